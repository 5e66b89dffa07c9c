"""Outputs that would destroy data are refused (issue 31): an export that would delete another
database's probe at a shared target, a foreign table emptied by a full export, an in-memory SQLite
target, and any output path that is the database's own file, WAL or lock."""

from __future__ import annotations

import shutil

import duckdb
import pytest
import sqlalchemy as sa

from n2vdb import api
from n2vdb.errors import N2vdbError, UsageError

from helpers import run_cli


def _counts(url: str) -> dict[str, int]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as con:
            tables = sa.inspect(con).get_table_names()
            return {t: con.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar() for t in tables}
    finally:
        engine.dispose()


@pytest.fixture
def other_db(tmp_path, ingested_db):
    """Another database whose probe 1 is a different probe (another key), as a second ingest elsewhere makes."""
    db = tmp_path / "b.duckdb"
    shutil.copy(ingested_db, db)
    con = duckdb.connect(str(db))
    con.execute("UPDATE probes SET probe_key = 'another-probe', layer = 'conv4' WHERE probe_id = 1")
    con.close()
    return db


def test_a_probe_of_another_database_never_replaces_the_one_at_the_target(ingested_db, other_db, tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    api.export(url, ingested_db, probe=1)
    before = _counts(url)
    with pytest.raises(N2vdbError, match="already holds another probe as probe 1; nothing was changed there"):
        api.export(url, other_db, probe=1)
    with pytest.raises(N2vdbError, match=r"holds probe\(s\) 1 that this database does not"):
        api.export(url, other_db)
    assert _counts(url) == before
    engine = sa.create_engine(url)
    with engine.connect() as con:
        assert con.execute(sa.text("SELECT layer FROM probes")).scalars().all() == ["conv5"]
    engine.dispose()
    assert api.export(url, ingested_db, probe=1) and _counts(url) == before  # the same probe: replaced
    assert api.export(url, ingested_db) and _counts(url) == before  # and a full export of its database


def test_a_full_export_refuses_a_table_that_is_not_ours(ingested_db, tmp_path):
    url = f"sqlite:///{tmp_path / 'app.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as con:
        con.execute(sa.text("CREATE TABLE images (id INTEGER, caption TEXT)"))
        con.execute(sa.text("INSERT INTO images VALUES (1, 'a cat')"))
    engine.dispose()
    result = run_cli("export", url, "--db", str(ingested_db))
    assert result.returncode == 1 and "has a table images that is not n2vdb's" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert _counts(url) == {"images": 1}


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_an_in_memory_sqlite_target_is_refused(ingested_db, url):
    with pytest.raises(UsageError, match="in-memory database"):
        api.export(url, ingested_db)


@pytest.mark.parametrize("name", ["db.csv", "db.parquet"])
def test_no_output_replaces_the_database_or_its_log(tmp_path, ingested_db, name, monkeypatch):
    db = tmp_path / name
    shutil.copy(ingested_db, db)
    before = db.read_bytes()
    monkeypatch.chdir(tmp_path)
    for args in (
        ["sql", "SELECT 1 AS x", "-o", name, "--db", name],
        ["sql", "SELECT 1 AS x", "-o", f"./{name}", "--db", str(db)],
        ["export", f"{name}.wal", "--db", name],
        ["export", f"sqlite:///{db}", "--db", name],
        ["report", "--out", f"{name}.wal", "--db", name],
        ["show", "filter", "3", "--out", f"{name}.writer.lock", "--db", name],
    ):
        result = run_cli(*args)
        assert result.returncode in (1, 2), (args, result.stderr)
        assert "is a file of the database" in result.stderr and "choose another path" in result.stderr, args
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / f"{name}.wal").exists()
    assert db.read_bytes() == before
    assert run_cli("sql", "SELECT count(*) AS n FROM probes", "--db", name).returncode == 0
