"""`n2vdb significance` on stored probes: intervals and p-values against brute force computed from
the stored activations and freshly decoded masks, calibration on a dataset whose labels are
shuffled across images, the built-in colours coming out significant, runs keyed by their settings,
one transaction, clean errors."""

from __future__ import annotations

import csv
import shutil

import duckdb
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from n2vdb import api
from n2vdb.data import importer
from n2vdb.data.broden import BrodenDataset
from n2vdb.probe import TrainSettings
from n2vdb.significance import null, resample
from n2vdb.store import read_connection

from helpers import run_cli

SMALL = dict(replicates=40, permutations=60, labels=3, filters=2)


def _masks(db):
    """Per stored image, in storage order: (image id, split, unit masks [K, sh, sw] as net2vec makes
    them, with F.interpolate, and {concept: mask})."""
    with read_connection(db) as con:
        dataset = BrodenDataset.open(importer.dataset_root(con, 1))
        thresholds = torch.tensor(
            [t for (t,) in con.execute("SELECT threshold FROM filters WHERE probe_id = 1 ORDER BY filter").fetchall()]
        )
    ids, acts = api.activations(1, db)
    out = []
    for image_id, a in zip(ids.tolist(), torch.from_numpy(acts)):
        row = dataset.rows[image_id]
        binary = (a > thresholds.view(-1, 1, 1).float()).float()[None]
        units = (F.interpolate(binary, size=(row.sh, row.sw), mode="bilinear", align_corners=True) > 0.5)[0]
        concepts, masks = dataset.masks(row)
        out.append((image_id, row.split, units.numpy(), dict(zip(concepts.tolist(), masks))))
    return out


