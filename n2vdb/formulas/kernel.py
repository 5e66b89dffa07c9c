"""The formulas' counting pass, compiled (numba): popcounts of packed bit masks.

A chunk of images holds, per image, the packed masks (uint64 words, one bit a pixel) of the labels
present in it and of the units that fire in it. A left-deep formula ((L0 op1 L1) op2 L2 ...) is
evaluated one word at a time from its labels' words, never stored. For every formula F of the
current beams and every label L present in an image, a pass adds

- |F & L| and |F| to the formula's totals (they do not depend on the unit), and
- |U & F & L| and |U & F| to each unit U whose beam holds F,

from which every extension's IoU follows without building its mask (search.py):
OR L, AND L and AND NOT L only need |U & F|, |F|, |U & L|, |L|, |U & F & L| and |F & L|.
Images where a label is absent add nothing to its counts, so the work is the labels each image
holds, not the whole label vocabulary.
"""

from __future__ import annotations

import numpy as np

from n2vdb.embed import threads
from n2vdb.embed.pixel_kernel import njit  # numba, as pixel_kernel set it up

LEAF, OR, AND, AND_NOT = 0, 1, 2, 3
OPS = {OR: "OR", AND: "AND", AND_NOT: "AND NOT"}
ABSENT, WHOLE = -2, -1  # a label's row in an image: absent, or an image-level label (every pixel)


@njit(cache=True, nogil=True, boundscheck=False)
def _popcount(x):  # pragma: no cover (compiled)
    # SWAR popcount; LLVM turns it into the POPCNT instruction where the CPU has one.
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (x * np.uint64(0x0101010101010101)) >> np.uint64(56)


@njit(cache=True, nogil=True, boundscheck=False)
def _rows_of(f, i, f_len, f_lab, pres_start, pres_label, pres_row, rows):  # pragma: no cover (compiled)
    """Fill ROWS[t] with the row of term t's label in image I: ABSENT, WHOLE or a mask row."""
    lo0, hi0 = pres_start[i], pres_start[i + 1]
    n = f_len[f]
    for t in range(n):
        label = f_lab[f, t]
        lo, hi = lo0, hi0
        while lo < hi:  # binary search: an image's labels are sorted
            mid = (lo + hi) // 2
            if pres_label[mid] < label:
                lo = mid + 1
            else:
                hi = mid
        rows[t] = pres_row[lo] if lo < hi0 and pres_label[lo] == label else ABSENT


@njit(cache=True, nogil=True, boundscheck=False)
def _maybe(f, f_len, f_op, rows):  # pragma: no cover (compiled)
    """Whether formula F can be non-empty on the image whose term rows are ROWS (an empty formula
    skips the image; a TRUE formula, of no terms, never does)."""
    n = f_len[f]
    if n == 0:
        return True
    live = rows[0] != ABSENT
    for t in range(1, n):
        op = f_op[f, t]
        if op == OR:
            live = live or rows[t] != ABSENT
        elif op == AND:
            live = live and rows[t] != ABSENT
        elif rows[t] == WHOLE:  # AND NOT an image-level label: nothing left
            live = False
    return live


@njit(cache=True, nogil=True, boundscheck=False)
def _word(f, w, i, f_len, f_op, rows, valid, lab_bits):  # pragma: no cover (compiled)
    """Word W of formula F's mask on image I."""
    n = f_len[f]
    if n == 0:
        return valid[i, w]
    r = rows[0]
    x = np.uint64(0) if r == ABSENT else (valid[i, w] if r == WHOLE else lab_bits[r, w])
    for t in range(1, n):
        r = rows[t]
        y = np.uint64(0) if r == ABSENT else (valid[i, w] if r == WHOLE else lab_bits[r, w])
        op = f_op[f, t]
        if op == OR:
            x = x | y
        elif op == AND:
            x = x & y
        else:
            x = x & ~y
    return x


