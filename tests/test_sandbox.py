"""The SQL sandbox (docs/sandbox.md): every escape is attempted, refused, and leaves every file as it was.

Each attack runs through the library's front door (api.sql, api.query) and a few through the CLI.
After each one the database file is byte-identical, a neighbouring DuckDB file is byte-identical,
and no new file exists in the directory.
"""

import hashlib
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from n2vdb import api
from n2vdb.errors import N2vdbError, QueryError, UsageError
from n2vdb.store import read_connection, sandbox
from n2vdb.store.sessions import Store

from helpers import run_cli


@pytest.fixture
def world(tmp_path, edge_broden):
    """A registered n2vdb database, a second DuckDB database beside it, and their checksums."""
    db = tmp_path / "n2v.duckdb"
    api.add_dataset(edge_broden[0], "edge", db)
    other = tmp_path / "other.duckdb"
    con = duckdb.connect(str(other))
    con.execute("CREATE TABLE precious AS SELECT 42 AS answer")
    con.close()
    return tmp_path, db, other


def snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.name.endswith(".writer.lock")
    }


ESCAPES = [
    # the attack: swap the default database, then re-attach this one writable
    "ATTACH '{dir}/scratch.duckdb' AS s (READ_WRITE); USE s; DETACH n2v; "
    "ATTACH '{db}' AS w (READ_WRITE); DROP TABLE w.concepts",
    "ATTACH '{other}' AS o (READ_WRITE); DROP TABLE o.precious",
    "ATTACH '{dir}/new.duckdb' AS n (READ_WRITE)",
    "ATTACH ':memory:' AS m; USE m; DETACH n2v; ATTACH '{db}' AS w (READ_WRITE)",
    "COPY (SELECT 'x') TO '{other}' (FORMAT csv)",
    "COPY (SELECT 'x') TO '{dir}/out.csv' (FORMAT csv)",
    "COPY concepts TO '{db}.wal' (FORMAT csv)",
    "EXPORT DATABASE '{dir}/exported'",
    "INSTALL httpfs",
    "LOAD httpfs",
    "LOAD '{dir}/evil.duckdb_extension'",
    "SET enable_external_access = true",
    "SET disabled_filesystems = ''",
    "SET lock_configuration = false",
    "RESET lock_configuration",
    "SET temp_directory = '{dir}'",
    "SET profile_output = '{dir}/profile.json'",
    "PRAGMA enable_profiling = 'json'; SET profiling_output = '{dir}/p.json'; SELECT 1",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM glob('{dir}/*')",
    "SELECT * FROM read_parquet('{dir}/data.parquet')",
    "CREATE PERSISTENT SECRET s (TYPE s3, KEY_ID 'a', SECRET 'b')",
    "DROP TABLE concepts",
    "DELETE FROM images",
    "CREATE TABLE mine AS SELECT 1",
    "UPDATE datasets SET name = 'x'",
    "SELECT * FROM python_table",  # a Python object of the caller's, by replacement scan
]


@pytest.mark.parametrize("attack", ESCAPES)
def test_read_only_sql_cannot_change_or_reach_any_file(world, attack):
    directory, db, other = world
    (directory / "evil.duckdb_extension").write_bytes(b"\x7fELF not really")
    pq.write_table(pa.table({"a": [1]}), directory / "data.parquet")
    python_table = pa.table({"secret": [1]})  # noqa: F841 - what a replacement scan would find
    before = snapshot(directory)
    with pytest.raises(N2vdbError):
        api.sql(attack.format(dir=directory, db=db, other=other), db)
    assert snapshot(directory) == before


@pytest.mark.parametrize(
    "statement",
    ["CHECKPOINT", "FORCE CHECKPOINT", "VACUUM", "CREATE TEMP TABLE t AS SELECT 1", "BEGIN; SELECT 1; COMMIT"],
)
def test_statements_the_sandbox_allows_change_no_file(world, statement):
    directory, db, _ = world
    before = snapshot(directory)
    api.sql(statement, db)
    assert snapshot(directory) == before


