"""Registering a Broden-format directory in the database: one transaction, streamed, decoded by workers."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from n2vdb.data.broden import BrodenDataset, ImageRow, concept_masks
from n2vdb.errors import DatasetError, N2vdbError
from n2vdb.progress import progress_bar
from n2vdb.store.connection import first, transaction

_worker_state: dict = {}


def _init_worker(root: Path, known: set[int]) -> None:
    _worker_state["root"], _worker_state["known"] = root, known


def _count_pixels(row: ImageRow) -> tuple[int, np.ndarray, np.ndarray]:
    ids, masks = concept_masks(_worker_state["root"], row, _worker_state["known"])
    return row.image_id, ids, masks.sum(axis=(1, 2))


def _pool_size(n_rows: int) -> int:
    if n_rows < 64:
        return 0  # a pool costs more than it saves on tiny sets
    return max(1, min(8, (os.cpu_count() or 1)))


def find_dataset(con: duckdb.DuckDBPyConnection, name: str) -> tuple[int, str] | None:
    row = first(con.execute("SELECT dataset_id, path FROM datasets WHERE name = ?", [name]))
    return (row[0], row[1]) if row else None


def add_dataset(con: duckdb.DuckDBPyConnection, path: str | Path, name: str, chunk: int = 2048) -> int:
    """Import a Broden-format directory under NAME; returns its dataset_id.

    Re-adding the same directory under the same name is a no-op; another directory under a taken
    name is an error. All rows land in one transaction, so a failure leaves no trace.
    """
    dataset = BrodenDataset.open(path)
    existing = find_dataset(con, name)
    if existing:
        if Path(existing[1]) == dataset.root:
            return existing[0]
        raise N2vdbError(f"dataset name {name!r} is taken by {existing[1]}; choose another --name")
    levels = dataset.concept_levels()
    known = set(dataset.labels)
    with transaction(con):
        dataset_id = first(con.execute(
            "INSERT INTO datasets (name, path, n_images, n_concepts) VALUES (?, ?, ?, ?) RETURNING dataset_id",
            [name, str(dataset.root), len(dataset.rows), len(dataset.labels)],
        ))[0]
        _insert_metadata(con, dataset_id, dataset, levels)
        _insert_image_concepts(con, dataset_id, dataset, known, chunk)
    return dataset_id


def _insert_metadata(con, dataset_id: int, dataset: BrodenDataset, levels: dict[int, str]) -> None:
    rows = dataset.rows
    images = pa.table({
        "dataset_id": pa.array([dataset_id] * len(rows), pa.int32()),
        "image_id": [r.image_id for r in rows],
        "path": [r.image for r in rows],
        "split": [r.split for r in rows],
        "ih": [r.ih for r in rows], "iw": [r.iw for r in rows],
        "sh": [r.sh for r in rows], "sw": [r.sw for r in rows],
    })
    con.register("_images", images)
    con.execute("INSERT INTO images SELECT * FROM _images")
    con.unregister("_images")
    labels = list(dataset.labels.values())
    concepts = pa.table({
        "dataset_id": pa.array([dataset_id] * len(labels), pa.int32()),
        "concept_id": [lab.number for lab in labels],
        "name": [lab.name for lab in labels],
        "category": [lab.category for lab in labels],
        "categories": [list(lab.categories) for lab in labels],
        "level": [levels[lab.number] for lab in labels],
        "frequency": pa.array([lab.frequency for lab in labels], pa.int32()),
        "coverage": pa.array([lab.coverage for lab in labels], pa.float64()),
    })
    con.register("_concepts", concepts)
    con.execute("INSERT INTO concepts SELECT * FROM _concepts")
    con.unregister("_concepts")


def _insert_image_concepts(con, dataset_id: int, dataset: BrodenDataset, known: set[int], chunk: int) -> None:
    workers = _pool_size(len(dataset.rows))
    buffer: list[tuple[int, np.ndarray, np.ndarray]] = []

    def flush() -> None:
        if not buffer:
            return
        image_ids = np.concatenate([np.full(len(ids), i, np.int32) for i, ids, _ in buffer])
        table = pa.table({
            "dataset_id": pa.array(np.full(len(image_ids), dataset_id, np.int32)),
            "image_id": image_ids,
            "concept_id": np.concatenate([ids for _, ids, _ in buffer]).astype(np.int32),
            "pixels": np.concatenate([px for _, _, px in buffer]).astype(np.int32),
        })
        con.register("_ic", table)
        con.execute("INSERT INTO image_concepts SELECT * FROM _ic")
        con.unregister("_ic")
        buffer.clear()

    with progress_bar() as bar:
        task = bar.add_task("reading masks", total=len(dataset.rows))
        if workers:
            ctx = multiprocessing.get_context("spawn" if os.name == "nt" else "fork")
            with ctx.Pool(workers, _init_worker, (dataset.root, known)) as pool:
                for result in pool.imap(_count_pixels, dataset.rows, chunksize=16):
                    buffer.append(result)
                    bar.advance(task)
                    if len(buffer) >= chunk:
                        flush()
        else:
            _init_worker(dataset.root, known)
            for row in dataset.rows:
                buffer.append(_count_pixels(row))
                bar.advance(task)
                if len(buffer) >= chunk:
                    flush()
        flush()


def list_datasets(con: duckdb.DuckDBPyConnection) -> list[dict]:
    cur = con.execute(
        "SELECT dataset_id, name, path, n_images, n_concepts, added_at FROM datasets ORDER BY dataset_id"
    )
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def require_dataset(con: duckdb.DuckDBPyConnection, name: str) -> tuple[int, Path]:
    found = find_dataset(con, name)
    if not found:
        known = [r["name"] for r in list_datasets(con)]
        hint = f" (registered: {', '.join(known)})" if known else ""
        raise DatasetError(f"no dataset named {name!r}{hint}; add one with `n2vdb data add PATH --name {name}`")
    return found[0], Path(found[1])