def test_intervals_are_weighted_sums_over_decoded_masks(db_copy):
    run_id = api.significance(db=db_copy, **SMALL)
    images = _masks(db_copy)
    con = duckdb.connect(str(db_copy), read_only=True)
    stored = con.execute(
        "SELECT filter, concept_id, split, estimate, lower, upper, replicates FROM score_intervals"
        " WHERE run_id = ? AND statistic = 'filter_iou' ORDER BY estimate DESC",
        [run_id],
    ).fetchall()
    assert len(stored) > 100
    checked = 0
    for f, c, split, estimate, lower, upper, reps in stored[:: len(stored) // 12]:
        rows = [(i, u[f], m[c]) for i, s, u, m in images if s == split and c in m]
        inter = np.array([(u & m).sum() for _, u, m in rows], np.float64)
        union = np.array([(u | m).sum() for _, u, m in rows], np.float64)
        w = resample.poisson_weights(0, np.array([i for i, _, _ in rows]), SMALL["replicates"]).astype(np.float64)
        expect = (w.T @ inter) / (w.T @ union)
        assert estimate == pytest.approx(inter.sum() / union.sum(), abs=1e-12)
        assert np.allclose(reps, expect, rtol=1e-6, equal_nan=True)
        lo, hi = np.nanquantile(expect, [0.025, 0.975])
        assert (lower, upper) == pytest.approx((lo, hi), rel=1e-6)
        checked += 1
    assert checked >= 10

    # The embedding's interval from its stored per-image val scores; the gain, paired, minus the best filter's.
    emb = con.execute(
        "SELECT i.concept_id, i.estimate, i.replicates, g.filter, g.estimate, g.replicates, e.val_score"
        " FROM score_intervals i JOIN score_intervals g USING (run_id, concept_id)"
        " JOIN embeddings e ON e.probe_id = 1 AND e.concept_id = i.concept_id AND e.kind = 'segmentation'"
        " AND e.n_filters = 256 WHERE i.run_id = ? AND i.statistic = 'embedding_iou' AND g.statistic = 'embedding_gain'",
        [run_id],
    ).fetchall()
    assert len(emb) > 5
    for c, estimate, reps, best, gain, gain_reps, val_score in emb:
        scores = con.execute(
            "SELECT image_id, intersection, union_ FROM image_concept_scores"
            " WHERE probe_id = 1 AND method = 'segmentation' AND concept_id = ?",
            [c],
        ).fetchnumpy()
        w = resample.poisson_weights(0, scores["image_id"], SMALL["replicates"]).astype(np.float64)
        expect = (w.T @ scores["intersection"]) / (w.T @ scores["union_"])
        assert estimate == pytest.approx(val_score, abs=1e-6) and np.allclose(reps, expect, rtol=1e-6, equal_nan=True)
        rows = [(i, u[best], m[c]) for i, s, u, m in images if s == "val" and c in m]
        wb = resample.poisson_weights(0, np.array([i for i, _, _ in rows]), SMALL["replicates"]).astype(np.float64)
        inter = np.array([(u & m).sum() for _, u, m in rows], np.float64)
        union = np.array([(u | m).sum() for _, u, m in rows], np.float64)
        assert gain == pytest.approx(estimate - inter.sum() / union.sum(), abs=1e-12)
        assert np.allclose(gain_reps, expect - (wb.T @ inter) / (wb.T @ union), atol=1e-6, equal_nan=True)
        want_best = con.execute("SELECT filter FROM best_filters WHERE probe_id = 1 AND concept_id = ?", [c]).fetchone()
        assert best == want_best[0]
    con.close()


def test_label_p_values_are_the_block_permutation_tests(db_copy):
    run_id = api.significance(db=db_copy, **SMALL)
    images = [im for im in _masks(db_copy) if im[1] == "val"]  # one segmentation size: blocks of 32 in order
    con = duckdb.connect(str(db_copy), read_only=True)
    tests = con.execute(
        "SELECT filter, concept_id, estimate, null_mean, p_value FROM significance_tests"
        " WHERE run_id = ? AND test = 'label' ORDER BY p_value, filter, concept_id",
        [run_id],
    ).fetchall()
    stored_val = dict(
        ((f, c), v)
        for f, c, v in con.execute(
            "SELECT filter, concept_id, iou FROM filter_concept_iou WHERE split = 'val'"
        ).fetchall()
    )
    ranked = con.execute(
        "SELECT filter, list(concept_id ORDER BY iou DESC, concept_id) FROM filter_concept_iou"
        " WHERE split = 'train' AND intersection > 0 GROUP BY filter"
    ).fetchall()
    con.close()
    assert {(f, c) for f, c, *_ in tests} == {
        (f, c) for f, labels in ranked for c in labels[: SMALL["labels"]] if (f, c) in stored_val
    }
    blocks = [images[i : i + 32] for i in range(0, len(images), 32)]
    perms = [null.block_permutations(0, b, SMALL["permutations"], len(block)) for b, block in enumerate(blocks)]
    for f, c, estimate, null_mean, p in tests[:: max(1, len(tests) // 15)]:
        assert estimate == stored_val[(f, c)]
        s = np.zeros(1 + SMALL["permutations"])
        a = np.zeros_like(s)
        for block, perm in zip(blocks, perms):
            for i, (_, _, _, labels) in enumerate(block):
                if c not in labels:
                    continue
                partners = np.r_[i, perm[:, i]]
                s += [(block[j][2][f] & labels[c]).sum() for j in partners]
                a += [block[j][2][f].sum() + labels[c].sum() for j in partners]
        iou = s / (a - s)
        assert iou[0] == pytest.approx(estimate, abs=1e-12)
        assert p == (1 + (iou[1:] >= iou[0] - 1e-15).sum()) / (1 + SMALL["permutations"])
        assert null_mean == pytest.approx(np.nanmean(iou[1:]), abs=1e-12)


def _ks_excess(p: np.ndarray) -> float:
    """One-sided Kolmogorov-Smirnov statistic: the largest excess of small p-values over uniform."""
    p = np.sort(p)
    return float(np.max(np.arange(1, len(p) + 1) / len(p) - p))


@pytest.fixture(scope="module")
def shuffled_db(tmp_path_factory):
    """A Broden-profile set (400 images) whose label columns are shuffled across images: no unit can
    detect any label there."""
    from n2vdb.data.synth import generate_profile

    folder = tmp_path_factory.mktemp("shuffled")
    root = generate_profile(folder / "synth", "broden", images=400, seed=5)
    with open(root / "index.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    labels = [c for c in rows[0] if c not in ("image", "split", "ih", "iw", "sh", "sw")]
    assert len({(r["sh"], r["sw"]) for r in rows}) == 1  # one size: any image's labels fit any other
    order = np.random.default_rng(1).permutation(len(rows))
    shuffled = [{**r, **{c: rows[j][c] for c in labels}} for r, j in zip(rows, order)]
    with open(root / "index.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(shuffled)
    db = folder / "n2v.duckdb"
    api.add_dataset(root, "shuffled", db)
    api.ingest("alexnet", "conv5", db, dataset="shuffled", weights="random", workers=0, train=TrainSettings(epochs=1))
    api.significance(db=db)
    return db


def test_p_values_are_calibrated_where_no_unit_detects_any_label(shuffled_db):
    con = duckdb.connect(str(shuffled_db), read_only=True)
    p, q = (
        np.array(x)
        for x in zip(*con.execute("SELECT p_value, q_value FROM significance_tests WHERE test = 'label'").fetchall())
    )
    assert len(p) > 500
    # No excess of small p-values: the one-sided KS test at level 0.001 (critical sqrt(ln(1000) / 2n)).
    critical = np.sqrt(np.log(1000) / (2 * len(p)))
    assert _ks_excess(p) < critical
    assert np.mean(p <= 0.05) <= 0.06 and np.mean(q < 0.05) <= 0.05

    # The same test fails a broken null: labels chosen on the val images that test them.
    with read_connection(shuffled_db) as rcon:
        dataset = BrodenDataset.open(importer.dataset_root(rcon, 1))
        from n2vdb.probe import load

        probe = load(rcon, 1)
        chosen = rcon.execute(
            "SELECT filter, concept_id FROM (SELECT *, row_number() OVER (PARTITION BY filter ORDER BY iou DESC,"
            " concept_id) AS r FROM filter_concept_iou WHERE split = 'val' AND intersection > 0) WHERE r <= 10"
            " ORDER BY concept_id, filter"
        ).fetchnumpy()
        counts = null.counts(
            rcon, probe, dataset, chosen["filter"].astype(np.int64), chosen["concept_id"].astype(np.int64), 1000, 32, 0
        )
    broken = resample.monte_carlo_p(counts.exceed(), 1000)
    assert _ks_excess(broken) > 5 * np.sqrt(np.log(1000) / (2 * len(broken)))
    con.close()


@pytest.fixture(scope="module")
def builtin_db(tmp_path_factory):
    """The built-in concept set at its default size (300 images), random weights."""
    from n2vdb.data.synth import generate

    folder = tmp_path_factory.mktemp("builtin")
    root = generate(folder / "synth", images=300, size=227, seed=3)
    db = folder / "n2v.duckdb"
    api.add_dataset(root, "synthetic", db)
    api.ingest("alexnet", "conv5", db, dataset="synthetic", weights="random", workers=0, train=TrainSettings(epochs=2))
    return db


def test_colour_concepts_best_filters_are_significant_on_the_builtin_set(builtin_db, tmp_path):
    db = tmp_path / "n2v.duckdb"
    shutil.copy(builtin_db, db)
    result = run_cli("significance", "--db", str(db))
    assert result.returncode == 0 and "significance stored as run 1" in result.stderr, result.stderr
    con = duckdb.connect(str(db), read_only=True)
    colours = con.execute(
        "SELECT c.name, t.q_value, v.iou FROM best_filters b JOIN concepts c USING (concept_id)"
        " JOIN filter_concept_iou v ON v.probe_id = 1 AND v.filter = b.filter AND v.concept_id = b.concept_id"
        " AND v.split = 'val'"
        " LEFT JOIN significance_tests t ON t.filter = b.filter AND t.concept_id = b.concept_id AND t.test = 'label'"
        " WHERE c.category = 'color'"
    ).fetchall()
    con.close()
    assert len(colours) == 6
    assert all(q is not None and q < 0.05 for _, q, _ in colours), colours
    shown = api.query("significant-labels", db).to_pylist()
    assert {r["label"] for r in shown} >= {name for name, _, _ in colours}


def test_runs_are_keyed_by_settings_and_written_whole(db_copy, monkeypatch):
    first = api.significance(db=db_copy, **SMALL)
    assert api.significance(db=db_copy, **SMALL) == first  # found, not computed again
    second = api.significance(db=db_copy, **{**SMALL, "seed": 1})
    assert second != first
    con = duckdb.connect(str(db_copy), read_only=True)
    assert con.execute("SELECT count(*) FROM significance_runs").fetchone()[0] == 2
    latest = con.execute("SELECT DISTINCT run_id FROM intervals").fetchall()
    assert latest == [(second,)]
    assert (
        con.execute("SELECT count(*) FROM stage_timings WHERE stage = 'significance'").fetchone()[0] == 1
    )  # the latest run's
    con.close()
    assert all(r["violations"] == 0 for r in api.db_check(db_copy).to_pylist())

    from n2vdb.store import writer

    real = writer.insert

    def failing(con, table, rows):
        if table == "significance_tests":
            raise RuntimeError("disk full")
        return real(con, table, rows)

    monkeypatch.setattr(writer, "insert", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        api.significance(db=db_copy, **{**SMALL, "seed": 2})
    con = duckdb.connect(str(db_copy), read_only=True)
    assert con.execute("SELECT count(*) FROM significance_runs").fetchone()[0] == 2
    assert con.execute("SELECT count(DISTINCT run_id) FROM score_intervals").fetchone()[0] == 2
    con.close()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--replicates", "1"], "--replicates must be between 10"),
        (["--level", "1.5"], "--level must be a confidence level"),
        (["--labels", "0"], "--labels must be between 1"),
        (["--permutations", "0"], "--permutations must be between 1"),
        (["--probe", "9"], "probe 9"),
    ],
)
def test_bad_settings_are_one_line_and_change_nothing(db_copy, args, says):
    result = run_cli("significance", *args, "--db", str(db_copy))
    assert result.returncode in (1, 2) and says in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    con = duckdb.connect(str(db_copy), read_only=True)
    runs = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'significance_runs'")
    if runs.fetchone()[0]:
        assert con.execute("SELECT count(*) FROM significance_runs").fetchone()[0] == 0
    con.close()


def test_a_netdissect_mode_probe_is_refused_with_what_to_do(tmp_path, synthetic_dir):
    db = tmp_path / "n2v.duckdb"
    api.add_dataset(synthetic_dir, "synthetic", db)
    api.ingest(
        "alexnet",
        "conv5",
        db,
        dataset="synthetic",
        weights="random",
        workers=0,
        iou_mode="netdissect",
        limit=12,
        train=TrainSettings(epochs=1),
    )
    result = run_cli("significance", "--db", str(db))
    assert result.returncode == 2 and "--iou-mode net2vec" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_queries_show_the_intervals_beside_the_scores(db_copy):
    before = {r["category"]: r for r in api.query("single-vs-embedding", db_copy).to_pylist()}
    assert all(r["embedding_lower"] is None for r in before.values())  # no run yet: no intervals, same scores
    run_id = api.significance(db=db_copy, **SMALL)
    con = duckdb.connect(str(db_copy), read_only=True)
    reps = {
        (s, f, c): np.array(r, np.float64)
        for s, f, c, r in con.execute(
            "SELECT statistic, filter, concept_id, replicates FROM score_intervals WHERE run_id = ? AND split = 'val'",
            [run_id],
        ).fetchall()
    }
    pixel = con.execute(
        "SELECT c.category, b.concept_id, b.filter FROM best_filters b JOIN concepts c USING (concept_id)"
        " JOIN embeddings e ON e.probe_id = 1 AND e.concept_id = b.concept_id AND e.kind = 'segmentation'"
        " AND e.n_filters = 256 WHERE c.level = 'pixel' AND e.val_score IS NOT NULL"
    ).fetchall()
    con.close()
    got = {r["category"]: r for r in api.query("single-vs-embedding", db_copy).to_pylist()}
    for category in {c for c, _, _ in pixel} | {"all"}:
        members = [(c, f) for cat, c, f in pixel if category in ("all", cat)]
        for statistic, column in (("filter_iou", "single_filter"), ("embedding_iou", "embedding")):
            stack = np.array([reps[(statistic, f if statistic == "filter_iou" else None, c)] for c, f in members])
            means = np.array([np.nanmean(col) if (~np.isnan(col)).any() else np.nan for col in stack.T])
            lo, hi = np.quantile(means[~np.isnan(means)], [0.025, 0.975])
            assert got[category][f"{column}_lower"] == pytest.approx(lo, rel=1e-5)
            assert got[category][f"{column}_upper"] == pytest.approx(hi, rel=1e-5)
        assert got[category]["embedding_iou"] == pytest.approx(before[category]["embedding_iou"])
    name, concept, best = next((n, c, f) for n, c, f in _named(db_copy, pixel))
    first = api.query("best-filters", db_copy, concept=name, k=1).to_pylist()[0]
    assert first["iou_filter"] == best
    assert first["val_lower"] == pytest.approx(np.nanquantile(reps[("filter_iou", best, concept)], 0.025), rel=1e-5)
    probes = api.query("compare-probes", db_copy, concept=name).to_pylist()
    assert probes[0]["embedding_upper"] == pytest.approx(
        np.nanquantile(reps[("embedding_iou", None, concept)], 0.975), rel=1e-5
    )
    by_category = api.query("significance-by-category", db_copy, cutoff=0.0, alpha=1.01).to_pylist()
    assert by_category[-1]["category"] == "all" and by_category[-1]["share"] == 1.0
    assert by_category[-1]["units"] == sum(r["units"] for r in by_category[:-1])


def _named(db, pixel):
    con = duckdb.connect(str(db), read_only=True)
    names = dict(con.execute("SELECT concept_id, name FROM concepts").fetchall())
    con.close()
    return [(names[c], c, f) for _, c, f in pixel]


def test_ingest_runs_it_by_default_and_the_report_draws_the_intervals(tmp_path, synthetic_dir):
    from n2vdb.render.report import _error

    db = tmp_path / "n2v.duckdb"
    assert run_cli("data", "add", str(synthetic_dir), "--name", "synthetic", "--db", str(db)).returncode == 0
    ingest = ["ingest", "alexnet", "conv5", "--weights", "random", "--limit", "40", "--epochs", "1", "--db", str(db)]
    result = run_cli(*ingest, "--no-significance")
    assert result.returncode == 0 and "significance" not in result.stderr, result.stderr

    def runs() -> int:
        con = duckdb.connect(str(db), read_only=True)
        try:
            return con.execute("SELECT count(*) FROM significance_runs").fetchone()[0]
        finally:
            con.close()

    assert runs() == 0
    result = run_cli(*ingest)  # the probe is complete: only the significance run is left to do
    assert result.returncode == 0 and "significance stored as run 1" in result.stderr, result.stderr
    assert runs() == 1
    vector = run_cli(
        "ingest", "alexnet", "fc7", "--weights", "random", "--limit", "40", "--epochs", "1", "--db", str(db)
    )
    assert vector.returncode == 0 and "significance: probe 2 is a vector layer" in vector.stderr, vector.stderr
    assert runs() == 1
    page = api.report(tmp_path / "report", db, probe=1)
    assert "single_filter_lower" in page.read_text() and (tmp_path / "report" / "scatter.png").exists()
    rows = [{"x": 0.5, "x_lower": 0.25, "x_upper": 1.0}, {"x": 0.1, "x_lower": 0.0, "x_upper": 0.2}]
    assert _error(rows, "x") == [[0.25, 0.1], [0.5, 0.1]]
    assert _error([*rows, {"x": 0.3, "x_lower": None, "x_upper": None}], "x") is None


def test_classification_accuracy_is_resampled_on_the_pairs_it_was_measured_on(db_copy):
    from n2vdb.embed import classification
    from n2vdb.embed.stage import classification_inputs
    from n2vdb.probe import load

    run_id = api.significance(db=db_copy, **SMALL)
    con = duckdb.connect(str(db_copy), read_only=True)
    stored = con.execute(
        "SELECT i.concept_id, i.estimate, i.lower, i.upper, i.replicates, e.val_score, e.weights, e.bias"
        " FROM score_intervals i JOIN embeddings e ON e.probe_id = 1 AND e.concept_id = i.concept_id"
        " AND e.kind = 'classification' AND e.n_filters = 256"
        " WHERE i.run_id = ? AND i.statistic = 'classification_accuracy' ORDER BY i.concept_id",
        [run_id],
    ).fetchall()
    probe = load(con, 1)
    image_ids, features, labels, is_val, concepts = classification_inputs(con, probe, 1)
    con.close()
    assert len(stored) == len(concepts) > 10
    val_rows = np.flatnonzero(is_val.numpy()).astype(np.int32)
    pairs = classification.val_sample(labels, val_rows, torch.Generator().manual_seed(0))  # the probe's seed
    x = features.numpy().astype(np.float64)
    for col, (c, estimate, lower, upper, reps, val_score, w, b) in enumerate(stored):
        assert c == concepts[col] and estimate == pytest.approx(val_score, abs=1e-12)
        mine = pairs[1] == col
        rows = val_rows[pairs[0][mine]]
        hit = ((x[rows] @ np.asarray(w, np.float64) + b) > 0) == labels.numpy()[rows, col]
        assert hit.mean() == pytest.approx(val_score, abs=1e-12)
        weights = resample.poisson_weights(0, image_ids[rows], SMALL["replicates"]).astype(np.float64)
        expect = (weights.T @ hit) / weights.sum(axis=0)
        assert np.allclose(reps, expect, rtol=1e-6, equal_nan=True)
        assert (lower, upper) == pytest.approx(tuple(np.nanquantile(expect, [0.025, 0.975])), rel=1e-6)


@pytest.mark.parametrize("limit", [3, 6])
def test_a_probe_of_a_few_images_gets_a_run_or_a_reason(tmp_path, synthetic_dir, limit):
    """Few images: no classification embedding, few or no val images; a run or one line, never a crash."""
    db = tmp_path / "n2v.duckdb"
    api.add_dataset(synthetic_dir, "synthetic", db)
    probe = api.ingest(
        "alexnet",
        "conv5",
        db,
        dataset="synthetic",
        weights="random",
        limit=limit,
        workers=0,
        train=TrainSettings(epochs=1),
    )
    run_id, reason = api.significance_where_it_applies(probe, db)
    assert (run_id is None) == (reason is not None)
    if reason:
        assert "no val images" in reason
    else:
        assert api.query("significant-labels", db, alpha=1.01).num_rows >= 0


def test_the_block_size_is_a_setting_of_its_own_run(db_copy):
    whole = api.significance(db=db_copy, **SMALL)  # the 24 val images fit one block of 32
    narrow = api.significance(db=db_copy, **SMALL, block=8)  # three blocks of 8
    assert narrow != whole
    con = duckdb.connect(str(db_copy), read_only=True)
    blocks = dict(con.execute("SELECT run_id, block FROM significance_runs").fetchall())
    pairs = con.execute(
        "SELECT a.p_value, b.p_value, a.estimate, b.estimate FROM significance_tests a"
        " JOIN significance_tests b USING (probe_id, test, filter, concept_id)"
        " WHERE a.run_id = ? AND b.run_id = ? AND a.test = 'label'",
        [whole, narrow],
    ).fetchall()
    con.close()
    assert blocks == {whole: 32, narrow: 8}
    assert all(a_est == b_est for _, _, a_est, b_est in pairs)  # the same observed IoUs
    assert sum(a != b for a, b, _, _ in pairs) > len(pairs) // 4  # other draws: other p-values
