"""The stored form of a layer's activations: per-(image, filter) uint8 quantisation.

codes[k] = round(A_k / s_k) with s_k = max(A_k) / 255 over that image's H x W positions, so every
dequantised value is within s_k / 2 of the float activation (half a step), at 1 byte per value
plus 4 bytes per (image, filter): 1.024 bytes per value for AlexNet conv5 before DuckDB's own
compression. The SQL macro `activation(codes, scales, filter, position, hw)` reads one value. A per-image scale needs no pass over the dataset before writing begins.
"""

from __future__ import annotations

from collections.abc import Iterator

import duckdb
import numpy as np
import pyarrow as pa
import torch

from n2vdb.errors import N2vdbError
from n2vdb.store import writer
from n2vdb.store.connection import first


def quantise(acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """acts [N, K, H, W] >= 0 -> (codes uint8 [N, K, H, W], scales float32 [N, K])."""
    peak = acts.flatten(2).amax(dim=2).clamp_min(0)
    scales = (peak / 255).float()
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(acts.clamp_min(0) / safe[:, :, None, None]).clamp_(0, 255).to(torch.uint8)
    return codes, scales


def dequantise(
    codes: np.ndarray | torch.Tensor, scales: np.ndarray | torch.Tensor, device: str | torch.device | None = None
) -> torch.Tensor:
    """codes uint8 [n, K, H, W], scales float32 [n, K] -> float32 activations [n, K, H, W] on DEVICE
    (where the codes are, by default). The one place the stored form is read back: the codes travel
    to the device as bytes, a quarter of the floats."""
    codes = torch.as_tensor(codes, device=device)
    return codes.float() * torch.as_tensor(scales, device=codes.device)[..., None, None]


def to_arrow(
    probe_id: int, image_ids: np.ndarray, codes: np.ndarray, scales: np.ndarray, pooled: np.ndarray
) -> pa.Table:
    n = len(image_ids)
    return pa.table(
        {
            "probe_id": pa.array(np.full(n, probe_id, np.int32)),
            "image_id": pa.array(image_ids.astype(np.int32)),
            "scales": pa.FixedSizeListArray.from_arrays(
                pa.array(scales.astype(np.float32).reshape(-1)), scales.shape[1]
            ).cast(pa.list_(pa.float32())),
            "codes": pa.array([codes[i].tobytes() for i in range(n)], pa.binary()),
            "pooled": pa.FixedSizeListArray.from_arrays(
                pa.array(pooled.astype(np.float32).reshape(-1)), pooled.shape[1]
            ).cast(pa.list_(pa.float32())),
        }
    )


def write(con: duckdb.DuckDBPyConnection, table: pa.Table) -> None:
    writer.insert(con, "activations", table)


def stored_image_ids(con: duckdb.DuckDBPyConnection, probe_id: int) -> set[int]:
    return set(stored_order(con, probe_id))


def stored_order(con: duckdb.DuckDBPyConnection, probe_id: int) -> list[int]:
    """Image ids in storage order: the order in which iter_codes streams them."""
    return [r[0] for r in con.execute("SELECT image_id FROM activations WHERE probe_id = ?", [probe_id]).fetchall()]


def iter_codes(
    con: duckdb.DuckDBPyConnection,
    probe_id: int,
    shape: tuple[int, int, int],
    image_ids: list[int] | None = None,
    batch: int = 256,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Stream (image_ids, codes uint8 [n, K, H, W], scales float32 [n, K]) in storage order, BATCH
    rows at a time.

    No ORDER BY: DuckDB cannot sort a table of large blobs within a bounded memory (measured: a
    sorted scan of 86 MB of codes fails under a 250 MB limit that the plain scan runs within), while
    a plain scan streams in insertion order (preserve_insertion_order), as stored_order lists.
    Each read is one window of BATCH consecutive rows (by rowid), not one scan of the whole table:
    a scan decodes 2,048 rows per vector whatever batch its reader hands out (90 MB of codes at
    AlexNet conv5), and fills DuckDB's cache as it goes, so its memory rose with the dataset up to
    several vectors (measured: +160 MB of peak RSS from 1,000 to 4,000 images); a window holds
    BATCH rows (tests/test_memory.py)."""
    k, h, w = shape
    for record in _windows(con, probe_id, "image_id, scales, codes", image_ids, batch):
        ids = record.column(0).to_numpy()
        scales = np.array(record.column(1).combine_chunks().flatten().to_numpy(zero_copy_only=False)).reshape(-1, k)
        codes = _blob_rows(record.column(2), k * h * w).reshape(-1, k, h, w)
        del record
        yield ids, codes, scales


def _blob_rows(column: pa.ChunkedArray, width: int) -> np.ndarray:
    """A column of equal-length blobs as one owned uint8 array [n, width], copied once from Arrow's
    data buffers (to_pylist made a bytes object per row, then a join and a bytearray of them all:
    three more copies of the window, made of small allocations that fragmented the heap)."""
    out = np.empty((len(column), width), np.uint8)
    at = 0
    for chunk in column.chunks:
        if chunk.null_count:
            raise N2vdbError("an activation row has no codes: the database is damaged; re-run the ingest of this probe")
        offset_type = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        offsets = np.frombuffer(chunk.buffers()[1], offset_type)[chunk.offset : chunk.offset + len(chunk) + 1]
        if not np.all(np.diff(offsets) == width):
            raise N2vdbError(
                f"activation codes are not {width} bytes per image: the database is damaged or from another "
                "probe shape; re-run the ingest of this probe"
            )
        data = np.frombuffer(chunk.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
        out[at : at + len(chunk)] = data.reshape(len(chunk), width)
        at += len(chunk)
    return out


def _windows(
    con: duckdb.DuckDBPyConnection, probe_id: int, columns: str, image_ids: list[int] | None, rows: int
) -> Iterator[pa.Table]:
    """COLUMNS of the probe's rows (of IMAGE_IDS only, where given) in storage order, as tables of
    at most ROWS consecutive rows, each read on its own (see iter_codes)."""
    sql = f"SELECT {columns} FROM activations WHERE probe_id = $p AND rowid BETWEEN $lo AND $hi"
    if image_ids is not None:  # other images may lie between a window's rows
        sql += " AND image_id IN (SELECT unnest($ids))"
    # A cursor of its own, so the caller's unfinished results on `con` and its statements between
    # windows cannot touch (or be touched by) this read.
    cursor = con.cursor()
    try:
        located = _locate(cursor, probe_id, image_ids)
        for start in range(0, len(located), rows):
            window = located[start : start + rows]
            params: dict = {"p": probe_id, "lo": window[0][0], "hi": window[-1][0]}
            if image_ids is not None:
                params["ids"] = [image_id for _, image_id in window]
            yield cursor.sql(sql, params=params).to_arrow_table()
    finally:
        cursor.close()


def _locate(con: duckdb.DuckDBPyConnection, probe_id: int, image_ids: list[int] | None) -> list[tuple[int, int]]:
    """(rowid, image_id) of the probe's rows (of IMAGE_IDS only, where given), in storage order."""
    sql = "SELECT rowid, image_id FROM activations WHERE probe_id = $p"
    params: dict = {"p": probe_id}
    if image_ids is not None:
        sql += " AND image_id IN (SELECT unnest($ids))"
        params["ids"] = [int(i) for i in image_ids]
    return [(int(r), int(i)) for r, i in con.sql(sql, params=params).fetchall()]


def iter_activations(
    con: duckdb.DuckDBPyConnection,
    probe_id: int,
    shape: tuple[int, int, int],
    image_ids: list[int] | None = None,
    batch: int = 256,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream (image_ids, float32 activations [n, K, H, W]) dequantised, in storage order."""
    for ids, codes, scales in iter_codes(con, probe_id, shape, image_ids, batch):
        yield ids, dequantise(codes, scales).numpy()


def _pooled_windows(con: duckdb.DuckDBPyConnection, probe_id: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(image ids, spatial means [rows, K]) of the probe's rows, in windows, in storage order."""
    for record in _windows(con, probe_id, "image_id, pooled", None, 4096):
        flat = record.column(1).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        yield record.column(0).to_numpy(), flat.reshape(len(record), -1)


def pooled(con: duckdb.DuckDBPyConnection, probe_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(image_ids, spatial means [N, K]) for classification embeddings, in image-id order: read in
    windows and sorted here, not by an ORDER BY, whose sort of every row would have to fit DuckDB's
    budget at once (64 MB of means for all of Broden at 256 filters; readers never spill). Each
    window is copied into its place in one [N, K] array, so the means are held once, not also as
    a list of parts to concatenate (16 MB more at 16,000 images of a 256-filter layer)."""
    (n,) = first(con.execute("SELECT count(*) FROM activations WHERE probe_id = ?", [probe_id]))
    image_ids, means, at = np.zeros(n, np.int32), None, 0
    for ids, block in _pooled_windows(con, probe_id):
        if means is None:
            means = np.empty((n, block.shape[1]), np.float32)
        image_ids[at : at + len(ids)], means[at : at + len(ids)] = ids, block
        at += len(ids)
    if means is None:
        return np.zeros(0, np.int32), np.zeros((0, 0), np.float32)
    if (image_ids[1:] < image_ids[:-1]).any():  # stored out of order (a resumed or merged extraction)
        order = np.argsort(image_ids, kind="stable")
        image_ids, means = image_ids[order], means[order]
    return image_ids, means


def pooled_mean(con: duckdb.DuckDBPyConnection, probe_id: int) -> np.ndarray:
    """float64 [K]: each filter's spatial mean averaged over the probe's images, summed window by
    window (no [N, K] array of the means)."""
    total, n = None, 0
    for ids, block in _pooled_windows(con, probe_id):
        part = block.sum(axis=0, dtype=np.float64)
        total, n = (part if total is None else total + part), n + len(ids)
    return np.zeros(0) if total is None else total / n


def thresholds(con: duckdb.DuckDBPyConnection, probe_id: int) -> torch.Tensor:
    """The probe's per-filter thresholds, float32 [K], in filter order."""
    rows = con.execute("SELECT threshold FROM filters WHERE probe_id = ? ORDER BY filter", [probe_id]).fetchall()
    return torch.tensor([t for (t,) in rows], dtype=torch.float32)
