"""The permutation null behind each label's p-value (docs/significance.md, "The null").

H0 for a tested (unit k, label c): on the val split, which image's label masks go with which image's
unit masks does not matter. Val images are taken in blocks of up to B images of one segmentation size
(in storage order, which does not depend on the masks); a permutation pairs each image i's label
masks with the unit masks of image perm(i) of its block, and the statistic is the val IoU of the
re-paired masks, summed over every image with the label as the stored IoU is. The null keeps all
that the question does not ask: each image's unit masks (how much of it the unit covers and where)
and each image's label masks, and only breaks their pairing. The observed pairing is the identity;
random permutations of the blocks are exchangeable with it under H0, so the Monte Carlo p-value
(1 + #{null IoU >= observed}) / (1 + P) is valid for any P (resample.monte_carlo_p).

Selecting the tested labels on the train split keeps the val test honest: choosing a unit's best
labels on the images that test them would make the largest of many IoUs look significant.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np

from n2vdb import activations as acts_store
from n2vdb.data.broden import BrodenDataset
from n2vdb.formulas.masks import pack, words
from n2vdb.probe import Probe
from n2vdb.progress import progress_bar
from n2vdb.significance import kernel
from n2vdb.stats import iou, upsample_patterns


@dataclass
class NullCounts:
    """Per test: its observed sums on the val split and the permutations' (int64 [T, 1 + P]; column 0
    the observed), S = sum of |M & L| and A = sum of |M| + |L| over the images with the label."""

    s: np.ndarray
    a: np.ndarray

    @property
    def permutations(self) -> int:
        return self.s.shape[1] - 1

    def observed(self) -> np.ndarray:
        """[T] the val IoU (NaN where the label has no val image)."""
        return _iou(self.s[:, 0], self.a[:, 0])

    def exceed(self) -> np.ndarray:
        """[T] permutations whose IoU is at least the observed one, compared exactly as fractions."""
        s0, u0 = self.s[:, :1], self.a[:, :1] - self.s[:, :1]
        return (self.s[:, 1:] * u0 >= s0 * (self.a[:, 1:] - self.s[:, 1:])).sum(axis=1)

    def null_mean(self) -> np.ndarray:
        """[T] the permutations' mean IoU (NaN where the label has no val image)."""
        draws = _iou(self.s[:, 1:], self.a[:, 1:])
        defined = (~np.isnan(draws)).sum(axis=1)
        return np.divide(np.nansum(draws, axis=1), defined, out=np.full(len(draws), np.nan), where=defined > 0)


def _iou(s: np.ndarray, a: np.ndarray) -> np.ndarray:
    union = (a - s).astype(np.float64)
    return np.divide(s, union, out=np.full(union.shape, np.nan), where=union > 0)


def block_permutations(seed: int, block_number: int, permutations: int, size: int) -> np.ndarray:
    """int64 [PERMUTATIONS, SIZE]: uniform random permutations of one block, reproducible by number."""
    rng = np.random.default_rng([seed, block_number])
    return np.argsort(rng.random((permutations, size)), axis=1, kind="stable").astype(np.int64)


@dataclass
class _Image:
    unit_bits: np.ndarray  # uint64 [K, W]
    unit_area: np.ndarray  # int64 [K]
    concepts: np.ndarray  # int64 [n] labels of the image that some test names
    label_bits: np.ndarray  # uint64 [n, W]
    label_area: np.ndarray  # int64 [n]


def _unit_masks(values, thresholds, size: tuple[int, int], n_words: int) -> tuple[np.ndarray, np.ndarray]:
    """One image's unit masks as net2vec mode makes them (stats/iou.filter_masks), packed, and their
    areas: from the cells' patterns where the geometry has a pattern table (no upsample), else
    upsampled and packed."""
    cells = upsample_patterns.packed_cells(values.shape[1], values.shape[2], *size)
    if cells is not None:
        binary = values > thresholds.view(-1, 1, 1).to(values.dtype)  # as filter_masks compares
        return kernel.unit_masks(upsample_patterns.cell_patterns(binary).numpy(), cells)
    unit = iou.filter_masks(values[None], thresholds, size, "net2vec")[0].numpy()
    return pack(unit, n_words), unit.reshape(len(unit), -1).sum(axis=1).astype(np.int64)


