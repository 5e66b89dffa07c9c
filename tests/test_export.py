"""`n2vdb export`: Parquet directories, SQLite and a real PostgreSQL server, checked against DuckDB."""

import glob
import json
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from n2vdb import api
from n2vdb.errors import N2vdbError, NotFound, UsageError
from n2vdb.export import PUBLIC_TABLES

from helpers import run_cli

REPO = Path(__file__).resolve().parents[1]


def source_rows(db: Path, table: str, where: str = "") -> list[dict]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.sql(f"SELECT * FROM {table} {where}").to_arrow_table().to_pylist()


def source_counts(db: Path) -> dict[str, int]:
    with duckdb.connect(str(db), read_only=True) as con:
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in PUBLIC_TABLES}


def keyed(rows: list[dict], key: tuple[str, ...]) -> dict[tuple, dict]:
    return {tuple(r[k] for k in key): r for r in rows}


KEYS = {
    "datasets": ("dataset_id",),
    "images": ("dataset_id", "image_id"),
    "concepts": ("dataset_id", "concept_id"),
    "image_concepts": ("dataset_id", "image_id", "concept_id"),
    "probes": ("probe_id",),
    "activations": ("probe_id", "image_id"),
    "filters": ("probe_id", "filter"),
    "filter_concept_iou": ("probe_id", "filter", "concept_id", "split"),
    "embeddings": ("probe_id", "concept_id", "kind", "n_filters"),
    "image_concept_scores": ("probe_id", "image_id", "concept_id", "method"),
}


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def assert_same_rows(expected: list[dict], got: list[dict], table: str, decode=lambda column, v: v):
    assert len(got) == len(expected), table
    want = keyed(expected, KEYS[table])
    have = keyed(got, KEYS[table])
    assert set(want) == set(have), table
    # every row of the small tables, a spread of rows of the large ones
    sample = sorted(want)[:: max(1, len(want) // 200)]
    for key in sample:
        for column, value in want[key].items():
            stored = decode(column, have[key][column])
            assert same(value, stored), (table, key, column, value, stored)


def test_parquet_directory_is_readable_by_duckdb_and_pyarrow(ingested_db, tmp_path):
    out = tmp_path / "parquet"
    counts = api.export(out, ingested_db)
    assert counts == source_counts(ingested_db)
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{t}.parquet" for t in PUBLIC_TABLES] + ["schema.sql"])
    for table in PUBLIC_TABLES:
        expected = source_rows(ingested_db, table)
        assert_same_rows(expected, pq.read_table(out / f"{table}.parquet").to_pylist(), table)
        with duckdb.connect() as con:
            assert con.execute(f"SELECT count(*) FROM read_parquet('{out / table}.parquet')").fetchall()[0][0] == len(
                expected
            )
    with duckdb.connect() as con:  # schema.sql recreates the tables, and the files load into them
        con.execute((out / "schema.sql").read_text())
        for table in PUBLIC_TABLES:
            con.execute(f"INSERT INTO {table} SELECT * FROM read_parquet('{out / table}.parquet')")
        assert con.execute("SELECT count(*) FROM filter_concept_iou").fetchall()[0][0] == counts["filter_concept_iou"]


def test_parquet_of_one_probe_and_errors(ingested_db, tmp_path):
    counts = api.export(tmp_path / "one", ingested_db, probe=1)
    assert counts == source_counts(ingested_db)  # the fixture holds one probe and its dataset
    # With a second probe beside it, --probe picks each one's rows and no other's.
    two = tmp_path / "two.duckdb"
    shutil.copy(ingested_db, two)
    con = duckdb.connect(str(two))
    for table in ("probes", "filters", "filter_concept_iou", "embeddings"):
        con.execute(f"CREATE TEMP TABLE copied AS SELECT * FROM {table} WHERE probe_id = 1")
        con.execute("UPDATE copied SET probe_id = 2")
        if table == "probes":
            con.execute("UPDATE copied SET probe_key = 'second', layer = 'conv4'")
        else:  # rows of the second probe that the first lacks, so a mix-up shows in the counts
            con.execute("DELETE FROM copied WHERE rowid % 2 = 0")
        con.execute(f"INSERT INTO {table} SELECT * FROM copied")
        con.execute("DROP TABLE copied")
    per_probe = {
        p: {t: con.execute(f"SELECT count(*) FROM {t} WHERE probe_id = ?", [p]).fetchone()[0] for t in ("filters",)}
        for p in (1, 2)
    }
    con.close()
    for probe in (1, 2):
        api.export(tmp_path / f"p{probe}", two, probe=probe)
        probes = pq.read_table(tmp_path / f"p{probe}" / "probes.parquet").to_pylist()
        assert [p["probe_id"] for p in probes] == [probe]
        for table in ("filters", "filter_concept_iou", "embeddings", "activations"):
            ids = set(pq.read_table(tmp_path / f"p{probe}" / f"{table}.parquet").column("probe_id").to_pylist())
            assert ids <= {probe}, table
        assert pq.read_table(tmp_path / f"p{probe}" / "filters.parquet").num_rows == per_probe[probe]["filters"]
    assert per_probe[1]["filters"] != per_probe[2]["filters"]
    with pytest.raises(NotFound, match="no probe 99"):
        api.export(tmp_path / "none", ingested_db, probe=99)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        api.export(tmp_path / "file", ingested_db)
    with pytest.raises(UsageError, match="cannot use"):
        api.export("nosuchdialect://x/y", ingested_db)


JSON_COLUMNS = ("settings", "provenance")  # the probes columns DuckDB keeps as JSON


def _decode_sqlite(column: str, value):
    if column in ("scales", "pooled", "weights", "categories") and isinstance(value, str) and value[:1] == "[":
        return json.loads(value)
    return value


def _read_all(url: str, table: str) -> list[dict]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as con:
            meta = sa.MetaData()
            t = sa.Table(table, meta, autoload_with=con)
            return [dict(r._mapping) for r in con.execute(sa.select(t))]
    finally:
        engine.dispose()


def _counts(url: str) -> dict[str, int]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as con:
            return {t: con.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar() for t in PUBLIC_TABLES}
    finally:
        engine.dispose()


def test_sqlite_export_matches_duckdb_and_is_idempotent_per_probe(ingested_db, tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    counts = api.export(url, ingested_db)
    assert counts == source_counts(ingested_db) == _counts(url)
    for table in PUBLIC_TABLES:
        got = _read_all(url, table)
        if table == "probes":
            expected = source_rows(ingested_db, table)
            for row in expected + got:
                for column in JSON_COLUMNS:
                    row[column] = json.loads(row[column]) if isinstance(row[column], str) else row[column]
            assert_same_rows(expected, got, table)
            continue
        assert_same_rows(source_rows(ingested_db, table), got, table, _decode_sqlite)
    again = api.export(url, ingested_db, probe=1)
    assert again == counts and _counts(url) == counts  # replaced, not doubled
    api.export(url, ingested_db)
    assert _counts(url) == counts


def test_a_failed_export_changes_nothing_at_the_target(ingested_db, tmp_path):
    target = tmp_path / "t.db"
    url = f"sqlite:///{target}"
    api.export(url, ingested_db)
    before = _counts(url)
    engine = sa.create_engine(url)
    with engine.begin() as con:  # the target refuses one table's rows, after others were replaced
        con.execute(
            sa.text(
                "CREATE TRIGGER refuse BEFORE INSERT ON filter_concept_iou "
                "BEGIN SELECT RAISE(ABORT, 'refused by test'); END"
            )
        )
    engine.dispose()
    with pytest.raises(N2vdbError, match="nothing was changed there: refused by test"):
        api.export(url, ingested_db)
    assert _counts(url) == before


# -- a real PostgreSQL server --------------------------------------------------------------------


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    pytest.fail(
        "PostgreSQL's server binaries are needed for this test: apt-get install postgresql-15 (.ci/run does it)"
    )


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL cluster on a unix socket in a temporary directory, run as a non-root user."""
    bindir = _postgres_bin()
    root = Path(tempfile.mkdtemp(prefix="n2vdb-pg-"))
    as_user: list[str] = []
    user = os.environ.get("USER") or "postgres"
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        user = "nobody"
        shutil.chown(root, user)
        as_user = ["runuser", "-u", user, "--"]
    data = root / "data"
    log = root / "log"
    subprocess.run(
        as_user + [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", user, "--no-sync"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        as_user
        + [
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(log),
            "-w",
            "-t",
            "60",
            "-o",
            f"-k {root} -c listen_addresses='' -c fsync=off",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://{user}@/postgres?host={root}"
    finally:
        subprocess.run(
            as_user + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)


def _decode_postgres(column: str, value):
    if isinstance(value, memoryview):
        return bytes(value)
    if column in ("scales", "pooled", "weights") and isinstance(value, list):  # REAL[]: back to float32
        return [float(np.float32(v)) for v in value]
    return value


def test_postgres_export_uses_arrays_and_jsonb_and_matches_duckdb(ingested_db, postgres_url):
    counts = api.export(postgres_url, ingested_db)
    driver_url = postgres_url.replace("postgresql://", "postgresql+psycopg://")
    assert counts == source_counts(ingested_db) == _counts(driver_url)
    engine = sa.create_engine(driver_url)
    with engine.connect() as con:
        types = dict(
            con.execute(
                sa.text(
                    "SELECT table_name || '.' || column_name, udt_name FROM information_schema.columns "
                    "WHERE table_schema = 'public'"
                )
            ).fetchall()
        )
        weights = con.execute(
            sa.text("SELECT array_length(weights, 1), weights[1] FROM embeddings ORDER BY concept_id, kind LIMIT 1")
        ).one()
    engine.dispose()
    assert types["embeddings.weights"] == "_float4" and types["concepts.categories"] == "_text"
    assert types["probes.settings"] == "jsonb" and types["activations.codes"] == "bytea"
    assert types["filter_concept_iou.iou"] == "float8" and types["filter_concept_iou.union_"] == "int8"
    first = source_rows(ingested_db, "embeddings", "ORDER BY concept_id, kind LIMIT 1")[0]
    # psycopg reads REAL as its shortest decimal text: equal to DuckDB's FLOAT once both are float32 again
    assert weights[0] == len(first["weights"]) and np.float32(weights[1]) == np.float32(first["weights"][0])
    for table in PUBLIC_TABLES:
        got = _read_all(driver_url, table)
        expected = source_rows(ingested_db, table)
        if table == "probes":
            for row in expected:
                for column in JSON_COLUMNS:
                    row[column] = json.loads(row[column])
        assert_same_rows(expected, got, table, _decode_postgres)
    api.export(postgres_url, ingested_db, probe=1)
    assert _counts(driver_url) == counts


def test_cli_export(ingested_db, tmp_path):
    env = {"N2VDB_QUIET": "0"}
    done = run_cli("export", tmp_path / "out", "--db", ingested_db, env=env)
    assert done.returncode == 0, done.stderr
    assert f"exported {sum(source_counts(ingested_db).values())} rows in 10 tables" in done.stderr
    bad = run_cli("export", "postgresql://nobody@/x?host=/nonexistent", "--db", ingested_db, env=env)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "nothing was changed" in bad.stderr
