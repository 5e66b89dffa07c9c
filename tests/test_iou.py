"""Stage 2: every single-filter IoU against a brute-force loop written from the definition."""

import duckdb
import numpy as np
import pytest
import torch
from conftest import write_broden, write_image, write_mask
from PIL import Image

from n2vdb import api

from helpers import planted_probe


def bilinear_align_corners(a: np.ndarray, sh: int, sw: int) -> np.ndarray:
    """Bilinear resize of a [H, W] map with corner pixels aligned, one output pixel at a time, in float32
    (the arithmetic of float32 tensors, so pixels that land exactly on the 0.5 boundary agree)."""
    f = np.float32
    a = a.astype(f)
    h, w = a.shape
    out = np.zeros((sh, sw), f)
    scale_y = f((h - 1) / (sh - 1)) if sh > 1 else f(0)
    scale_x = f((w - 1) / (sw - 1)) if sw > 1 else f(0)
    for i in range(sh):
        y = f(scale_y * f(i))
        y0 = int(np.floor(y))
        y1 = min(y0 + 1, h - 1)
        fy = f(y - f(y0))
        for j in range(sw):
            x = f(scale_x * f(j))
            x0 = int(np.floor(x))
            x1 = min(x0 + 1, w - 1)
            fx = f(x - f(x0))
            top = f(f(f(1) - fx) * a[y0, x0]) + f(fx * a[y0, x1])
            bottom = f(f(f(1) - fx) * a[y1, x0]) + f(fx * a[y1, x1])
            out[i, j] = f(f(f(1) - fy) * f(top) + f(fy * f(bottom)))
    return out


def decode(path) -> np.ndarray:
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1]


def truth_masks(root, row) -> dict[int, np.ndarray]:
    masks: dict[int, np.ndarray] = {}
    for category in ("color", "object", "material", "part"):
        for rel in filter(None, row[category].split(";")):
            codes = decode(root / "images" / rel)
            for c in set(np.unique(codes)) - {0}:
                masks[int(c)] = masks.get(int(c), np.zeros(codes.shape, bool)) | (codes == c)
    for category in ("scene", "texture"):
        for c in filter(None, row[category].split(";")):
            masks[int(c)] = np.ones((int(row["sh"]), int(row["sw"])), bool)
    return masks


def brute_force(root, acts, thresholds, mode="net2vec"):
    """{(filter, concept, split): (intersection, union)} straight from the definition (net2vec mode;
    the netdissect mode's tally is tested against NetDissect-Lite's algorithm in test_netdissect.py)."""
    import csv

    rows = list(csv.DictReader((root / "index.csv").open()))
    sums: dict = {}
    for n, row in enumerate(rows):
        masks = truth_masks(root, row)
        sh, sw = int(row["sh"]), int(row["sw"])
        for k in range(acts.shape[1]):
            threshold = np.float32(thresholds[k])
            on = bilinear_align_corners(acts[n, k] > threshold, sh, sw) > 0.5
            for c, lab in masks.items():
                key = (k, c, row["split"])
                inter, union = sums.get(key, (0, 0))
                sums[key] = (inter + int((on & lab).sum()), union + int((on | lab).sum()))
    return sums


def test_every_iou_matches_brute_force(tmp_path, edge_broden, mode="net2vec"):
    root, _ = edge_broden
    rng = np.random.default_rng(1)
    acts = np.maximum(rng.normal(size=(4, 5, 6, 6)), 0).astype(np.float32)
    db = tmp_path / "t.duckdb"
    probe_id, _ = planted_probe(db, root, acts, quantile=0.8, mode=mode)
    ids, stored = api.activations(probe_id, db)
    con = duckdb.connect(str(db), read_only=True)
    thresholds = np.array(
        [
            t
            for (t,) in con.execute(
                "SELECT threshold FROM filters WHERE probe_id = ? ORDER BY filter", [probe_id]
            ).fetchall()
        ]
    )
    got = {
        (f, c, s): (i, u, iou)
        for f, c, s, i, u, iou in con.execute(
            "SELECT filter, concept_id, split, intersection, union_, iou FROM filter_concept_iou"
        ).fetchall()
    }
    expected = brute_force(root, stored, thresholds, mode)
    assert set(got) == {k for k, v in expected.items() if v[1] > 0}
    for key, (inter, union) in expected.items():
        assert got[key][:2] == (inter, union), key
        assert got[key][2] == pytest.approx(inter / union)


