"""The formula search against a plain implementation of compexp's loop on dense boolean masks.

The reference below follows compexp's `compute_best_iou` step by step: formula objects compared by
identity (compexp's formula classes define no __eq__), a dict in insertion order ranked with
Counter.most_common, every candidate's mask built over the whole dataset and measured again. It
shares no arithmetic with n2vdb's counts.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from n2vdb.formulas import masks as fmasks
from n2vdb.formulas import search
from n2vdb.formulas.kernel import AND, AND_NOT, LEAF, OR


class Leaf:
    def __init__(self, val):
        self.val = val

    def __len__(self):
        return 1


class Not:
    def __init__(self, val):
        self.val = val

    def __len__(self):
        return 1 + len(self.val)


class Bin:
    def __init__(self, op, left, right):
        self.op, self.left, self.right = op, left, right

    def __len__(self):
        return len(self.left) + len(self.right)


def dense(f, label_masks, shapes):
    """The formula's mask on every image, as a list of bool arrays."""
    if isinstance(f, Leaf):
        return label_masks[f.val]
    if isinstance(f, Not):
        return [~m for m in dense(f.val, label_masks, shapes)]
    left, right = dense(f.left, label_masks, shapes), dense(f.right, label_masks, shapes)
    return [(a | b) if f.op == "OR" else (a & b) for a, b in zip(left, right)]


def reference(unit, label_masks, shapes, beam_size, max_length, penalty):
    """compexp's compute_best_iou for one unit: (best formula, score), (best label, iou)."""
    u_area = sum(int(m.sum()) for m in unit)

    def iou(mask):
        both = sum(int((a & b).sum()) for a, b in zip(unit, mask))
        area = sum(int(m.sum()) for m in mask)
        return both / (area + u_area - both + 1e-10)

    ious = {lab: iou(label_masks[lab]) for lab in sorted(label_masks)}
    nonzero = Counter({lab: v for lab, v in ious.items() if v > 0})
    if not nonzero:
        return None, None
    formulas = {Leaf(lab): v for lab, v in nonzero.most_common(beam_size)}
    best_noncomp = Counter(formulas).most_common(1)[0]
    for _ in range(max_length - 1):
        new = {}
        for formula in formulas:
            for label in sorted(label_masks):
                for op, negate in (("OR", False), ("AND", False), ("AND", True)):
                    term = Not(Leaf(label)) if negate else Leaf(label)
                    term = Bin(op, formula, term)
                    new[term] = penalty ** (len(term) - 1) * iou(dense(term, label_masks, shapes))
        formulas.update(new)
        formulas = dict(Counter(formulas).most_common(beam_size))
    return Counter(formulas).most_common(1)[0], best_noncomp


def as_tuple(f) -> search.Formula:
    if isinstance(f, Leaf):
        return ((LEAF, f.val),)
    right = f.right
    if isinstance(right, Not):
        return (*as_tuple(f.left), (AND_NOT, right.val.val))
    return (*as_tuple(f.left), (OR if f.op == "OR" else AND, right.val))


def blobs(rng, shape, n, radius):
    ys, xs = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape, bool)
    for _ in range(n):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        out |= (ys - cy) ** 2 + (xs - cx) ** 2 <= rng.uniform(0.5, radius) ** 2
    return out


def make_data(seed, n_images=14, n_labels=9, n_units=7):
    """Images of two sizes (one not a multiple of 64 pixels, one wider than a word), pixel labels
    that overlap, image-level labels, and units correlated with some labels."""
    rng = np.random.default_rng(seed)
    shapes = [(7, 9) if i % 3 else (9, 11) for i in range(n_images)]
    label_masks = {lab: [np.zeros(s, bool) for s in shapes] for lab in range(n_labels)}
    images = []
    for i, s in enumerate(shapes):
        present = np.flatnonzero(rng.random(n_labels) < 0.45)
        whole = []
        for lab in present.tolist():
            if lab >= n_labels - 2:  # the last two labels are image-level
                label_masks[lab][i][:] = True
                whole.append(lab)
            else:
                m = blobs(rng, s, 2, 3.0)
                if m.any():
                    label_masks[lab][i] = m
        labels = sorted(lab for lab in range(n_labels) if label_masks[lab][i].any())
        is_whole = np.array([lab in whole for lab in labels], bool)
        stack = [label_masks[lab][i] for lab in labels if lab not in whole]
        images.append(
            fmasks.ImageMasks(i, s, np.array(labels, np.int32), is_whole, np.array(stack, bool).reshape(-1, *s))
        )
    units = [[np.zeros(s, bool) for s in shapes] for _ in range(n_units)]
    for u in range(n_units):
        source = u % (n_labels - 1)
        for i, s in enumerate(shapes):
            noise = blobs(rng, s, 1, 2.5) if rng.random() < 0.4 else np.zeros(s, bool)
            keep = label_masks[source][i] & (rng.random(s) < 0.8) if u % 2 == 0 else np.zeros(s, bool)
            units[u][i] = noise | keep
    if n_units > 1:
        units[-1] = [np.zeros(s, bool) for s in shapes]  # a unit that never fires
    per_image = []
    for i in range(n_images):
        fired = [u for u in range(n_units) if units[u][i].any()]
        per_image.append(
            (np.array(fired, np.int32), np.array([units[u][i] for u in fired], bool).reshape(-1, *shapes[i]))
        )
    return shapes, label_masks, images, units, per_image


