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
    exists = first(con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_migrations'"
    ))[0]
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


def check_readable(con: duckdb.DuckDBPyConnection) -> None:
    """A reader needs a database that this version understands and that is fully upgraded."""
    todo = pending(con)
    if todo:
        raise N2vdbError(
            f"database schema is {len(todo)} migration(s) behind this n2vdb: run `n2vdb db upgrade`"
        )


def upgrade(con: duckdb.DuckDBPyConnection, directory: Path | None = None) -> list[Migration]:
    """Apply pending migrations in order, each in its own transaction. Returns what was applied."""
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
