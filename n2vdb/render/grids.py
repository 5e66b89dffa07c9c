"""Image grids sampled across a score distribution (method.md section 9), not only the top images.

Each tile is a dataset image at its segmentation size with the ground-truth mask (green) and the
predicted mask (red; overlap shows yellow) blended in, captioned with its quantile and score.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from n2vdb import activations as acts_store
from n2vdb.data.broden import BrodenDataset
from n2vdb.errors import NotFound
from n2vdb.probe import Probe
from n2vdb.stats.iou import filter_masks, thresholds_for

QUANTILES = (1.0, 0.99, 0.95, 0.9, 0.75, 0.5)
TILE = 160
CAPTION = 28


@dataclass
class Sample:
    quantile: float
    image_id: int
    score: float


def pick(scores: dict[int, float], quantiles=QUANTILES) -> list[Sample]:
    """The image at each quantile of the score distribution (nearest rank, ties broken by image id);
    where few images make two quantiles land on one image, it is shown once."""
    ranked = sorted(scores.items(), key=lambda kv: (kv[1], kv[0]))
    out: list[Sample] = []
    for q in quantiles:
        image_id, score = ranked[min(len(ranked) - 1, round(q * (len(ranked) - 1)))]
        if all(s.image_id != image_id for s in out):
            out.append(Sample(q, image_id, score))
    return out


def _tile(image: Image.Image, truth: np.ndarray | None, predicted: np.ndarray, caption: str) -> Image.Image:
    h, w = predicted.shape
    base = np.asarray(image.convert("RGB").resize((w, h), Image.BILINEAR)).astype(np.float32)
    overlay = base.copy()
    if truth is not None:
        overlay[truth] = overlay[truth] * 0.45 + np.array([0, 200, 0]) * 0.55
    overlay[predicted] = overlay[predicted] * 0.45 + np.array([230, 0, 0]) * 0.55
    if truth is not None:
        both = truth & predicted
        overlay[both] = overlay[both] * 0.3 + np.array([240, 220, 0]) * 0.7
    picture = Image.fromarray(overlay.clip(0, 255).astype(np.uint8)).resize((TILE, TILE), Image.NEAREST)
    tile = Image.new("RGB", (TILE, TILE + CAPTION), "white")
    tile.paste(picture, (0, 0))
    ImageDraw.Draw(tile).text((4, TILE + 6), caption, fill="black")
    return tile


def compose(tiles: list[Image.Image], title: str, path: Path, columns: int = 6) -> Path:
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (TILE + 4) + 4, rows * (TILE + CAPTION + 4) + 24), "white")
    ImageDraw.Draw(sheet).text((6, 6), title, fill="black")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (4 + (i % columns) * (TILE + 4), 24 + (i // columns) * (TILE + CAPTION + 4)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _acts(con, probe: Probe, image_id: int) -> torch.Tensor:
    shape = (probe.n_filters, probe.height, probe.width)
    ((_, values),) = list(acts_store.iter_activations(con, probe.activation_probe, shape, [image_id]))
    return torch.from_numpy(values[0])


def probe_mode(con: duckdb.DuckDBPyConnection, probe: Probe) -> str:
    """The IoU mode the probe's numbers were computed with, so a picture agrees with its caption."""
    row = con.execute("SELECT settings->>'iou_mode' FROM probes WHERE probe_id = ?", [probe.probe_id]).fetchone()
    return (row and row[0]) or "net2vec"


def _truth(dataset: BrodenDataset, image_id: int, concept_id: int) -> np.ndarray | None:
    ids, masks = dataset.masks(dataset.rows[image_id])
    hit = np.flatnonzero(ids == concept_id)
    return masks[hit[0]] if len(hit) else None


def embedding_mask(
    acts: torch.Tensor, thresholds: torch.Tensor, weights: torch.Tensor, bias: float, size: tuple[int, int]
) -> torch.Tensor:
    """A segmentation embedding's mask: upsample(w . B(x) + b) > 0 (sigmoid > 0.5), method.md section 4."""
    binary = (acts > thresholds.float().view(-1, 1, 1)).float()  # embeddings train on float32 thresholds
    logits = torch.einsum("khw,k->hw", binary, weights) + bias
    return F.interpolate(logits[None, None], size=size, mode="bilinear", align_corners=True)[0, 0] > 0


def distribution_grid(
    con: duckdb.DuckDBPyConnection, probe: Probe, dataset: BrodenDataset, name: str, path: Path
) -> tuple[Path, list[Sample], list[float]]:
    """The paper's non-maximal view: ALL images of the probe at quantiles of the concept's
    classification-embedding score (queries/concept-distribution.sql), whether or not they contain it,
    each with the segmentation embedding's mask (red) and the concept's truth where present (green)."""
    from n2vdb import queries

    rows = queries.run(con, "concept-distribution", concept=name, probe=probe.probe_id).to_pylist()
    if not rows:
        raise NotFound(f"probe {probe.probe_id} has no classification embedding for {name!r}")
    concept_id = con.execute(
        "SELECT concept_id FROM concepts WHERE dataset_id = ? AND name = ?", [probe.dataset_id, name]
    ).fetchone()[0]
    seg = con.execute(
        "SELECT weights, bias FROM embeddings WHERE probe_id = ? AND concept_id = ? AND kind = 'segmentation'"
        " AND n_filters = ?",
        [probe.probe_id, concept_id, probe.n_filters],
    ).fetchone()
    thresholds = acts_store.thresholds(con, probe.probe_id)
    scores = {r["image_id"]: r["score"] for r in rows}
    contains = {r["image_id"]: r["contains"] for r in rows}
    samples = pick(scores)
    tiles = []
    for sample in samples:
        row = dataset.rows[sample.image_id]
        size = (row.sh, row.sw)
        predicted = (
            embedding_mask(_acts(con, probe, sample.image_id), thresholds, torch.tensor(seg[0]), seg[1], size).numpy()
            if seg
            else np.zeros(size, bool)
        )
        with Image.open(dataset.image_path(row)) as image:
            tiles.append(
                _tile(
                    image,
                    _truth(dataset, sample.image_id, concept_id),
                    predicted,
                    f"q{sample.quantile:g}  p {sample.score:.3f}"
                    f"  {'has it' if contains[sample.image_id] else 'absent'}",
                )
            )
    title = (
        f"{name}: classification score over all {len(rows)} images, probe {probe.probe_id} "
        f"(green truth, red segmentation embedding)"
    )
    return compose(tiles, title, path), samples, [r["score"] for r in rows]