def test_the_configuration_is_locked_and_says_so(world):
    _, db, _ = world
    with read_connection(db) as con:
        settings = dict(
            con.execute(
                "SELECT name, value FROM duckdb_settings() WHERE name IN"
                " ('enable_external_access', 'lock_configuration', 'autoload_known_extensions',"
                "  'autoinstall_known_extensions', 'temp_directory')"
            ).fetchall()
        )
        # DuckDB does not report disabled_filesystems; its refusal shows it is set
        with pytest.raises(duckdb.Error, match="LocalFileSystem has been disabled"):
            con.execute(f"ATTACH '{db}' AS again")
    assert settings == {
        "enable_external_access": "false",
        "lock_configuration": "true",
        "autoload_known_extensions": "false",
        "autoinstall_known_extensions": "false",
        "temp_directory": "",
    }
    with pytest.raises(QueryError, match="cannot be changed from SQL"):
        api.sql("SET enable_external_access = true", db)
    with pytest.raises(QueryError, match="--read NAME=PATH"):
        api.sql("COPY (SELECT 1) TO 'x.csv'", db)
    with pytest.raises(QueryError, match="add --write"):
        api.sql("DELETE FROM images", db)


def test_every_read_only_connection_is_sealed(world):
    """Named queries, the ingest's computing phases and the shell all read through connect(read_only=True)."""
    directory, db, other = world
    before = snapshot(directory)
    with Store(db).reading() as con:
        with pytest.raises(duckdb.Error):
            con.execute(f"COPY (SELECT 1) TO '{directory}/x.csv'")
    with sandbox(db) as con:
        with pytest.raises(duckdb.Error):
            con.execute(f"ATTACH '{other}' AS o")
    assert snapshot(directory) == before


def test_named_queries_run_in_the_sandbox(world, monkeypatch, tmp_path):
    """A query file that tries to write is refused like ad-hoc SQL."""
    from n2vdb import queries

    directory, db, _ = world
    qdir = tmp_path / "q"
    qdir.mkdir()
    (qdir / "leak.sql").write_text(
        f"-- name: leak\n-- description: tries to write\nCOPY (SELECT 1) TO '{directory}/leak.csv'\n"
    )
    real_get = queries.get
    monkeypatch.setattr(queries, "get", lambda name, directory=None: real_get(name, qdir))
    before = snapshot(directory)
    with pytest.raises(QueryError):
        api.query("leak", db)
    assert snapshot(directory) == before


def test_write_is_one_transaction_all_or_nothing(world):
    _, db, _ = world
    count = api.sql("SELECT count(*) AS n FROM images", db).column("n")[0].as_py()
    assert count > 0
    with pytest.raises(QueryError, match="no_such_table"):
        api.sql("DELETE FROM images; SELECT * FROM no_such_table", db, write=True)
    assert api.sql("SELECT count(*) AS n FROM images", db).column("n")[0].as_py() == count
    api.sql("CREATE TABLE notes AS SELECT 1 AS x; INSERT INTO notes VALUES (2)", db, write=True)
    assert api.sql("SELECT sum(x) AS s FROM notes", db).column("s")[0].as_py() == 3


@pytest.mark.parametrize(
    "attack,message",
    [
        ("BEGIN; DELETE FROM images; COMMIT", "one transaction"),
        ("DELETE FROM images; COMMIT; SELECT * FROM nope", "one transaction"),
        ("ATTACH ':memory:' AS m; USE m; DETACH n2v", "ATTACH is refused"),
        ("USE memory", "USE is refused"),
        ("DETACH n2v", "DETACH is refused"),
        ("DELETE FROM images; COPY (SELECT 1) TO '{dir}/x.csv'", "opens no files"),
        ("DELETE FROM images; ATTACH '{other}' AS o (READ_WRITE)", "ATTACH is refused"),
        ("DELETE FROM images; INSTALL httpfs", "opens no files"),
        ("DELETE FROM images; SET enable_external_access = true", "cannot be changed"),
    ],
)
def test_write_mode_changes_this_database_only_and_refuses_escapes(world, attack, message):
    directory, db, other = world
    before = snapshot(directory)
    with pytest.raises(N2vdbError, match=message):
        api.sql(attack.format(dir=directory, other=other), db, write=True)
    assert snapshot(directory) == before


