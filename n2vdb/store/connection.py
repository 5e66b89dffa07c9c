"""Opening the database: one writer, many read-only readers, one-line lock errors.

Every read-only connection is a sandbox by construction (docs/sandbox.md): once the database is open,
DuckDB's own settings switch off its local file system and all external access, no extension can be
installed, loaded or auto-loaded, and the configuration is locked, so no SQL can reach another file,
write this one, or undo the settings. Nothing here inspects the SQL it will run.
"""

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


def database_files(db: str | os.PathLike | None = None) -> tuple[Path, ...]:
    """The files that make up database DB: the file, DuckDB's write-ahead log and n2vdb's writer lock."""
    path = db_path(db).resolve()
    return path, path.with_name(path.name + ".wal"), path.with_name(path.name + ".writer.lock")


def refuse_database_path(out: str | os.PathLike, db: str | os.PathLike | None, param: str) -> None:
    """Refuse an output path (a file to write, a directory to make) that is one of DB's own files:
    writing there would replace the database, or put a directory where DuckDB expects its log."""
    target = Path(out).resolve()
    if target in database_files(db):
        raise UsageError(f"{param} {out} is a file of the database {db_path(db)}; choose another path", param=param)


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


def connect(
    path: str | os.PathLike | None = None,
    *,
    read_only: bool,
    wait_s: float | None = None,
    memory_env: str | None = None,
) -> duckdb.DuckDBPyConnection:
    """Open the database, retrying while another process holds the lock for up to wait_s seconds,
    and translating lock conflicts and missing files into N2vdbErrors. A read-only connection is
    always sealed (see seal()). MEMORY_ENV: the variable naming DuckDB's cache budget when this
    connection starts the process's instance of the file (see MEMORY_BUDGETS)."""
    deadline = time.monotonic() + (busy_wait_s() if wait_s is None else wait_s)
    delay = 0.02
    while True:
        try:
            con = _connect_once(path, read_only, memory_env)
            if read_only:
                seal(con)
            return con
        except DatabaseBusy:
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def _connect_once(path: str | os.PathLike | None, read_only: bool, memory_env: str | None) -> duckdb.DuckDBPyConnection:
    target = db_path(path)
    if read_only and not target.exists():
        raise N2vdbError(f"no database at {target}: create one with `n2vdb data synth` / `n2vdb ingest`, or pass --db")
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
        if "different configuration" in str(exc):
            raise N2vdbError(
                f"{target} is already open in this process through a connection n2vdb did not make "
                "(a duckdb.connect of your own?): close it first"
            ) from None
        raise N2vdbError(f"cannot open database {target}: {str(exc).splitlines()[0]}") from None
    # DuckDB draws its own progress bar on stdout, which would corrupt piped output. A per-connection
    # setting, which seal() leaves open to the connections that join a sealed instance.
    con.execute("SET enable_progress_bar = false")
    # The process's connections to one file share one DuckDB instance and its global settings, set
    # by the first of them (not passed at open, so that a plain duckdb.connect can share it too).
    if not _locked(con):
        for name, value in _GLOBAL_SETTINGS.items():
            con.execute(f"SET {name} = ?", [value])
        # DuckDB's buffer cache would otherwise grow towards 80% of RAM as a large probe is read.
        # A writer gets a smaller one: its cache of the blocks it wrote grew with the dataset during
        # extraction (measured: +250 MB of peak RSS from 1,000 to 4,000 images at 1GB, +80 MB at 64MB);
        # unsealed, it may spill to DuckDB's temp directory beside the database past it.
        env = memory_env or ("N2VDB_DUCKDB_MEMORY" if read_only else "N2VDB_DUCKDB_WRITER_MEMORY")
        con.execute("SET memory_limit = ?", [os.environ.get(env, MEMORY_BUDGETS[env])])
        for name, value in _BUDGET_SETTINGS.get(env, {}).items():
            con.execute(f"SET {name} = ?", [value])
    return con


# DuckDB's cache budget, by the variable that sets it. Readers never spill (seal()), so a query that
# outgrows theirs fails; the ingest's own reads are windows of the activations (activations.iter_codes),
# which fill the cache with blocks they never revisit (measured: +290 MB of peak RSS from 1,000 to
# 4,000 images at 1GB; +100 MB from 4,000 to 8,000 at 256MB, none at 64MB), so they get a small one.
MEMORY_BUDGETS = {
    "N2VDB_DUCKDB_MEMORY": "1GB",  # queries, show, report, the shell
    # writers (may spill beside the database, unless sealed). An index being written stays in memory:
    # a 256-filter layer's 614k IoU rows replaced in one transaction failed under 128MB, a 2048-filter
    # layer's 4.9M under 512MB (tests/test_writer.py). A cap, not an allocation: short writes use little.
    "N2VDB_DUCKDB_WRITER_MEMORY": "1GB",
    "N2VDB_DUCKDB_INGEST_MEMORY": "64MB",  # an ingest's or merge's reading phases (store.sessions)
    # extraction's write sessions: appends of the codes, whose cache would otherwise fill towards the
    # writer's budget as the dataset grows (measured: extraction's peak RSS +1 GB from 1,000 to 16,000
    # images at 1GB). With vacuum off (below), a session's checkpoint writes its own rows only: 32MB
    # held 16,384 rows of AlexNet conv5 codes at a flat peak in a bare DuckDB test.
    "N2VDB_DUCKDB_EXTRACT_MEMORY": "128MB",
}

