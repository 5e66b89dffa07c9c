"""Segmentation training's work per (image, concept) pair on the CPU, as one compiled loop (numba).

A pair's gradient needs, at every one of its sh x sw mask pixels, the upsampled logit, its sigmoid
and the loss's derivative, and then the adjoint of the upsampling back onto the image's on values.
As torch operations that is five passes over [P, sh, sw] tensors in memory, 86% of training's time.
Here each pair goes through once, with every intermediate in a row of sw floats that stays in cache:

    X = bias + sum of the concept's weights at the on values        the low logits [H, W]
    X_w = X A_w^T                                                   two taps per output column
    per output row i, between low rows r and r + 1 (weight t):
        z = (1 - t) X_w[r] + t X_w[r + 1];  s = sigmoid(z)          a vectorisable exp (below)
        g = dL/dz from the mask bit and the pair's two coefficients
        G[r] += (1 - t) g;  G[r + 1] += t g                         the adjoint along the height
    dX = G A_w, added into the concept's gradient row at the on values

The exp is Cephes' single-precision expf (range reduction by ln 2 in two parts, a degree-6
polynomial, the power of two written into the exponent bits), because llvmlite's exp is a scalar
call that stops LLVM vectorising the loop. Within a cell the output rows are evenly spaced, so z
steps by a constant per column from row to row and e^-z is carried by one multiply per pixel
(_cell_gradient): two exps per column and cell instead of one per pixel. It agrees with torch's
sigmoid to a few ulp, so gradients agree with the torch path to float rounding
(tests/test_pixel_kernel.py). Sums that feed each other (the adjoints) go into separate rows and
registers, since adds chained through one memory location were a third of the loop's time.
Measured on one core, on a 1,024-image block of the broden profile: ~7.8 us per pair-step,
against ~10 us with an exp per pixel and ~40 us for the torch passes.
"""

from __future__ import annotations

import os
import sys
from typing import NamedTuple

import numpy as np
import torch


def _prefer_wide_vectors() -> None:
    """On a CPU with AVX-512, let LLVM use 512-bit vectors (its tuning for these CPUs prefers 256):
    the loop is arithmetic-bound and runs ~14% faster. It has to be said before numba starts, so it is
    skipped where numba was imported first or NUMBA_CPU_FEATURES is already set."""
    if "numba" in sys.modules or "NUMBA_CPU_FEATURES" in os.environ:
        return
    import llvmlite.binding as llvm

    features = llvm.get_host_cpu_features()
    if features.get("avx512f"):
        os.environ["NUMBA_CPU_FEATURES"] = features.flatten() + ",-prefer-256-bit"


_prefer_wide_vectors()
from numba import njit  # noqa: E402  (after the vector width is chosen)

from n2vdb.embed import threads  # noqa: E402

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI, _LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)  # ln 2 = HI + LO, HI exact in few bits
_EXP_LIMIT = np.float32(87.0)  # e^87 and 2^(126) stay normal floats; sigmoid is 0 or 1 to float precision beyond
# Cells whose low logits are all within +-25 take the recurrence (_cell_gradient): its intermediates
# stay within +-75 (steps are under one row), inside _EXP_LIMIT. Beyond, sigmoid is within 1e-11 of 0
# or 1 and the per-pixel exp handles it.
_RECURRENCE_LIMIT = np.float32(25.0)


class Taps(NamedTuple):
    """A 1-D bilinear interpolation as two taps per output: output i is (1 - weight[i]) input
    low[i] + weight[i] input low[i] + 1; first[r] is the first output whose low tap is r (outputs
    are in order, so those of r are first[r] to first[r + 1])."""

    low: np.ndarray
    weight: np.ndarray
    first: np.ndarray


