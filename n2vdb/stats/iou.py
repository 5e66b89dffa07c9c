"""Stage 2 of ingest: single-filter set IoU for every (filter, concept, split), as tensor algebra.

Per image: the K filter masks M [K, P] at segmentation size and the image's concept masks L [C, P]
give every intersection in one product M @ L^T; |M| and |L| give the unions. Totals are summed
over the images of a split that contain the concept (method.md section 3). `--iou-mode netdissect`
is NetDissect-Lite's tally instead, with its own denominator (stats/netdissect.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from n2vdb import activations as acts_store
from n2vdb.data.broden import BrodenDataset, ImageRow
from n2vdb.probe import Probe, set_status
from n2vdb.stats import netdissect, pil_resize, upsample_patterns
from n2vdb.progress import progress_bar
from n2vdb.store.connection import first, transaction
from n2vdb.store.sessions import Store

MODES = ("net2vec", "netdissect")


def filter_masks(acts: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """acts [n, K, H, W] -> bool masks [n, K, sh, sw].

    net2vec: threshold at H x W, bilinear upsample (align_corners=True), > 0.5.
    netdissect: PIL's bilinear resize of the raw activations (as NetDissect-Lite), then > the
    threshold compared in float64 (pass float64 thresholds: thresholds_for gives them).
    """
    if mode == "net2vec":
        t = thresholds.view(1, -1, 1, 1).to(acts.dtype)
        binary = (acts > t).to(acts.dtype)
        return F.interpolate(binary, size=size, mode="bilinear", align_corners=True) > 0.5
    if mode == "netdissect":
        return torch.stack([pil_resize.above(a, thresholds.double(), size) for a in acts])
    raise ValueError(f"unknown IoU mode {mode!r}; choose one of {', '.join(MODES)}")


class MaskRows(Dataset):
    """(image_id, concept ids, bool masks [C, sh, sw]) per row, decoded in worker processes."""

    def __init__(self, dataset: BrodenDataset, rows: list[ImageRow]):
        self.dataset, self.rows = dataset, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        row = self.rows[index]
        ids, masks = self.dataset.masks(row)
        return row.image_id, ids, masks


def _as_list(items: list) -> list:
    return items


def iter_masks(dataset: BrodenDataset, rows: list[ImageRow], workers: int) -> Iterator:
    """Decoded masks in row order. Workers send packed chunks of rows: one message per image would
    cost more than the decoding it saves."""
    if not workers:
        for row in rows:
            ids, masks = dataset.masks(row)
            yield row.image_id, ids, torch.from_numpy(masks)
        return
    loader = DataLoader(MaskRows(dataset, rows), batch_size=32, num_workers=workers, collate_fn=_as_list,
                        prefetch_factor=4)
    for chunk in loader:
        for image_id, ids, masks in chunk:
            yield int(image_id), ids, torch.from_numpy(masks)


def thresholds_for(con: duckdb.DuckDBPyConnection, probe_id: int, mode: str) -> torch.Tensor:
    """The thresholds a mode compares with: float32 in net2vec mode (as always), float64 in netdissect
    mode (NetDissect-Lite compares float32 maps with float64 thresholds)."""
    return netdissect.thresholds(con, probe_id) if mode == "netdissect" else acts_store.thresholds(con, probe_id)


def iter_image_overlaps(con: duckdb.DuckDBPyConnection, probe: Probe, dataset: BrodenDataset,
                        thresholds: torch.Tensor, mode: str, workers: int, masks: Iterable | None = None,
                        device: str | torch.device = "cpu"):
    """Per image: (image_id, concept ids [C], intersections [K, C], |M| [K], |L| [C]), the counts on
    the CPU whatever DEVICE did the arithmetic.
    masks, if given, replaces decoding: (image_id, concept ids, bool masks) in storage order
    (activations.stored_order)."""
    shape = (probe.n_filters, probe.height, probe.width)
    rows = [dataset.rows[i] for i in acts_store.stored_order(con, probe.activation_probe)]  # masks decoded in the order activations stream
    masks = iter(masks) if masks is not None else iter_masks(dataset, rows, workers)
    device = torch.device(device)
    thresholds = thresholds.to(device)
    for ids, codes, scales in acts_store.iter_codes(con, probe.activation_probe, shape, batch=64):
        values = (torch.from_numpy(codes).to(device).float()
                  * torch.from_numpy(scales).to(device)[:, :, None, None])
        for i, image_id in enumerate(ids):
            mask_id, concept_ids, concept_masks = next(masks)
            assert mask_id == image_id, "activations and masks out of step"
            concept_ids, concept_masks = np.asarray(concept_ids), torch.as_tensor(concept_masks)
            if len(concept_ids) == 0:
                yield int(image_id), concept_ids, None, None, None
                continue
            inter, mask_area = image_overlaps(values[i], thresholds, concept_masks.to(device), mode)
            yield int(image_id), concept_ids, inter.cpu(), mask_area.cpu(), concept_masks.flatten(1).sum(dim=1)


def image_overlaps(acts: torch.Tensor, thresholds: torch.Tensor, concept_masks: torch.Tensor, mode: str
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """acts [K, H, W], concept masks [C, sh, sw] -> (intersections [K, C], filter mask areas [K])."""
    size = tuple(concept_masks.shape[1:])
    tab = upsample_patterns.table_on(acts.shape[1], acts.shape[2], *size, acts.device) \
        if mode == "net2vec" else None
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


def tally(con: duckdb.DuckDBPyConnection, probe: Probe, dataset: BrodenDataset, thresholds: torch.Tensor,
          mode: str, workers: int = 0, masks: Iterable | None = None, device: str | torch.device = "cpu"
          ) -> IouTotals:
    concept_ids = np.array(sorted(dataset.labels), dtype=np.int64)
    column = {int(c): i for i, c in enumerate(concept_ids)}
    split_of = {r.image_id: r.split for r in dataset.rows}
    k = probe.n_filters
    inter = {s: np.zeros((k, len(concept_ids)), np.int64) for s in ("train", "val")}
    union = {s: np.zeros((k, len(concept_ids)), np.int64) for s in ("train", "val")}
    total = first(con.execute("SELECT count(*) FROM activations WHERE probe_id = ?", [probe.activation_probe]))[0]
    with progress_bar() as bar:
        task = bar.add_task("single-filter IoU", total=total)
        for image_id, ids, i_kc, m_k, l_c in iter_image_overlaps(con, probe, dataset, thresholds, mode, workers,
                                                                 masks=masks, device=device):
            bar.advance(task)
            if i_kc is None:
                continue
            cols = np.array([column[int(c)] for c in ids])
            split = split_of[image_id]
            i_np = i_kc.round().long().numpy()
            inter[split][:, cols] += i_np
            union[split][:, cols] += (m_k[:, None] + l_c[None, :]).round().long().numpy() - i_np
    return IouTotals(concept_ids, inter, union)


def best_filters(totals: IouTotals) -> dict[int, int]:
    """concept -> the filter with the highest train-split IoU, for concepts seen in train."""
    train = totals.iou("train")
    seen = totals.union["train"].max(axis=0) > 0
    return {int(c): int(train[:, j].argmax()) for j, c in enumerate(totals.concept_ids) if seen[j]}


def _iou_table(probe_id: int, totals: IouTotals) -> pa.Table:
    parts = []
    for split in ("train", "val"):
        ks, cs = np.nonzero(totals.union[split])
        parts.append(pa.table({
            "probe_id": pa.array(np.full(len(ks), probe_id, np.int32)),
            "filter": pa.array(ks.astype(np.int32)),
            "concept_id": pa.array(totals.concept_ids[cs].astype(np.int32)),
            "split": pa.array([split] * len(ks), pa.string()),
            "intersection": totals.intersection[split][ks, cs],
            "union_": totals.union[split][ks, cs],
            "iou": totals.iou(split)[ks, cs],
        }))
    return pa.concat_tables(parts)


def per_image_best(con, probe: Probe, dataset: BrodenDataset, thresholds: torch.Tensor, mode: str,
                   best: dict[int, int], workers: int = 0, device: str | torch.device = "cpu") -> pa.Table:
    """Per-image IoU of each concept's best filter, on every image containing the concept."""
    out: dict[str, list] = {k: [] for k in ("image_id", "concept_id", "intersection", "union_")}
    for image_id, ids, i_kc, m_k, l_c in iter_image_overlaps(con, probe, dataset, thresholds, mode, workers,
                                                             device=device):
        if i_kc is None:
            continue
        for j, c in enumerate(ids):
            f = best.get(int(c))
            if f is None:
                continue
            inter = int(round(float(i_kc[f, j])))
            out["image_id"].append(image_id)
            out["concept_id"].append(int(c))
            out["intersection"].append(inter)
            out["union_"].append(int(round(float(m_k[f] + l_c[j]))) - inter)
    inter = np.array(out["intersection"], np.int64)
    union = np.array(out["union_"], np.int64)
    n = len(inter)
    return pa.table({
        "probe_id": pa.array(np.full(n, probe.probe_id, np.int32)),
        "image_id": pa.array(np.array(out["image_id"], np.int32)),
        "concept_id": pa.array(np.array(out["concept_id"], np.int32)),
        "method": pa.array(["best_filter"] * n, pa.string()),
        "intersection": inter, "union_": union,
        "iou": np.divide(inter, union, out=np.zeros(n), where=union > 0),
        "score": pa.nulls(n, pa.float64()),
    })


