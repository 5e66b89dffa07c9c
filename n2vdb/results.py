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

from dataclasses import dataclass
from typing import TYPE_CHECKING

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


def fetch(relation: duckdb.DuckDBPyRelation) -> Rows:
    """Run RELATION and return its rows, without pyarrow whenever its column types allow."""
    types = relation.types
    if not all(_same_either_way(t) for t in types):
        return Rows.from_arrow(relation.to_arrow_table())
    names = list(relation.columns)
    # dict(zip()) keeps the last of two columns of one name, as pyarrow's to_pylist() does
    return Rows(names, [_kind(t) for t in types], [dict(zip(names, row)) for row in relation.fetchall()])