def taps(matrix: torch.Tensor) -> Taps:
    """The taps of an [n_out, n_in] bilinear interpolation matrix (segmentation.upsample_matrix),
    read off the matrix itself, so there is one definition of the interpolation."""
    a = matrix.double().cpu().numpy()
    n_out, n_in = a.shape
    low = np.minimum((a > 0).argmax(axis=1), n_in - 2).astype(np.int64)
    weight = a[np.arange(n_out), low + 1].astype(np.float32)
    if not np.allclose(a[np.arange(n_out), low], 1 - weight, atol=1e-6):
        raise ValueError("not a two-tap interpolation matrix")
    position = low + weight.astype(np.float64)  # where each output samples the input
    if n_out > 2 and not np.allclose(np.diff(position), position[1] - position[0], atol=1e-5):
        raise ValueError("not an evenly spaced interpolation (_cell_gradient's recurrence needs even steps)")
    return Taps(low, weight, np.searchsorted(low, np.arange(n_in)))


def coefficients(alpha: np.ndarray, scale: np.ndarray, loss: str) -> tuple[np.ndarray, np.ndarray]:
    """The two per-pair constants of dL/dz for pixels inside (pos) and outside (neg) the mask.
    paper: dL/dz = s (1 - s) (y ? -a : 1 - a) k; loglik: dL/dz = y ? a k (s - 1) : (1 - a) k s."""
    a, k = alpha.astype(np.float64), scale.astype(np.float64)
    pos = -a * k if loss == "paper" else a * k
    neg = (1 - a) * k
    return pos.astype(np.float32), neg.astype(np.float32)


def _bit_table() -> np.ndarray:
    """Byte value -> its 8 bits as 8 bytes, most significant first (np.packbits' order), each entry
    one uint64 so that a packed mask row unpacks with one load and one store per byte."""
    bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1)
    return np.ascontiguousarray(bits).view(np.uint64).ravel()


_BITS = _bit_table()

# nogil: disjoint concepts run in threads (embed/threads.py).
_COMPILE = dict(cache=True, nogil=True, boundscheck=False, error_model="numpy", fastmath={"contract"})


@njit(inline="always", **_COMPILE)
def _logits_along_w(
    first, stop, filters, positions, weights, bias, columns, t_columns, low, along_w
):  # pragma: no cover
    """A pair's low logits into LOW [H * W] (BIAS plus its concept's WEIGHTS [K] at each of the image's
    on values [FIRST, STOP)), and their upsampling along the width into ALONG_W [H, sw]."""
    one = np.float32(1)
    n_low, width = along_w.shape
    n_cols = len(low) // n_low
    low[:] = bias
    for at in range(first, stop):
        low[positions[at]] += weights[filters[at]]
    for r in range(n_low):  # each output column is two taps of the low row
        base = r * n_cols
        for j in range(width):
            c, u = columns[j], t_columns[j]
            along_w[r, j] = low[base + c] * (one - u) + low[base + c + 1] * u


@njit(inline="always", **_COMPILE)
def _mask_buffer(mask_bits, n_rows, width):  # pragma: no cover
    """The buffer a pair's mask unpacks into, one byte per pixel: as uint64 words (_unpack fills eight
    pixels at a time) and as [n_rows, width] rows of a C-ordered array (so LLVM vectorises loads)."""
    mask = np.empty(mask_bits.shape[1] * 8, np.uint8)
    return mask.view(np.uint64), mask[: n_rows * width].reshape(n_rows, width)


@njit(inline="always", **_COMPILE)
def _unpack(packed, table, words):  # pragma: no cover
    """A pair's packed mask row into WORDS (uint64, viewed by the caller as one byte per pixel), in
    the loop rather than by np.unpackbits per chunk: the unpacked mask stays in cache."""
    for b in range(len(packed)):
        words[b] = table[packed[b]]


@njit(inline="always", **_COMPILE)
def _exp_parts(x):  # pragma: no cover
    """e^x (x clamped to +-87) as (e^f, the bits of the float 2^n) with x = n ln2 + f, |f| <= ln2 / 2:
    the caller stores the bits in an int32 row and multiplies by its float view, which is how
    LLVM vectorises writing 2^n into the exponent."""
    x = min(max(x, -_EXP_LIMIT), _EXP_LIMIT)
    n = np.floor(x * _LOG2E + np.float32(0.5))
    f = x - n * _LN2_HI - n * _LN2_LO
    poly = np.float32(1.9875691500e-4) * f + np.float32(1.3981999507e-3)
    poly = poly * f + np.float32(8.3334519073e-3)
    poly = poly * f + np.float32(4.1665795894e-2)
    poly = poly * f + np.float32(1.6666665459e-1)
    poly = poly * f + np.float32(5.0000001201e-1)
    return poly * f * f + f + np.float32(1), (np.int32(n) + np.int32(127)) << 23


