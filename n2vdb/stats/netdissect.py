"""`--iou-mode netdissect`: NetDissect-Lite's unit x label tally (its `tally_job`), quirks included.

Per image, for every unit whose map exceeds its threshold somewhere:
- the raw map is resized to the segmentation size as PIL's bilinear does (stats/pil_resize.py) and
  thresholded after: A = {pixels with resized value > T_k};
- intersection(k, L) += the number of (pixel in A, mask channel) pairs whose channel holds L: every
  PNG of every pixel category is a channel of its own, so a label found in two channels at one pixel
  counts twice; an image-level label adds |A| (its mask is the whole image);
- the unit's area |A| is added to the denominator of EVERY label of a category c when c is "hit" in
  that image: some pixel of A carries a label whose primary category is c, or the image has an
  image-level label of category c. Images that hold the label itself need not be among them, and an
  image holding it but where A touches no label of c does not count;
- label area(L) += its pixels summed over channels (sh * sw per image-level occurrence), on every image.
IoU(k, L) = intersection / (area of the unit in L's primary category + area(L) - intersection).
A label's primary category is NetDissect-Lite's: the category whose c_<category>.csv gives it the
largest coverage (ties to the later category), or, without those files, label.csv's largest count.

Two deliberate departures, both documented in docs/method.md: thresholds are the exact quantile
(NetDissect-Lite uses a streaming sketch), and an image with only image-level labels counts just
those categories (NetDissect-Lite reuses the previous unit's category hits there, a stale variable).
Totals are kept per split; their sums over splits are NetDissect-Lite's numbers (it has no splits).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import duckdb
import numpy as np
import torch

from n2vdb import activations as acts_store
from n2vdb.data import pool
from n2vdb.data.broden import BrodenDataset, ImageRow, decode_mask
from n2vdb.errors import DatasetError
from n2vdb.probe import Probe
from n2vdb.progress import progress_bar
from n2vdb.stats import pil_resize

UNIT_CHUNK = 512  # units resized at once: bounds the buffers ([chunk, sh, sw] x 8 bytes)


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def category_order(dataset: BrodenDataset) -> list[str]:
    """NetDissect-Lite's category list: category.csv's rows in order, else index.csv's columns."""
    path = dataset.root / "category.csv"
    if path.is_file():
        return [r["name"] for r in _read_csv(path) if r.get("name") in dataset.categories]
    return list(dataset.categories)


def primary_categories(dataset: BrodenDataset, categories: list[str]) -> dict[int, int]:
    """label number -> index into CATEGORIES of its primary category, as NetDissect-Lite chooses it."""
    coverage: dict[str, dict[int, float]] = {}
    for name in categories:
        path = dataset.root / f"c_{name}.csv"
        if not path.is_file():
            coverage = {}
            break
        coverage[name] = {int(r["number"]): float(r.get("coverage") or 0) for r in _read_csv(path)}
    out = {}
    for number, label in dataset.labels.items():
        if coverage:
            # max over (coverage if the label is in the category else 0, category index)
            out[number] = max((coverage[c].get(number, 0.0), i) for i, c in enumerate(categories))[1]
        else:
            out[number] = categories.index(label.category) if label.category in categories else 0
    return out


def label_channels(dataset: BrodenDataset, row: ImageRow, categories: list[str]) -> tuple[np.ndarray, list[int]]:
    """(pixel channels int32 [n, sh, sw] of label numbers, image-level labels with repeats)."""
    channels, scalars = [], []
    for category in categories:
        for rel in row.masks.get(category, ()):
            channels.append(decode_mask(dataset.root / "images" / rel, (row.sh, row.sw)))
        scalars.extend(row.labels.get(category, ()))
    stack = np.stack(channels) if channels else np.zeros((0, row.sh, row.sw), np.int32)
    unknown = (set(np.unique(stack).tolist()) | set(scalars)) - {0} - set(dataset.labels)
    if unknown:
        raise DatasetError(
            f"image {row.image} (index.csv line {row.image_id + 2}) uses label {min(unknown)} missing from label.csv"
        )
    return stack, scalars


def _channels_of(dataset: BrodenDataset, categories: list[str], row: ImageRow):
    return (row.image_id, *label_channels(dataset, row, categories))


def iter_channels(dataset: BrodenDataset, rows: list[ImageRow], categories: list[str], workers: int) -> Iterator:
    """(image_id, pixel channels, image-level labels) in row order, in WORKERS processes if any."""
    return pool.decoded(partial(_channels_of, dataset, categories), rows, workers)


def thresholds(con: duckdb.DuckDBPyConnection, probe_id: int) -> torch.Tensor:
    """The stored thresholds as float64: NetDissect-Lite compares float32 maps with float64 thresholds."""
    rows = con.execute("SELECT threshold FROM filters WHERE probe_id = ? ORDER BY filter", [probe_id]).fetchall()
    return torch.tensor([t for (t,) in rows], dtype=torch.float64)


