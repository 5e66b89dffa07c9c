"""Compositional formulas (n2vdb formulas) beside compexp's own search loop and a bare forward pass.

    python bench/formulas.py [--images 1000] [--units 2] [--workers 2]

On the broden profile (`n2vdb data synth --profile broden`), alexnet conv5, random weights:
1. a bare forward pass over the images (scale.py's, in a child process);
2. `n2vdb formulas` (beam 5, length 3, every category, every image) for all 256 units, its wall
   time and its core-seconds (user + system CPU of this process);
3. compexp's search (vision/dissection/neuron.py `compute_best_iou`, BEAM_SEARCH_LIMIT None, its
   default) on --units sampled units, with its real machinery: each label's and unit's mask one
   run-length encoding over the whole dataset (pycocotools, `pip install pycocotools`), every
   candidate formula's mask merged anew and measured with cmask.area, the first beam taken from the
   labels present where the unit fires (its pos_labels shortcut). Its mask catalog's construction
   is not timed (compexp caches it on disk): only the per-unit search, in core-seconds. compexp
   inverts a label's RLE for every AND NOT candidate (cmask.invert of its pycocotools fork, which
   PyPI's lacks); here each label's inverse is encoded once with the catalog, which only flatters
   compexp's time.
The sampled units' formulas and scores are compared with n2vdb's, which must be the same.
"""

import argparse
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from common import ingest_profile, save_result

sys.path.insert(0, str(Path(__file__).parent))
from scale import forward_in_child  # noqa: E402


def core_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Leaf:
    def __init__(self, label):
        self.label = label

    def __len__(self):
        return 1


class _Not:
    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return 1 + len(self.inner)


class _Join:
    def __init__(self, op, left, right):
        self.op, self.left, self.right = op, left, right

    def __len__(self):
        return len(self.left) + len(self.right)


def _rle_of(cmask, f, rles):
    """A formula's whole-dataset RLE, merged from its labels' as compexp's get_mask_global does."""
    if isinstance(f, _Leaf):
        return rles[f.label]
    if isinstance(f, _Not):  # compexp negates leaves only: their inverses are made with the catalog
        return rles[("not", f.inner.label)]
    return cmask.merge((_rle_of(cmask, f.left, rles), _rle_of(cmask, f.right, rles)), intersect=f.op == "AND")


def compexp_unit(cmask, unit_rle, unit_area, pos_labels, rles, areas, labels, beam, length):
    """compexp's compute_best_iou for one unit: (best formula, score)."""

    def iou(rle, area):
        both = cmask.area(cmask.merge((rle, unit_rle), intersect=True))
        return both / (area + unit_area - both + 1e-10)

    nonzero = Counter({lab: v for lab in pos_labels if (v := iou(rles[lab], areas[lab])) > 0})
    if not nonzero:
        return None, 0.0
    formulas = {_Leaf(lab): v for lab, v in nonzero.most_common(beam)}
    for _ in range(length - 1):
        new = {}
        for formula in formulas:
            for label in labels:
                for op, negate in (("OR", False), ("AND", False), ("AND", True)):
                    term = _Join(op, formula, _Not(_Leaf(label)) if negate else _Leaf(label))
                    rle = _rle_of(cmask, term, rles)
                    new[term] = iou(rle, cmask.area(rle))
        formulas.update(new)
        formulas = dict(Counter(formulas).most_common(beam))
    return Counter(formulas).most_common(1)[0]


def _as_tuple(f):
    from n2vdb.formulas.kernel import AND, AND_NOT, LEAF, OR

    if isinstance(f, _Leaf):
        return ((LEAF, f.label),)
    if isinstance(f.right, _Not):
        return (*_as_tuple(f.left), (AND_NOT, f.right.inner.label))
    return (*_as_tuple(f.left), (OR if f.op == "OR" else AND, f.right.label))