@njit(inline="always", **_COMPILE)
def _exp_row(x, out, two_n):  # pragma: no cover
    """OUT = e^X elementwise (OUT may be X); TWO_N is a scratch int32 row (_exp_parts)."""
    for j in range(len(x)):
        out[j], two_n[j] = _exp_parts(x[j])
    scale = two_n.view(np.float32)
    for j in range(len(x)):
        out[j] *= scale[j]


@njit(inline="always", **_COMPILE)
def _add_stepped_row_gradient(e_neg, ratio, t, mask, inside, outside, loglik, below, above):  # pragma: no cover
    """dL/dz along the next output row of a cell: E_NEG = e^-z of the row before advances by RATIO
    (and is kept for the row after), then _add_pixel_gradient at each pixel (MASK the row's labels,
    T its height weight)."""
    one = np.float32(1)
    for j in range(len(e_neg)):
        e = e_neg[j] * ratio[j]
        e_neg[j] = e
        _add_pixel_gradient(one / (one + e), mask[j], t, inside, outside, loglik, below, above, j)


@njit(inline="always", **_COMPILE)
def _add_pixel_gradient(s, label, t, inside, outside, loglik, below, above, j):  # pragma: no cover
    """dL/dz at pixel J of a row from its sigmoid S and LABEL, into BELOW[j] and ABOVE[j]."""
    one = np.float32(1)
    y = np.float32(label)
    if loglik:
        g = outside * s + y * (inside * (s - one) - outside * s)
    else:
        g = (outside + y * (inside - outside)) * s * (one - s)
    below[j] += g * (one - t)
    above[j] += g * t


@njit(inline="always", **_COMPILE)
def _row_gradient(x0, x1, t, mask, inside, outside, loglik, z, two_n, below, above):  # pragma: no cover
    """dL/dz along one output row, whose logits are (1 - t) X0 + t X1 (MASK its labels; INSIDE,
    OUTSIDE the pair's coefficients), added into the rows of its adjoint along the height: (1 - t)
    of it into BELOW, t into ABOVE; its exp computed at every pixel. Z and TWO_N are scratch rows."""
    one = np.float32(1)
    for j in range(len(z)):  # e^-z = 2^n e^f, |f| <= ln2 / 2
        x = -(x0[j] * (one - t) + x1[j] * t)
        z[j], two_n[j] = _exp_parts(x)
    scale = two_n.view(np.float32)
    for j in range(len(z)):
        _add_pixel_gradient(one / (one + z[j] * scale[j]), mask[j], t, inside, outside, loglik, below, above, j)


@njit(inline="always", **_COMPILE)
def _cell_gradient(
    x0, x1, t_rows, first, stop, labels, inside, outside, loglik, e_neg, ratio, two_n, below, above
):  # pragma: no cover
    """_row_gradient for the output rows [FIRST, STOP) between low rows X0 and X1, with e^-z by
    recurrence: the rows' heights t are evenly spaced (taps checks it), so z steps by the same
    amount d = step (x1 - x0) from row to row and e^-z by the factor e^-d. Two exps per column and
    cell instead of one per pixel: the exp was most of the loop. The caller takes this path only
    where |x0|, |x1| <= _RECURRENCE_LIMIT, so no intermediate leaves float range."""
    t0 = t_rows[first]
    step = (t_rows[stop - 1] - t0) / np.float32(stop - 1 - first) if stop - first > 1 else np.float32(0)
    for j in range(len(e_neg)):  # e^-z one step before the cell's first row, and the factor per row
        d = x1[j] - x0[j]
        e_neg[j] = -(x0[j] + (t0 - step) * d)
        ratio[j] = -step * d
    _exp_row(e_neg, e_neg, two_n)
    _exp_row(ratio, ratio, two_n)
    for i in range(first, stop):
        _add_stepped_row_gradient(e_neg, ratio, t_rows[i], labels[i], inside, outside, loglik, below, above)