def concept_grid(
    con: duckdb.DuckDBPyConnection,
    probe: Probe,
    dataset: BrodenDataset,
    concept_id: int,
    name: str,
    method: str,
    path: Path,
    mode: str | None = None,
) -> tuple[Path, list[Sample]]:
    """Images containing the concept at quantiles of their per-image IoU under METHOD; single-filter
    masks are drawn in MODE (default: the probe's own IoU mode)."""
    mode = mode or probe_mode(con, probe)
    scores = dict(
        con.execute(
            "SELECT image_id, iou FROM image_concept_scores WHERE probe_id = ? AND concept_id = ? AND method = ?",
            [probe.probe_id, concept_id, method],
        ).fetchall()
    )
    if not scores:
        raise NotFound(f"probe {probe.probe_id} has no per-image {method} scores for {name!r}")
    thresholds = thresholds_for(con, probe.probe_id, mode)
    if method == "segmentation":
        weights, bias = con.execute(
            "SELECT weights, bias FROM embeddings WHERE probe_id = ? AND concept_id = ? AND kind = 'segmentation'"
            " AND n_filters = ?",
            [probe.probe_id, concept_id, probe.n_filters],
        ).fetchone()
        weights = torch.tensor(weights)
    else:
        filter_id = con.execute(
            "SELECT filter FROM best_filters WHERE probe_id = ? AND concept_id = ?", [probe.probe_id, concept_id]
        ).fetchone()[0]
    samples = pick(scores)
    tiles = []
    for sample in samples:
        row = dataset.rows[sample.image_id]
        acts = _acts(con, probe, sample.image_id)
        size = (row.sh, row.sw)
        if method == "segmentation":
            predicted = embedding_mask(acts, thresholds, weights, bias, size)
        else:
            predicted = filter_masks(acts[None], thresholds, size, mode)[0, filter_id]
        with Image.open(dataset.image_path(row)) as image:
            tiles.append(
                _tile(
                    image,
                    _truth(dataset, sample.image_id, concept_id),
                    predicted.numpy(),
                    f"q{sample.quantile:g}  IoU {sample.score:.3f}",
                )
            )
    label = "embedding" if method == "segmentation" else f"best filter {filter_id}"
    return compose(tiles, f"{name}: {label}, probe {probe.probe_id} (green truth, red prediction)", path), samples


def filter_grid(
    con: duckdb.DuckDBPyConnection,
    probe: Probe,
    dataset: BrodenDataset,
    filter_id: int,
    path: Path,
    mode: str | None = None,
) -> tuple[Path, list[Sample]]:
    """Images at quantiles of the filter's peak activation, its mask overlaid in MODE (default: the
    probe's own IoU mode)."""
    mode = mode or probe_mode(con, probe)
    if not 0 <= filter_id < probe.n_filters:
        raise NotFound(f"probe {probe.probe_id} has filters 0..{probe.n_filters - 1}, not {filter_id}")
    peaks = dict(
        con.execute(
            "SELECT image_id, scales[?] * 255 FROM activations WHERE probe_id = ?",
            [filter_id + 1, probe.activation_probe],
        ).fetchall()
    )
    best = con.execute(
        "SELECT concept_id, name FROM filter_concept_iou i JOIN concepts c USING (concept_id)"
        " WHERE i.probe_id = ? AND i.filter = ? AND i.split = 'train' AND c.dataset_id = ?"
        " ORDER BY i.iou DESC LIMIT 1",
        [probe.probe_id, filter_id, probe.dataset_id],
    ).fetchone()
    thresholds = thresholds_for(con, probe.probe_id, mode)
    samples = pick(peaks)
    tiles = []
    for sample in samples:
        row = dataset.rows[sample.image_id]
        predicted = filter_masks(_acts(con, probe, sample.image_id)[None], thresholds, (row.sh, row.sw), mode)[
            0, filter_id
        ]
        truth = _truth(dataset, sample.image_id, best[0]) if best else None
        with Image.open(dataset.image_path(row)) as image:
            tiles.append(_tile(image, truth, predicted.numpy(), f"q{sample.quantile:g}  max {sample.score:.3g}"))
    concept = f", green = its best concept {best[1]!r}" if best else ""
    return compose(
        tiles, f"filter {filter_id}, probe {probe.probe_id}: red = activation > threshold{concept}", path
    ), samples


def sparkline(values: list[float], bins: int = 20, low: float = 0.0, high: float = 1.0) -> str:
    """A one-line histogram, e.g. of per-image IoUs."""
    counts, _ = np.histogram(values, bins=bins, range=(low, high))
    blocks = " ▁▂▃▄▅▆▇█"
    top = counts.max() or 1
    return "".join(blocks[int(np.ceil(c / top * 8))] for c in counts)