def unit_masks(values: torch.Tensor, thresholds64: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """values [K, H, W] float32 -> bool [K, sh, sw]: PIL-resized map > threshold (compared in float64)."""
    out = torch.zeros(values.shape[0], *size, dtype=torch.bool, device=values.device)
    for start in range(0, values.shape[0], UNIT_CHUNK):
        end = start + UNIT_CHUNK
        out[start:end] = pil_resize.above(values[start:end], thresholds64[start:end], size)
    return out


def image_tally(
    values: torch.Tensor,
    thresholds64: torch.Tensor,
    channels: np.ndarray,
    n_categories: int,
    category_of: np.ndarray,
    scalars: list[int],
):
    """One image's contribution: (pixel labels [L], their areas [L], intersections [K, L], unit areas [K],
    categories hit [K, n_categories] bool), all numpy. channels: int label numbers [n, sh, sw];
    category_of: label number -> primary category index. Scalars add to intersections and areas in
    the caller."""
    k = values.shape[0]
    device = values.device
    size = tuple(channels.shape[1:])
    flat = channels.reshape(len(channels), size[0] * size[1])
    counts = np.bincount(flat.ravel(), minlength=1)
    counts[0] = 0
    labels = np.flatnonzero(counts)
    area = torch.zeros(k, dtype=torch.float64, device=device)
    inter = torch.zeros(k, len(labels), dtype=torch.float64, device=device)
    # Units that never exceed their threshold light no pixel (a convex resize cannot exceed the max).
    fired = torch.nonzero(values.flatten(1).amax(dim=1).double() > thresholds64).flatten()
    if len(fired):
        on = unit_masks(values[fired], thresholds64[fired], size).flatten(1).float()
        area[fired] = on.sum(dim=1).double()
        if len(labels):
            # count[l, p]: how many channels carry label l at pixel p (0, 1, 2 ...)
            lookup = np.full(len(counts), -1, np.int64)
            lookup[labels] = np.arange(len(labels))
            column = lookup[flat]  # [n, P]
            channel_pixels = np.nonzero(column >= 0)
            count = torch.zeros(len(labels), flat.shape[1], device=device)
            count.index_put_(
                (torch.from_numpy(column[channel_pixels]).to(device), torch.from_numpy(channel_pixels[1]).to(device)),
                torch.ones(len(channel_pixels[0]), device=device),
                accumulate=True,
            )
            inter[fired] = (on @ count.T).double()
    inter_np, area_np = inter.cpu().numpy(), area.cpu().numpy()
    hit = np.zeros((k, n_categories), dtype=bool)
    if len(labels):
        per_cat = np.zeros((k, n_categories))
        np.add.at(per_cat.T, category_of[labels], inter_np.T)
        hit |= per_cat > 0
    for number in scalars:
        hit[:, category_of[number]] = True
    return labels, counts[labels], inter_np, area_np, hit


def tally(
    con: duckdb.DuckDBPyConnection,
    probe: Probe,
    dataset: BrodenDataset,
    workers: int = 0,
    device: str | torch.device = "cpu",
):
    """IouTotals (stats.iou) of NetDissect-Lite's tally, per split."""
    from n2vdb.stats.iou import IouTotals

    device = torch.device(device)
    categories = category_order(dataset)
    category_of = primary_categories(dataset, categories)
    concept_ids = np.array(sorted(dataset.labels), dtype=np.int64)
    column = {int(c): i for i, c in enumerate(concept_ids)}
    label_category = np.array([category_of[int(c)] for c in concept_ids], dtype=np.int64)
    category_lookup = np.zeros(int(concept_ids.max()) + 1 if len(concept_ids) else 1, np.int64)
    category_lookup[concept_ids] = label_category
    k, n_cat = probe.n_filters, len(categories)
    splits = ("train", "val")
    inter = {s: np.zeros((k, len(concept_ids)), np.int64) for s in splits}
    label_area = {s: np.zeros(len(concept_ids), np.int64) for s in splits}
    unit_area = {s: np.zeros((k, n_cat), np.int64) for s in splits}
    split_of = {r.image_id: r.split for r in dataset.rows}
    order = acts_store.stored_order(con, probe.activation_probe)
    decoded = iter_channels(dataset, [dataset.rows[i] for i in order], categories, workers)
    thr = thresholds(con, probe.probe_id).to(device)
    shape = (probe.n_filters, probe.height, probe.width)
    with progress_bar() as bar:
        task = bar.add_task("single-filter IoU (netdissect)", total=len(order))
        for ids, codes, scales in acts_store.iter_codes(con, probe.activation_probe, shape, batch=64):
            values = acts_store.dequantise(codes, scales, device)
            for i, image_id in enumerate(ids):
                mask_id, channels, scalars = next(decoded)
                assert mask_id == image_id, "activations and masks out of step"
                bar.advance(task)
                if not len(channels) and not scalars:
                    continue  # NetDissect-Lite drops images without any annotation
                split = split_of[int(image_id)]
                sh, sw = channels.shape[1:]
                labels, areas, i_kl, a_k, hit = image_tally(values[i], thr, channels, n_cat, category_lookup, scalars)
                cols = np.array([column[int(n)] for n in labels], dtype=np.int64)
                inter[split][:, cols] += np.rint(i_kl).astype(np.int64)
                np.add.at(label_area[split], cols, areas)
                a_int = np.rint(a_k).astype(np.int64)
                for number in scalars:
                    inter[split][:, column[number]] += a_int
                    label_area[split][column[number]] += sh * sw
                unit_area[split] += a_int[:, None] * hit
    union = {s: unit_area[s][:, label_category] + label_area[s][None, :] - inter[s] for s in splits}
    return IouTotals(concept_ids, inter, union)