@njit(cache=True, nogil=True, boundscheck=False)
def _formula_counts(
    f_first, f_stop, f_len, f_op, f_lab, valid, pres_start, pres_label, pres_row, lab_bits, fl, fa
):  # pragma: no cover (compiled; tests/test_formulas.py checks the search against dense masks)
    """FL[f, label] += |F & L| and FA[f] += |F| over the chunk's images, for formulas [F_FIRST, F_STOP)."""
    n_img, n_words = valid.shape
    rows = np.empty(max(1, f_len.max()), np.int64)
    for f in range(f_first, f_stop):
        for i in range(n_img):
            _rows_of(f, i, f_len, f_lab, pres_start, pres_label, pres_row, rows)
            if not _maybe(f, f_len, f_op, rows):
                continue
            p0, p1 = pres_start[i], pres_start[i + 1]
            for w in range(n_words):
                x = _word(f, w, i, f_len, f_op, rows, valid, lab_bits)
                if x == 0:
                    continue
                fa[f] += _popcount(x)
                for p in range(p0, p1):
                    r = pres_row[p]
                    fl[f, pres_label[p]] += _popcount(x if r == WHOLE else x & lab_bits[r, w])


@njit(cache=True, nogil=True, boundscheck=False)
def _unit_counts(
    u_first,
    u_stop,
    unit_start,
    unit_img,
    unit_bits,
    beam,
    f_len,
    f_op,
    f_lab,
    valid,
    pres_start,
    pres_label,
    pres_row,
    lab_bits,
    ufl,
    uf,
):  # pragma: no cover (compiled)
    """UFL[u, b, label] += |U & F & L| and UF[u, b] += |U & F| for F = BEAM[u, b], units [U_FIRST, U_STOP)."""
    n_words = valid.shape[1]
    rows = np.empty(max(1, f_len.max()), np.int64)
    for u in range(u_first, u_stop):
        for q in range(unit_start[u], unit_start[u + 1]):
            i = unit_img[q]
            p0, p1 = pres_start[i], pres_start[i + 1]
            for b in range(beam.shape[1]):
                f = beam[u, b]
                if f < 0:
                    continue
                _rows_of(f, i, f_len, f_lab, pres_start, pres_label, pres_row, rows)
                if not _maybe(f, f_len, f_op, rows):
                    continue
                for w in range(n_words):
                    x = unit_bits[q, w]
                    if x == 0:
                        continue
                    x = x & _word(f, w, i, f_len, f_op, rows, valid, lab_bits)
                    if x == 0:
                        continue
                    uf[u, b] += _popcount(x)
                    for p in range(p0, p1):
                        r = pres_row[p]
                        ufl[u, b, pres_label[p]] += _popcount(x if r == WHOLE else x & lab_bits[r, w])


def count(chunk, formulas, beam: np.ndarray, fl, fa, ufl, uf) -> None:
    """Add one chunk's counts (masks.Chunk) for the FORMULAS (search.FormulaTable) and the units'
    BEAM [K, B] of formula indices (-1: an empty slot) to the accumulators, in threads: formulas
    split between threads for FL and FA, units for UFL and UF, so no two threads add to one cell."""
    f_len, f_op, f_lab = formulas.arrays()
    c = chunk

    def by_formula(a: int, b: int) -> None:
        _formula_counts(a, b, f_len, f_op, f_lab, c.valid, c.pres_start, c.pres_label, c.pres_row, c.lab_bits, fl, fa)

    def by_unit(a: int, b: int) -> None:
        _unit_counts(
            a,
            b,
            c.unit_start,
            c.unit_img,
            c.unit_bits,
            beam,
            f_len,
            f_op,
            f_lab,
            c.valid,
            c.pres_start,
            c.pres_label,
            c.pres_row,
            c.lab_bits,
            ufl,
            uf,
        )

    # Each formula, and each unit, a run of its own: over_concepts splits them between torch's threads.
    threads.over_concepts(by_formula, np.arange(len(f_len)))
    threads.over_concepts(by_unit, np.arange(beam.shape[0]))
