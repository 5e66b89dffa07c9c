"""Stage 2 of ingest: single-filter set IoU for every (filter, concept, split), as tensor algebra.

Per image: the K filter masks M [K, P] at segmentation size and the image's concept masks L [C, P]
give every intersection in one product M @ L^T; |M| and |L| give the unions. Totals are summed
over the images of a split that contain the concept (method.md section 3). `--iou-mode netdissect`
is NetDissect-Lite's tally instead, with its own denominator (stats/netdissect.py).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial

import duckdb
import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from n2vdb import activations as acts_store
from n2vdb.data import pool
from n2vdb.data.broden import BrodenDataset, ImageRow, LabelMaps
from n2vdb.probe import Probe
from n2vdb.progress import progress_bar
from n2vdb.stats import netdissect, pil_resize, upsample_patterns
from n2vdb.stats.thresholds import code_cutoffs
from n2vdb.store import writer
from n2vdb.store.connection import first, transaction
from n2vdb.store.sessions import Store

MODES = ("net2vec", "netdissect")
EXACT_FLOAT32 = 1 << 24  # float32 holds every integer up to here exactly
# Activation values per batch of images (at most 256 images): 96 images at AlexNet conv5. A batch's
# arithmetic (its binary maps, each image's concepts padded to the widest, the [pairs, K] overlaps)
# held ~55 MB above the stage's level at 256 images, and the heap kept the highest such level once
# many batches had passed, so a large dataset's peak rose while a small one's ended first (measured,
# the IoU stage alone at 16,000 Broden-profile images, the tally's highest RSS: 1,143 MB at 2^24
# values, 1,067 MB at 2^22; at 1,000 images the stage's peak 1,068 -> 1,003 MB; no slower).
BATCH_VALUES = 1 << 22


def filter_masks(acts: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """acts [n, K, H, W] -> bool masks [n, K, sh, sw].

    net2vec: threshold at H x W, bilinear upsample (align_corners=True), > 0.5. Only maps with a cell
    above the threshold are upsampled: at the 0.995 quantile most (image, filter) maps have none
    (their mask is empty), and the upsample is the cost.
    netdissect: PIL's bilinear resize of the raw activations (as NetDissect-Lite), then > the
    threshold compared in float64 (pass float64 thresholds: thresholds_for gives them).
    """
    if mode == "net2vec":
        t = thresholds.view(1, -1, 1, 1).to(acts.dtype)
        binary = acts > t
        active = binary.flatten(2).any(dim=2)  # [n, K]
        out = torch.zeros(*binary.shape[:2], *size, dtype=torch.bool, device=acts.device)
        if active.any():
            maps = binary[active].to(acts.dtype)[None]  # [1, m, H, W]: the active maps as channels
            out[active] = F.interpolate(maps, size=size, mode="bilinear", align_corners=True)[0] > 0.5
        return out
    if mode == "netdissect":
        return torch.stack([pil_resize.above(a, thresholds.double(), size) for a in acts])
    raise ValueError(f"unknown IoU mode {mode!r}; choose one of {', '.join(MODES)}")


def _masks_of(dataset: BrodenDataset, row: ImageRow):
    """(image_id, concept ids, bool masks [C, sh, sw]) of one row."""
    ids, masks = dataset.masks(row)
    return row.image_id, ids, masks


def iter_masks(dataset: BrodenDataset, rows: list[ImageRow], workers: int) -> Iterator:
    """Decoded masks in row order, in WORKERS processes (data/pool.py) if any."""
    for image_id, ids, masks in pool.decoded(partial(_masks_of, dataset), rows, workers):
        yield int(image_id), ids, torch.from_numpy(masks)


@dataclass
class LabelSide:
    """What the IoU arithmetic needs of an image's concept masks: with a pattern table, their
    per-cell counts (upsample_patterns.label_counts, small integers) where a concept has pixels in the
    cell (sparse_counts: about a fifth of them at Broden density) and not the masks; without one,
    the masks."""

    area: torch.Tensor  # [C] |L| per concept, int64
    cells: torch.Tensor | None  # [Z] concept * cells + cell of each row of counts, ascending
    counts: torch.Tensor | None  # [Z, 16]
    masks: torch.Tensor | None  # [C, sh, sw] bool


def label_side(masks: torch.Tensor, layer: tuple[int, int] | None) -> LabelSide:
    """The label side of bool masks [C, sh, sw]; LAYER = the activation map's (H, W) in net2vec
    mode, None for masks only."""
    tab = upsample_patterns.table(*layer, *masks.shape[1:]) if layer is not None and len(masks) else None
    if tab is None:
        return LabelSide(masks.flatten(1).sum(dim=1), None, None, masks)
    return _counted(*upsample_patterns.sparse_counts(upsample_patterns.label_counts(masks, tab)), len(masks), tab)


def _counted(index: torch.Tensor, counts: torch.Tensor, n: int, tab: upsample_patterns.PatternTable) -> LabelSide:
    """The LabelSide of N concepts' sparse per-cell counts (float)."""
    # Pattern 15 (all corners on) turns on every pixel of its cell, and every pixel has one cell.
    concept = torch.div(index, tab.cells, rounding_mode="floor")
    area = torch.zeros(n).index_add_(0, concept, counts[:, 15]).round().long()
    # A cell holds at most tab.order.shape[1] pixels: counts that fit in a byte travel as bytes.
    return LabelSide(area, index, counts.to(torch.uint8 if tab.order.shape[1] <= 255 else torch.int32), None)


