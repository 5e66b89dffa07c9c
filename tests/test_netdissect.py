"""`--iou-mode netdissect` against NetDissect-Lite's published tally (feature_operation.py, tally_job),
re-written here as its per-image, per-unit loop, with PIL itself doing the resize (scipy's old
imresize(mode='F') is PIL's BILINEAR resize of a float32 image)."""

import csv

import duckdb
import numpy as np
import pytest
import torch
from conftest import write_image, write_mask
from PIL import Image

from n2vdb import api
from n2vdb.stats import pil_resize

from helpers import planted_probe

CATEGORIES = ["color", "object", "part", "material", "scene", "texture"]  # category.csv order (not index.csv's)
# number, name, label.csv category cell, {category: coverage} as c_<category>.csv states it
LABELS = [
    (1, "red-c", "color(3)", {"color": 0.3}),
    (2, "dog", "object(5)", {"object": 0.2}),
    # label.csv's counts make wood a material; c_*.csv coverage makes it an object for NetDissect-Lite
    (300, "wood", "material(9);object(4)", {"material": 0.1, "object": 0.4}),
    (301, "leg", "part(3)", {"part": 0.1}),
    (302, "head", "part(2)", {"part": 0.05}),
    (303, "brick", "material(2)", {"material": 0.2}),
    (5, "street-s", "scene(2)", {"scene": 0.5}),
    (6, "city-s", "scene(1)", {"scene": 0.4}),
    (7, "striped", "texture(1)", {"texture": 1.0}),
]
INDEX_COLUMNS = ["image", "split", "ih", "iw", "sh", "sw", "color", "object", "material", "part", "scene", "texture"]