def compexp_catalog(db: Path, probe_id: int, units: list[int]):
    """compexp's MaskCatalog in our label numbering: whole-dataset RLEs of every label and of the
    sampled units, their areas, and each unit's pos_labels."""
    import torch
    from pycocotools import mask as cmask

    from n2vdb import activations as acts_store
    from n2vdb.data import importer
    from n2vdb.data.broden import BrodenDataset
    from n2vdb.formulas import masks as fmasks
    from n2vdb.probe import load
    from n2vdb.stats import netdissect
    from n2vdb.store import read_connection

    with read_connection(db) as con:
        probe = load(con, probe_id)
        dataset = BrodenDataset.open(importer.dataset_root(con, probe.dataset_id))
        order = acts_store.stored_order(con, probe_id)
        numbers = sorted(dataset.labels)
        index_of = {n: i for i, n in enumerate(numbers)}
        shape = (dataset.rows[0].sh, dataset.rows[0].sw)
        n = len(order)
        per_label: dict[int, list] = {}
        unit_dense = {u: np.zeros((n, *shape), bool) for u in units}
        present = np.zeros((n, len(numbers)), bool)
        thresholds = netdissect.thresholds(con, probe_id)
        at = 0
        for ids, codes, scales in acts_store.iter_codes(con, probe_id, (probe.n_filters, probe.height, probe.width)):
            values = acts_store.dequantise(torch.as_tensor(codes), torch.as_tensor(scales))
            for i, image_id in enumerate(ids.tolist()):
                side = fmasks.label_masks(dataset, tuple(dataset.categories), index_of, dataset.rows[image_id])
                pixel = iter(side.masks)
                for label, whole in zip(side.labels.tolist(), side.whole.tolist()):
                    per_label.setdefault(label, []).append((at, None if whole else next(pixel)))
                    present[at, label] = True
                fired, masks = fmasks.unit_masks(values[i], thresholds, shape)
                for u, m in zip(fired.tolist(), masks):
                    if u in unit_dense:
                        unit_dense[u][at] = m
                at += 1
    rles, areas = {}, {}
    for label, items in per_label.items():
        dense = np.zeros((n, *shape), bool)
        for i, m in items:
            dense[i] = True if m is None else m
        rles[label] = cmask.encode(np.asfortranarray(dense.reshape(n * shape[0], shape[1])))
        rles[("not", label)] = cmask.encode(np.asfortranarray(~dense.reshape(n * shape[0], shape[1])))
        areas[label] = cmask.area(rles[label])
    unit_rles = {u: cmask.encode(np.asfortranarray(d.reshape(n * shape[0], shape[1]))) for u, d in unit_dense.items()}
    fires = {u: d.reshape(n, -1).any(axis=1) for u, d in unit_dense.items()}
    pos = {u: np.flatnonzero(present[fires[u]].any(axis=0)).tolist() for u in units}
    return cmask, rles, areas, unit_rles, {u: int(d.sum()) for u, d in unit_dense.items()}, pos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--units", type=int, default=2, help="units searched by compexp's loop")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from n2vdb import api
    from n2vdb.data.synth import generate_broden
    from n2vdb.store import read_connection

    with tempfile.TemporaryDirectory() as tmp:
        root, db = Path(tmp) / "broden", Path(tmp) / "bench.duckdb"
        generate_broden(root, images=args.images, workers=max(args.workers, 1))
        api.add_dataset(root, "broden-profile", db)
        forward = forward_in_child(root, args.workers, "cpu")
        probe_id = ingest_profile(db, args.workers, epochs=1)
        cpu0, wall0 = core_seconds(), time.perf_counter()
        run_id = api.formulas(probe_id, db, workers=args.workers)
        ours_cpu, ours_wall = core_seconds() - cpu0, time.perf_counter() - wall0
        with read_connection(db) as con:
            n_units = con.execute("SELECT n_filters FROM probes WHERE probe_id = ?", [probe_id]).fetchone()[0]
            stored = con.execute(
                "SELECT filter, formula, score, n_labels FROM unit_formulas WHERE probe_id = ? AND run_id = ?",
                [probe_id, run_id],
            ).fetchall()
            terms = con.execute(
                "SELECT filter, list(op ORDER BY position), list(concept_id ORDER BY position) FROM formula_terms"
                " t WHERE probe_id = ? AND run_id = ? AND rank = 1 AND step = (SELECT max(step) FROM formula_beams b"
                " WHERE b.probe_id = t.probe_id AND b.run_id = t.run_id AND b.filter = t.filter) GROUP BY filter",
                [probe_id, run_id],
            ).fetchall()
            numbers = sorted(r[0] for r in con.execute("SELECT concept_id FROM concepts").fetchall())
        ours = {f: (formula, score, n) for f, formula, score, n in stored}
        lengths = Counter(n for _, _, n in ours.values())
        sample = sorted(ours)[:: max(1, len(ours) // max(args.units, 1))][: args.units]
        cmask, rles, areas, unit_rles, unit_areas, pos = compexp_catalog(db, probe_id, sample)
        labels = sorted(k for k in rles if not isinstance(k, tuple))
        index_of = {n: i for i, n in enumerate(numbers)}
        opcode = {"LEAF": 0, "OR": 1, "AND": 2, "AND NOT": 3}
        our_terms = {f: tuple((opcode[o], index_of[c]) for o, c in zip(ops, ids)) for f, ops, ids in terms}
        agree, theirs_cpu = 0, 0.0
        for u in sample:
            start = core_seconds()
            best, score = compexp_unit(cmask, unit_rles[u], unit_areas[u], pos[u], rles, areas, labels, 5, 3)
            theirs_cpu += core_seconds() - start
            same = best is not None and _as_tuple(best) == our_terms[u] and score == ours[u][1]
            agree += same
            print(
                f"unit {u}: compexp {score:.6f}, n2vdb {ours[u][0]} {ours[u][1]:.6f} {'same' if same else 'DIFFERENT'}"
            )
    per_unit_theirs = theirs_cpu / len(sample)
    per_unit_ours = ours_cpu / n_units
    figures = {
        "images": args.images,
        "units": n_units,
        "forward_s": forward,
        "formulas_wall_s": ours_wall,
        "formulas_core_s": ours_cpu,
        "formulas_vs_forward": ours_wall / forward,
        "compexp_units": len(sample),
        "compexp_core_s_per_unit": per_unit_theirs,
        "n2vdb_core_s_per_unit": per_unit_ours,
        "speedup_per_unit": per_unit_theirs / per_unit_ours,
        "agree": f"{agree}/{len(sample)}",
        "formula_lengths": {str(k): v for k, v in sorted(lengths.items())},
    }
    headline = (
        f"{args.images} broden-profile images, alexnet conv5: n2vdb formulas {ours_wall:.1f} s wall"
        f" = {ours_wall / forward:.2f}x the forward pass ({forward:.1f} s); per unit {per_unit_ours:.3f} core-s vs"
        f" compexp's loop {per_unit_theirs:.1f} core-s ({per_unit_theirs / per_unit_ours:,.0f}x);"
        f" formulas identical on {agree}/{len(sample)} sampled units"
    )
    print(headline)
    save_result("formulas", headline, figures)


if __name__ == "__main__":
    main()
