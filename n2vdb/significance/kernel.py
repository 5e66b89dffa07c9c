"""The permutation null's inner loop, compiled (numba): one block of images at a time.

For a tested (unit k, label c) pair and an image i of the block that has the label, the overlap of
every block image j's unit mask with i's label mask is a row of popcounts; the observed statistic
takes j = i, and permutation p takes j = perm[p, i]. A permutation's sums are then additions of
entries of that row, so P permutations cost P additions per (pair, image), not P mask overlaps.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from n2vdb.embed.threads import over_concepts
from n2vdb.formulas.kernel import _popcount


@njit(cache=True, nogil=True, boundscheck=False)
def _block(
    first,
    stop,
    unit_bits,
    unit_area,
    entry_image,
    entry_bits,
    entry_area,
    test_start,
    test_index,
    test_filter,
    perms,
    s,
    a,
):  # pragma: no cover (compiled)
    b = unit_bits.shape[0]
    n_words = unit_bits.shape[2]
    n_perms = perms.shape[0]
    x = np.empty(b, np.int64)
    for e in range(first, stop):
        i = entry_image[e]
        la = entry_area[e]
        for q in range(test_start[e], test_start[e + 1]):
            t = test_index[q]
            k = test_filter[q]
            for j in range(b):
                c = 0
                for w in range(n_words):
                    c += _popcount(unit_bits[j, k, w] & entry_bits[e, w])
                x[j] = c
            s[t, 0] += x[i]
            a[t, 0] += unit_area[i, k] + la
            for p in range(n_perms):
                j = perms[p, i]
                s[t, p + 1] += x[j]
                a[t, p + 1] += unit_area[j, k] + la


@njit(cache=True, nogil=True, boundscheck=False)
def _cell_masks(patterns, cells, out, area):  # pragma: no cover (compiled)
    n_units, n_cells = patterns.shape
    n_words = cells.shape[2]
    for k in range(n_units):
        for c in range(n_cells):
            q = patterns[k, c]
            if q:
                for w in range(n_words):
                    out[k, w] |= cells[c, q, w]
        a = 0
        for w in range(n_words):
            a += _popcount(out[k, w])
        area[k] = a


def unit_masks(patterns: np.ndarray, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 [K, W] packed masks, int64 [K] areas) of K upsampled binary maps, from their cell
    patterns [K, cells] (upsample_patterns.cell_patterns) and the geometry's packed_cells table:
    each pixel lies in one cell, so a mask is the OR of its cells' rows."""
    out = np.zeros((patterns.shape[0], cells.shape[2]), np.uint64)
    area = np.zeros(patterns.shape[0], np.int64)
    _cell_masks(np.ascontiguousarray(patterns), cells, out, area)
    return out, area


def add_block(
    unit_bits: np.ndarray,
    unit_area: np.ndarray,
    entry_concept: np.ndarray,
    entry_image: np.ndarray,
    entry_bits: np.ndarray,
    entry_area: np.ndarray,
    test_start: np.ndarray,
    test_index: np.ndarray,
    test_filter: np.ndarray,
    perms: np.ndarray,
    s: np.ndarray,
    a: np.ndarray,
) -> None:
    """Add one block's sums to S and A [T, 1 + P] (int64; column 0 is the observed pairing):
    S = sum of overlaps |M_j & L_i|, A = sum of |M_j| + |L_i|, over the block's images i with the label
    of each test. unit_bits uint64 [B, K, W], unit_area int64 [B, K]; entry e is (image entry_image[e],
    label entry_concept[e], sorted by label) with its mask entry_bits [E, W] and area; its tests are
    test_index[test_start[e]:test_start[e + 1]] on units test_filter[...]; perms int64 [P, B].
    Entries of one label stay in one thread: no two threads add to the same test."""

    arrays = (unit_bits, unit_area, entry_image, entry_bits, entry_area, test_start, test_index, test_filter)
    over_concepts(lambda first, stop: _block(first, stop, *arrays, perms, s, a), entry_concept)
