"""Connection layer and migration runner."""

import os
import shutil
import subprocess
import sys
import textwrap

import duckdb
import pytest

from n2vdb.errors import DatabaseBusy, N2vdbError
from n2vdb.resources import sql_dir
from n2vdb.store import connect, migrate, read_connection, write_connection

from helpers import run_cli

PUBLIC_TABLES = {
    "datasets",
    "images",
    "concepts",
    "image_concepts",
    "probes",
    "filters",
    "filter_concept_iou",
    "embeddings",
    "image_concept_scores",
    "activations",
    "schema_migrations",
}


def test_new_database_is_upgraded_with_public_schema(tmp_path):
    db = tmp_path / "n.duckdb"
    with write_connection(db) as con:
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        versions = con.execute("SELECT version, name, sha256 FROM schema_migrations").fetchall()
    assert PUBLIC_TABLES <= tables
    assert [(v, n) for v, n, _ in versions] == [(m.version, m.name) for m in migrate.available()]
    assert all(len(s) == 64 for _, _, s in versions)


def test_upgrade_is_idempotent(tmp_path):
    db = tmp_path / "n.duckdb"
    con = connect(db, read_only=False)
    assert migrate.upgrade(con)
    assert migrate.upgrade(con) == []
    con.close()


def test_scores_lose_their_key_and_keep_their_rows_on_upgrade(tmp_path):
    """migrations/0012 copies image_concept_scores into a table without the PRIMARY KEY whose index
    grew every write's memory with the dataset; the rows stay as they were."""
    before = tmp_path / "before"
    shutil.copytree(sql_dir("migrations"), before)
    (before / "0012_scores_without_key.sql").unlink()
    con = connect(tmp_path / "n.duckdb", read_only=False)
    migrate.upgrade(con, before)
    keys = "SELECT count(*) FROM duckdb_constraints() WHERE table_name = 'image_concept_scores' AND constraint_type = 'PRIMARY KEY'"
    assert con.execute(keys).fetchone()[0] == 1
    rows = [
        (1, i, c, m, i, i + c + 1, i / (i + c + 1), None)
        for i in range(3)
        for c in (5, 7)
        for m in ("best_filter", "segmentation")
    ] + [(2, 0, 5, "classification", None, None, None, 0.25)]
    con.executemany("INSERT INTO image_concept_scores VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    assert [m.name for m in migrate.upgrade(con)] == ["scores_without_key"]
    assert con.execute(keys).fetchone()[0] == 0
    columns = (
        "SELECT column_name, data_type, is_nullable FROM duckdb_columns() WHERE table_name = 'image_concept_scores'"
    )
    assert con.execute(columns).fetchall() == [
        ("probe_id", "INTEGER", False),
        ("image_id", "INTEGER", False),
        ("concept_id", "INTEGER", False),
        ("method", "VARCHAR", False),
        ("intersection", "BIGINT", True),
        ("union_", "BIGINT", True),
        ("iou", "DOUBLE", True),
        ("score", "DOUBLE", True),
    ]
    assert sorted(con.execute("SELECT * FROM image_concept_scores").fetchall()) == sorted(rows)
    con.close()


def test_edited_migration_is_refused(tmp_path):
    migrations = tmp_path / "migrations"
    shutil.copytree(sql_dir("migrations"), migrations)
    con = connect(tmp_path / "n.duckdb", read_only=False)
    migrate.upgrade(con, migrations)
    first = sorted(migrations.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited\n")
    with pytest.raises(N2vdbError, match="edited after it was applied"):
        migrate.upgrade(con, migrations)


def test_failed_migration_rolls_back(tmp_path):
    migrations = tmp_path / "migrations"
    shutil.copytree(sql_dir("migrations"), migrations)
    (migrations / "0999_broken.sql").write_text("CREATE TABLE half (x INTEGER); SELECT * FROM no_such_table;")
    con = connect(tmp_path / "n.duckdb", read_only=False)
    with pytest.raises(N2vdbError, match="0999_broken failed"):
        migrate.upgrade(con, migrations)
    tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert "half" not in tables and "datasets" in tables


def test_database_from_newer_schema_is_refused(tmp_path):
    db = tmp_path / "n.duckdb"
    with write_connection(db) as con:
        con.execute("INSERT INTO schema_migrations (version, name, sha256) VALUES (9999, 'future', 'x')")
    with pytest.raises(N2vdbError, match="newer than this n2vdb"):
        with read_connection(db):
            pass


def test_reader_needs_existing_database(tmp_path):
    with pytest.raises(N2vdbError, match="no database"):
        with read_connection(tmp_path / "absent.duckdb"):
            pass


def test_unwritable_location(tmp_path):
    with pytest.raises(N2vdbError, match="does not exist"):
        connect(tmp_path / "no" / "dir" / "x.duckdb", read_only=False)


def test_lock_conflict_names_the_holder(tmp_path):
    db = tmp_path / "n.duckdb"
    with write_connection(db):
        pass
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import duckdb, sys, time
        con = duckdb.connect({str(db)!r})
        print("ready", flush=True)
        time.sleep(30)
    """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(DatabaseBusy, match=f"PID {holder.pid}"):
            connect(db, read_only=False, wait_s=0.5)  # the wait is N2VDB_BUSY_TIMEOUT's to test, not this
        result = subprocess.run(
            [sys.executable, "-m", "n2vdb", "probes", "--db", str(db)],
            capture_output=True,
            text=True,
            env={**os.environ, "N2VDB_BUSY_TIMEOUT": "0.5"},
        )
        assert result.returncode == 1
        assert "database busy" in result.stderr and f"PID {holder.pid}" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        holder.kill()
        holder.wait()


def test_db_status_and_upgrade_cli(tmp_path):
    db = str(tmp_path / "n.duckdb")
    run = lambda *a: run_cli(*a, "--db", db)  # noqa: E731
    status = run("db", "status", "-f", "csv")
    assert status.returncode == 0 and "1,init,False" in status.stdout
    upgrade = run("db", "upgrade")
    assert upgrade.returncode == 0 and "0001_init" in upgrade.stderr
    assert "1,init,True" in run("db", "status", "-f", "csv").stdout
    assert "up to date" in run("db", "upgrade").stderr


def test_probes_record_the_software_they_ran_with(ingested_db):
    import json

    import numpy
    import torch
    import torchvision

    from n2vdb import __version__

    con = duckdb.connect(str(ingested_db), read_only=True)
    (provenance,) = con.execute("SELECT provenance FROM probes ORDER BY probe_id LIMIT 1").fetchone()
    con.close()
    recorded = json.loads(provenance)
    assert recorded["n2vdb"] == __version__ and recorded["duckdb"] == duckdb.__version__
    assert recorded["torch"] == torch.__version__.split("+")[0] or recorded["torch"] == torch.__version__
    assert recorded["torchvision"].split("+")[0] == torchvision.__version__.split("+")[0]
    assert recorded["numpy"] == numpy.__version__
