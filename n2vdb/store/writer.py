"""Every bulk write of n2vdb's tables: Arrow rows inserted by column name.

A positional `INSERT ... SELECT *` writes silently into the wrong columns once a migration adds a
column in the middle of a table; here each Arrow column goes to the table column of its name, and
rows whose columns are not the table's are refused before anything is written.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import duckdb
import numpy as np
import pyarrow as pa

from n2vdb.errors import N2vdbError

Rows = pa.Table | pa.RecordBatch

_VIEW = "_n2vdb_rows"  # the name the rows are registered under while they are copied


def columns(con: duckdb.DuckDBPyConnection, table: str) -> dict[str, bool]:
    """Column name -> whether the table gives it a default, in the table's order."""
    found = con.execute(
        "SELECT column_name, column_default IS NOT NULL FROM duckdb_columns()"
        " WHERE table_name = ? AND schema_name = current_schema() AND database_name = current_database()"
        " ORDER BY column_index",
        [table],
    ).fetchall()
    if not found:
        raise N2vdbError(f"no table {table!r} in this database: is it an n2vdb database at the current schema?")
    return dict(found)


def check_columns(con: duckdb.DuckDBPyConnection, table: str, rows: Rows) -> None:
    """Refuse ROWS unless they carry every column of TABLE (those with a default may be left to it)
    and no other."""
    target = columns(con, table)
    given = rows.schema.names
    missing = [name for name, has_default in target.items() if not has_default and name not in given]
    extra = [name for name in given if name not in target]
    if missing or extra or len(set(given)) != len(given):
        said = []
        if missing:
            said.append(f"lack column(s) {', '.join(missing)}")
        if extra:
            said.append(f"carry column(s) {', '.join(extra)} it does not have")
        if len(set(given)) != len(given):
            said.append("name a column twice")
        raise N2vdbError(
            f"rows for table {table} {' and '.join(said)}: this n2vdb and the database's schema disagree "
            "(upgrade n2vdb, or open the database with the version that made it)"
        )


def insert(con: duckdb.DuckDBPyConnection, table: str, rows: Rows) -> None:
    """Append ROWS (an Arrow table or record batch) to TABLE, column by name."""
    check_columns(con, table, rows)
    _copy(con, table, rows)


def _copy(con: duckdb.DuckDBPyConnection, table: str, rows: Rows) -> None:
    con.register(_VIEW, rows)
    try:
        con.execute(f'INSERT INTO "{table}" BY NAME SELECT * FROM {_VIEW}')
    finally:
        con.unregister(_VIEW)


def replace_probe_rows(
    con: duckdb.DuckDBPyConnection,
    table: str,
    probe_id: int,
    rows: Rows | Iterable[Rows],
    methods: Sequence[str] | None = None,
) -> None:
    """A stage's rows of one probe in TABLE: the ones stored before are deleted, ROWS (one Arrow
    table or several) inserted. METHODS limits the deletion to rows of those methods (a table such as
    image_concept_scores that several stages write). Run it inside the caller's transaction, so that a
    failure leaves the old rows."""
    parts = [rows] if isinstance(rows, (pa.Table, pa.RecordBatch)) else list(rows)
    for part in parts:  # all refused before any row is deleted
        check_columns(con, table, part)
    sql, params = f'DELETE FROM "{table}" WHERE probe_id = ?', [probe_id]
    if methods is not None:
        sql += " AND method IN (SELECT unnest(?))"
        params.append(list(methods))
    con.execute(sql, params)
    for part in parts:
        _copy(con, table, part)


def score_rows(
    probe_id: int,
    method: str,
    image_ids: np.ndarray,
    concept_ids: np.ndarray,
    intersection: np.ndarray | None = None,
    union: np.ndarray | None = None,
    score: np.ndarray | None = None,
) -> pa.Table:
    """image_concept_scores rows of one METHOD: IoUs (INTERSECTION, UNION; the IoU stage's best
    filters, segmentation embeddings) or classification SCOREs, one per (image, concept) pair."""
    n = len(image_ids)
    if intersection is None:
        inter = union_ = pa.nulls(n, pa.int64())
        iou = pa.nulls(n, pa.float64())
        scores = pa.array(np.asarray(score, np.float64))
    else:
        i, u = np.asarray(intersection, np.int64), np.asarray(union, np.int64)
        inter, union_ = pa.array(i), pa.array(u)
        iou = pa.array(np.divide(i, u, out=np.zeros(n), where=u > 0))
        scores = pa.nulls(n, pa.float64())
    return pa.table(
        {
            "probe_id": pa.array(np.full(n, probe_id, np.int32)),
            "image_id": pa.array(np.asarray(image_ids, np.int32)),
            "concept_id": pa.array(np.asarray(concept_ids, np.int32)),
            "method": pa.repeat(pa.scalar(method, pa.string()), n),
            "intersection": inter,
            "union_": union_,
            "iou": iou,
            "score": scores,
        }
    )