def pil_imresize(feature_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """scipy.misc.imresize(feature_map, shape, mode='F'): a float32 PIL image resized with BILINEAR."""
    return np.asarray(Image.fromarray(feature_map.astype(np.float32), mode="F").resize(shape[::-1], Image.BILINEAR))


@pytest.mark.parametrize(
    "geometry",
    [(6, 6, 15, 17), (13, 13, 113, 113), (7, 7, 112, 112), (14, 14, 7, 7), (6, 9, 5, 4), (1, 3, 4, 7), (5, 5, 5, 5)],
)
def test_resize_is_pils_bit_for_bit(geometry):
    h, w, sh, sw = geometry
    rng = np.random.default_rng(h * 100 + sw)
    maps = (rng.random((4, h, w)) * rng.random((4, h, w)) * 7).astype(np.float32)
    expected = np.stack([pil_imresize(m, (sh, sw)) for m in maps])
    assert np.array_equal(pil_resize.resize(torch.from_numpy(maps), (sh, sw)).numpy(), expected)


@pytest.mark.parametrize("geometry", [(13, 13, 113, 113), (6, 9, 5, 4), (7, 7, 112, 112)])
def test_fast_threshold_is_exact_at_the_boundary(geometry):
    """above() = (PIL resize > threshold) even where the threshold IS a resized value, or one float32
    step either side of it: the band around the threshold is recomputed with Pillow's arithmetic."""
    h, w, sh, sw = geometry
    rng = np.random.default_rng(5)
    maps = (rng.random((6, h, w)) * 4).astype(np.float32)
    resized = np.stack([pil_imresize(m, (sh, sw)) for m in maps])
    picks = resized.reshape(6, -1)[np.arange(6), rng.integers(0, sh * sw, 6)].astype(np.float64)
    maps[0, :, : w // 2] = 0  # flat zero regions, thresholds at 0 and just below
    maps[1] -= 2  # negative values
    resized = np.stack([pil_imresize(m, (sh, sw)) for m in maps])
    picks[0], picks[1] = 0.0, resized[1].ravel()[3]
    for thresholds in (
        picks,
        np.nextafter(picks.astype(np.float32), 0).astype(np.float64),
        np.nextafter(picks.astype(np.float32), 9).astype(np.float64),
        picks - 1e-12,
        np.r_[-1e-300, picks[1:]],
    ):
        got = pil_resize.above(torch.from_numpy(maps), torch.from_numpy(thresholds), (sh, sw)).numpy()
        assert np.array_equal(got, resized > thresholds[:, None, None])


def test_resize_is_not_torchs_when_downsampling():
    """Why the mode carries its own resize: PIL widens the filter when shrinking; torch does not."""
    maps = np.random.default_rng(0).random((1, 14, 14)).astype(np.float32)
    ours = pil_resize.resize(torch.from_numpy(maps), (7, 7))
    theirs = torch.nn.functional.interpolate(
        torch.from_numpy(maps)[None], size=(7, 7), mode="bilinear", align_corners=False
    )[0]
    assert (ours - theirs).abs().max() > 0.05


def quirky_broden(root):
    """Every case the tally treats specially: a label in two categories whose primary category differs
    between label.csv counts and c_*.csv coverage, one label in two part channels at overlapping pixels and
    in the object and material channels at once, image-level labels (two in one cell), an image with only
    image-level labels, an image with none, and a segmentation smaller than the map (PIL downsamples)."""
    rng = np.random.default_rng(11)
    sizes = [
        (40, 30, 20, 15),
        (33, 47, 17, 23),
        (50, 50, 25, 25),
        (21, 35, 11, 18),
        (12, 10, 5, 4),
        (30, 30, 15, 15),
        (30, 30, 14, 16),
    ]
    rows = []
    for i, (ih, iw, sh, sw) in enumerate(sizes):
        stem = f"set/{i:03d}"
        write_image(root / "images" / f"{stem}.jpg", ih, iw, seed=i)
        row = {
            "image": f"{stem}.jpg",
            "split": "train" if i % 2 == 0 else "val",
            "ih": ih,
            "iw": iw,
            "sh": sh,
            "sw": sw,
        }
        if i == 3:  # nothing at all
            rows.append(row)
            continue
        if i == 5:  # image-level labels only
            row.update(scene="5", texture="7")
            rows.append(row)
            continue
        channels = {
            "color": rng.choice([0, 1], size=(sh, sw)),
            "object": rng.choice([0, 300] if i == 6 else [0, 2, 300], size=(sh, sw)),  # 6: wood, no dog
            "material": rng.choice([0, 300, 303], size=(sh, sw)),
            "part_1": rng.choice([0, 301, 302], size=(sh, sw)),
            "part_2": rng.choice([0, 301], size=(sh, sw)),
        }
        for name, labels in channels.items():
            write_mask(root / "images" / f"{stem}_{name}.png", labels)
        row.update(
            color=f"{stem}_color.png",
            object=f"{stem}_object.png",
            material=f"{stem}_material.png",
            part=f"{stem}_part_1.png;{stem}_part_2.png",
            scene={0: "5;6", 2: "6"}.get(i, ""),
            texture="7" if i in (1, 4) else "",
        )
        rows.append(row)
    root.mkdir(parents=True, exist_ok=True)
    with (root / "index.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, INDEX_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in INDEX_COLUMNS})
    with (root / "label.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["number", "name", "category", "frequency", "coverage", "syns"])
        writer.writerow([0, "-", "-", 0, 0, ""])
        for number, name, cell, _ in LABELS:
            writer.writerow([number, name, cell, 1, 0.5, ""])
    with (root / "category.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "first", "last", "count", "frequency"])
        for name in CATEGORIES:
            writer.writerow([name, 1, 1, 1, 1])
    for category in CATEGORIES:
        with (root / f"c_{category}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["code", "number", "name", "frequency", "coverage"])
            code = 1
            for number, name, _, coverage in LABELS:
                if category in coverage:
                    writer.writerow([code, number, name, 1, coverage[category]])
                    code += 1
    return root


def netdissect_lite(root, features: np.ndarray, threshold: np.ndarray, images=None):
    """(tally_both [units, labels], denominator [units, labels], tally_labels [labels]) by NetDissect-Lite's
    algorithm, over all images (or only those numbered in IMAGES).

    One departure, the documented one: on an image with only image-level labels NetDissect-Lite adds
    them to a stale `tally_cat` left by the previous unit; here it starts from zeros."""
    categories = [r["name"] for r in csv.DictReader((root / "category.csv").open())]
    label_rows = list(csv.DictReader((root / "label.csv").open()))
    n_labels = max(int(r["number"]) for r in label_rows) + 1
    if all((root / f"c_{c}.csv").exists() for c in categories):
        coverage = {
            c: {int(r["number"]): float(r["coverage"]) for r in csv.DictReader((root / f"c_{c}.csv").open())}
            for c in categories
        }
        primary = [max((coverage[c].get(j, 0.0), ic) for ic, c in enumerate(categories))[1] for j in range(n_labels)]
    else:  # (n2vdb's fallback) the category with the largest count in label.csv
        primary = [0] * n_labels
        for r in label_rows:
            counts = [
                (int(part.split("(")[1].rstrip(")")), part.split("(")[0])
                for part in r["category"].split(";")
                if "(" in part
            ]
            if counts:
                primary[int(r["number"])] = categories.index(max(counts, key=lambda c: c[0])[1])
    labelcat = np.zeros((n_labels, len(categories)))
    labelcat[np.arange(n_labels), primary] = 1
    units = features.shape[1]
    tally_both = np.zeros((units, n_labels))
    tally_units_cat = np.zeros((units, len(categories)))
    tally_labels = np.zeros(n_labels)
    for i, row in enumerate(csv.DictReader((root / "index.csv").open())):
        if images is not None and i not in images:
            continue
        sh, sw = int(row["sh"]), int(row["sw"])
        scalars, pixels = [], []
        for cat in categories:
            tokens = [t for t in row[cat].split(";") if t]
            if all(t.isdigit() for t in tokens):
                scalars += [int(t) for t in tokens]
            else:
                rgbs = [np.asarray(Image.open(root / "images" / t).convert("RGB")).astype(np.int64) for t in tokens]
                pixels.append(np.stack([rgb[..., 0] + 256 * rgb[..., 1] for rgb in rgbs]))
        if not scalars and not pixels:
            continue  # NetDissect-Lite's loader drops images without data
        for scalar in scalars:
            tally_labels[scalar] += sh * sw
        if pixels:
            pixels = np.concatenate(pixels)
            tally_label = np.bincount(pixels.ravel())
            tally_label[0] = 0
            tally_labels[: len(tally_label)] += tally_label
        for unit in range(units):
            feature_map = features[i][unit]
            if feature_map.max() > threshold[unit]:
                mask = pil_imresize(feature_map, (sh, sw))
                indexes = np.argwhere(mask > threshold[unit])
                tally_cat = np.zeros(len(categories))
                if len(pixels) > 0:
                    tally_bt = np.bincount(pixels[:, indexes[:, 0], indexes[:, 1]].ravel())
                    if len(tally_bt) > 0:
                        tally_bt[0] = 0
                    tally_cat = np.dot(tally_bt[None, :], labelcat[: len(tally_bt), :])[0]
                    tally_both[unit, : len(tally_bt)] += tally_bt
                for scalar in scalars:
                    tally_cat += labelcat[scalar]
                    tally_both[unit, scalar] += len(indexes)
                tally_units_cat[unit] += len(indexes) * (tally_cat > 0)
    denominator = np.dot(tally_units_cat, labelcat.T) + tally_labels[None, :] - tally_both
    return tally_both, denominator, tally_labels


def stored_totals(db, probe_id):
    con = duckdb.connect(str(db), read_only=True)
    rows = con.execute(
        "SELECT filter, concept_id, sum(intersection), sum(union_) FROM filter_concept_iou"
        " WHERE probe_id = ? GROUP BY ALL",
        [probe_id],
    ).fetchall()
    thresholds = np.array(
        [
            t
            for (t,) in con.execute(
                "SELECT threshold FROM filters WHERE probe_id = ? ORDER BY filter", [probe_id]
            ).fetchall()
        ]
    )
    con.close()
    return {(f, c): (int(i), int(u)) for f, c, i, u in rows}, thresholds


@pytest.fixture
def quirky(tmp_path):
    root = quirky_broden(tmp_path / "quirky")
    rng = np.random.default_rng(3)
    acts = (np.maximum(rng.normal(size=(7, 5, 6, 6)), 0) * rng.uniform(0.5, 3, size=(1, 5, 1, 1))).astype(np.float32)
    db = tmp_path / "t.duckdb"
    probe_id, _ = planted_probe(db, root, acts, quantile=0.8, mode="netdissect")
    return root, acts, db, probe_id


def test_summed_over_splits_equals_netdissect_lite_exactly(quirky):
    """Fed the stored (dequantised) activations and thresholds, the published algorithm gives n2vdb's
    intersections and unions exactly: every (unit, label) pair, summed over train and val."""
    root, _, db, probe_id = quirky
    got, thresholds = stored_totals(db, probe_id)
    _, stored = api.activations(probe_id, db)
    both, denominator, _ = netdissect_lite(root, stored.astype(np.float64), thresholds)
    labels = [n for n, *_ in LABELS]
    expected = {
        (f, c): (int(both[f, c]), int(denominator[f, c]))
        for f in range(stored.shape[1])
        for c in labels
        if denominator[f, c] > 0
    }
    assert got == expected


def test_the_quirks_are_exercised(quirky):
    """Not vacuous: channels are counted separately, denominators span the category, and a label's
    primary category comes from c_*.csv coverage."""
    root, _, db, probe_id = quirky
    _, stored = api.activations(probe_id, db)
    _, thresholds = stored_totals(db, probe_id)
    both, denominator, label_area = netdissect_lite(root, stored.astype(np.float64), thresholds)
    con = duckdb.connect(str(db), read_only=True)
    or_area = dict(con.execute("SELECT concept_id, sum(pixels) FROM image_concepts GROUP BY 1").fetchall())
    con.close()
    assert label_area[301] > or_area[301]  # leg in part_1 and part_2 at one pixel counts twice
    assert label_area[300] > or_area[300]  # wood in the object and material channels at one pixel
    # dog's denominators include image 6 (wood but no dog): drop it and they shrink, intersections do not
    with_dog = [i for i in range(7) if i != 6]
    both_dog, denominator_dog, _ = netdissect_lite(root, stored.astype(np.float64), thresholds, with_dog)
    assert np.array_equal(both_dog[:, 2], both[:, 2])
    assert np.any(denominator_dog[:, 2] < denominator[:, 2])
    # wood's unit areas are the objects' (dog's), not the materials' (brick's)
    unit_area = denominator - label_area[None, :] + both
    assert np.array_equal(unit_area[:, 300], unit_area[:, 2])
    assert not np.array_equal(unit_area[:, 300], unit_area[:, 303])


def test_primary_category_comes_from_coverage(tmp_path):
    from n2vdb.data.broden import BrodenDataset
    from n2vdb.stats import netdissect

    dataset = BrodenDataset.open(quirky_broden(tmp_path / "q"))
    order = netdissect.category_order(dataset)
    assert order == CATEGORIES
    primary = netdissect.primary_categories(dataset, order)
    assert order[primary[300]] == "object" and dataset.labels[300].category == "material"
    assert {n: order[c] for n, c in primary.items() if n != 300} == {
        n: dataset.labels[n].category for n in primary if n != 300
    }
    for path in tmp_path.glob("q/c_*.csv"):
        path.unlink()  # without c_*.csv files: label.csv's largest count
    assert order[netdissect.primary_categories(dataset, order)[300]] == "material"


def test_within_quantisation_of_float_activations(quirky):
    """Against the algorithm run on the float activations with numpy's percentile thresholds (what
    NetDissect-Lite itself would do): intersections differ only by labelled pixels that lie within the
    quantisation margin of the threshold, and IoUs by little."""
    root, acts, db, probe_id = quirky
    got, thresholds = stored_totals(db, probe_id)
    float_thresholds = np.percentile(acts.astype(np.float64), 80, axis=(0, 2, 3))
    con = duckdb.connect(str(db), read_only=True)
    bounds = np.array(
        [
            b
            for (b,) in con.execute(
                "SELECT threshold_bound FROM filters WHERE probe_id = ? ORDER BY filter", [probe_id]
            ).fetchall()
        ]
    )
    con.close()
    assert np.all(np.abs(thresholds - float_thresholds) <= bounds + 1e-7)
    both, denominator, _ = netdissect_lite(root, acts.astype(np.float64), float_thresholds)
    # a pixel can change sides only if its float resized value lies within (half a step + threshold bound)
    steps = acts.max(axis=(2, 3)) / 255
    margin_hits = np.zeros_like(both)
    for i, row in enumerate(csv.DictReader((root / "index.csv").open())):
        sh, sw = int(row["sh"]), int(row["sw"])
        chans = [
            np.asarray(Image.open(root / "images" / t).convert("RGB")).astype(np.int64)
            for c in ("color", "object", "material", "part")
            for t in row[c].split(";")
            if t
        ]
        chans = [c[..., 0] + 256 * c[..., 1] for c in chans]
        scalars = [int(t) for c in ("scene", "texture") for t in row[c].split(";") if t]
        for f in range(acts.shape[1]):
            near = (
                np.abs(pil_imresize(acts[i, f], (sh, sw)) - float_thresholds[f]) <= steps[i, f] / 2 + bounds[f] + 1e-6
            )
            for chan in chans:
                np.add.at(margin_hits[f], chan[near], 1)
            for s in scalars:
                margin_hits[f, s] += near.sum()
    diffs = []
    for (f, c), (inter, union) in got.items():
        assert abs(inter - both[f, c]) <= margin_hits[f, c]
        diffs.append(abs(inter / union - both[f, c] / max(denominator[f, c], 1e-10)))
    assert max(diffs) < 0.05


def test_net2vec_mode_untouched_by_the_netdissect_tally(tmp_path, quirky):
    """A net2vec probe of the same activations still counts OR-ed masks over images containing the label."""
    root, acts, _, _ = quirky
    db = tmp_path / "n.duckdb"
    probe_id, _ = planted_probe(db, root, acts, quantile=0.8, mode="net2vec")
    con = duckdb.connect(str(db), read_only=True)
    (n,) = con.execute(
        "SELECT count(*) FROM filter_concept_iou WHERE probe_id = ? AND concept_id = 7 AND split = 'val'", [probe_id]
    ).fetchone()
    assert n == 5  # striped appears in val images 1 and 5: rows for every filter
    con.close()


@pytest.mark.parametrize("mode", ["netdissect", "net2vec"])
def test_pictures_agree_with_their_captions(tmp_path, monkeypatch, mode):
    """`show concept --method best_filter` draws the probe's own mode: the IoU of each drawn mask with
    the drawn truth is the per-image IoU its caption (and image_concept_scores) states."""
    from n2vdb.render import grids

    root = quirky_broden(tmp_path / "quirky")
    rng = np.random.default_rng(8)
    acts = np.maximum(rng.normal(size=(7, 4, 6, 6)), 0).astype(np.float32)
    db = tmp_path / "t.duckdb"
    probe_id, _ = planted_probe(db, root, acts, quantile=0.7, mode=mode)
    drawn = []
    real_tile = grids._tile
    monkeypatch.setattr(
        grids,
        "_tile",
        lambda image, truth, predicted, caption: (
            drawn.append((truth, predicted)),
            real_tile(image, truth, predicted, caption),
        )[1],
    )
    _, samples, _ = api.show_concept("wood", db, probe_id, "best_filter", out=tmp_path / "g.png")
    assert len(drawn) == len(samples) > 1
    for (truth, predicted), sample in zip(drawn, samples):
        union = (truth | predicted).sum()
        assert (truth & predicted).sum() / union == pytest.approx(sample.score)
    # and the two modes draw different masks here, so the check above can tell them apart
    other = "net2vec" if mode == "netdissect" else "netdissect"
    con = duckdb.connect(str(db), read_only=True)
    from n2vdb import probe as probes
    from n2vdb.data.broden import BrodenDataset

    probe = probes.load(con, probe_id)
    drawn.clear()
    grids.concept_grid(con, probe, BrodenDataset.open(root), 300, "wood", "best_filter", tmp_path / "o.png", other)
    con.close()
    assert any((t & p).sum() / (t | p).sum() != pytest.approx(s.score) for (t, p), s in zip(drawn, samples))
