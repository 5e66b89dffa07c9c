"""Ad-hoc SQL from users (`n2vdb sql`, the shell), run in the sandbox of n2vdb.store.connection.

The sandbox itself is DuckDB's configuration, not this module: a read-only connection cannot open
any file or change any setting whatever it is sent. What this module adds is what the sandbox
cannot say on its own:

- `--write` (write=True) runs every statement it is given as one transaction, all or nothing. Statements that
  would break that promise (BEGIN, COMMIT, ROLLBACK) or reach past this database (ATTACH, DETACH,
  USE) are refused before anything runs: a writer keeps DuckDB's file system for its log, so the
  database it may change is named by n2vdb, not by the SQL.
- Files are opened by n2vdb, never by the SQL: `--read NAME=PATH` opens Parquet or CSV files
  read-only with pyarrow and shows them to the SQL as the view NAME; `--output FILE` streams the
  last statement's result into FILE.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb

from n2vdb import results
from n2vdb.errors import QueryError, UsageError
from n2vdb.store import interrupt

if TYPE_CHECKING:
    import pyarrow as pa

# Statement kinds a --write run refuses (see the module docstring).
_WRITE_REFUSED = {
    duckdb.StatementType.TRANSACTION: "write already runs everything as one transaction; remove BEGIN/COMMIT/ROLLBACK",
    duckdb.StatementType.ATTACH: "write changes this database only; ATTACH is refused",
    duckdb.StatementType.DETACH: "write changes this database only; DETACH is refused",
}
# What a sandbox refusal means for the user, keyed by a fragment of DuckDB's message.
_SANDBOX_HINTS = (
    ("read-only mode", "n2vdb sql is read-only; add --write to change the database"),
    (
        "disabled by configuration",
        "SQL in n2vdb opens no files: --read NAME=PATH shows a file as a view, --output FILE writes the result",
    ),
    ("Loading external extensions is disabled", "SQL in n2vdb installs and loads no extensions"),
    ("has been locked", "the sandbox's settings cannot be changed from SQL"),
)
# USE after any leading comments (DuckDB keeps them in the statement text).
_USE = re.compile(r"^(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*USE\b", re.I | re.S)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_READ_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "csv"}
_OUTPUT_FORMATS = (".parquet", ".csv")


def describe_error(exc: duckdb.Error) -> str:
    """DuckDB's message on one line, with the line and column its caret points at."""
    lines = str(exc).splitlines()
    message = lines[0]
    for needle, hint in _SANDBOX_HINTS:
        if needle in message:
            return f"{message} ({hint})"
    for i, line in enumerate(lines):
        match = re.match(r"LINE (\d+): ", line)
        if match and i + 1 < len(lines) and "^" in lines[i + 1]:
            column = lines[i + 1].index("^") - len(match[0]) + 1
            return f"{message} (line {match[1]}, column {column})"
    return message


def statements(sql: str, con: duckdb.DuckDBPyConnection | None = None) -> list[duckdb.Statement]:
    """SQL split into statements by DuckDB's parser: CON's, when there is one (duckdb.extract_statements
    would first open DuckDB's default in-memory database, ~25 ms of `n2vdb sql`)."""
    try:
        found = (con or duckdb).extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(describe_error(exc)) from None
    if not found:
        raise UsageError("no SQL statement given")
    return found


def check_writable(found: list[duckdb.Statement]) -> None:
    for statement in found:
        reason = _WRITE_REFUSED.get(statement.type)
        if reason is None and _USE.match(statement.query):
            reason = "write changes this database only; USE is refused"
        if reason:
            raise UsageError(f"{reason} (statement: {statement.query.strip()[:60]})", param="write")


def run(
    con: duckdb.DuckDBPyConnection,
    sql: str,
    *,
    write: bool = False,
    output: Path | None = None,
    rows: bool = False,
    timeout: float | None = None,
) -> pa.Table | results.Rows | None:
    """Run every statement of SQL on CON; return the last one's result (a pyarrow Table, or with
    rows=True an n2vdb.results.Rows, which needs no pyarrow), or stream it into OUTPUT (and return
    None). With write=True the statements are one transaction. Ctrl-C stops it at once; a read stops
    after TIMEOUT seconds (store/interrupt.timeout_s: the default, N2VDB_TIMEOUT, 0 for none)."""
    found = statements(sql, con)
    if output is not None:
        output = output_path(output)
    if write:
        check_writable(found)
    limit = None if write else interrupt.timeout_s(timeout)
    return interrupt.run(con, lambda: _run_all(con, found, write, output, rows), limit)