def test_per_image_best_filter_scores(tmp_path, edge_broden):
    root, _ = edge_broden
    acts = np.maximum(np.random.default_rng(2).normal(size=(4, 5, 6, 6)), 0).astype(np.float32)
    db = tmp_path / "t.duckdb"
    probe_id, _ = planted_probe(db, root, acts, quantile=0.7)
    con = duckdb.connect(str(db), read_only=True)
    best = dict(
        con.execute(
            "SELECT concept_id, arg_max(filter, iou) FROM filter_concept_iou WHERE split = 'train' GROUP BY 1"
        ).fetchall()
    )
    per_image = con.execute(
        "SELECT image_id, concept_id, intersection, union_ FROM image_concept_scores WHERE method = 'best_filter'"
    ).fetchall()
    # summing per-image counts of the best filter over a split gives back the set totals
    totals: dict = {}
    split = dict(con.execute("SELECT image_id, split FROM images").fetchall())
    for image_id, concept, inter, union in per_image:
        key = (concept, split[image_id])
        i, u = totals.get(key, (0, 0))
        totals[key] = (i + inter, u + union)
    for (concept, s), (i, u) in totals.items():
        row = con.execute(
            "SELECT intersection, union_ FROM filter_concept_iou WHERE filter = ? AND concept_id = ? AND split = ?",
            [best[concept], concept, s],
        ).fetchone()
        assert row == (i, u)
    assert {c for _, c, _, _ in per_image} == set(best)


def test_planted_filter_equal_to_a_concept_mask_scores_one(tmp_path):
    root = tmp_path / "planted"
    rng = np.random.default_rng(5)
    rows, acts = [], []
    for n in range(8):
        blob = np.zeros((7, 7), np.int64)
        y, x = rng.integers(0, 4, size=2)
        blob[y : y + 3, x : x + 3] = 40
        other = np.zeros((7, 7), np.int64)
        other[rng.integers(0, 7), :] = 41
        stem = f"i/{n}"
        write_image(root / "images" / f"{stem}.jpg", 14, 14, seed=n)
        write_mask(root / "images" / f"{stem}_o.png", blob)
        write_mask(root / "images" / f"{stem}_c.png", other)
        rows.append(
            {
                "image": f"{stem}.jpg",
                "split": "train" if n < 5 else "val",
                "ih": 14,
                "iw": 14,
                "sh": 7,
                "sw": 7,
                "object": f"{stem}_o.png",
                "color": f"{stem}_c.png",
            }
        )
        noise = rng.uniform(0, 0.2, size=(3, 7, 7)).astype(np.float32) * (rng.random((3, 7, 7)) < 0.05)
        acts.append(np.stack([(blob > 0) * 3.0, (other > 0) * 1.5, noise[0]]).astype(np.float32))
    write_broden(root, rows, [(40, "box", "object(8)"), (41, "stripe-c", "color(8)")])
    db = tmp_path / "t.duckdb"
    probe_id, _ = planted_probe(db, root, np.stack(acts), quantile=0.5)
    con = duckdb.connect(str(db), read_only=True)
    got = dict(
        ((f, c, s), iou)
        for f, c, s, iou in con.execute("SELECT filter, concept_id, split, iou FROM filter_concept_iou").fetchall()
    )
    for split in ("train", "val"):
        assert got[(0, 40, split)] == 1.0
        assert got[(1, 41, split)] == 1.0
        assert got[(2, 40, split)] < 0.5


def broden_density(root):
    """Images at Broden's density: ~25 pixel-level concepts each (objects, parts in two part channels
    sharing one label set and overlapping, materials, colours), a scene and two textures; three
    segmentation sizes, two images of each, so batches mix sizes."""
    rng = np.random.default_rng(11)
    objects, parts, materials, colors = range(10, 20), range(100, 110), range(200, 206), range(300, 308)
    labels = (
        [(n, f"obj{n}", "object(6)") for n in objects]
        + [(n, f"part{n}", "part(6)") for n in parts]
        + [(n, f"mat{n}", "material(6)") for n in materials]
        + [(n, f"col{n}-c", "color(6)") for n in colors]
        + [(900, "s1-s", "scene(3)"), (901, "s2-s", "scene(3)"), (950, "t1", "texture(6)"), (951, "t2", "texture(6)")]
    )
    rows = []
    for i, (sh, sw) in enumerate([(25, 25), (19, 23), (25, 25), (12, 31), (19, 23), (12, 31)]):
        stem = f"d/{i}"
        write_image(root / "images" / f"{stem}.jpg", 2 * sh, 2 * sw, seed=i)
        channels = {
            "object": (objects, 0.1),
            "part_1": (parts, 0.4),
            "part_2": (parts, 0.5),
            "material": (materials, 0.1),
            "color": (colors, 0.0),
        }
        for name, (numbers, empty) in channels.items():
            codes = rng.choice(list(numbers), size=(sh, sw))
            codes[rng.random((sh, sw)) < empty] = 0
            write_mask(root / "images" / f"{stem}_{name}.png", codes)
        rows.append(
            {
                "image": f"{stem}.jpg",
                "split": "train" if i % 3 else "val",
                "ih": 2 * sh,
                "iw": 2 * sw,
                "sh": sh,
                "sw": sw,
                "object": f"{stem}_object.png",
                "material": f"{stem}_material.png",
                "color": f"{stem}_color.png",
                "part": f"{stem}_part_1.png;{stem}_part_2.png",
                "scene": str(900 + i % 2),
                "texture": "950;951",
            }
        )
    return write_broden(root, rows, labels)


