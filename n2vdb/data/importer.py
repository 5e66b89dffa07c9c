"""Registering a Broden-format directory in the database: one transaction, streamed, decoded by workers."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from n2vdb.data import fingerprint, pool
from n2vdb.data.broden import BrodenDataset, ImageRow, concept_masks
from n2vdb.errors import DatasetError, N2vdbError, UsageError
from n2vdb.progress import progress_bar, say
from n2vdb.store import writer
from n2vdb.store.connection import first, transaction


def _count_pixels(root: Path, known: set[int], row: ImageRow) -> tuple[int, np.ndarray, np.ndarray]:
    ids, masks = concept_masks(root, row, known)
    return row.image_id, ids, masks.sum(axis=(1, 2))


def _pool_size(n_rows: int) -> int:
    if n_rows < 64:
        return 0  # a pool costs more than it saves on tiny sets
    return max(1, min(8, (os.cpu_count() or 1)))


def find_dataset(con: duckdb.DuckDBPyConnection, name: str) -> tuple[int, str] | None:
    row = first(con.execute("SELECT dataset_id, path FROM datasets WHERE name = ?", [name]))
    return (row[0], row[1]) if row else None


def check_name(name: str) -> None:
    """A dataset name is shown in messages and suggested back in commands: it must be visible text."""
    if not isinstance(name, str) or not name.strip():
        raise UsageError("a dataset name cannot be empty; pass --name NAME")
    if any(not ch.isprintable() for ch in name):
        raise UsageError(f"dataset name {name!r} holds control characters; choose a plain name")


def add_dataset(con: duckdb.DuckDBPyConnection, path: str | Path, name: str, chunk: int = 2048) -> int:
    """Import a Broden-format directory under NAME; returns its dataset_id.

    Re-adding the same, unchanged directory under the same name is a no-op; another directory under a
    taken name is an error, and so is a registered directory whose files changed. All rows land in one
    transaction, so a failure leaves no trace.
    """
    check_name(name)
    dataset = BrodenDataset.open(path)
    existing = find_dataset(con, name)
    if existing:
        if Path(existing[1]) == dataset.root:
            verify_unchanged(con, existing[0], name, dataset)
            if not _recorded(con, existing[0]):  # registered before fingerprints: record one now
                with transaction(con):
                    _record_files(con, existing[0], fingerprint.take(dataset))
            return existing[0]
        raise N2vdbError(f"dataset name {name!r} is taken by {existing[1]}; choose another --name")
    missing = next((r for r in dataset.rows if not dataset.image_path(r).is_file()), None)
    if missing is not None:  # found now, not by the ingest that would fail on it hours later
        raise DatasetError(
            f"index.csv row {missing.image_id + 1} names image {missing.image}, which is not under "
            f"{dataset.root / 'images'}: restore the file or remove its row"
        )
    levels = dataset.concept_levels()
    known = set(dataset.labels)
    files = fingerprint.take(dataset)
    with transaction(con):
        dataset_id = first(
            con.execute(
                "INSERT INTO datasets (name, path, n_images, n_concepts) VALUES (?, ?, ?, ?) RETURNING dataset_id",
                [name, str(dataset.root), len(dataset.rows), len(dataset.labels)],
            )
        )[0]
        _insert_metadata(con, dataset_id, dataset, levels)
        _insert_image_concepts(con, dataset_id, dataset, known, chunk)
        _record_files(con, dataset_id, files)
    if dataset.ignored_columns:
        say(
            f"note: index.csv column(s) {', '.join(map(repr, dataset.ignored_columns))} name no category of "
            "label.csv and were ignored"
        )
    return dataset_id


def _record_files(con: duckdb.DuckDBPyConnection, dataset_id: int, files: dict[str, tuple[str, int]]) -> None:
    rows = pa.table(
        {
            "dataset_id": pa.array([dataset_id] * len(files), pa.int32()),
            "file": pa.array(list(files), pa.string()),
            "sha256": pa.array([sha for sha, _ in files.values()], pa.string()),
            "bytes": pa.array([size for _, size in files.values()], pa.int64()),
        }
    )
    writer.insert(con, "dataset_files", rows)


def _recorded(con: duckdb.DuckDBPyConnection, dataset_id: int) -> dict[str, tuple[str, int]]:
    return {
        f: (sha, size)
        for f, sha, size in con.execute(
            "SELECT file, sha256, bytes FROM dataset_files WHERE dataset_id = ?", [dataset_id]
        ).fetchall()
    }


def verify_unchanged(con: duckdb.DuckDBPyConnection, dataset_id: int, name: str, dataset: BrodenDataset) -> None:
    """Refuse a dataset directory that no longer holds what was registered: probes key images by their
    index.csv row, so a changed directory would mix two datasets under one set of ids."""
    recorded = _recorded(con, dataset_id)
    if recorded:
        changed = fingerprint.differences(recorded, fingerprint.take(dataset))
    else:
        changed = _legacy_differences(con, dataset_id, dataset)
    if changed:
        raise DatasetError(
            f"dataset {name!r} changed since it was registered ({'; '.join(changed[:3])}); probes key images by "
            f"index.csv row, so n2vdb will not mix the two versions: register the directory as a new dataset "
            f"(`n2vdb data add {dataset.root} --name {name}-v2`) and use --dataset {name}-v2, or restore the "
            "registered files"
        )


def _legacy_differences(con: duckdb.DuckDBPyConnection, dataset_id: int, dataset: BrodenDataset) -> list[str]:
    """A dataset registered before fingerprints (migration 0003): its images and concepts rows are what
    was imported, so index.csv and label.csv must still describe them row by row."""
    stored = con.execute(
        "SELECT image_id, path, split, ih, iw, sh, sw FROM images WHERE dataset_id = ? ORDER BY image_id", [dataset_id]
    ).fetchall()
    now = [(r.image_id, r.image, r.split, r.ih, r.iw, r.sh, r.sw) for r in dataset.rows]
    said = []
    if stored != now:
        if len(stored) != len(now):
            said.append(f"index.csv lists {len(now)} images, {len(stored)} were registered")
        else:
            first_changed = next(i for i, (a, b) in enumerate(zip(stored, now)) if a != b)
            said.append(f"index.csv line {first_changed + 2} changed")
    labels = con.execute(
        "SELECT concept_id, name FROM concepts WHERE dataset_id = ? ORDER BY concept_id", [dataset_id]
    ).fetchall()
    if labels != sorted((lab.number, lab.name) for lab in dataset.labels.values()):
        said.append("label.csv changed")
    return said


def _insert_metadata(con, dataset_id: int, dataset: BrodenDataset, levels: dict[int, str]) -> None:
    rows = dataset.rows
    images = pa.table(
        {
            "dataset_id": pa.array([dataset_id] * len(rows), pa.int32()),
            "image_id": [r.image_id for r in rows],
            "path": [r.image for r in rows],
            "split": [r.split for r in rows],
            "ih": [r.ih for r in rows],
            "iw": [r.iw for r in rows],
            "sh": [r.sh for r in rows],
            "sw": [r.sw for r in rows],
        }
    )
    writer.insert(con, "images", images)
    labels = list(dataset.labels.values())
    concepts = pa.table(
        {
            "dataset_id": pa.array([dataset_id] * len(labels), pa.int32()),
            "concept_id": [lab.number for lab in labels],
            "name": [lab.name for lab in labels],
            "category": [lab.category for lab in labels],
            "categories": [list(lab.categories) for lab in labels],
            "level": [levels[lab.number] for lab in labels],
            "frequency": pa.array([lab.frequency for lab in labels], pa.int32()),
            "coverage": pa.array([lab.coverage for lab in labels], pa.float64()),
        }
    )
    writer.insert(con, "concepts", concepts)


def _insert_image_concepts(con, dataset_id: int, dataset: BrodenDataset, known: set[int], chunk: int) -> None:
    workers = _pool_size(len(dataset.rows))
    buffer: list[tuple[int, np.ndarray, np.ndarray]] = []

    def flush() -> None:
        if not buffer:
            return
        image_ids = np.concatenate([np.full(len(ids), i, np.int32) for i, ids, _ in buffer])
        table = pa.table(
            {
                "dataset_id": pa.array(np.full(len(image_ids), dataset_id, np.int32)),
                "image_id": image_ids,
                "concept_id": np.concatenate([ids for _, ids, _ in buffer]).astype(np.int32),
                "pixels": np.concatenate([px for _, _, px in buffer]).astype(np.int32),
            }
        )
        writer.insert(con, "image_concepts", table)
        buffer.clear()

    with progress_bar() as bar:
        task = bar.add_task("reading masks", total=len(dataset.rows))
        for result in pool.decoded(partial(_count_pixels, dataset.root, known), dataset.rows, workers, chunk=16):
            buffer.append(result)
            bar.advance(task)
            if len(buffer) >= chunk:
                flush()
        flush()


def list_datasets(con: duckdb.DuckDBPyConnection) -> list[dict]:
    cur = con.execute("SELECT dataset_id, name, path, n_images, n_concepts, added_at FROM datasets ORDER BY dataset_id")
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def require_dataset(con: duckdb.DuckDBPyConnection, name: str) -> tuple[int, Path]:
    found = find_dataset(con, name)
    if not found:
        known = [r["name"] for r in list_datasets(con)]
        hint = f" (registered: {', '.join(known)})" if known else ""
        raise DatasetError(f"no dataset named {name!r}{hint}; add one with `n2vdb data add PATH --name {name}`")
    return found[0], Path(found[1])


def dataset_root(con: duckdb.DuckDBPyConnection, dataset_id: int) -> Path:
    """The directory a registered dataset was added from."""
    row = first(con.execute("SELECT path FROM datasets WHERE dataset_id = ?", [dataset_id]))
    if not row:
        raise DatasetError(f"no dataset {dataset_id} in this database (`n2vdb data list` shows them)")
    return Path(row[0])


def concept_id(con: duckdb.DuckDBPyConnection, dataset_id: int, name: str) -> int:
    """The id of the concept NAME (as stored: n2vdb.queries.resolve_concept finds it) in a dataset."""
    row = first(con.execute("SELECT concept_id FROM concepts WHERE dataset_id = ? AND name = ?", [dataset_id, name]))
    if not row:
        raise DatasetError(f"no concept {name!r} in dataset {dataset_id}")
    return row[0]
