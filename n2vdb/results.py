"""A result as the renderer reads it: column names, what kind of number each column holds, and rows.

Named queries and `n2vdb sql` hand the CLI a Rows fetched straight from DuckDB (fetchall, with the
column types DuckDB states), so that answering a question does not import pyarrow and numpy (about
0.2 s of a 0.3 s cold start). Rows.from_arrow wraps the pyarrow Tables of the rest of the API, so
both reach one renderer (n2vdb/render/output.py).

fetch() takes DuckDB's Python values only for column types whose values are the same as pyarrow's
`to_pylist()` gives (tests/test_startup.py compares them type by type); any other column type (MAP,
INTERVAL, HUGEINT, UUID, fixed-size ARRAY, time zones ...) goes through Arrow as before, so what is
printed never depends on the path taken.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from n2vdb.errors import QueryError, UsageError

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa

_INTEGERS = {"tinyint", "smallint", "integer", "bigint", "utinyint", "usmallint", "uinteger", "ubigint"}
_FLOATS = {"float", "double"}
# Types whose fetchall() value equals pyarrow's to_pylist() value, type and all.
_SAME_EITHER_WAY = (
    _INTEGERS
    | _FLOATS
    | {
        "boolean",
        "varchar",
        "null",
        "decimal",
        "date",
        "time",
        "timestamp",
        "timestamp_s",
        "timestamp_ms",
        "blob",
        "enum",
    }
)
INTEGER, FLOATING, DECIMAL, OTHER = "integer", "floating", "decimal", "other"


@dataclass(frozen=True)
class Rows:
    """What a renderer needs of a result; the same whether it came from DuckDB or from Arrow."""

    column_names: list[str]
    kinds: list[str]  # per column: INTEGER, FLOATING, DECIMAL or OTHER (right-justified, bars for scores)
    rows: list[dict]

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    def to_pylist(self) -> list[dict]:
        return self.rows

    @classmethod
    def from_arrow(cls, table: pa.Table) -> Rows:
        import pyarrow as pa

        def kind(field: pa.Field) -> str:
            if pa.types.is_integer(field.type):
                return INTEGER
            if pa.types.is_floating(field.type):
                return FLOATING
            return DECIMAL if pa.types.is_decimal(field.type) else OTHER

        return cls(list(table.column_names), [kind(f) for f in table.schema], table.to_pylist())

    @classmethod
    def from_pylist(cls, rows: list[dict]) -> Rows:
        """Rows of text built in Python (listings); their columns are the first row's keys."""
        names = list(rows[0]) if rows else []
        return cls(names, [OTHER] * len(names), rows)


def _same_either_way(duck_type) -> bool:
    if duck_type.id in ("list", "struct"):
        return all(_same_either_way(child) for _, child in duck_type.children)
    return duck_type.id in _SAME_EITHER_WAY


def _kind(duck_type) -> str:
    if duck_type.id in _INTEGERS:
        return INTEGER
    if duck_type.id in _FLOATS:
        return FLOATING
    return DECIMAL if duck_type.id == "decimal" else OTHER


DEFAULT_RESULT_MB = 1024


def result_limit_bytes() -> int:
    """How much of a result may be fetched into memory: N2VDB_RESULT_MB megabytes (default 1,024).
    DuckDB's memory limit bounds its own buffers, not the rows handed to Python."""
    text = os.environ.get("N2VDB_RESULT_MB", str(DEFAULT_RESULT_MB))
    try:
        megabytes = float(text)
    except ValueError:
        megabytes = -1.0
    if not 0 < megabytes < float("inf"):
        raise UsageError(f"N2VDB_RESULT_MB={text!r}: expected a number of megabytes above 0, e.g. 1024")
    return int(megabytes * 1e6)


def _too_large(limit: int) -> QueryError:
    return QueryError(
        f"the result passed {limit / 1e6:,.0f} MB (N2VDB_RESULT_MB) and was not fetched; add a LIMIT, "
        "or write it to a file with `n2vdb sql ... -o FILE.parquet`, which streams"
    )


def _size(value) -> int:
    """A value's bytes, roughly: its length for text and blobs, 8 for a number."""
    if isinstance(value, str | bytes):
        return len(value) + 8
    if isinstance(value, list | tuple):
        return sum(_size(v) for v in value) + 8
    if isinstance(value, dict):
        return sum(_size(v) for v in value.values()) + 8
    return 8


def arrow_table(relation: duckdb.DuckDBPyRelation) -> pa.Table:
    """RELATION's result as a pyarrow Table, fetched in batches and refused past result_limit_bytes."""
    import pyarrow as pa

    limit, size, batches = result_limit_bytes(), 0, []
    reader = relation.to_arrow_reader(64 * 1024)
    for batch in reader:
        size += batch.nbytes
        if size > limit:
            raise _too_large(limit)
        batches.append(batch)
    return pa.Table.from_batches(batches, schema=reader.schema)


def fetch(relation: duckdb.DuckDBPyRelation) -> Rows:
    """Run RELATION and return its rows, without pyarrow whenever its column types allow; refused
    past result_limit_bytes."""
    types = relation.types
    if not all(_same_either_way(t) for t in types):
        return Rows.from_arrow(arrow_table(relation))
    names = list(relation.columns)
    limit, size, rows = result_limit_bytes(), 0, []
    for row in relation.iter_rows():
        size += _size(row)
        if size > limit:
            raise _too_large(limit)
        # dict(zip()) keeps the last of two columns of one name, as pyarrow's to_pylist() does
        rows.append(dict(zip(names, row)))
    return Rows(names, [_kind(t) for t in types], rows)
