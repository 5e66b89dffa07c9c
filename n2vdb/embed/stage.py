"""Stage 3 of ingest: segmentation and classification embeddings, per-image scores, sufficiency."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

from n2vdb import activations as acts_store
from n2vdb import timings
from n2vdb.data.broden import BrodenDataset
from n2vdb.embed import classification, segmentation
from n2vdb.embed.examples import cached, store_examples
from n2vdb.errors import UsageError
from n2vdb.probe import Probe, TrainSettings
from n2vdb.progress import say
from n2vdb.store import writer
from n2vdb.store.connection import transaction
from n2vdb.store.sessions import Store

# The reference's grids (ruthcfong/net2vec): segmentation every F from 1 to 128 then 160, 192, 224;
# classification 1, 2, 3, 5, 10, 15, ..., 50, 80, 100, 128.
REFERENCE_GRIDS = {
    "segmentation": (*range(1, 129), 160, 192, 224),
    "classification": (1, 2, 3, *range(5, 51, 5), 80, 100, 128),
}


def sufficiency_grid(k: int, kind: str = "segmentation", grid: Sequence[int] | None = None) -> list[int]:
    """The F values to retrain with for KIND: GRID if given, else the reference's, below K (K itself is
    the full embedding)."""
    chosen = REFERENCE_GRIDS[kind] if grid is None else grid
    return sorted({int(f) for f in chosen if 0 < f < k})


def parse_grid(text: str) -> tuple[int, ...]:
    """'1,2,4,8' -> (1, 2, 4, 8); anything else is a UsageError that says what to type."""
    try:
        values = tuple(sorted({int(t) for t in text.split(",") if t.strip()}))
    except ValueError:
        raise UsageError(
            f"sufficiency_grid {text!r}: give filter counts separated by commas, e.g. 1,2,4,8", param="sufficiency_grid"
        ) from None
    check_grid(values)
    return values


def check_grid(grid: Sequence[int] | None) -> None:
    if grid is not None and (not grid or min(grid) < 1):
        raise UsageError(
            "sufficiency_grid needs one or more filter counts of at least 1, e.g. 1,2,4,8", param="sufficiency_grid"
        )


def top_filters(weights: torch.Tensor, f: int) -> torch.Tensor:
    """keep [K, C]: 1 on each concept's F filters with the largest |w|."""
    keep = torch.zeros_like(weights)
    keep.scatter_(0, weights.abs().topk(f, dim=0).indices, 1.0)
    return keep


def embedding_rows(
    probe_id: int,
    kind: str,
    n_filters: int,
    concept_ids,
    weights: torch.Tensor,
    bias: torch.Tensor,
    train_score,
    val_score,
    val_ap=None,
) -> pa.Table:
    """`embeddings` rows: one per concept, from weights [K, C] and per-concept bias and scores."""
    n = len(concept_ids)
    k = weights.shape[0]
    nan_to_null = lambda a: pa.array(np.asarray(a, np.float64), mask=np.isnan(np.asarray(a, np.float64)))  # noqa: E731
    return pa.table(
        {
            "probe_id": pa.array(np.full(n, probe_id, np.int32)),
            "concept_id": pa.array(np.asarray(concept_ids, np.int32)),
            "kind": pa.array([kind] * n, pa.string()),
            "n_filters": pa.array(np.full(n, n_filters, np.int32)),
            "weights": pa.FixedSizeListArray.from_arrays(
                pa.array(weights.T.contiguous().numpy().astype(np.float32).reshape(-1)), k
            ).cast(pa.list_(pa.float32())),
            "bias": bias.numpy().astype(np.float64),
            "train_score": nan_to_null(train_score),
            "val_score": nan_to_null(val_score),
            "val_ap": nan_to_null(val_ap if val_ap is not None else np.full(n, np.nan)),
        }
    )


