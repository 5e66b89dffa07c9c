"""Classification training's epoch on the CPU as one compiled loop (numba).

Each concept's batches only read and move its own weight row, so an epoch can run concept by concept,
each taking all its batches in order: the same updates as the joint trainer's steps (step t is every
concept's t-th batch), without a torch call per step. Per pair it is one dot product, a sigmoid and
one scaled add into the gradient row; per batch one momentum update of the row, as torch's SGD does
it (v = m v + g; w -= lr v). Concepts run in threads (embed/threads.py).

After training, the same module scores: a pair's logit (train accuracy) and a block of concepts'
logits over the val images (val accuracy, average precision, per-image scores), each summed in an
order fixed by the filters alone, so no result depends on how the work is cut into blocks.
"""

from __future__ import annotations

import math

import numpy as np

from n2vdb.embed import threads
from n2vdb.embed.pixel_kernel import njit  # numba as pixel_kernel set it up (its vector width)


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy", fastmath={"contract"})
def _concept_batches(
    first, stop, images, cols, features, targets, rows_w, bias, velocity_w, velocity_b, keep, batch, lr, momentum
):  # pragma: no cover (compiled; tests/test_embed.py checks it against torch's SGD concept by concept)
    """Pairs [FIRST, STOP) sorted by concept, each concept's in its epoch order: every concept takes
    them in batches of BATCH, the loss (BCE with logits) averaged over the batch's own count, and
    steps its row of ROWS_W [C, K] (times its KEEP row, if KEEP has rows) and its BIAS."""
    k = features.shape[1]
    grad = np.empty(k, np.float32)
    one = np.float32(1)
    start = first
    while start < stop:
        c = cols[start]
        end = start
        while end < stop and cols[end] == c:
            end += 1
        w, v = rows_w[c], velocity_w[c]
        for lo in range(start, end, batch):
            hi = min(lo + batch, end)
            scale = np.float32(1.0 / (hi - lo))
            grad[:] = 0
            grad_b = np.float32(0)
            for p in range(lo, hi):
                x = features[images[p]]
                z = bias[c]
                for j in range(k):
                    z += x[j] * w[j]
                residual = (one / (one + np.float32(math.exp(-z))) - np.float32(targets[images[p], c])) * scale
                for j in range(k):
                    grad[j] += x[j] * residual
                grad_b += residual
            if keep.shape[0]:
                for j in range(k):
                    grad[j] *= keep[c, j]
            for j in range(k):
                v[j] = momentum * v[j] + grad[j]
                w[j] -= lr * v[j]
            velocity_b[c] = momentum * velocity_b[c] + grad_b
            bias[c] -= lr * velocity_b[c]
        start = end


def epoch(images, cols, rank, features, targets, rows_w, bias, velocity_w, velocity_b, keep, batch, lr, momentum):
    """One epoch over the selected (image, concept) pairs IMAGES, COLS (image RANK in the epoch's
    order), in place on the CPU tensors ROWS_W [C, K], BIAS [C] and their velocities; KEEP [C, K] or
    None."""
    by = np.lexsort((rank[images], cols))  # by concept, then epoch order: own_batches' order
    images, cols = images[by], cols[by]
    no_keep = np.zeros((0, rows_w.shape[1]), np.float32)
    args = (
        images,
        cols,
        features.numpy(),
        targets.numpy(),
        rows_w.numpy(),
        bias.numpy(),
        velocity_w.numpy(),
        velocity_b.numpy(),
        no_keep if keep is None else keep.numpy(),
        batch,
        np.float32(lr),
        np.float32(momentum),
    )
    threads.over_concepts(lambda first, stop: _concept_batches(first, stop, *args), cols)


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy", fastmath={"contract"})
def _dot(x, w):  # pragma: no cover (compiled)
    """x . w in eight interleaved partial sums (filter j into sum j mod 8), added pairwise: a fixed
    order (independent of the call) that keeps eight multiply-adds in flight, not one."""
    k = x.shape[0]
    top = k - k % 8
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0)
    for j in range(0, top, 8):
        s0 += x[j] * w[j]
        s1 += x[j + 1] * w[j + 1]
        s2 += x[j + 2] * w[j + 2]
        s3 += x[j + 3] * w[j + 3]
        s4 += x[j + 4] * w[j + 4]
        s5 += x[j + 5] * w[j + 5]
        s6 += x[j + 6] * w[j + 6]
        s7 += x[j + 7] * w[j + 7]
    for j in range(top, k):
        s0 += x[j] * w[j]
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy", fastmath={"contract"})
def _pair_hits(images, cols, features, targets, rows_w, bias, hits):  # pragma: no cover (compiled)
    for p in range(len(images)):
        r, c = images[p], cols[p]
        if (_dot(features[r], rows_w[c]) + bias[c] > 0) == targets[r, c]:
            hits[c] += 1


def pair_hits(images, cols, features, targets, rows_w, bias) -> np.ndarray:
    """Per concept (int64 [C]), how many of the pairs (IMAGES rows of FEATURES [N, K], COLS rows of
    ROWS_W [C, K]) have a logit x . w + b whose sign (> 0) gives the label TARGETS [N, C]."""
    hits = np.zeros(len(rows_w), np.int64)
    _pair_hits(images, cols, features, targets, rows_w, bias, hits)
    return hits


@njit(cache=True, nogil=True, boundscheck=False, error_model="numpy", fastmath={"contract"})
def _logits(features, rows, weights, bias, c0, c1, out):  # pragma: no cover (compiled)
    width = c1 - c0
    acc = np.empty(width, np.float32)
    for i in range(len(rows)):
        x = features[rows[i]]
        acc[:] = 0
        for j in range(weights.shape[0]):
            xj = x[j]
            w = weights[j, c0:c1]
            for c in range(width):  # concepts side by side: a vector multiply-add per filter
                acc[c] += xj * w[c]
        for c in range(width):
            out[c, i] = acc[c] + bias[c0 + c]


def logits(features, rows, weights, bias, c0: int, c1: int) -> np.ndarray:
    """float32 [c1 - c0, len(ROWS)]: concept c's logit features[rows[i]] . weights[:, c] + bias[c] at
    [c - c0, i] (FEATURES [N, K], WEIGHTS [K, C]), each dot summed in filter order."""
    out = np.empty((c1 - c0, len(rows)), np.float32)
    _logits(features, rows, weights, bias, c0, c1, out)
    return out