def dense_probe(tmp_path, seed: int, n_filters: int, quantile: float):
    """(dataset root, db, probe id) of a planted probe on broden_density's six images: random
    non-negative activations [6, N_FILTERS, 8, 8] from SEED, thresholds at QUANTILE."""
    root = broden_density(tmp_path / "dense")
    acts = np.maximum(np.random.default_rng(seed).normal(size=(6, n_filters, 8, 8)), 0).astype(np.float32)
    db = tmp_path / "t.duckdb"
    probe_id, _ = planted_probe(db, root, acts, quantile=quantile)
    return root, db, probe_id


@pytest.mark.parametrize("quantile", [0.6, 0.97])
def test_broden_density_iou_matches_brute_force(tmp_path, quantile):
    root, db, probe_id = dense_probe(tmp_path, seed=3, n_filters=7, quantile=quantile)
    _, stored = api.activations(probe_id, db)
    con = duckdb.connect(str(db), read_only=True)
    thresholds = np.array(
        [
            t
            for (t,) in con.execute(
                "SELECT threshold FROM filters WHERE probe_id = ? ORDER BY filter", [probe_id]
            ).fetchall()
        ]
    )
    got = {
        (f, c, s): (i, u)
        for f, c, s, i, u in con.execute(
            "SELECT filter, concept_id, split, intersection, union_ FROM filter_concept_iou"
        ).fetchall()
    }
    expected = brute_force(root, stored, thresholds)
    assert len({c for _, c, _ in expected}) >= 30
    assert got == {k: v for k, v in expected.items() if v[1] > 0}


def test_batches_mixing_sizes_give_each_image_its_counts(tmp_path):
    """Per (image, concept) overlaps from batches of two images of different sizes equal the brute force."""
    import csv

    from n2vdb import probe as probes
    from n2vdb.data.broden import BrodenDataset
    from n2vdb.stats import iou as iou_stage

    root, db, probe_id = dense_probe(tmp_path, seed=4, n_filters=5, quantile=0.8)
    _, stored = api.activations(probe_id, db)
    con = duckdb.connect(str(db), read_only=True)
    thresholds = torch.tensor(
        [
            t
            for (t,) in con.execute(
                "SELECT threshold FROM filters WHERE probe_id = ? ORDER BY filter", [probe_id]
            ).fetchall()
        ]
    )
    probe, dataset = probes.load(con, probe_id), BrodenDataset.open(root)
    rows = list(csv.DictReader((root / "index.csv").open()))
    seen = 0
    for batch in iou_stage.iter_batch_overlaps(con, probe, dataset, thresholds.float(), "net2vec", 0, batch=2):
        for n, (image, concept) in enumerate(zip(batch.pair_image, batch.concept_ids)):
            image_id = int(batch.image_ids[image])
            lab = truth_masks(root, rows[image_id])[int(concept)]
            for k in range(stored.shape[1]):
                on = bilinear_align_corners(stored[image_id, k] > np.float32(thresholds[k]), *lab.shape) > 0.5
                assert batch.intersection[n, k] == (on & lab).sum()
                assert batch.mask_area[image, k] == on.sum()
            assert batch.label_area[n] == lab.sum()
            seen += 1
    assert seen == sum(len(truth_masks(root, r)) for r in rows)


def test_spilled_overlaps_give_the_same_best_filter_scores(tmp_path):
    """run() reads pass one's overlaps back from a spill file; decoding again must give the same rows."""
    from n2vdb import probe as probes
    from n2vdb.data.broden import BrodenDataset
    from n2vdb.stats import iou as iou_stage

    root, db, probe_id = dense_probe(tmp_path, seed=6, n_filters=5, quantile=0.9)
    con = duckdb.connect(str(db), read_only=True)
    probe, dataset = probes.load(con, probe_id), BrodenDataset.open(root)
    thresholds = iou_stage.thresholds_for(con, probe_id, "net2vec")
    spill = iou_stage.OverlapSpill()
    totals = iou_stage.tally(con, probe, dataset, thresholds, "net2vec", spill=spill)
    best = iou_stage.best_filters(totals)
    spilled = iou_stage.per_image_best(con, probe, dataset, thresholds, "net2vec", best, overlaps=spill)
    again = iou_stage.per_image_best(con, probe, dataset, thresholds, "net2vec", best)
    assert spilled.num_rows > 50 and spilled.equals(again)
    stored = con.execute(
        "SELECT image_id, concept_id, intersection, union_ FROM image_concept_scores"
        " WHERE method = 'best_filter' ORDER BY 1, 2"
    ).fetchall()
    assert stored == sorted(
        zip(*(again.column(c).to_pylist() for c in ("image_id", "concept_id", "intersection", "union_")))
    )