def classification_inputs(con, probe: Probe, dataset_id: int):
    """(image ids, features [N, K], labels [N, C] bool, is_val [N], concept ids) for concepts seen in
    train and not in every train image; built from arrays (per-pair Python objects grew with the
    dataset), the label matrix only for those concepts."""
    ids, features = acts_store.pooled(con, probe.activation_probe)  # in image-id order
    images = con.execute("SELECT image_id, split FROM images WHERE dataset_id = ?", [dataset_id]).fetchnumpy()
    val_images = np.sort(images["image_id"][np.asarray(images["split"]) == "val"])
    is_val = np.isin(ids, val_images)
    pairs = con.execute(
        "SELECT ic.image_id, ic.concept_id FROM image_concepts ic WHERE ic.dataset_id = ?"
        " AND ic.image_id IN (SELECT image_id FROM activations WHERE probe_id = ?)",
        [dataset_id, probe.activation_probe],
    ).fetchnumpy()
    # (np.unique's return_inverse sorts an int64 copy of every pair: a search into the concepts
    # needs only their sorted list)
    concepts = np.unique(pairs["concept_id"])
    cols = np.searchsorted(concepts, pairs.pop("concept_id")).astype(np.int32)
    rows = np.searchsorted(ids, pairs.pop("image_id")).astype(np.int32)
    # the label matrix of every concept seen (a pair listed twice sets its cell once), then its
    # usable columns moved to the front of each row in place: no second images x concepts matrix
    seen = np.zeros((len(ids), len(concepts)), bool)
    seen[rows, cols] = True
    del rows, cols
    train = np.flatnonzero(~is_val)
    train_pos = sum(
        (seen[train[lo : lo + 4096]].sum(0) for lo in range(0, len(train), 4096)), np.zeros(len(concepts), np.int64)
    )
    usable = (train_pos > 0) & (train_pos < len(train))
    labels = _keep_columns(seen, usable)
    concepts = concepts.astype(np.int64)
    return ids, torch.from_numpy(features), torch.from_numpy(labels), torch.from_numpy(is_val), concepts[usable]


def _keep_columns(matrix: np.ndarray, keep: np.ndarray, rows_at_once: int = 4096) -> np.ndarray:
    """MATRIX [N, C] (C-ordered) with only the columns KEEP, compacted in MATRIX's own buffer: rows
    [lo, hi) are read before they are written to [lo * m, hi * m) of the flat buffer, which ends
    before row hi's old start."""
    if keep.all():
        return matrix
    n, m = len(matrix), int(keep.sum())
    flat = matrix.reshape(-1)
    for lo in range(0, n, rows_at_once):
        hi = min(n, lo + rows_at_once)
        flat[lo * m : hi * m] = matrix[lo:hi][:, keep].reshape(-1)
    return flat[: n * m].reshape(n, m)