def test_read_and_output_are_opened_by_n2vdb_only(world):
    directory, db, other = world
    shards = directory / "shards"
    (shards / "a").mkdir(parents=True)
    pq.write_table(pa.table({"image_id": [0, 1]}), shards / "a" / "part-1.parquet")
    pq.write_table(pa.table({"image_id": [2]}), shards / "part-2.parquet")
    (directory / "extra.csv").write_text("image_id,tag\n0,keep\n2,keep\n")
    result = api.sql("SELECT count(*) AS n, sum(image_id) AS s FROM parts", db, read={"parts": shards})
    assert result.to_pylist() == [{"n": 3, "s": 3}]
    globbed = api.sql("SELECT count(*) AS n FROM parts", db, read={"parts": f"{shards}/**/*.parquet"})
    assert globbed.to_pylist() == [{"n": 3}]
    joined = api.sql(
        "SELECT i.image_id, e.tag FROM images i JOIN extra e USING (image_id) ORDER BY 1",
        db,
        read={"extra": directory / "extra.csv"},
    )
    assert joined.to_pylist() == [{"image_id": 0, "tag": "keep"}, {"image_id": 2, "tag": "keep"}]
    # the views do not open the file system to the SQL
    with pytest.raises(QueryError):
        api.sql(f"SELECT * FROM read_csv('{directory}/extra.csv')", db, read={"extra": directory / "extra.csv"})
    target = directory / "result.parquet"
    assert api.sql("SELECT image_id, split FROM images ORDER BY 1", db, output=target) is None
    assert pq.read_table(target).column("image_id").to_pylist() == [0, 1, 2, 3]
    api.sql("SELECT image_id FROM images ORDER BY 1", db, output=directory / "result.csv")
    assert (directory / "result.csv").read_text().splitlines()[0] == '"image_id"'


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"read": {"1bad": "x.parquet"}}, "view name"),
        ({"read": {"v": "/nonexistent/*.parquet"}}, "no such file"),
        ({"read": {"v": "{dir}/n2v.duckdb"}}, "Parquet"),
        ({"output": "{dir}"}, "name a .parquet or .csv file"),
        ({"output": "{dir}/sub"}, "name a .parquet or .csv file"),
        ({"output": "{dir}/missing/x.csv"}, "does not exist"),
    ],
)
def test_file_options_refuse_nonsense(world, kwargs, message):
    directory, db, _ = world
    kwargs = {
        k: (
            {n: v.format(dir=directory) for n, v in val.items()} if isinstance(val, dict) else val.format(dir=directory)
        )
        for k, val in kwargs.items()
    }
    before = snapshot(directory)
    with pytest.raises(UsageError, match=message):
        api.sql("SELECT 1", db, **kwargs)
    assert snapshot(directory) == before


def cli(*args):
    return run_cli(*args)


def test_cli_refusals_are_one_line(world):
    directory, db, other = world
    before = snapshot(directory)
    for args, code in [
        (["sql", f"ATTACH '{other}' AS o (READ_WRITE); DROP TABLE o.precious"], 1),
        (["sql", "--write", "BEGIN; DELETE FROM images; COMMIT"], 2),
        (["sql", "--read", "nonsense", "SELECT 1"], 2),
    ]:
        result = cli(*args, "--db", str(db))
        assert result.returncode == code, result.stderr
        assert result.stderr.startswith("Error:") and len(result.stderr.strip().splitlines()) == 1
        assert "Traceback" not in result.stderr
    assert snapshot(directory) == before
    written = cli("sql", "SELECT name FROM concepts ORDER BY 1", "-o", str(directory / "names.csv"), "--db", str(db))
    assert written.returncode == 0 and written.stdout == ""
    assert "dog" in (directory / "names.csv").read_text()


def test_connections_of_one_process_share_one_sealed_instance(world):
    """DuckDB shares one instance (and its settings) among a process's connections to a file: a second
    reader joins the sealed one, a plain duckdb.connect is sealed with it, and one opened with other
    settings is named in one line."""
    directory, db, _ = world
    with read_connection(db) as outer:
        with read_connection(db) as inner:
            assert inner.execute("SELECT count(*) FROM images").fetchone()[0] == 4
            with pytest.raises(duckdb.Error, match="disabled"):
                inner.execute(f"COPY (SELECT 1) TO '{directory}/x.csv'")
        assert outer.execute("SELECT count(*) FROM concepts").fetchone()[0] > 0
    own = duckdb.connect(str(db), read_only=True)  # a notebook's own connection shares the instance
    try:
        assert api.sql("SELECT count(*) AS n FROM images", db).to_pylist() == [{"n": 4}]
        with pytest.raises(duckdb.Error, match="disabled"):  # ... and is sealed with it
            own.execute(f"COPY (SELECT 1) TO '{directory}/x.csv'")
    finally:
        own.close()
    configured = duckdb.connect(str(db), read_only=True, config={"threads": 1})
    try:
        with pytest.raises(N2vdbError, match="a duckdb.connect of your own"):
            api.sql("SELECT 1", db)
    finally:
        configured.close()
    assert not (directory / "x.csv").exists()