# Settings that go with a budget. An ingest's reads are windows of a few hundred rows, which gain
# nothing from DuckDB's worker threads; run in the caller's thread they leave no per-thread heaps of
# freed blocks behind (measured, the IoU stage alone on a 16,000-image Broden-profile database, two
# runs each: peak RSS 1,060-1,064 MB -> 975-979 MB, 25-26 s either way).
_BUDGET_SETTINGS = {"N2VDB_DUCKDB_INGEST_MEMORY": {"threads": 1}}

# Nothing is fetched or loaded behind the user's back, on any connection.
_GLOBAL_SETTINGS = {
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
    # Large blobs (the activations' codes) compressed with ZSTD are decompressed a whole 2,048-row
    # vector at a time, however few rows a read asks for: 90 MB at AlexNet conv5, more than DuckDB's
    # cache budget, so reading them grew peak RSS with the dataset (measured: +180 MB of peak RSS
    # from 1,000 to 4,000 images under a 64MB budget, none once stored uncompressed) and was 3x
    # slower; stored plainly, a read of a few rows touches their blocks only. Files grow: ZSTD
    # saved ~35% of random-weight codes. Rows written before keep theirs.
    "disabled_compression_methods": "zstd",
    # No vacuum at checkpoints. Extraction's write sessions each append one small row group (a few
    # hundred images) and checkpoint as they close; DuckDB's vacuum merges trailing small row groups,
    # rewriting every row since the last full one at each close (~2.2x those codes in memory at once:
    # peak RSS +190 MB at ~1,800 rows of AlexNet conv5 codes in a bare DuckDB test, 0 without; each
    # row written several times, the file 1.7x its data at 16,384 rows), and the first checkpoint of
    # a writer with a larger budget merges them all at once (+380 MB for 4,096 rows, in one piece:
    # it grows with the dataset). What vacuum would reclaim here is the space of deleted rows, and
    # n2vdb deletes only the small per-probe rows a stage re-run replaces; activations are never
    # deleted. Row groups stay as written (one per extraction session).
    "max_vacuum_tasks": 0,
}


def _locked(con: duckdb.DuckDBPyConnection) -> bool:
    return bool(first(con.execute("SELECT current_setting('lock_configuration')"))[0])


def seal(con: duckdb.DuckDBPyConnection, *, file_system: bool = True) -> None:
    """Make CON unable to reach anything but the database it has open, whatever SQL it is sent.

    - enable_external_access = false: no COPY TO/FROM, file readers, ATTACH of other files, EXPORT,
      INSTALL or LOAD, persistent secrets, or scans of Python objects in this process;
    - disabled_filesystems = LocalFileSystem (read-only connections): not even the files DuckDB would
      allow for the open database (ATTACH of it READ_WRITE after a DETACH, spill files) can be opened;
      reads continue through the handle opened before. A writer keeps the local file system for its
      write-ahead log, so `sql --write` also refuses ATTACH, DETACH and USE (n2vdb.adhoc);
    - temp_directory = '': nothing spills to disk; a query that outgrows N2VDB_DUCKDB_MEMORY fails;
    - secret_directory = '': duckdb_settings() shows readers no path under the user's home;
    - lock_configuration = true, last: none of the above can be SET back from SQL.
    """
    if _locked(con):
        # Connections of one process to one file share DuckDB's instance and its settings: a later
        # one joins an instance sealed before, which seal() checks instead of setting again.
        if first(con.execute("SELECT current_setting('enable_external_access')"))[0]:
            raise N2vdbError(
                "the database is open in this process with an unsealed, locked configuration; "
                "close the other connection first"
            )
        return
    con.execute("SET allowed_configs = ['enable_progress_bar']")  # harmless, and per connection
    con.execute("SET temp_directory = ''")
    con.execute("SET secret_directory = ''")  # no secrets are read anyway; and duckdb_settings() shows no $HOME
    con.execute("SET enable_external_access = false")
    if file_system:
        con.execute("SET disabled_filesystems = 'LocalFileSystem'")
    con.execute("SET lock_configuration = true")


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
