"""Compositional explanations (Mu & Andreas 2020): each unit's best formula of labels by beam search,
exactly as compexp's `NeuronOperator.compute_best_iou` defines it, from counts instead of masks.

compexp, per unit: the first beam is the B labels of highest non-zero IoU; each of N - 1 steps
extends every beam formula F by `OR L`, `AND L` and `AND NOT L` for every label L, scores each
(IoU times penalty ** (length - 1), where a NOT counts in the length), and keeps the best B of the
old and new formulas; the answer is the best of the last beam. Ties keep the earlier formula: old
before new, new in the order (beam formula, label number, OR / AND / AND NOT), since compexp ranks
with Counter.most_common, a stable sort of a dict in insertion order. compexp builds every
candidate's mask over the whole dataset; here one pass over the images per step counts, for every
beam formula, |U & F|, |F|, |U & F & L| and |F & L| (kernel.py), and each candidate's IoU is
arithmetic on those:

    F OR L       |U & F'| = |U & F| + |U & L| - |U & F & L|    |F'| = |F| + |L| - |F & L|
    F AND L      |U & F'| = |U & F & L|                        |F'| = |F & L|
    F AND NOT L  |U & F'| = |U & F| - |U & F & L|              |F'| = |F| - |F & L|

IoU = |U & F'| / (|U| + |F'| - |U & F'| + 1e-10), in float64, as compexp computes it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from n2vdb.formulas import kernel
from n2vdb.formulas.kernel import AND, AND_NOT, LEAF, OR
from n2vdb.formulas.masks import Chunk

Formula = tuple[tuple[int, int], ...]  # ((LEAF, label), (op, label), ...): left-deep; () is TRUE
EXTENSIONS = (OR, AND, AND_NOT)  # compexp's order


def length(formula: Formula) -> int:
    """compexp's len(formula): its labels, plus one for each NOT."""
    return len(formula) + sum(op == AND_NOT for op, _ in formula)


def text(formula: Formula, name: Callable[[int], str]) -> str:
    """compexp's str(formula): '((water OR river) AND (NOT blue))'."""
    if not formula:
        return "TRUE"
    out = name(formula[0][1])
    for op, label in formula[1:]:
        out = f"({out} {'OR' if op == OR else 'AND'} {f'(NOT {name(label)})' if op == AND_NOT else name(label)})"
    return out


class FormulaTable:
    """The distinct formulas of a pass, in the kernel's arrays."""

    def __init__(self, formulas: Iterable[Formula]):
        self.index: dict[Formula, int] = {}
        for f in formulas:
            self.index.setdefault(f, len(self.index))
        terms = max((len(f) for f in self.index), default=0)
        n = len(self.index)
        self.f_len = np.zeros(n, np.int64)
        self.f_op = np.zeros((n, max(terms, 1)), np.int64)
        self.f_lab = np.zeros((n, max(terms, 1)), np.int64)
        for f, i in self.index.items():
            self.f_len[i] = len(f)
            for t, (op, label) in enumerate(f):
                self.f_op[i, t], self.f_lab[i, t] = op, label

    def arrays(self):
        return self.f_len, self.f_op, self.f_lab


@dataclass
class PassCounts:
    fl: np.ndarray  # [F, L] |F & L|
    fa: np.ndarray  # [F] |F|
    ufl: np.ndarray  # [K, B, L] |U & F & L|
    uf: np.ndarray  # [K, B] |U & F|


def count_pass(chunks: Iterable[Chunk], table: FormulaTable, beam: np.ndarray, n_labels: int) -> PassCounts:
    """One pass over the chunks: the counts of TABLE's formulas and of the units' BEAM [K, B]."""
    n_f = len(table.f_len)
    out = PassCounts(
        np.zeros((n_f, n_labels), np.int64),
        np.zeros(n_f, np.int64),
        np.zeros((*beam.shape, n_labels), np.int64),
        np.zeros(beam.shape, np.int64),
    )
    for chunk in chunks:
        kernel.count(chunk, table, beam, out.fl, out.fa, out.ufl, out.uf)
    return out


@dataclass(frozen=True)
class Scored:
    formula: Formula
    score: float  # the IoU times the complexity penalty: what the search ranks by
    iou: float
    intersection: int
    union: int


@dataclass
class UnitFormulas:
    unit: int
    best: Scored | None  # None: the unit has no label of non-zero IoU
    best_label: Scored | None  # the first beam's best (compexp's best_noncomp)
    beams: list[list[Scored]] = field(default_factory=list)  # beam after step 0 (labels), 1, ...


def _iou(inter: np.ndarray, area: np.ndarray, unit_area: int) -> np.ndarray:
    return inter / (area + unit_area - inter + 1e-10)


def _scored(formula: Formula, score: float, inter: int, area: int, unit_area: int) -> Scored:
    union = int(area + unit_area - inter)
    return Scored(formula, float(score), float(inter / (union + 1e-10)), int(inter), union)