def _compute(
    store: Store,
    probe: Probe,
    dataset: BrodenDataset,
    settings: TrainSettings,
    workers: int,
    device: torch.device,
    segmentation_applies: bool = True,
) -> tuple[list[tuple[str, pa.Table]], list[timings.StageTiming]]:
    k = probe.n_filters
    tables: list[tuple[str, pa.Table]] = []
    records: list[timings.StageTiming] = []

    # The store is read in short phases (the pixel concepts, the examples, the classification
    # inputs), each closed before the training after it: DuckDB's cache of what a phase read (up to
    # its 64 MB budget) is let go, not held through that training.
    with store.reading() as con:
        pixel = {
            c
            for (c,) in con.execute(
                "SELECT DISTINCT ic.concept_id FROM image_concepts ic JOIN concepts c USING (dataset_id, concept_id)"
                " JOIN images i USING (dataset_id, image_id)"
                " WHERE ic.dataset_id = ? AND c.level = 'pixel' AND i.split = 'train'"
                " AND ic.image_id IN (SELECT image_id FROM activations WHERE probe_id = ?)",
                [probe.dataset_id, probe.activation_probe],
            ).fetchall()
        }
    seg_concepts = sorted(pixel) if segmentation_applies else []  # not for a vector layer
    if seg_concepts:
        with timings.timed("segmentation") as timing:
            with store.reading() as con:
                source = cached(store_examples(con, probe, dataset, pixel, workers))
            say(f"training {len(seg_concepts)} segmentation embeddings ({settings.epochs} epochs)")
            seg_kwargs = dict(
                epochs=settings.epochs,
                lr=settings.seg_lr,
                batch_size=settings.seg_batch,
                loss=settings.seg_loss,
                use_bias=settings.seg_bias,
                seed=settings.seed,
                device=device,
            )
            per_image: list = []
            seg = segmentation.train(source, seg_concepts, k, per_image=per_image, **seg_kwargs)
            tables.append(
                (
                    "embeddings",
                    embedding_rows(
                        probe.probe_id,
                        "segmentation",
                        k,
                        seg.concept_ids,
                        seg.weights,
                        seg.bias,
                        seg.train_iou,
                        seg.val_iou,
                    ),
                )
            )
            columns = [np.concatenate(c) for c in zip(*per_image)] if per_image else [np.zeros(0, np.int64)] * 4
            tables.append(("image_concept_scores", writer.score_rows(probe.probe_id, "segmentation", *columns)))
        timing.images, timing.pairs = seg.images, seg.train_pairs
        records.append(timing)
        if settings.sufficiency:
            with timings.timed("segmentation-sufficiency", timing.images, timing.pairs) as timing:
                for f in sufficiency_grid(k, "segmentation", settings.sufficiency_grid):
                    say(f"sufficiency: segmentation with the top {f} filters")
                    part = segmentation.train(source, seg_concepts, k, keep=top_filters(seg.weights, f), **seg_kwargs)
                    tables.append(
                        (
                            "embeddings",
                            embedding_rows(
                                probe.probe_id,
                                "segmentation",
                                f,
                                part.concept_ids,
                                part.weights,
                                part.bias,
                                part.train_iou,
                                part.val_iou,
                            ),
                        )
                    )
            records.append(timing)

    with store.reading() as con:
        image_ids, features, labels, is_val, cls_concepts = classification_inputs(con, probe, probe.dataset_id)
    if len(cls_concepts) and bool(is_val.any()):
        # (the pairs are counted by train: labels[~is_val].sum(0) here made an int64 copy of the train
        # rows' labels, +120 MB of peak RSS at 16,000 Broden-profile images)
        with timings.timed("classification", len(image_ids)) as timing:
            say(f"training {len(cls_concepts)} classification embeddings")
            cls_kwargs = dict(
                epochs=settings.epochs,
                lr=settings.cls_lr,
                batch_size=settings.cls_batch,
                seed=settings.seed,
                device=device,
            )
            cls = classification.train(features, labels, is_val, cls_concepts, **cls_kwargs)
            tables.append(
                (
                    "embeddings",
                    embedding_rows(
                        probe.probe_id,
                        "classification",
                        k,
                        cls.concept_ids,
                        cls.weights,
                        cls.bias,
                        cls.train_accuracy,
                        cls.val_accuracy,
                        cls.val_ap,
                    ),
                )
            )
            rows, cols = image_ids[cls.present_rows], cls_concepts[cls.present_cols]
            tables.append(
                (
                    "image_concept_scores",
                    writer.score_rows(probe.probe_id, "classification", rows, cols, score=cls.present_scores),
                )
            )
        timing.pairs = cls.train_pairs
        records.append(timing)
        if settings.sufficiency:
            with timings.timed("classification-sufficiency", len(image_ids), cls.train_pairs) as timing:
                for f in sufficiency_grid(k, "classification", settings.sufficiency_grid):
                    part = classification.train(
                        features, labels, is_val, cls_concepts, keep=top_filters(cls.weights, f), **cls_kwargs
                    )
                    tables.append(
                        (
                            "embeddings",
                            embedding_rows(
                                probe.probe_id,
                                "classification",
                                f,
                                part.concept_ids,
                                part.weights,
                                part.bias,
                                part.train_accuracy,
                                part.val_accuracy,
                                part.val_ap,
                            ),
                        )
                    )
            records.append(timing)
    return tables, records


def run(
    store: Store,
    probe: Probe,
    dataset: BrodenDataset,
    settings: TrainSettings,
    workers: int = 0,
    device: str | torch.device = "cpu",
    segmentation: bool = True,
    finish=None,
) -> None:
    """Train everything from short reading phases; write all rows in one short transaction.
    Segmentation embeddings (the pixel-heavy part) train on DEVICE; classification, on N x K pooled
    features, is cheap on the CPU. FINISH(con), where given (n2vdb.pipeline), runs in the write transaction."""
    tables, records = _compute(store, probe, dataset, settings, workers, torch.device(device), segmentation)
    with store.writing() as con, transaction(con):
        for name, methods in (("embeddings", None), ("image_concept_scores", ("segmentation", "classification"))):
            writer.replace_probe_rows(con, name, probe.probe_id, [t for n, t in tables if n == name], methods)
        timings.save(con, probe.probe_id, records)
        if finish is not None:
            finish(con)
