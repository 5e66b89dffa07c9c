"""`n2vdb export DEST`: the public tables as Parquet files, or copied into a SQL server (SQLAlchemy).

Rows travel in record batches read from DuckDB (`fetch_record_batch`), so memory stays bounded by
one batch whatever the size of the probe. A server export runs in one transaction: a failure leaves
the target as it was. With a probe, the export replaces that probe's rows (and its dataset's) at the
target and leaves the others, so re-running it is idempotent.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from n2vdb import probe as probes_mod
from n2vdb.errors import N2vdbError, UsageError
from n2vdb.store.connection import first

# The README's public schema, in an order that keeps references pointing backwards.
DATASET_TABLES = ("datasets", "images", "concepts", "image_concepts")
PROBE_TABLES = ("probes", "activations", "filters", "filter_concept_iou", "embeddings", "image_concept_scores")
PUBLIC_TABLES = DATASET_TABLES + PROBE_TABLES
BATCH_BYTES = 16 << 20  # per record batch, roughly: activations rows are large, the others small
# Keys a table's one writer keeps unique without an index in DuckDB (migrations/0012): the export
# orders by them and gives its copy the key.
UNKEYED = {"image_concept_scores": ("probe_id", "image_id", "concept_id", "method")}


@dataclass(frozen=True)
class Column:
    name: str
    duck_type: str  # DuckDB's spelling: INTEGER, FLOAT[], JSON, ...
    nullable: bool


@dataclass(frozen=True)
class TableSpec:
    name: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    create_sql: str


def table_specs(con: duckdb.DuckDBPyConnection) -> list[TableSpec]:
    columns: dict[str, list[Column]] = {t: [] for t in PUBLIC_TABLES}
    for table, name, kind, nullable in con.execute(
        "SELECT table_name, column_name, data_type, is_nullable FROM duckdb_columns() "
        "WHERE schema_name = 'main' AND table_name IN (SELECT unnest(?)) ORDER BY table_name, column_index",
        [list(PUBLIC_TABLES)],
    ).fetchall():
        columns[table].append(Column(name, kind, nullable))
    keys = {
        t: tuple(c)
        for t, c in con.execute(
            "SELECT table_name, constraint_column_names FROM duckdb_constraints() "
            "WHERE schema_name = 'main' AND constraint_type = 'PRIMARY KEY'"
        ).fetchall()
    }
    sql = dict(con.execute("SELECT table_name, sql FROM duckdb_tables() WHERE schema_name = 'main'").fetchall())
    missing = [t for t in PUBLIC_TABLES if not columns[t]]
    if missing:
        raise N2vdbError(f"the database lacks table(s) {', '.join(missing)}: run `n2vdb db upgrade`")
    return [TableSpec(t, tuple(columns[t]), keys.get(t, UNKEYED.get(t, ())), sql[t]) for t in PUBLIC_TABLES]


def _selection(con, probe_id: int | None) -> dict[str, tuple[str, list]]:
    """Per table, the WHERE clause (and its parameters) that picks the rows to export."""
    if probe_id is None:
        return {t: ("", []) for t in PUBLIC_TABLES}
    probe = probes_mod.load(con, probe_id)  # a one-line NotFound for an unknown probe
    chosen = {t: ("WHERE dataset_id = ?", [probe.dataset_id]) for t in DATASET_TABLES}
    chosen.update({t: ("WHERE probe_id = ?", [probe_id]) for t in PROBE_TABLES})
    return chosen


def _batches(con, spec: TableSpec, where: str, args: list) -> Iterator[pa.RecordBatch]:
    order = ", ".join(spec.primary_key)
    rows = max(1, BATCH_BYTES // _row_bytes(con, spec))
    # Activations are exported in storage order: sorting their blobs would buffer them all.
    ordered = f" ORDER BY {order}" if order and spec.name != "activations" else ""
    yield from con.sql(f"SELECT * FROM {spec.name} {where}{ordered}", params=args or None).to_arrow_reader(rows)


def _row_bytes(con, spec: TableSpec) -> int:
    if spec.name != "activations":
        return 256
    widest = first(con.execute("SELECT max(n_filters * height * width) FROM probes"))[0] or 1
    return int(widest * 1.1) + 1024  # one code byte per value, plus scales and pooled means


def local_target(dest: str) -> str:
    """The file or directory DEST writes on this machine: the directory itself, or a sqlite:/// URL's
    file; refused where it is an in-memory SQLite database, whose rows would vanish with the export."""
    if "://" not in dest:
        return dest
    scheme, _, rest = dest.partition("://")
    if not scheme.startswith("sqlite"):
        return ""  # a server's: nothing of this machine's
    path = rest[1:].split("?")[0] if rest.startswith("/") else ""
    if path in ("", ":memory:"):
        raise UsageError(f"dest {dest} is an in-memory database, gone when the export ends; give sqlite:///FILE")
    return path


def export(
    con: duckdb.DuckDBPyConnection,
    dest: str,
    probe_id: int | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, int]:
    """Export the public tables to DEST (a directory or a SQLAlchemy URL); rows written per table."""
    specs = table_specs(con)
    selection = _selection(con, probe_id)
    if "://" in dest:
        return _to_server(con, specs, selection, dest, probe_id, progress)
    return _to_parquet(con, specs, selection, Path(dest), progress)


# -- Parquet ---------------------------------------------------------------------------------------


def _to_parquet(con, specs: list[TableSpec], selection, out: Path, progress) -> dict[str, int]:
    import pyarrow.parquet as pq

    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file; export writes a directory (or give a URL such as sqlite:///f.db)")
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for spec in specs:
        where, args = selection[spec.name]
        target = out / f"{spec.name}.parquet"
        partial = target.with_suffix(".parquet.partial")  # never a half-written file under the real name
        rows = 0
        writer = None
        try:
            for batch in _batches(con, spec, where, args):
                if writer is None:
                    writer = pq.ParquetWriter(partial, batch.schema, compression="zstd")
                writer.write_batch(batch)
                rows += batch.num_rows
            if writer is None:  # no rows: still a file with the table's columns
                empty = con.sql(f"SELECT * FROM {spec.name} LIMIT 0").to_arrow_table()
                pq.write_table(empty, partial, compression="zstd")
        finally:
            if writer is not None:
                writer.close()
        partial.replace(target)
        counts[spec.name] = rows
        if progress:
            progress(spec.name, rows)
    # The sequences first: the tables' id columns default to them.
    sequences = [
        sql
        for (sql,) in con.execute(
            "SELECT sql FROM duckdb_sequences() WHERE schema_name = 'main' ORDER BY sequence_name"
        ).fetchall()
    ]
    (out / "schema.sql").write_text(
        "-- n2vdb public tables (DuckDB dialect); rows in NAME.parquet beside this file.\n"
        + "".join(sql.rstrip(";") + ";\n" for sql in sequences + [spec.create_sql for spec in specs])
    )
    return counts


# -- SQL servers -----------------------------------------------------------------------------------


def _engine(url: str):
    import sqlalchemy

    scheme, _, rest = url.partition("://")
    if scheme in ("postgresql", "postgres"):
        url = f"postgresql+psycopg://{rest}"  # psycopg 3, the driver n2vdb[export] installs
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise N2vdbError("export to PostgreSQL needs psycopg 3: pip install 'n2vdb[export]'") from None
    try:
        engine = sqlalchemy.create_engine(url)
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError, ImportError) as exc:
        raise UsageError(
            f"cannot use {_redacted(url)}: {str(exc).splitlines()[0]} "
            "(give a directory, sqlite:///FILE or postgresql://USER@HOST/DB)"
        ) from None
    return engine


def _redacted(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL has no password to hide
        return url.split("@")[-1]


def _column_type(duck_type: str, dialect: str):
    from sqlalchemy import JSON, REAL, BigInteger, Boolean, DateTime, Double, Integer, LargeBinary, SmallInteger, Text

    if duck_type.endswith("[]"):
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import ARRAY

            return ARRAY(_column_type(duck_type[:-2], dialect))
        return Text()  # JSON text: SQLite and the others have no arrays
    if duck_type == "JSON":
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import JSONB

            return JSONB()
        return JSON()
    simple = {
        "INTEGER": Integer,
        "BIGINT": BigInteger,
        "SMALLINT": SmallInteger,
        "DOUBLE": Double,
        "FLOAT": REAL,
        "VARCHAR": Text,
        "BOOLEAN": Boolean,
        "TIMESTAMP": DateTime,
        "BLOB": LargeBinary,
    }
    if duck_type not in simple:
        raise N2vdbError(f"export does not know how to store DuckDB type {duck_type}")
    return simple[duck_type]()


def _converter(column: Column, dialect: str):
    """How one value travels: arrays stay lists on PostgreSQL and become JSON text elsewhere;
    DuckDB's JSON arrives as text and SQLAlchemy's JSON types want the parsed value."""
    if column.duck_type.endswith("[]") and dialect != "postgresql":
        return lambda v: None if v is None else json.dumps(v)
    if column.duck_type == "JSON":
        return lambda v: None if v is None else json.loads(v)
    return None


def _check_target(con, target, specs: list[TableSpec], tables: dict, probe_id: int | None, url: str) -> None:
    """Refuse an export that would delete rows it does not replace. Rows are matched by probe_id
    and dataset_id, which restart at 1 in every database: at the target, the probe and dataset under
    those ids must be the same ones (same probe_key, same dataset name), and a full export must find
    no probe there that this database lacks. Tables of another application under a public table's
    name (other columns) are refused, not emptied."""
    import sqlalchemy as sa

    where = _redacted(url)
    inspector = sa.inspect(target)
    present = set(inspector.get_table_names())
    for spec in specs:
        if spec.name in present and {c["name"] for c in inspector.get_columns(spec.name)} != {
            c.name for c in spec.columns
        }:
            raise N2vdbError(
                f"{where} has a table {spec.name} that is not n2vdb's (other columns); nothing was changed "
                "there: export to another database"
            )
    if "probes" not in present or "datasets" not in present:
        return
    probes, datasets = tables["probes"], tables["datasets"]
    there = dict(target.execute(sa.select(probes.c.probe_key, probes.c.probe_id)).all())
    here = dict(con.execute("SELECT probe_key, probe_id FROM probes").fetchall())
    clash = "; nothing was changed there: export it to another database (exports keep probe and dataset numbers)"
    if probe_id is None:
        missing = sorted(pid for key, pid in there.items() if key not in here)
        if missing:
            raise N2vdbError(
                f"{where} holds probe(s) {', '.join(map(str, missing))} that this database does not: a full "
                "export would delete them; nothing was changed there: export one probe with --probe N, "
                "or to another database"
            )
        moved = sorted(pid for key, pid in there.items() if here[key] != pid)
        if moved:
            raise N2vdbError(f"{where} holds this database's probes under other numbers ({moved[0]}, ...){clash}")
        return
    key, dataset_id = first(con.execute("SELECT probe_key, dataset_id FROM probes WHERE probe_id = ?", [probe_id]))
    by_id = {pid: k for k, pid in there.items()}
    if probe_id in by_id and by_id[probe_id] != key:
        raise N2vdbError(f"{where} already holds another probe as probe {probe_id}{clash}")
    if key in there and there[key] != probe_id:
        raise N2vdbError(f"{where} already holds this probe as probe {there[key]}{clash}")
    name = first(con.execute("SELECT name FROM datasets WHERE dataset_id = ?", [dataset_id]))[0]
    held = target.execute(sa.select(datasets.c.name).where(datasets.c.dataset_id == dataset_id)).scalar()
    if held is not None and held != name:
        raise N2vdbError(f"{where} already holds another dataset ({held!r}) as dataset {dataset_id}{clash}")


def _to_server(con, specs: list[TableSpec], selection, url: str, probe_id: int | None, progress) -> dict[str, int]:
    import sqlalchemy as sa

    engine = _engine(url)
    dialect = engine.dialect.name
    metadata = sa.MetaData()
    tables = {}
    for spec in specs:
        tables[spec.name] = sa.Table(
            spec.name,
            metadata,
            *[
                sa.Column(
                    c.name,
                    _column_type(c.duck_type, dialect),
                    nullable=c.nullable,
                    primary_key=c.name in spec.primary_key,
                    autoincrement=False,
                )
                for c in spec.columns
            ],
        )
    counts = {}
    try:
        with engine.begin() as target:  # one transaction: all or nothing
            _check_target(con, target, specs, tables, probe_id, url)
            metadata.create_all(target, checkfirst=True)
            for spec in reversed(specs):  # clear the rows this export replaces
                table = tables[spec.name]
                where, args = selection[spec.name]
                if not where:
                    target.execute(table.delete())
                else:
                    key = "dataset_id" if spec.name in DATASET_TABLES else "probe_id"
                    target.execute(table.delete().where(table.c[key] == args[0]))
            for spec in specs:
                table = tables[spec.name]
                converters = {c.name: f for c in spec.columns if (f := _converter(c, dialect))}
                where, args = selection[spec.name]
                rows = 0
                for batch in _batches(con, spec, where, args):
                    records = batch.to_pylist()
                    for record in records:
                        for name, convert in converters.items():
                            record[name] = convert(record[name])
                    target.execute(table.insert(), records)
                    rows += len(records)
                counts[spec.name] = rows
                if progress:
                    progress(spec.name, rows)
    except sa.exc.SQLAlchemyError as exc:
        message = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise N2vdbError(f"export to {_redacted(url)} failed, nothing was changed there: {message}") from None
    finally:
        engine.dispose()
    return counts
