"""Opening an n2vdb database: a connection (n2vdb.store.connection) whose schema is checked for
readers and upgraded for writers (n2vdb.store.migrate). Kept apart from both so that neither imports
the other back."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import duckdb

from n2vdb.store.connection import connect, seal
from n2vdb.store.migrate import check_readable, upgrade


@contextlib.contextmanager
def read_connection(
    path: str | os.PathLike | None = None, wait_s: float | None = None
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A sealed read-only connection to a fully upgraded n2vdb database; WAIT_S: how long to wait for a
    writer's lock (N2VDB_BUSY_TIMEOUT when None)."""
    con = connect(path, read_only=True, wait_s=wait_s)
    try:
        check_readable(con)
        yield con
    finally:
        con.close()


@contextlib.contextmanager
def write_connection(
    path: str | os.PathLike | None = None, wait_s: float | None = None
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-write connection with every migration applied (a new database is created and upgraded)."""
    con = connect(path, read_only=False, wait_s=wait_s)
    try:
        upgrade(con)
        yield con
    finally:
        con.close()


@contextlib.contextmanager
def sandbox(path: str | os.PathLike | None = None, *, write: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """The connection user SQL runs on (`n2vdb sql`, named queries, the shell): read-only, or with
    write=True able to change this database (migrated first) and reach nothing else."""
    if not write:
        with read_connection(path) as con:
            yield con
        return
    with write_connection(path) as con:
        seal(con, file_system=False)
        yield con
