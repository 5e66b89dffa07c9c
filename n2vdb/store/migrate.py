"""Numbered SQL migrations (migrations/NNNN_name.sql), each applied once in its own transaction."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import duckdb

from n2vdb.errors import N2vdbError
from n2vdb.resources import sql_dir
from n2vdb.store.connection import first, transaction

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available(directory: Path | None = None) -> list[Migration]:
    directory = directory or sql_dir("migrations")
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise N2vdbError(f"migration file {path.name} is not named NNNN_name.sql")
        found.append(Migration(int(match[1]), match[2], path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise N2vdbError(f"two migration files share a version number in {directory}")
    return found


def applied(con: duckdb.DuckDBPyConnection) -> dict[int, tuple[str, str]]:
    """version -> (name, sha256) of what this database has applied; empty for a new database."""
    exists = first(
        con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_migrations'")
    )[0]
    if not exists:
        return {}
    return {v: (n, s) for v, n, s in con.execute("SELECT version, name, sha256 FROM schema_migrations").fetchall()}


def _check(done: dict[int, tuple[str, str]], known: list[Migration]) -> list[Migration]:
    """Refuse edited or unknown applied migrations; return those still pending."""
    by_version = {m.version: m for m in known}
    for version, (name, sha) in sorted(done.items()):
        mine = by_version.get(version)
        if mine is None:
            raise N2vdbError(
                f"database has schema migration {version:04d}_{name}, newer than this n2vdb knows: upgrade n2vdb"
            )
        if mine.sha256 != sha:
            raise N2vdbError(
                f"migration {version:04d}_{name}.sql was edited after it was applied; "
                "restore it and add a new migration instead"
            )
    return [m for m in known if m.version not in done]


def pending(con: duckdb.DuckDBPyConnection, directory: Path | None = None) -> list[Migration]:
    return _check(applied(con), available(directory))


def foreign_objects(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Tables, views and sequences of a database that n2vdb has never upgraded (empty for a new file)."""
    if applied(con):
        return []
    names = [
        n
        for (n,) in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_catalog = current_database()"
            " UNION ALL SELECT sequence_name FROM duckdb_sequences()"
            " WHERE database_name = current_database() AND NOT temporary ORDER BY 1"
        ).fetchall()
    ]
    return [n for n in names if n != "schema_migrations"]


def _not_ours(names: list[str]) -> str:
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"this DuckDB file is not an n2vdb database (it holds {shown})"


def check_readable(con: duckdb.DuckDBPyConnection) -> None:
    """A reader needs a database that this version understands and that is fully upgraded."""
    foreign = foreign_objects(con)
    if foreign:
        raise N2vdbError(f"{_not_ours(foreign)}: pass the --db of an n2vdb database")
    todo = pending(con)
    if todo:
        raise N2vdbError(f"database schema is {len(todo)} migration(s) behind this n2vdb: run `n2vdb db upgrade`")


def upgrade(con: duckdb.DuckDBPyConnection, directory: Path | None = None, adopt: bool = False) -> list[Migration]:
    """Apply pending migrations in order, each in its own transaction. Returns what was applied.

    n2vdb's schema goes only into an empty file or one n2vdb made: a DuckDB file holding other tables
    is refused unless ADOPT (`n2vdb db upgrade --adopt`) says to add n2vdb's tables beside them."""
    foreign = foreign_objects(con)
    if foreign and not adopt:
        raise N2vdbError(
            f"{_not_ours(foreign)}; n2vdb will not add its tables to it: use another --db, or "
            "run `n2vdb db upgrade --adopt` to add them beside the others"
        )
    con.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name VARCHAR NOT NULL, sha256 VARCHAR NOT NULL,"
        " applied_at TIMESTAMP NOT NULL DEFAULT current_timestamp)"
    )
    todo = pending(con, directory)
    for migration in todo:
        try:
            with transaction(con):
                con.execute(migration.sql)
                con.execute(
                    "INSERT INTO schema_migrations (version, name, sha256) VALUES (?, ?, ?)",
                    [migration.version, migration.name, migration.sha256],
                )
        except duckdb.Error as exc:
            raise N2vdbError(f"migration {migration.version:04d}_{migration.name} failed: {exc}") from None
    return todo


def status(con: duckdb.DuckDBPyConnection) -> list[dict]:
    done = applied(con)
    rows = []
    for m in available():
        rows.append({"version": m.version, "name": m.name, "applied": m.version in done})
    return rows
