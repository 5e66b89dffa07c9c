"""Letting readers in while an ingest runs.

DuckDB lets one process write a file, or many read it, never both. An ingest therefore holds the
write lock only in short sessions: its long computing phases (thresholds, IoU, training) read
through a read-only connection, which other readers share, and it takes the write lock only to
save each stage's rows; extraction writes batches in sessions of at most `hold_s` seconds. A query
that arrives while a session is open waits for it (N2VDB_BUSY_TIMEOUT, 5 s by default) and then
gets its answer, or a one-line "database busy" naming the holder. Two ingests never interleave:
a lock file beside the database admits one writer process at a time.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb

from n2vdb.errors import DatabaseBusy
from n2vdb.store.connection import connect, db_path

_WRITING: set[Path] = set()  # databases this process holds the writer lock of (the lock is re-entrant)


class Store:
    """Database access in phases: `reading()` shares the file, `writing()` holds it briefly."""

    def __init__(self, path: str | os.PathLike | None = None, writer_wait_s: float = 120.0):
        self.path = db_path(path)
        self.writer_wait_s = writer_wait_s

    @contextlib.contextmanager
    def _open(self, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        memory_env = "N2VDB_DUCKDB_INGEST_MEMORY" if read_only else None  # scans: a small cache will do
        con = connect(self.path, read_only=read_only, wait_s=self.writer_wait_s, memory_env=memory_env)
        try:
            yield con
        finally:
            con.close()

    def reading(self) -> contextlib.AbstractContextManager[duckdb.DuckDBPyConnection]:
        return self._open(read_only=True)

    def writing(self) -> contextlib.AbstractContextManager[duckdb.DuckDBPyConnection]:
        return self._open(read_only=False)

    @contextlib.contextmanager
    def sessions(self, hold_s: float = 2.0) -> Iterator[SessionWriter]:
        writer = SessionWriter(self, hold_s)
        try:
            yield writer
        finally:
            writer.close()

    @contextlib.contextmanager
    def exclusive_writer(self) -> Iterator[None]:
        """One writing process per database: a second ingest fails at once instead of interleaving."""
        key = self.path.resolve()  # the file itself: a symlinked --db must find the same lock
        if key in _WRITING:
            yield
            return
        lock_path = key.with_name(key.name + ".writer.lock")
        with open(lock_path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise DatabaseBusy(
                    f"database busy: {self.path} is being written by PID {holder}; wait for it to finish"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            _WRITING.add(key)
            try:
                yield
            finally:
                _WRITING.discard(key)
                handle.seek(0)
                handle.truncate()
                fcntl.flock(handle, fcntl.LOCK_UN)


class SessionWriter:
    """Many small writes (extraction batches) through write sessions of at most hold_s seconds each."""

    def __init__(self, store: Store, hold_s: float):
        self.store, self.hold_s = store, hold_s
        self.con: duckdb.DuckDBPyConnection | None = None
        self.opened = 0.0

    def connection(self) -> duckdb.DuckDBPyConnection:
        if self.con is not None and time.monotonic() - self.opened > self.hold_s:
            self.close()  # let waiting readers in
        if self.con is None:
            self.con = connect(
                self.store.path,
                read_only=False,
                wait_s=self.store.writer_wait_s,
                memory_env="N2VDB_DUCKDB_EXTRACT_MEMORY",
            )
            self.opened = time.monotonic()
        return self.con

    def close(self) -> None:
        if self.con is not None:
            self.con.close()
            self.con = None


class Pinned(Store):
    """One open connection used for every phase: for callers (tests, notebooks) that hold their own."""

    def __init__(self, con: duckdb.DuckDBPyConnection):
        self.con = con
        self.path = Path("(pinned)")

    @contextlib.contextmanager
    def reading(self) -> Iterator[duckdb.DuckDBPyConnection]:
        yield self.con

    writing = reading

    @contextlib.contextmanager
    def sessions(self, hold_s: float = 2.0) -> Iterator[SessionWriter]:
        writer = SessionWriter(self, hold_s)
        writer.con, writer.hold_s = self.con, float("inf")
        yield writer

    @contextlib.contextmanager
    def exclusive_writer(self) -> Iterator[None]:
        yield