def beam_search(
    chunks: Callable[[], Iterable[Chunk]],
    n_units: int,
    n_labels: int,
    beam_size: int = 5,
    max_length: int = 3,
    penalty: float = 1.0,
    on_pass: Callable[[int], None] | None = None,
) -> list[UnitFormulas]:
    """Every unit's formulas over the images CHUNKS() yields (called once per pass): the first pass
    counts the labels, and each of MAX_LENGTH - 1 more extends the beams."""
    true = FormulaTable([()])
    base = count_pass(chunks(), true, np.zeros((n_units, 1), np.int64), n_labels)
    if on_pass:
        on_pass(0)
    label_area = base.fl[0]  # |L|
    unit_label = base.ufl[:, 0, :]  # |U & L|
    unit_area = base.uf[:, 0]  # |U|
    candidates = np.flatnonzero(label_area > 0)  # labels present in the images, by number
    results, beams = [], []
    for u in range(n_units):
        iou = _iou(unit_label[u, candidates], label_area[candidates], unit_area[u])
        nonzero = np.flatnonzero(iou > 0)
        top = nonzero[np.argsort(-iou[nonzero], kind="stable")[:beam_size]]
        beam = [
            _scored(
                ((LEAF, int(candidates[j])),),
                iou[j],
                unit_label[u, candidates[j]],
                label_area[candidates[j]],
                unit_area[u],
            )
            for j in top
        ]
        results.append(UnitFormulas(u, beam[0] if beam else None, beam[0] if beam else None, [beam]))
        beams.append(beam)
    for step in range(1, max_length):
        table = FormulaTable(s.formula for beam in beams for s in beam)
        width = max((len(b) for b in beams), default=0)
        if not width:
            break
        slots = np.full((n_units, width), -1, np.int64)
        for u, beam in enumerate(beams):
            slots[u, : len(beam)] = [table.index[s.formula] for s in beam]
        counts = count_pass(chunks(), table, slots, n_labels)
        if on_pass:
            on_pass(step)
        for u, beam in enumerate(beams):
            if not beam:
                continue
            beams[u] = _extend(
                u, beam, slots[u], counts, candidates, label_area, unit_label[u], unit_area[u], beam_size, penalty
            )
            results[u].beams.append(beams[u])
            results[u].best = beams[u][0]
    return results


def _extend(u, beam, slots, counts: PassCounts, candidates, label_area, unit_label, unit_area, beam_size, penalty):
    """The next beam of unit U: the best BEAM_SIZE of BEAM and its extensions, ties to the earlier."""
    b = len(beam)
    f = slots[:b]
    fl = counts.fl[f][:, candidates]  # [b, L]
    ufl = counts.ufl[u, :b][:, candidates]
    fa = counts.fa[f][:, None]
    uf = counts.uf[u, :b][:, None]
    la, ul = label_area[candidates][None, :], unit_label[candidates][None, :]
    inter = np.stack([uf + ul - ufl, ufl, uf - ufl], axis=2)  # [b, L, 3]: OR, AND, AND NOT
    area = np.stack([fa + la - fl, fl, fa - fl], axis=2)
    iou = _iou(inter, area, unit_area)
    lengths = np.array([length(s.formula) for s in beam])[:, None, None] + np.array([1, 1, 2])[None, None, :]
    score = (penalty ** (lengths - 1.0)) * iou
    old = np.array([s.score for s in beam])
    order = np.argsort(-np.concatenate([old, score.ravel()]), kind="stable")[:beam_size]
    out = []
    for j in order.tolist():
        if j < b:
            out.append(beam[j])
            continue
        k = j - b
        slot, rest = divmod(k, score.shape[1] * 3)
        label_at, op_at = divmod(rest, 3)
        formula = beam[slot].formula + ((EXTENSIONS[op_at], int(candidates[label_at])),)
        out.append(
            _scored(formula, score.ravel()[k], inter[slot, label_at, op_at], area[slot, label_at, op_at], unit_area)
        )
    return out


def evaluate(chunks: Iterable[Chunk], wanted: list[list[Formula]], n_labels: int) -> list[list[tuple[int, int, int]]]:
    """(|U & F|, |F|, |U|) of each unit's WANTED formulas over CHUNKS: a val split's scores."""
    n_units = len(wanted)
    lists = [[(), *w] for w in wanted]  # slot 0: TRUE, for |U|
    table = FormulaTable(f for w in lists for f in w)
    slots = np.full((n_units, max(len(w) for w in lists)), -1, np.int64)
    for u, w in enumerate(lists):
        slots[u, : len(w)] = [table.index[f] for f in w]
    counts = count_pass(chunks, table, slots, n_labels)
    return [
        [(int(counts.uf[u, j]), int(counts.fa[slots[u, j]]), int(counts.uf[u, 0])) for j in range(1, len(w))]
        for u, w in enumerate(lists)
    ]