def maps_side(maps: LabelMaps, layer: tuple[int, int] | None) -> LabelSide:
    """label_side of an image's decoded label maps: with a pattern table, the counts come straight from
    the label numbers (upsample_patterns.code_counts), no per-concept mask built; else its masks."""
    if layer is None or not len(maps.ids) or upsample_patterns.table(*layer, *maps.shape) is None:
        return label_side(torch.from_numpy(maps.masks()), layer)
    tab, types = upsample_patterns.table(*layer, *maps.shape), upsample_patterns.pixel_types(*layer, *maps.shape)
    whole = np.searchsorted(maps.ids, maps.whole)
    index, counts = upsample_patterns.code_counts(
        maps.channels, maps.present, maps.local(), whole, len(maps.ids), tab, types
    )
    return _counted(index, counts, len(maps.ids), tab)


def _label_arrays(dataset: BrodenDataset, layer: tuple[int, int] | None, row: ImageRow):
    """(image_id, concept ids, LabelSide as numpy arrays) of one row. A worker sends numpy arrays:
    pickled inline, where tensors would each cost a shared-memory file and its handover."""
    maps = dataset.label_maps(row)
    side = maps_side(maps, layer)
    arrays = (side.area, side.cells, side.counts, side.masks)
    return row.image_id, maps.ids, tuple(None if t is None else t.numpy() for t in arrays)


def iter_label_sides(
    dataset: BrodenDataset,
    rows: list[ImageRow],
    workers: int,
    layer: tuple[int, int] | None,
    masks: Iterable | None = None,
) -> Iterator:
    """(image_id, concept ids, LabelSide) in row order; from MASKS ((image_id, ids, bool masks) in row
    order) where given, else decoded (in WORKERS processes, if any)."""
    if masks is not None:
        for image_id, ids, m in masks:
            yield int(image_id), ids, label_side(torch.as_tensor(m), layer)
    else:
        for image_id, ids, arrays in pool.decoded(partial(_label_arrays, dataset, layer), rows, workers):
            yield int(image_id), ids, LabelSide(*(None if a is None else torch.from_numpy(a) for a in arrays))