@pytest.mark.parametrize(
    ("seed", "beam_size", "max_length", "penalty", "chunk"),
    [(0, 5, 3, 1.0, 5), (1, 3, 4, 1.0, 14), (2, 5, 3, 0.9, 3), (3, 1, 2, 1.0, 4), (4, 4, 3, 1.0, 1), (5, 5, 1, 1.0, 7)],
)
def test_the_search_is_compexps_formula_for_formula(seed, beam_size, max_length, penalty, chunk):
    shapes, label_masks, images, units, per_image = make_data(seed)
    n_units, n_labels = len(units), len(label_masks)
    chunks = [
        fmasks.make_chunk(images[a : a + chunk], per_image[a : a + chunk], n_units)
        for a in range(0, len(images), chunk)
    ]
    found = search.beam_search(lambda: chunks, n_units, n_labels, beam_size, max_length, penalty)
    agree = 0
    for u in range(n_units):
        best, best_label = reference(units[u], label_masks, shapes, beam_size, max_length, penalty)
        got = found[u]
        if best is None:
            assert got.best is None and got.best_label is None
            continue
        assert got.best.formula == as_tuple(best[0]), (u, search.text(got.best.formula, str))
        assert got.best.score == best[1]  # bit for bit: the same float64 arithmetic
        assert got.best_label.formula == as_tuple(best_label[0]) and got.best_label.score == best_label[1]
        agree += 1
    assert agree >= n_units - 2  # the data gives most units a formula to find


def test_counts_match_dense_masks_for_every_extension():
    """The counts behind OR, AND and AND NOT equal the dense masks' sums (one beam of two formulas)."""
    shapes, label_masks, images, units, per_image = make_data(7)
    chunks = [fmasks.make_chunk(images, per_image, len(units))]
    formulas = [((LEAF, 1), (AND_NOT, 8)), ((LEAF, 2), (OR, 0), (AND, 3))]
    table = search.FormulaTable(formulas)
    beam = np.tile(np.arange(2), (len(units), 1))
    counts = search.count_pass(chunks, table, beam, len(label_masks))
    as_objects = [Bin("AND", Leaf(1), Not(Leaf(8))), Bin("AND", Bin("OR", Leaf(2), Leaf(0)), Leaf(3))]
    for j, f in enumerate(as_objects):
        mask = dense(f, label_masks, shapes)
        assert counts.fa[j] == sum(int(m.sum()) for m in mask)
        for lab in range(len(label_masks)):
            assert counts.fl[j, lab] == sum(int((m & lm).sum()) for m, lm in zip(mask, label_masks[lab]))
        for u in range(len(units)):
            assert counts.uf[u, j] == sum(int((m & um).sum()) for m, um in zip(mask, units[u]))
            for lab in (0, 4, 8):
                expect = sum(int((m & um & lm).sum()) for m, um, lm in zip(mask, units[u], label_masks[lab]))
                assert counts.ufl[u, j, lab] == expect


def test_pack_round_trip_and_text():
    rng = np.random.default_rng(0)
    m = rng.random((3, 113, 113)) < 0.3
    bits = fmasks.pack(m, fmasks.words(113 * 113))
    assert bits.shape == (3, 200) and (fmasks.unpack(bits, 113 * 113) == m.reshape(3, -1)).all()
    names = {0: "water", 1: "river", 2: "blue"}.get
    f = ((LEAF, 0), (OR, 1), (AND_NOT, 2))
    assert search.text(f, names) == "((water OR river) AND (NOT blue))"
    assert search.length(f) == 4  # compexp counts the NOT
