"""Opening the database: one writer, many read-only readers, one-line lock errors."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb

from n2vdb.errors import DatabaseBusy, N2vdbError, UsageError

DEFAULT_DB = "n2v.duckdb"
_LOCK_HOLDER = re.compile(r"held in (?P<prog>\S+) \(PID (?P<pid>\d+)\)")


def db_path(path: str | os.PathLike | None = None) -> Path:
    """--db wins, then N2VDB_DB, then ./n2v.duckdb."""
    return Path(path or os.environ.get("N2VDB_DB") or DEFAULT_DB)


def busy_wait_s() -> float:
    """How long an open waits for another process's write lock (an ingest holds it in short sessions)."""
    text = os.environ.get("N2VDB_BUSY_TIMEOUT", "5")
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):  # NaN fails too: it would make the wait endless
        raise UsageError(f"N2VDB_BUSY_TIMEOUT={text!r}: expected a number of seconds, e.g. 5")
    return seconds


def connect(path: str | os.PathLike | None = None, *, read_only: bool,
            wait_s: float | None = None) -> duckdb.DuckDBPyConnection:
    """Open the database, retrying while another process holds the lock for up to wait_s seconds,
    and translating lock conflicts and missing files into N2vdbErrors."""
    deadline = time.monotonic() + (busy_wait_s() if wait_s is None else wait_s)
    delay = 0.02
    while True:
        try:
            return _connect_once(path, read_only)
        except DatabaseBusy:
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def _connect_once(path: str | os.PathLike | None, read_only: bool) -> duckdb.DuckDBPyConnection:
    target = db_path(path)
    if read_only and not target.exists():
        raise N2vdbError(
            f"no database at {target}: create one with `n2vdb data synth` / `n2vdb ingest`, or pass --db"
        )
    if not read_only and not target.parent.exists():
        raise N2vdbError(f"cannot create database {target}: directory {target.parent} does not exist")
    try:
        con = duckdb.connect(str(target), read_only=read_only)
    except duckdb.IOException as exc:
        message = str(exc)
        holder = _LOCK_HOLDER.search(message)
        if holder or "lock" in message.lower():
            who = f"PID {holder['pid']} ({holder['prog']})" if holder else "another process"
            raise DatabaseBusy(
                f"database busy: {target} is locked by {who}; wait for it to finish or use another --db"
            ) from None
        raise N2vdbError(f"cannot open database {target}: {message.splitlines()[0]}") from None
    except duckdb.Error as exc:
        raise N2vdbError(f"cannot open database {target}: {str(exc).splitlines()[0]}") from None
    # DuckDB draws its own progress bar on stdout, which would corrupt piped output.
    con.execute("SET enable_progress_bar = false")
    # DuckDB's buffer cache would otherwise grow towards 80% of RAM as a large probe is read.
    con.execute("SET memory_limit = ?", [os.environ.get("N2VDB_DUCKDB_MEMORY", "1GB")])
    return con


@contextlib.contextmanager
def read_connection(path: str | os.PathLike | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    con = connect(path, read_only=True)
    try:
        from n2vdb.store.migrate import check_readable

        check_readable(con)
        yield con
    finally:
        con.close()


@contextlib.contextmanager
def write_connection(path: str | os.PathLike | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-write connection with every migration applied (a new database is created and upgraded)."""
    con = connect(path, read_only=False)
    try:
        from n2vdb.store.migrate import upgrade

        upgrade(con)
        yield con
    finally:
        con.close()


def first(result: duckdb.DuckDBPyConnection):
    """The first row of a result, or None, leaving no unfinished result behind (DuckDB 2.0 refuses
    new statements on a connection whose last result was not read to the end)."""
    rows = result.fetchall()
    return rows[0] if rows else None


@contextlib.contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """BEGIN ... COMMIT, rolled back on any error. A failed COMMIT (a full disk) has already rolled
    back: the second rollback's complaint must not hide the real error."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
        con.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(duckdb.Error):
            con.execute("ROLLBACK")
        raise