def _run_all(con, found, write: bool, output: Path | None, rows: bool):
    """run()'s statements, on the thread interrupt.run gives them."""
    try:
        if write:
            con.execute("BEGIN TRANSACTION")
        for statement in found[:-1]:
            con.execute(statement.query).complete()  # run it through, keeping no rows
        last = con.sql(found[-1].query)
        if last is None and rows:
            result = results.Rows([], [], [])
        elif last is None:
            import pyarrow as pa

            result = pa.table({})
        elif output is not None:
            _stream(last, output)
            result = None
        else:
            result = results.fetch(last) if rows else results.arrow_table(last)
        if write:
            con.execute("COMMIT")
        return result
    except duckdb.Error as exc:
        if write:
            try:
                con.execute("ROLLBACK")
            except duckdb.Error:
                pass  # a failed COMMIT has already rolled back
        raise QueryError(describe_error(exc)) from None


def output_path(path: Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in _OUTPUT_FORMATS:
        raise UsageError(f"output {path}: name a .parquet or .csv file", param="output")
    if path.is_dir():
        raise UsageError(f"output {path} is a directory; name a file", param="output")
    if not path.parent.is_dir():
        raise UsageError(f"output {path}: directory {path.parent} does not exist", param="output")
    return path


def _stream(relation: duckdb.DuckDBPyRelation, path: Path) -> None:
    """Batch by batch, so a large result never sits in memory whole; written beside and renamed,
    so a failure leaves no half file."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    reader = relation.to_arrow_reader(64 * 1024)
    partial = path.with_name(f".{path.name}.partial")
    try:
        if path.suffix.lower() == ".csv":
            with pacsv.CSVWriter(partial, reader.schema) as writer:
                for batch in reader:
                    writer.write_batch(batch)
        else:
            with pq.ParquetWriter(partial, reader.schema) as writer:
                for batch in reader:
                    writer.write_batch(batch)
        partial.replace(path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def register_files(con: duckdb.DuckDBPyConnection, reads: Mapping[str, str | Path]) -> None:
    """Show each NAME=PATH to the SQL as a view, read by pyarrow (the connection itself has no file
    system). PATH is a Parquet or CSV file, a directory of them, or a glob."""
    if not reads:
        return  # pyarrow.dataset costs 0.15 s to import: only when asked for
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.dataset as ds

    for name, spec in reads.items():
        if not _NAME.match(name):
            raise UsageError(
                f"read {name}=...: a view name is letters, digits and _, not starting with a digit", param="read"
            )
        files = _expand(str(spec))
        formats = {_READ_FORMATS.get(Path(f).suffix.lower()) for f in files}
        if None in formats or len(formats) != 1:
            raise UsageError(
                f"read {name}={spec}: give Parquet (.parquet) or CSV (.csv, .tsv) files of one kind", param="read"
            )
        fmt = formats.pop()
        if all(Path(f).suffix.lower() == ".tsv" for f in files):
            fmt = ds.CsvFileFormat(parse_options=pacsv.ParseOptions(delimiter="\t"))
        try:
            con.register(name, ds.dataset(files, format=fmt))
        except (pa.ArrowException, OSError) as exc:
            raise UsageError(f"read {name}={spec}: {str(exc).splitlines()[0]}", param="read") from None


def parse_reads(items: list[str]) -> dict[str, str]:
    reads: dict[str, str] = {}
    for item in items:
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            raise UsageError(f"read expects NAME=PATH, got {item!r}", param="read")
        if name in reads:
            raise UsageError(f"read names {name!r} twice", param="read")
        reads[name] = path
    return reads


def _expand(spec: str) -> list[str]:
    path = Path(spec)
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in _READ_FORMATS and p.is_file())
    elif path.is_file():
        files = [spec]
    else:
        files = sorted(f for f in glob.glob(spec, recursive=True) if Path(f).is_file())
    if not files:
        raise UsageError(f"read {spec}: no such file, or no Parquet/CSV files there", param="read")
    return files
