"""Classification training's epoch on the CPU as one compiled loop (numba).

Each concept's batches only read and move its own weight row, so an epoch can run concept by concept,
each taking all its batches in order: the same updates as the joint trainer's steps (step t is every
concept's t-th batch), without a torch call per step. Per pair it is one dot product, a sigmoid and
one scaled add into the gradient row; per batch one momentum update of the row, as torch's SGD does
it (v = m v + g; w -= lr v). Concepts run in threads (embed/threads.py).
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