def run(store: Store, probe: Probe, dataset: BrodenDataset, mode: str, workers: int = 0,
        device: str | torch.device = "cpu") -> IouTotals:
    """The whole stage: computed over a shared read connection, written in one transaction (a re-run
    replaces, never duplicates)."""
    with store.reading() as con:
        thresholds = thresholds_for(con, probe.probe_id, mode)
        if mode == "netdissect":
            totals = netdissect.tally(con, probe, dataset, workers, device)
        else:
            totals = tally(con, probe, dataset, thresholds, mode, workers, device=device)
        best = best_filters(totals)
        scores = per_image_best(con, probe, dataset, thresholds, mode, best, workers, device)
    with store.writing() as con, transaction(con):
        con.execute("DELETE FROM filter_concept_iou WHERE probe_id = ?", [probe.probe_id])
        con.execute("DELETE FROM image_concept_scores WHERE probe_id = ? AND method = 'best_filter'",
                    [probe.probe_id])
        for name, table in (("filter_concept_iou", _iou_table(probe.probe_id, totals)),
                            ("image_concept_scores", scores)):
            con.register("_rows", table)
            con.execute(f"INSERT INTO {name} SELECT * FROM _rows")
            con.unregister("_rows")
        set_status(con, probe.probe_id, "embeddings")
    probe.status = "embeddings"
    return totals