@njit(**_COMPILE)
def _pairs_gradient(
    first,
    stop,
    offsets,
    filters,
    positions,
    images,
    cols,
    mask_rows,
    mask_bits,
    table,
    weights,
    bias,
    pos,
    neg,
    rows,
    t_rows,
    row_firsts,
    columns,
    t_columns,
    column_firsts,
    loglik,
    grad_w,
    grad_b,
):  # pragma: no cover (compiled; tests/test_pixel_kernel.py checks it against autograd)
    """For each pair q in [FIRST, STOP) (image images[q], column cols[q], mask mask_bits[mask_rows[q]]
    packed): its low logits from the image's on values, their upsampled row logits, the loss's
    gradient at each pixel, and its adjoint back onto the on values, added into grad_w [C, K]
    (concept rows, as WEIGHTS) and grad_b [C]."""
    n_low, n_cols, width = rows[-1] + 2, columns[-1] + 2, len(columns)
    hw = n_low * n_cols
    low = np.empty(hw, np.float32)
    along_w = np.empty((n_low, width), np.float32)
    along_h = np.empty((n_low, width), np.float32)
    z, ratio = np.empty(width, np.float32), np.empty(width, np.float32)
    two_n = np.empty(width, np.int32)
    below, above = np.empty(width, np.float32), np.empty(width, np.float32)
    moderate = np.empty(n_low, np.bool_)
    words, labels = _mask_buffer(mask_bits, len(t_rows), width)
    one = np.float32(1)
    for q in range(first, stop):
        image, col = images[q], cols[q]
        inside, outside = pos[q], neg[q]
        _unpack(mask_bits[mask_rows[q]], table, words)
        _logits_along_w(
            offsets[image],
            offsets[image + 1],
            filters,
            positions,
            weights[col],
            bias[col],
            columns,
            t_columns,
            low,
            along_w,
        )
        for r in range(n_low):  # along_w's rows interpolate low's, so they are no larger
            large = 0
            for at in range(r * n_cols, (r + 1) * n_cols):
                large |= abs(low[at]) > _RECURRENCE_LIMIT
            moderate[r] = large == 0
        # Output rows cell by cell (those between low rows r and r + 1), their adjoint summed into two
        # separate rows, so the adds never wait on each other through memory: BELOW ends as row r's
        # and ABOVE carries into the next cell's BELOW.
        below[:] = 0
        for r in range(n_low - 1):
            above[:] = 0
            a, b = row_firsts[r], row_firsts[r + 1]
            if b > a and moderate[r] and moderate[r + 1]:
                _cell_gradient(
                    along_w[r],
                    along_w[r + 1],
                    t_rows,
                    a,
                    b,
                    labels,
                    inside,
                    outside,
                    loglik,
                    z,
                    ratio,
                    two_n,
                    below,
                    above,
                )
                a = b
            for i in range(a, b):
                _row_gradient(
                    along_w[r],
                    along_w[r + 1],
                    t_rows[i],
                    labels[i],
                    inside,
                    outside,
                    loglik,
                    z,
                    two_n,
                    below,
                    above,
                )
            along_h[r] = below
            below, above = above, below
        along_h[n_low - 1] = below
        # The adjoint along the width, along_h A_w, back into low. Summed cell by cell in registers:
        # adding into low[c] pixel by pixel chains every add through memory (5x slower).
        for r in range(n_low):
            base = r * n_cols
            low[base] = 0
            for c in range(n_cols - 1):  # each cell's two sums start afresh: no chain along the row
                left, right = np.float32(0), np.float32(0)
                for j in range(column_firsts[c], column_firsts[c + 1]):
                    v, u = along_h[r, j], t_columns[j]
                    left += v * (one - u)
                    right += v * u
                low[base + c] += left
                low[base + c + 1] = right
        total = np.float32(0)
        for at in range(hw):
            total += low[at]
        grad_b[col] += total
        for at in range(offsets[image], offsets[image + 1]):
            filt, where = filters[at], positions[at]
            grad_w[col, filt] += low[where]