def thresholds_for(con: duckdb.DuckDBPyConnection, probe_id: int, mode: str) -> torch.Tensor:
    """The thresholds a mode compares with: float32 in net2vec mode (as always), float64 in netdissect
    mode (NetDissect-Lite compares float32 maps with float64 thresholds)."""
    return netdissect.thresholds(con, probe_id) if mode == "netdissect" else acts_store.thresholds(con, probe_id)


@dataclass
class BatchOverlaps:
    """The overlaps of one batch of images, one row per (image, concept) pair, in image order and
    concept order within an image; counts on the CPU, exact integers in float32."""

    image_ids: np.ndarray  # [B]
    pair_image: np.ndarray  # [N] index into image_ids
    concept_ids: np.ndarray  # [N]
    intersection: torch.Tensor  # [N, K]
    mask_area: torch.Tensor  # [B, K] |M| per image and filter
    label_area: torch.Tensor  # [N] |L| per pair


def iter_batch_overlaps(
    con: duckdb.DuckDBPyConnection,
    probe: Probe,
    dataset: BrodenDataset,
    thresholds: torch.Tensor,
    mode: str,
    workers: int,
    masks: Iterable | None = None,
    device: str | torch.device = "cpu",
    batch: int | None = None,
) -> Iterator[BatchOverlaps]:
    """BatchOverlaps per BATCH stored images, whatever DEVICE did the arithmetic.
    masks, if given, replaces decoding: (image_id, concept ids, bool masks) in storage order
    (activations.stored_order)."""
    k, h, w = probe.n_filters, probe.height, probe.width
    if batch is None:
        batch = max(1, min(256, BATCH_VALUES // (k * h * w)))
    rows = [
        dataset.rows[i] for i in acts_store.stored_order(con, probe.activation_probe)
    ]  # masks decoded in the order activations stream
    sides = iter_label_sides(dataset, rows, workers, (h, w) if mode == "net2vec" else None, masks)
    device = torch.device(device)
    thresholds = thresholds.to(device)
    for ids, codes, scales in acts_store.iter_codes(con, probe.activation_probe, (k, h, w), batch=batch):
        codes, scales = torch.as_tensor(codes, device=device), torch.as_tensor(scales, device=device)
        cutoffs = code_cutoffs(scales, thresholds) if mode == "net2vec" else None
        # The dequantised activations, only where cutoffs cannot stand for them.
        values = acts_store.dequantise(codes, scales) if cutoffs is None else None
        decoded = []
        for image_id in ids:
            side_id, concept_ids, side = next(sides)
            assert side_id == image_id, "activations and masks out of step"
            decoded.append((np.asarray(concept_ids, dtype=np.int64), side))
        if values is None and any(side.counts is None and len(side.area) for _, side in decoded):
            values = acts_store.dequantise(codes, scales)
        sizes = np.array([len(c) for c, _ in decoded], dtype=np.int64)
        first_pair = np.cumsum(sizes) - sizes
        n = int(sizes.sum())
        inter = torch.zeros(n, k)
        mask_area = torch.zeros(len(ids), k)
        label_area = torch.zeros(n)
        if n:
            label_area[:] = torch.cat([side.area for _, side in decoded]).float()
        groups: dict[tuple[int, int], list[int]] = {}  # images with counts, by segmentation size: one table each
        for i, (_, side) in enumerate(decoded):
            if side.counts is not None:
                row = dataset.rows[int(ids[i])]
                groups.setdefault((row.sh, row.sw), []).append(i)
            elif len(side.area):
                image_inter, image_area = image_overlaps(values[i], thresholds, side.masks.to(device), mode)
                inter[first_pair[i] : first_pair[i] + sizes[i]] = image_inter.T.cpu()
                mask_area[i] = image_area.cpu()
        for size, members in groups.items():
            pairs = torch.from_numpy(
                np.concatenate([np.arange(first_pair[i], first_pair[i] + sizes[i]) for i in members])
            )
            tab = upsample_patterns.table_on(h, w, *size, device)
            pair_image = torch.from_numpy(np.repeat(np.arange(len(members)), sizes[members])).to(device)
            # Each member's (concept, cell) rows renumbered to (pair of the group, cell).
            first_of = np.cumsum(sizes[members]) - sizes[members]
            index = torch.cat([decoded[i][1].cells + int(f) * tab.cells for i, f in zip(members, first_of)])
            counts = torch.cat([decoded[i][1].counts for i in members]).to(device)
            chosen = torch.as_tensor(members, device=device) if len(members) < len(ids) else slice(None)
            if cutoffs is not None:
                group_inter, group_area = upsample_patterns.code_overlaps(
                    codes[chosen], cutoffs[chosen], index.to(device), counts, pair_image, tab
                )
            else:
                group_inter, group_area = upsample_patterns.batch_overlaps(
                    values[chosen] > thresholds.view(1, -1, 1, 1), index.to(device), counts, pair_image, tab
                )
            if len(pairs) == n:  # the batch's every pair, in order: no copy
                inter = group_inter.cpu()
            else:
                inter[pairs] = group_inter.cpu()
            mask_area[members] = group_area.cpu()
        yield BatchOverlaps(
            np.asarray(ids, dtype=np.int64),
            np.repeat(np.arange(len(ids)), sizes),
            np.concatenate([c for c, _ in decoded]) if n else np.zeros(0, np.int64),
            inter,
            mask_area,
            label_area,
        )


def image_overlaps(
    acts: torch.Tensor, thresholds: torch.Tensor, concept_masks: torch.Tensor, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """acts [K, H, W], concept masks [C, sh, sw] -> (intersections [K, C], filter mask areas [K])."""
    size = tuple(concept_masks.shape[1:])
    tab = upsample_patterns.table_on(acts.shape[1], acts.shape[2], *size, acts.device) if mode == "net2vec" else None
    if tab is not None:
        return upsample_patterns.overlaps(acts > thresholds.view(-1, 1, 1), concept_masks, tab)
    m = filter_masks(acts[None], thresholds, size, mode)[0].flatten(1).float()
    return m @ concept_masks.flatten(1).float().T, m.sum(dim=1)


@dataclass
class IouTotals:
    concept_ids: np.ndarray  # [C] all concepts of the dataset
    intersection: dict[str, np.ndarray]  # split -> [K, C] int64
    union: dict[str, np.ndarray]

    def iou(self, split: str) -> np.ndarray:
        union = self.union[split]
        return np.divide(self.intersection[split], union, out=np.zeros(union.shape), where=union > 0)


class OverlapSpill:
    """The first pass's overlaps in a temporary file, intersections sparse (most are zero: a filter's
    mask is small), so that the per-image best-filter scores read them back instead of decoding
    every mask a second time. Memory stays at one batch; disk holds ~8 bytes per non-zero
    intersection plus 4 per (image, filter)."""

    def __init__(self):
        self.file = tempfile.TemporaryFile(prefix="n2vdb-iou-")
        self.batches = 0

    def add(self, batch: BatchOverlaps) -> None:
        inter = batch.intersection.round().to(torch.int32).flatten()
        at = torch.nonzero(inter).flatten()
        for array in (
            batch.image_ids,
            batch.pair_image.astype(np.int32),
            batch.concept_ids,
            batch.mask_area.round().to(torch.int32).numpy(),
            batch.label_area.round().to(torch.int32).numpy(),
            at.to(torch.int32).numpy(),
            inter[at].numpy(),
        ):
            np.save(self.file, array, allow_pickle=False)
        self.batches += 1

    def __iter__(self) -> Iterator[BatchOverlaps]:
        self.file.seek(0)
        for _ in range(self.batches):
            image_ids, pair_image, concept_ids, mask_area, label_area, at, values = (
                np.load(self.file, allow_pickle=False) for _ in range(7)
            )
            inter = torch.zeros(len(concept_ids) * mask_area.shape[1])
            inter[torch.from_numpy(at).long()] = torch.from_numpy(values).float()
            yield BatchOverlaps(
                image_ids,
                pair_image.astype(np.int64),
                concept_ids,
                inter.view(len(concept_ids), -1),
                torch.from_numpy(mask_area).float(),
                torch.from_numpy(label_area).float(),
            )

    def close(self) -> None:
        self.file.close()


def tally(
    con: duckdb.DuckDBPyConnection,
    probe: Probe,
    dataset: BrodenDataset,
    thresholds: torch.Tensor,
    mode: str,
    workers: int = 0,
    masks: Iterable | None = None,
    device: str | torch.device = "cpu",
    spill: OverlapSpill | None = None,
) -> IouTotals:
    """Set totals over every image; SPILL, if given, keeps each batch's overlaps for per_image_best."""
    concept_ids = np.array(sorted(dataset.labels), dtype=np.int64)
    split_of = split_lookup(dataset)
    k, c = probe.n_filters, len(concept_ids)
    # Accumulated [2C, K]: a pair's row adds to its concept's row, train's concepts then val's;
    # handed out as [K, C] per split.
    inter = torch.zeros(2 * c, k, dtype=torch.int64)
    union = torch.zeros(2 * c, k, dtype=torch.int64)
    largest = max((r.sh * r.sw for r in dataset.rows), default=0)
    total = first(con.execute("SELECT count(*) FROM activations WHERE probe_id = ?", [probe.activation_probe]))[0]
    with progress_bar() as bar:
        task = bar.add_task("single-filter IoU", total=total)
        for batch in iter_batch_overlaps(con, probe, dataset, thresholds, mode, workers, masks=masks, device=device):
            bar.advance(task, len(batch.image_ids))
            if spill is not None:
                spill.add(batch)
            if not len(batch.concept_ids):
                continue
            split = torch.from_numpy(split_of[batch.image_ids[batch.pair_image]]).long()
            rows = torch.from_numpy(np.searchsorted(concept_ids, batch.concept_ids)) + c * split
            mask_area = batch.mask_area[batch.pair_image]
            if 2 * len(batch.image_ids) * largest <= EXACT_FLOAT32:
                # A concept has at most one pair per image, so its sums over a batch stay below 2^24
                # (a union is at most twice an image's pixels): exact in float32, then added as integers.
                part = torch.zeros(2 * c, k).index_add_(0, rows, batch.intersection)
                labels = torch.zeros(2 * c).index_add_(0, rows, batch.label_area)
                inter += part.long()
                union += (torch.zeros(2 * c, k).index_add_(0, rows, mask_area) + labels[:, None] - part).long()
            else:
                i_nk = batch.intersection.round().long()
                inter.index_add_(0, rows, i_nk)
                union.index_add_(0, rows, (mask_area + batch.label_area[:, None]).round().long() - i_nk)
    return IouTotals(
        concept_ids,
        {s: inter[j * c : (j + 1) * c].T.numpy().copy() for j, s in enumerate(("train", "val"))},
        {s: union[j * c : (j + 1) * c].T.numpy().copy() for j, s in enumerate(("train", "val"))},
    )


def split_lookup(dataset: BrodenDataset) -> np.ndarray:
    """image_id -> 0 (train) or 1 (val)."""
    split = np.zeros(max((r.image_id for r in dataset.rows), default=-1) + 1, np.int8)
    for r in dataset.rows:
        split[r.image_id] = 0 if r.split == "train" else 1
    return split


def best_filters(totals: IouTotals) -> dict[int, int]:
    """concept -> the filter with the highest train-split IoU, for concepts seen in train."""
    train = totals.iou("train")
    seen = totals.union["train"].max(axis=0) > 0
    return {int(c): int(train[:, j].argmax()) for j, c in enumerate(totals.concept_ids) if seen[j]}


def _iou_table(probe_id: int, totals: IouTotals) -> pa.Table:
    parts = []
    for split in ("train", "val"):
        ks, cs = np.nonzero(totals.union[split])
        parts.append(
            pa.table(
                {
                    "probe_id": pa.array(np.full(len(ks), probe_id, np.int32)),
                    "filter": pa.array(ks.astype(np.int32)),
                    "concept_id": pa.array(totals.concept_ids[cs].astype(np.int32)),
                    "split": pa.repeat(pa.scalar(split, pa.string()), len(ks)),
                    "intersection": totals.intersection[split][ks, cs],
                    "union_": totals.union[split][ks, cs],
                    "iou": totals.iou(split)[ks, cs],
                }
            )
        )
    return pa.concat_tables(parts)


def per_image_best(
    con,
    probe: Probe,
    dataset: BrodenDataset,
    thresholds: torch.Tensor,
    mode: str,
    best: dict[int, int],
    workers: int = 0,
    device: str | torch.device = "cpu",
    overlaps: Iterable[BatchOverlaps] | None = None,
) -> pa.Table:
    """Per-image IoU of each concept's best filter, on every image containing the concept; from
    OVERLAPS (an OverlapSpill of the tally) where given, else computed again."""
    if overlaps is None:
        overlaps = iter_batch_overlaps(con, probe, dataset, thresholds, mode, workers, device=device)
    concept_ids = np.array(sorted(dataset.labels), dtype=np.int64)
    best_of = np.array([best.get(int(c), -1) for c in concept_ids], dtype=np.int64)  # -1: no best filter
    out: dict[str, list] = {k: [] for k in ("image_id", "concept_id", "intersection", "union_")}
    for batch in overlaps:
        f = best_of[np.searchsorted(concept_ids, batch.concept_ids)]
        keep = np.flatnonzero(f >= 0)
        pairs, f = torch.from_numpy(keep), torch.from_numpy(f[keep])
        images = torch.from_numpy(batch.pair_image[keep])
        inter = batch.intersection[pairs, f].round().long()
        union = (batch.mask_area[images, f] + batch.label_area[pairs]).round().long() - inter
        out["image_id"].append(batch.image_ids[batch.pair_image[keep]])
        out["concept_id"].append(batch.concept_ids[keep])
        out["intersection"].append(inter.numpy())
        out["union_"].append(union.numpy())
    joined = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in out.items()}
    return writer.score_rows(
        probe.probe_id,
        "best_filter",
        joined["image_id"],
        joined["concept_id"],
        joined["intersection"],
        joined["union_"],
    )


def run(
    store: Store,
    probe: Probe,
    dataset: BrodenDataset,
    mode: str,
    workers: int = 0,
    device: str | torch.device = "cpu",
    finish=None,
) -> IouTotals:
    """The whole stage: computed over a shared read connection, written in one transaction (a re-run
    replaces, never duplicates); FINISH(con), where given (n2vdb.pipeline), runs in that transaction."""
    with store.reading() as con:
        thresholds = thresholds_for(con, probe.probe_id, mode)
        spill = None
        if mode == "netdissect":
            totals = netdissect.tally(con, probe, dataset, workers, device)
        else:
            spill = OverlapSpill()
            totals = tally(con, probe, dataset, thresholds, mode, workers, device=device, spill=spill)
        best = best_filters(totals)
        try:
            scores = per_image_best(con, probe, dataset, thresholds, mode, best, workers, device, overlaps=spill)
        finally:
            if spill is not None:
                spill.close()
    with store.writing() as con, transaction(con):
        writer.replace_probe_rows(con, "filter_concept_iou", probe.probe_id, _iou_table(probe.probe_id, totals))
        writer.replace_probe_rows(con, "image_concept_scores", probe.probe_id, scores, methods=("best_filter",))
        if finish is not None:
            finish(con)
    return totals