def counts(
    con: duckdb.DuckDBPyConnection,
    probe: Probe,
    dataset: BrodenDataset,
    test_filter: np.ndarray,
    test_concept: np.ndarray,
    permutations: int,
    block: int,
    seed: int,
    workers: int = 0,
) -> NullCounts:
    """The observed and permuted sums of each test (TEST_FILTER, TEST_CONCEPT: sorted by concept)."""
    k, h, w = probe.n_filters, probe.height, probe.width
    concept_ids = np.array(sorted(dataset.labels), dtype=np.int64)
    t_col = np.searchsorted(concept_ids, test_concept)
    t_degree = np.bincount(t_col, minlength=len(concept_ids))
    t_start = np.cumsum(t_degree) - t_degree
    s = np.zeros((len(test_filter), 1 + permutations), np.int64)
    a = np.zeros_like(s)
    thresholds = iou.thresholds_for(con, probe.probe_id, "net2vec")
    val_ids = [i for i in acts_store.stored_order(con, probe.activation_probe) if dataset.rows[i].split == "val"]
    pending: dict[tuple[int, int], list[_Image]] = {}
    numbered = [0]

    def flush(size: tuple[int, int]) -> None:
        images = pending.pop(size, [])
        if not images:
            return
        entry_concept = np.concatenate([im.concepts for im in images])
        entry_image = np.concatenate([np.full(len(im.concepts), b, np.int64) for b, im in enumerate(images)])
        order = np.argsort(entry_concept, kind="stable")
        entry_concept, entry_image = entry_concept[order], entry_image[order]
        entry_bits = np.concatenate([im.label_bits for im in images])[order]
        entry_area = np.concatenate([im.label_area for im in images])[order]
        col = np.searchsorted(concept_ids, entry_concept)
        n_tests = t_degree[col]
        test_start = np.r_[0, np.cumsum(n_tests)].astype(np.int64)
        test_index = np.repeat(t_start[col] - test_start[:-1], n_tests) + np.arange(test_start[-1])
        perms = block_permutations(seed, numbered[0], permutations, len(images))
        numbered[0] += 1
        kernel.add_block(
            np.stack([im.unit_bits for im in images]),
            np.stack([im.unit_area for im in images]),
            entry_concept,
            entry_image,
            np.ascontiguousarray(entry_bits),
            entry_area,
            test_start,
            test_index.astype(np.int64),
            test_filter[test_index].astype(np.int64),
            perms,
            s,
            a,
        )

    rows = [dataset.rows[i] for i in val_ids]
    masks = iou.iter_masks(dataset, rows, workers)
    with progress_bar() as bar:
        task = bar.add_task("significance: permutations", total=len(val_ids))
        for ids, codes, scales in acts_store.iter_codes(con, probe.activation_probe, (k, h, w), val_ids, batch=64):
            values = acts_store.dequantise(codes, scales)
            for i, image_id in enumerate(ids.tolist()):
                mask_id, concepts, label = next(masks)
                assert mask_id == image_id, "activations and masks out of step"
                row = dataset.rows[image_id]
                size = (row.sh, row.sw)
                n_words = words(row.sh * row.sw)
                unit_bits, unit_area = _unit_masks(values[i], thresholds, size, n_words)
                keep = t_degree[np.searchsorted(concept_ids, concepts)] > 0
                label = label.numpy()[keep]
                pending.setdefault(size, []).append(
                    _Image(
                        unit_bits,
                        unit_area,
                        np.asarray(concepts, dtype=np.int64)[keep],
                        pack(label, n_words),
                        label.reshape(len(label), row.sh * row.sw).sum(axis=1).astype(np.int64),
                    )
                )
                if len(pending[size]) == block:
                    flush(size)
                bar.advance(task)
    for size in sorted(pending):
        flush(size)
    return NullCounts(s, a)