@njit(**_COMPILE)
def _pairs_predicted(
    offsets,
    filters,
    positions,
    images,
    cols,
    mask_rows,
    mask_bits,
    table,
    weights,
    bias,
    rows,
    t_rows,
    columns,
    t_columns,
    inter,
    predicted,
):  # pragma: no cover (compiled; tests/test_pixel_kernel.py checks it against F.interpolate)
    """Per pair q: PREDICTED[q] pixels where the upsampled logit is > 0 (sigmoid > 0.5) and INTER[q]
    of them inside its mask (mask_bits[mask_rows[q]], packed)."""
    n_low, n_cols, width = rows[-1] + 2, columns[-1] + 2, len(columns)
    low = np.empty(n_low * n_cols, np.float32)
    along_w = np.empty((n_low, width), np.float32)
    words, labels = _mask_buffer(mask_bits, len(rows), width)
    one = np.float32(1)
    for q in range(len(images)):
        image, col = images[q], cols[q]
        _unpack(mask_bits[mask_rows[q]], table, words)
        _logits_along_w(
            offsets[image],
            offsets[image + 1],
            filters,
            positions,
            weights[col],
            bias[col],
            columns,
            t_columns,
            low,
            along_w,
        )
        hits, on = 0, 0
        for i in range(len(rows)):
            r, t = rows[i], t_rows[i]
            x0, x1, mask = along_w[r], along_w[r + 1], labels[i]
            for j in range(width):
                positive = x0[j] * (one - t) + x1[j] * t > 0
                on += positive
                hits += positive & mask[j]
        inter[q], predicted[q] = hits, on


def predicted_counts(block, pairs, cols, weights, bias, rows, columns, on_values) -> tuple[np.ndarray, np.ndarray]:
    """(pixels predicted inside the mask, pixels predicted) per pair of BLOCK, M = sigmoid(logits) >
    0.5 as segmentation.evaluate counts it; arguments as accumulate's (CPU tensors)."""
    inter, predicted = np.zeros(len(pairs), np.int64), np.zeros(len(pairs), np.int64)
    _pairs_predicted(
        block.offsets,
        *on_values,
        block.pair_image[pairs],
        cols,
        pairs,
        block.mask_bits,
        _BITS,
        weights.contiguous().numpy(),
        bias.numpy(),
        rows.low,
        rows.weight,
        columns.low,
        columns.weight,
        inter,
        predicted,
    )
    return inter, predicted


def accumulate(block, pairs, cols, weights, bias, alpha, scale, loss, rows, columns, on_values, grad_w, grad_b) -> None:
    """Add the gradient of sum_p scale_p loss_p over PAIRS of BLOCK (CPU tensors: weights, grad_w
    concept rows [C, K]; bias, grad_b, alpha [C]; scale [P]) to grad_w and grad_b, as segmentation._accumulate's
    torch passes would. ROWS = taps(A_h) and COLUMNS = taps(A_w) give the upsampling,
    ON_VALUES = split_on_values(block, H * W) the block's on values."""
    by_concept = np.argsort(cols, kind="stable")
    pairs, cols = pairs[by_concept], cols[by_concept]
    pos, neg = coefficients(alpha.numpy()[cols], scale.numpy()[by_concept], loss)
    args = (
        block.offsets,
        *on_values,
        block.pair_image[pairs],
        cols,
        pairs,
        block.mask_bits,
        _BITS,
        weights.contiguous().numpy(),
        bias.numpy(),
        pos,
        neg,
        *rows,
        *columns,
        loss == "loglik",
        grad_w.numpy(),
        grad_b.numpy(),
    )
    threads.over_concepts(lambda first, stop: _pairs_gradient(first, stop, *args), cols)


def split_on_values(block, hw: int) -> tuple[np.ndarray, np.ndarray]:
    """(filter, position) of each of BLOCK's on values (stored as filter * HW + position), split once
    per block: an integer division per value in the loop costs more than the arithmetic it feeds."""
    filters, positions = np.divmod(block.active, hw)
    return filters.astype(np.int32), positions.astype(np.int32)
