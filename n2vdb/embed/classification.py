"""Net2Vec classification embeddings (method.md section 5): image-level presence from pooled activations.

All concepts train at once (W [K, C]), each as the reference trains it alone: every epoch a concept
draws its own balanced sample (all images of its minority class plus as many of the majority), takes
it in the epoch's order in batches of BATCH_SIZE, averages the loss over each batch's own count, and
steps (momentum included) only on its own batches (n2vdb.embed.batches). On the CPU an epoch is one
compiled loop, concept by concept (cls_kernel.py); elsewhere torch steps, every concept's t-th batch
at once: the same updates, since a concept's batches touch only its own row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from n2vdb.embed import cls_kernel
from n2vdb.embed.batches import RowMomentum, own_batches


@dataclass
class ClsResult:
    concept_ids: np.ndarray
    weights: torch.Tensor  # [K, C]
    bias: torch.Tensor  # [C]
    train_accuracy: np.ndarray  # balanced accuracy on a balanced train sample
    val_accuracy: np.ndarray  # on the balanced val set (drawn once)
    val_ap: np.ndarray  # average precision on the whole (unbalanced) val set
    # every val image's present concepts, in (image, concept) order: rows of the features, concept
    # columns, probabilities (not an [N_val, C] matrix, which grew with images x concepts)
    present_rows: np.ndarray
    present_cols: np.ndarray
    present_scores: np.ndarray
    train_pairs: int  # (image, concept) pairs in each epoch's balanced train sample


# Noise values drawn at once: balanced_pairs draws the [N, C] noise a [rows, C] chunk at a time (the
# same numbers as one draw), so nothing of N x C elements is held but the bool labels.
DRAW_ELEMENTS = 1 << 20
# The first pass keeps, per concept, the majority images whose noise is under a cut at which about
# size + SIGMAS x sqrt(size) + EXTRA of them are expected: more than the SIZE smallest with near
# certainty (a shortfall is ~8 standard deviations away), so the candidates are about as many as the
# pairs drawn. A concept that falls short anyway is drawn again exactly, from a replay of the noise.
CUT_SIGMAS, CUT_EXTRA = 8.0, 32.0
# Logits scored at once after training: the val images' in [concepts, N_val] blocks of about this
# many (at least EVAL_MIN_CONCEPTS concepts each), as a concept's average precision needs its scores
# on every val image but no other concept's. cls_kernel sums each logit in an order of its own, so
# the blocks change no result (tests/test_embed.py checks small blocks against one).
EVAL_ELEMENTS, EVAL_MIN_CONCEPTS = 1 << 20, 8


def _chunk_rows(c: int) -> int:
    return max(1, DRAW_ELEMENTS // max(c, 1))


def _draw_chunks(n: int, c: int, gen: torch.Generator):
    """(first row, noise [rows, C] float32 as numpy) over all N rows: torch.rand(n, c) in row chunks."""
    rows = _chunk_rows(c)
    for lo in range(0, n, rows):
        yield lo, torch.rand(min(rows, n - lo), c, generator=gen).numpy()


PAIR_INDEX = np.int32  # the dtype of a draw's image rows and concept columns
_BELOW_ONE = 0x3F800000  # the bit patterns of the floats in [0, 1) are below 1.0's


class BalancedDraws:
    """The balanced samples of one labels [N, C] bool matrix, a fresh draw on each call: per concept,
    the minority class and an equal draw of the majority (the majority images with the smallest of one
    uniform noise draw [N, C], ties to the lower index as a stable sort breaks them).

    The noise is drawn in row chunks (the same numbers, and the generator left as, torch.rand(N, C)),
    and a chunk keeps only the entries under each concept's cut, so memory grows with the pairs drawn,
    not with images x concepts."""

    def __init__(self, labels: torch.Tensor, rows: np.ndarray | None = None) -> None:
        """ROWS (increasing), if given: draw over labels[rows], read in place (no copy of them)."""
        self.labels = labels.numpy()
        self.rows = rows
        n, c = self.n, self.c = len(self.labels) if rows is None else len(rows), self.labels.shape[1]
        step = _chunk_rows(c)
        n_pos = sum((self._block(lo, lo + step).sum(0) for lo in range(0, n, step)), np.zeros(c, np.int64))
        self.flip = n_pos > n - n_pos  # the minority is the negatives
        self.size = size = np.minimum(n_pos, n - n_pos)
        n_major = n - size
        expected = size + CUT_SIGMAS * np.sqrt(size) + CUT_EXTRA
        self.cut = np.where(expected < n_major, expected / np.maximum(n_major, 1), 2.0).astype(np.float32)
        self.cut[size == 0] = -1.0  # a concept on every image or on none has no balanced sample
        # Every draw holds every minority pair (none for a concept without a sample), as int32:
        # at 16,000 Broden-profile images a draw is ~600k pairs, and each int64 copy of them costs
        # 5 MB more than it needs to (rows and columns count images and concepts, far below 2^31).
        found, cols = [], []
        for lo in range(0, n, step):
            i, j = np.nonzero(self._block(lo, lo + step) ^ self.flip)
            found.append((i + lo).astype(PAIR_INDEX))
            cols.append(j.astype(PAIR_INDEX))
        self.minority = (_cat(found, PAIR_INDEX), _cat(cols, PAIR_INDEX))

    def _block(self, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) of the matrix drawn over."""
        return self.labels[lo:hi] if self.rows is None else self.labels[self.rows[lo:hi]]

    def _at(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return self.labels[rows if self.rows is None else self.rows[rows], cols]

    def __call__(self, gen: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(image rows, concept columns) int32 (PAIR_INDEX) of one draw, in no particular order;
        rows index labels[rows] where ROWS was given."""
        n, c = self.n, self.c
        # A non-negative float orders as its bit pattern, then the index breaks ties: one key per
        # (concept, image), (concept, noise bits, image), in the stable sort's order within a concept.
        if c * _BELOW_ONE * max(n, 1) >= 2**63:  # (beyond some 8 billion images x concepts)
            raise ValueError(f"{n} images x {c} concepts is too many for one classification draw")
        replay = gen.get_state()
        keys = []
        for lo, noise in _draw_chunks(n, c, gen):
            rows, cols = np.divmod(np.flatnonzero(noise < self.cut), c)
            major = self._at(rows + lo, cols) == self.flip[cols]
            rows, cols = rows[major], cols[major]
            keys.append(self._keys(rows + lo, cols, noise[rows, cols]))
        keys = _cat(keys)
        keys.sort()
        first = np.arange(c, dtype=np.int64) * (_BELOW_ONE * n)  # each concept's lowest key
        short = np.flatnonzero(np.diff(np.searchsorted(keys, [*first, c * _BELOW_ONE * n])) < self.size)
        if len(short):  # all majority images of these concepts are candidates, from the same noise again
            again = torch.Generator()
            again.set_state(replay)
            keys = [keys[~np.isin(keys // (_BELOW_ONE * n), short)]]
            for lo, noise in _draw_chunks(n, c, again):
                rows, at = np.nonzero(self._block(lo, lo + len(noise))[:, short] == self.flip[short])
                keys.append(self._keys(rows + lo, short[at], noise[rows, short[at]]))
            keys = np.concatenate(keys)
            keys.sort()
        # each concept's SIZE smallest: the first SIZE of its run of keys
        size = self.size.astype(np.int64)
        at = np.arange(size.sum()) + np.repeat(np.searchsorted(keys, first) - (np.cumsum(size) - size), size)
        rows = (keys[at] % max(n, 1)).astype(PAIR_INDEX)
        del keys, at
        return np.concatenate([self.minority[0], rows]), np.concatenate(
            [self.minority[1], np.repeat(np.arange(c, dtype=PAIR_INDEX), size)]
        )

    def _keys(self, rows: np.ndarray, cols: np.ndarray, noise: np.ndarray) -> np.ndarray:
        keys = cols.astype(np.int64) * _BELOW_ONE
        keys += noise.view(np.int32)
        keys *= self.n
        keys += rows
        return keys


def _cat(parts: list[np.ndarray], dtype=np.int64) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def balanced_pairs(labels: torch.Tensor, gen: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One draw of BalancedDraws(labels): (image rows, concept columns)."""
    return BalancedDraws(labels)(gen)


def balanced_sample(labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """balanced_pairs as a selection [N, C] bool."""
    images, cols = balanced_pairs(labels, gen)
    chosen = torch.zeros(labels.shape, dtype=torch.bool)
    chosen.numpy()[images, cols] = True
    return chosen


def _concept_blocks(n_rows: int, c: int) -> list[tuple[int, int]]:
    """[c0, c1) blocks of C concepts whose logits over N_ROWS images are about EVAL_ELEMENTS."""
    width = max(EVAL_MIN_CONCEPTS, EVAL_ELEMENTS // max(n_rows, 1))
    return [(c0, min(c, c0 + width)) for c0 in range(0, c, width)]


def uses_compiled_steps(device: torch.device) -> bool:
    """Whether training on DEVICE runs each epoch as cls_kernel's compiled CPU loop."""
    return device.type == "cpu"


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean of the precision at the rank of each positive (scores sorted descending)."""
    n_pos = int(labels.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = labels[order].astype(np.float64)
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / n_pos)


def _fraction(hits: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Per concept, HITS over its number of pairs in COLS (nan for a concept without pairs)."""
    n = np.bincount(cols, minlength=len(hits))
    return np.where(n > 0, hits / np.maximum(n, 1), np.nan)


def _hits(block: np.ndarray, c0: int, i: np.ndarray, j: np.ndarray, y: np.ndarray, val_rows: np.ndarray) -> np.ndarray:
    """bool per balanced val pair (val row i, concept j) of a block of logits [c1 - c0, val rows]:
    whether the embedding classifies the pair's image right (logit > 0 on a positive)."""
    return (block[j - c0, i] > 0) == y[val_rows[i], j]


def val_sample(labels: torch.Tensor, val_rows: np.ndarray, gen: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The balanced val pairs (val row index, concept column) the val accuracy is measured on: the
    first draw of training's generator, so that the same seed draws the same pairs again
    (n2vdb/significance resamples them)."""
    return BalancedDraws(labels, val_rows)(gen)


def val_pair_hits(features, weights, bias, labels, val_rows, val_pairs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(feature rows, concept columns, hits) of every balanced val pair, in concept order: what the
    val accuracy averages, per pair."""
    x, y, w, b = features.numpy(), labels.numpy(), weights.numpy(), bias.numpy()
    images, cols = val_pairs
    by = np.argsort(cols, kind="stable")
    images, cols = images[by], cols[by]
    bounds = np.searchsorted(cols, np.arange(y.shape[1] + 1))
    hits = np.zeros(len(cols), bool)
    for c0, c1 in _concept_blocks(len(val_rows), y.shape[1]):
        block = cls_kernel.logits(x, val_rows, w, b, c0, c1)
        at = slice(bounds[c0], bounds[c1])
        hits[at] = _hits(block, c0, images[at], cols[at], y, val_rows)
    return val_rows[images], cols, hits


def _score_val(features, weights, bias, labels, val_rows, val_pairs):
    """Scores of the val images (rows VAL_ROWS of FEATURES and LABELS), a block of concepts at a time:
    (accuracy on the balanced VAL_PAIRS, average precision on every val image, and every val image's
    present concepts as (rows, concept columns, probability) in (image, concept) order)."""
    x, y, w, b = features.numpy(), labels.numpy(), weights.numpy(), bias.numpy()
    c = y.shape[1]
    images, cols = val_pairs
    by = np.argsort(cols, kind="stable")
    images, cols = images[by], cols[by]
    bounds = np.searchsorted(cols, np.arange(c + 1))
    hits = np.zeros(c, np.int64)
    ap = np.full(c, np.nan)
    present = []
    for c0, c1 in _concept_blocks(len(val_rows), c):
        block = cls_kernel.logits(x, val_rows, w, b, c0, c1)
        i, j = images[bounds[c0] : bounds[c1]], cols[bounds[c0] : bounds[c1]]
        hits += np.bincount(j[_hits(block, c0, i, j, y, val_rows)], minlength=c)
        truth = y[val_rows, c0:c1]
        for col in range(c0, c1):
            # one concept's scores per call: the vectorised sigmoid rounds an array's tail
            # differently from its body, so a call spanning concepts would depend on the blocks
            probs = torch.sigmoid(torch.from_numpy(block[col - c0])).numpy()
            ap[col] = average_precision(probs, truth[:, col - c0])
            at = np.flatnonzero(truth[:, col - c0])
            present.append((at, np.full(len(at), col), probs[at]))
    at, col, score = (_cat([p[k] for p in present], dtype) for k, dtype in enumerate((np.int64, np.int64, np.float32)))
    order = np.lexsort((col, at))
    return _fraction(hits, cols), ap, (val_rows[at[order]], col[order], score[order])


def train(
    features: torch.Tensor,
    labels: torch.Tensor,
    is_val: torch.Tensor,
    concept_ids: Sequence[int],
    *,
    epochs: int = 30,
    lr: float = 0.1,
    batch_size: int = 64,
    seed: int = 0,
    keep: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> ClsResult:
    """features [N, K] pooled activations, labels [N, C] bool, is_val [N] bool. The draws (samples,
    orders, initial weights) come from one CPU generator on any DEVICE, so a seed gives the same
    training wherever the arithmetic runs; the steps run on DEVICE."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    features = features.float()
    labels = labels.bool()
    n_filters, n_concepts = features.shape[1], labels.shape[1]
    # The train and val images are rows of FEATURES and LABELS, read in place (copies of them grew
    # with images x concepts).
    train_rows, val_rows = (np.flatnonzero(split).astype(PAIR_INDEX) for split in (~is_val.numpy(), is_val.numpy()))
    val_pairs = val_sample(labels, val_rows, gen)
    bound = 1 / np.sqrt(n_filters)
    weights = (torch.rand(n_filters, n_concepts, generator=gen) * 2 - 1) * bound
    if keep is not None:
        keep = keep.float()
        weights = weights * keep
    # Trained as [C, K] rows: a step reads and moves only the rows of the concepts that have a batch.
    rows_w = weights.T.contiguous().to(device)
    keep_rows = None if keep is None else keep.T.contiguous().to(device)
    bias = torch.zeros(n_concepts, device=device)
    on_device = features.to(device)
    sgd_w, sgd_b = RowMomentum(rows_w), RowMomentum(bias)
    step_size = max(1, epochs // 2)  # lr x 0.1 halfway, as the reference's StepLR
    draw = BalancedDraws(labels, train_rows)
    targets = labels.to(device)  # bool: a float copy of [N, C] grew with images x concepts
    rank_of = np.zeros(len(features), PAIR_INDEX)  # each train image's place in the epoch's order
    for epoch in range(epochs):
        lr_now = lr * 0.1 ** (epoch // step_size)
        images = cols = None  # the last epoch's pairs go before this one's are drawn
        images, cols = draw(gen)
        images = train_rows[images]
        order = torch.randperm(len(train_rows), generator=gen)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order))
        rank_of[train_rows] = rank.numpy()
        if uses_compiled_steps(device):  # the same steps, concept by concept in one compiled loop
            velocity_w, velocity_b = sgd_w.velocity, sgd_b.velocity
            cls_kernel.epoch(
                images,
                cols,
                rank_of,
                on_device,
                targets,
                rows_w,
                bias,
                velocity_w,
                velocity_b,
                keep_rows,
                batch_size,
                lr_now,
                sgd_w.momentum,
            )
            continue
        for chosen, scale in own_batches(cols, rank_of[images], batch_size):
            img = torch.from_numpy(images[chosen]).to(device)
            step_cols = cols[chosen]
            col = torch.from_numpy(step_cols).to(device)
            stepped, slot = (torch.from_numpy(a).to(device) for a in np.unique(step_cols, return_inverse=True))
            x = on_device.index_select(0, img)
            logits = (x * rows_w.index_select(0, col)).sum(1) + bias[col]
            # d BCE-with-logits / d logit = sigmoid(z) - y, over the batch's own count
            residual = (torch.sigmoid(logits) - targets[img, col].float()) * torch.from_numpy(scale).float().to(device)
            grad_w = torch.zeros(len(stepped), n_filters, device=device).index_add_(0, slot, x * residual[:, None])
            if keep_rows is not None:
                grad_w *= keep_rows[stepped]
            sgd_w.step(rows_w, stepped, grad_w, lr_now)
            sgd_b.step(bias, stepped, torch.zeros(len(stepped), device=device).index_add_(0, slot, residual), lr_now)
    weights = rows_w.T.contiguous().cpu()
    b = bias.cpu()
    images, cols = draw(gen)  # a fresh balanced train sample, for the train accuracy
    train_hits = cls_kernel.pair_hits(
        train_rows[images], cols, features.numpy(), labels.numpy(), rows_w.cpu().numpy(), b.numpy()
    )
    del images
    val_acc, ap, present = _score_val(features, weights, b, labels, val_rows, val_pairs)
    pairs = 2 * int(draw.size.sum())
    return ClsResult(np.asarray(concept_ids), weights, b, _fraction(train_hits, cols), val_acc, ap, *present, pairs)
