"""The paper's analyses added as named queries, against numpy on small planted databases."""

import numpy as np
import pytest

from n2vdb import api
from n2vdb.store import write_connection

K = 10
# concept id -> (name, category, level)
CONCEPTS = {
    1: ("red-c", "color", "pixel"),
    2: ("dog", "object", "pixel"),
    3: ("cat", "object", "pixel"),
    4: ("wood", "material", "pixel"),
    5: ("leg", "part", "pixel"),
    6: ("beach-s", "scene", "image"),
}
N_IMAGES = 12


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Three probes on one dataset; probe 3 lacks 'cat'. Embeddings, pooled activations and labels random,
    with a few weights placed to fall on the normalised-weight boundary."""
    db = tmp_path_factory.mktemp("a") / "a.duckdb"
    rng = np.random.default_rng(0)
    truth = {"seg": {}, "cls": {}, "pooled": {}, "contains": {}}
    with write_connection(db) as con:
        con.execute("INSERT INTO datasets VALUES (1, 'toy', '/toy', ?, ?, now())", [N_IMAGES, len(CONCEPTS)])
        for cid, (name, cat, level) in CONCEPTS.items():
            con.execute("INSERT INTO concepts VALUES (1, ?, ?, ?, [?], ?, 1, 0.1)", [cid, name, cat, cat, level])
        for i in range(N_IMAGES):
            con.execute(
                "INSERT INTO images VALUES (1, ?, ?, ?, 8, 8, 4, 4)", [i, f"{i}.jpg", "train" if i % 3 else "val"]
            )
            for cid in CONCEPTS:
                if rng.random() < 0.4:
                    truth["contains"][(i, cid)] = True
                    con.execute("INSERT INTO image_concepts VALUES (1, ?, ?, 3)", [i, cid])
        for pid in (1, 2, 3):
            con.execute(
                "INSERT INTO probes (probe_id, probe_key, model, weights, layer, dataset_id, n_filters,"
                " height, width, settings, status) VALUES (?, ?, 'm', 'w', ?, 1, ?, 2, 2, '{}', 'complete')",
                [pid, f"k{pid}", f"l{pid}", K],
            )
            for f in range(K):
                con.execute("INSERT INTO filters VALUES (?, ?, 0.5, 0, 1, 0.5)", [pid, f])
            pooled = rng.random((N_IMAGES, K)).astype(np.float32)
            truth["pooled"][pid] = pooled
            for i in range(N_IMAGES):
                con.execute(
                    "INSERT INTO activations VALUES (?, ?, ?, ?, ?)",
                    [pid, i, [1.0] * K, b"\0" * (K * 4), pooled[i].tolist()],
                )
            for cid in CONCEPTS:
                if pid == 3 and cid == 3:
                    continue
                seg = rng.normal(size=K).astype(np.float32)
                seg[rng.integers(K)] = 0.5 * np.abs(seg).max()  # exactly on the default share: counts
                cls = rng.normal(size=K).astype(np.float32)
                bias = float(rng.normal())
                truth["seg"][(pid, cid)], truth["cls"][(pid, cid)] = seg, (cls, bias)
                con.execute(
                    "INSERT INTO embeddings VALUES (?, ?, 'segmentation', ?, ?, 0, 0.2, 0.3, NULL)",
                    [pid, cid, K, seg.tolist()],
                )
                con.execute(
                    "INSERT INTO embeddings VALUES (?, ?, 'segmentation', 2, ?, 0, 0.2, 0.3, NULL)",
                    [pid, cid, (seg * 0 + 9).tolist()],
                )  # a sufficiency run: never counted
                con.execute(
                    "INSERT INTO embeddings VALUES (?, ?, 'classification', ?, ?, ?, 0.6, 0.7, 0.7)",
                    [pid, cid, K, cls.tolist(), bias],
                )
    return db, truth


def bins_of(counts):
    edges = {
        "0": (0, 0),
        "1": (1, 1),
        "2-5": (2, 5),
        "6-9": (6, 9),
        "10-14": (10, 14),
        "15-19": (15, 19),
        "20+": (20, 10**9),
    }
    return {label: int(((counts >= lo) & (counts <= hi)).sum()) for label, (lo, hi) in edges.items()}


@pytest.mark.parametrize("share", [0.5, 0.2, 0.9])
def test_embedding_exclusivity(planted, share):
    db, truth = planted
    counts = np.zeros(K, int)
    for cid, (_, _, level) in CONCEPTS.items():
        if level != "pixel":
            continue
        w = truth["seg"][(1, cid)]
        counts += ((w / np.abs(w).max()).astype(np.float64) >= share).astype(int)
    got = api.query("embedding-exclusivity", db, probe=1, share=share).to_pylist()
    expected = bins_of(counts)
    assert [r["concepts_per_filter"] for r in got] == list(expected)
    assert {r["concepts_per_filter"]: r["filters"] for r in got} == expected
    assert sum(r["share_of_filters"] for r in got) == pytest.approx(1.0)
    if share == 0.5:
        assert counts.sum() >= 5  # the planted boundary weights are counted: >= share, not >


def test_embedding_space_correlation(planted):
    db, truth = planted
    shared = sorted(CONCEPTS[c][0] for c in CONCEPTS if c != 3)
    by_name = {CONCEPTS[c][0]: c for c in CONCEPTS}

    def sims(pid, kind):
        vectors = [truth[kind][(pid, by_name[n])] for n in shared]
        vectors = [v[0] if kind == "cls" else v for v in vectors]
        unit = np.array([v / np.linalg.norm(v) for v in vectors], np.float64)
        gram = unit @ unit.T
        return gram[np.triu_indices(len(shared), 1)]

    for kind, sql_kind in (("seg", "segmentation"), ("cls", "classification")):
        got = api.query("embedding-space-correlation", db, probe_a=1, probe_b=3, kind=sql_kind).to_pylist()
        assert len(got) == 1
        row = got[0]
        assert (row["probe_a"], row["probe_b"], row["shared_concepts"]) == (1, 3, len(shared))
        assert row["concept_pairs"] == len(shared) * (len(shared) - 1) // 2
        assert row["pearson_r"] == pytest.approx(np.corrcoef(sims(1, kind), sims(3, kind))[0, 1], abs=1e-5)
    same = api.query("embedding-space-correlation", db, probe_a=2, probe_b=2).to_pylist()[0]
    assert same["pearson_r"] == pytest.approx(1.0) and same["shared_concepts"] == len(CONCEPTS)


def test_concept_distribution_covers_every_image(planted):
    db, truth = planted
    got = api.query("concept-distribution", db, concept="dog", probe=2).to_pylist()
    w, b = truth["cls"][(2, 2)]
    scores = 1 / (1 + np.exp(-(truth["pooled"][2].astype(np.float64) @ w + b)))
    assert len(got) == N_IMAGES  # all images, not only those containing dog
    assert [r["image_id"] for r in got] == sorted(range(N_IMAGES), key=lambda i: (-scores[i], i))
    for r in got:
        assert r["score"] == pytest.approx(scores[r["image_id"]], abs=1e-5)
        assert r["contains"] == truth["contains"].get((r["image_id"], 2), False)
        rank = sorted(range(N_IMAGES), key=lambda i: (scores[i], i)).index(r["image_id"])
        assert r["quantile"] == pytest.approx(rank / (N_IMAGES - 1))
    assert {r["contains"] for r in got} == {True, False}


def test_show_concept_over_all_images(tmp_path, ingested_db):
    """`show concept --over all` samples every image of the probe by the classification score, beside the
    default view of per-image IoUs among the images containing the concept."""
    import duckdb

    from n2vdb.render import grids

    path, samples, values = api.show_concept("red", ingested_db, over="all", out=tmp_path / "all.png")
    assert path.exists()
    con = duckdb.connect(str(ingested_db), read_only=True)
    n_images = con.execute("SELECT count(*) FROM activations").fetchone()[0]
    containing = con.execute(
        "SELECT count(*) FROM image_concepts ic JOIN concepts c USING (dataset_id, concept_id) WHERE c.name = 'red-c'"
    ).fetchone()[0]
    con.close()
    assert len(values) == n_images > containing
    scores = {
        r["image_id"]: r["score"] for r in api.query("concept-distribution", ingested_db, concept="red").to_pylist()
    }
    assert [(s.image_id, s.score) for s in samples] == [(s.image_id, s.score) for s in grids.pick(scores)]
    _, _, per_image = api.show_concept("red", ingested_db, out=tmp_path / "containing.png")
    assert len(per_image) < len(values)


def test_report_shows_the_new_analyses(tmp_path, ingested_db):
    page = api.report(tmp_path / "report", ingested_db, cards=1)
    text = page.read_text()
    assert "embedding-exclusivity.png" in text and (page.parent / "embedding-exclusivity.png").is_file()
    assert "All images, across the classification score" in text
    grid = next((page.parent / "cards").glob("*-all.png"))
    assert f"cards/{grid.name}" in text
