"""Every named query against numpy on a small database filled directly, plus the query error paths."""

import json

import duckdb
import numpy as np
import pytest

from n2vdb import api, queries
from n2vdb.errors import N2vdbError, NotFound, QueryError, UsageError
from n2vdb.store import write_connection

from helpers import run_cli

K = 8
CONCEPTS = {
    1: ("red-c", "color"),
    2: ("blue-c", "color"),
    3: ("dog", "object"),
    4: ("cat", "object"),
    5: ("car", "object"),
    6: ("wood", "material"),
    7: ("leg", "part"),
    8: ("head", "part"),
    9: ("beach-s", "scene"),
}
PIXEL = [c for c in CONCEPTS if c != 9]


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    """(db, truth): two probes with random embeddings and IoUs; probe 2's concept 3 is absent."""
    db = tmp_path_factory.mktemp("q") / "q.duckdb"
    rng = np.random.default_rng(0)
    truth = {}
    with write_connection(db) as con:
        con.execute("INSERT INTO datasets VALUES (1, 'toy', '/toy', 10, 9, now())")
        for cid, (name, cat) in CONCEPTS.items():
            con.execute(
                "INSERT INTO concepts VALUES (1, ?, ?, ?, [?], ?, 1, 0.1)",
                [cid, name, cat, cat, "image" if cat == "scene" else "pixel"],
            )
        for pid in (1, 2):
            con.execute(
                "INSERT INTO probes (probe_id, probe_key, model, weights, layer, dataset_id, n_filters,"
                " height, width, settings, status) VALUES (?, ?, 'm', 'w', ?, 1, ?, 3, 3, '{}', 'complete')",
                [pid, f"k{pid}", f"l{pid}", K],
            )
            thresholds = rng.random(K)
            for f in range(K):
                con.execute("INSERT INTO filters VALUES (?, ?, ?, 0, 1, 0.5)", [pid, f, thresholds[f]])
            iou = {s: rng.random((K, len(CONCEPTS))) * 0.3 for s in ("train", "val")}
            seg = rng.normal(size=(len(CONCEPTS), K))
            cls = rng.normal(size=(len(CONCEPTS), K))
            seg_val = rng.random(len(CONCEPTS)) * 0.5
            cls_val = 0.5 + rng.random(len(CONCEPTS)) * 0.5
            suff = {}
            for j, cid in enumerate(CONCEPTS):
                if pid == 2 and cid == 3:
                    continue
                for s in ("train", "val"):
                    for f in range(K):
                        con.execute(
                            "INSERT INTO filter_concept_iou VALUES (?, ?, ?, ?, 1, 1, ?)",
                            [pid, f, cid, s, iou[s][f, j]],
                        )
                if cid in PIXEL:
                    con.execute(
                        "INSERT INTO embeddings VALUES (?, ?, 'segmentation', ?, ?, 0, 0.2, ?, NULL)",
                        [pid, cid, K, seg[j].tolist(), seg_val[j]],
                    )
                    for f in (1, 2, 4):
                        score = seg_val[j] * rng.uniform(0.5, 1.05)
                        suff[(cid, f)] = score
                        con.execute(
                            "INSERT INTO embeddings VALUES (?, ?, 'segmentation', ?, ?, 0, 0.2, ?, NULL)",
                            [pid, cid, f, seg[j].tolist(), score],
                        )
                con.execute(
                    "INSERT INTO embeddings VALUES (?, ?, 'classification', ?, ?, 0, 0.6, ?, 0.7)",
                    [pid, cid, K, cls[j].tolist(), cls_val[j]],
                )
            truth[pid] = dict(
                iou=iou,
                seg=seg.astype(np.float32),
                cls=cls.astype(np.float32),
                seg_val=seg_val,
                cls_val=cls_val,
                suff=suff,
            )
    return db, truth


def unit(v):
    return v / np.linalg.norm(v)


def cos(a, b):
    return float(unit(a) @ unit(b))


IDX = {cid: j for j, cid in enumerate(CONCEPTS)}
NAME = {cid: n for cid, (n, _) in CONCEPTS.items()}


def test_nearest(filled):
    db, truth = filled
    got = api.query("nearest", db, concept="dog", k="3", probe="1").to_pylist()
    seg = truth[1]["seg"]
    sims = sorted(((cos(seg[IDX[3]], seg[IDX[c]]), NAME[c]) for c in PIXEL if c != 3), reverse=True)[:3]
    assert [r["concept"] for r in got] == [n for _, n in sims]
    assert [r["similarity"] for r in got] == pytest.approx([s for s, _ in sims], abs=1e-6)
    assert [r["rank"] for r in got] == [1, 2, 3]


def test_nearest_defaults_to_newest_probe_and_suffixless_names(filled):
    db, truth = filled
    got = api.query("nearest", db, concept="red", kind="classification").to_pylist()
    cls = truth[2]["cls"]
    best = max((cos(cls[IDX[1]], cls[IDX[c]]), NAME[c]) for c in CONCEPTS if c not in (1, 3))
    assert got[0]["concept"] == best[1]
    assert len(got) == len(CONCEPTS) - 2  # probe 2 lacks concept 3


def test_similarity_and_analogy(filled):
    db, truth = filled
    seg = truth[1]["seg"]
    got = api.query("similarity", db, a="dog", b="cat", probe=1).to_pylist()
    assert got[0]["similarity"] == pytest.approx(cos(seg[IDX[3]], seg[IDX[4]]), abs=1e-6)
    target = unit(seg[IDX[3]]) - unit(seg[IDX[4]]) + unit(seg[IDX[5]])
    expected = sorted(((cos(target, seg[IDX[c]]), NAME[c]) for c in PIXEL if c not in (3, 4, 5)), reverse=True)
    got = api.query("analogy", db, a="dog", b="cat", c="car", k=2, probe=1).to_pylist()
    assert [r["concept"] for r in got] == [n for _, n in expected[:2]]
    assert got[0]["similarity"] == pytest.approx(expected[0][0], abs=1e-5)


def best_train(iou, cids):
    return {c: int(iou["train"][:, IDX[c]].argmax()) for c in cids}


def test_exclusivity_and_filter_concepts(filled):
    db, truth = filled
    best = best_train(truth[1]["iou"], PIXEL)
    counts = np.bincount(list(best.values()), minlength=K)
    bins = {
        "0": counts == 0,
        "1": counts == 1,
        "2-5": (counts >= 2) & (counts <= 5),
        "6-9": (counts >= 6) & (counts <= 9),
        "10-14": (counts >= 10) & (counts <= 14),
        "15-19": (counts >= 15) & (counts <= 19),
        "20+": counts >= 20,
    }
    got = api.query("exclusivity", db, probe=1).to_pylist()
    assert [r["concepts_per_filter"] for r in got] == list(bins)
    for r in got:
        assert r["filters"] == bins[r["concepts_per_filter"]].sum()
        assert r["share"] == pytest.approx(bins[r["concepts_per_filter"]].mean())
    lists = api.query("filter-concepts", db, probe=1).to_pylist()
    assert {r["filter"]: r["n_concepts"] for r in lists} == {f: int(n) for f, n in enumerate(counts) if n}
    for r in lists:
        names = [NAME[c] for c in best if best[c] == r["filter"]]
        assert sorted(r["concepts"].split(", ")) == sorted(names)


def test_best_filters(filled):
    db, truth = filled
    iou, seg = truth[1]["iou"], truth[1]["seg"]
    got = api.query("best-filters", db, concept="cat", k=3, probe=1).to_pylist()
    by_iou = np.argsort(-iou["train"][:, IDX[4]])[:3]
    by_w = np.argsort(-np.abs(seg[IDX[4]]))[:3]
    assert [r["iou_filter"] for r in got] == by_iou.tolist()
    assert [r["weight_filter"] for r in got] == by_w.tolist()
    assert got[0]["val_iou"] == pytest.approx(iou["val"][by_iou[0], IDX[4]])


def test_single_vs_embedding(filled):
    db, truth = filled
    t = truth[1]
    best = best_train(t["iou"], PIXEL)
    got = {r["category"]: r for r in api.query("single-vs-embedding", db, probe=1).to_pylist()}
    for category in ("color", "object", "material", "part", "all"):
        members = [c for c in PIXEL if category in ("all", CONCEPTS[c][1])]
        single = np.mean([t["iou"]["val"][best[c], IDX[c]] for c in members])
        embedding = np.mean([t["seg_val"][IDX[c]] for c in members])
        assert got[category]["concepts"] == len(members)
        assert got[category]["single_filter_iou"] == pytest.approx(single)
        assert got[category]["embedding_iou"] == pytest.approx(embedding)
    assert "scene" not in got


def test_sufficiency(filled):
    db, truth = filled
    t = truth[1]
    got = {r["concept"]: r for r in api.query("sufficiency", db, probe=1).to_pylist()}
    assert set(got) == {NAME[c] for c in PIXEL}
    for c in PIXEL:
        full = t["seg_val"][IDX[c]]
        reaching = [f for f in (1, 2, 4) if t["suff"][(c, f)] >= 0.9 * full] + [K]
        assert got[NAME[c]]["filters_needed"] == min(reaching)
        assert got[NAME[c]]["full_score"] == pytest.approx(full)
    one = api.query("sufficiency", db, probe=1, concept="red").to_pylist()
    assert [r["concept"] for r in one] == ["red-c"]


def test_weight_iou_correlation(filled):
    db, truth = filled
    t = truth[1]
    got = {r["concept"]: r["pearson_r"] for r in api.query("weight-iou-correlation", db, probe=1).to_pylist()}
    for c in PIXEL:
        assert got[NAME[c]] == pytest.approx(
            np.corrcoef(t["seg"][IDX[c]], t["iou"]["train"][:, IDX[c]])[0, 1], abs=1e-5
        )


def test_compare_probes(filled):
    db, truth = filled
    got = api.query("compare-probes", db, concept="car").to_pylist()
    assert [r["probe_id"] for r in got] == [1, 2]
    for r in got:
        t = truth[r["probe_id"]]
        best = int(t["iou"]["train"][:, IDX[5]].argmax())
        assert r["best_filter"] == best
        assert r["single_filter_iou"] == pytest.approx(t["iou"]["val"][best, IDX[5]])
        assert r["embedding_iou"] == pytest.approx(t["seg_val"][IDX[5]])
        assert r["classification_accuracy"] == pytest.approx(t["cls_val"][IDX[5]])


def test_category_neighbours(filled):
    db, truth = filled
    seg = truth[1]["seg"]
    k = 3
    hits: dict = {}
    for a in PIXEL:
        order = sorted((b for b in PIXEL if b != a), key=lambda b: (-cos(seg[IDX[a]], seg[IDX[b]]), b))[:k]
        for b in order:
            key = (CONCEPTS[a][1], CONCEPTS[b][1])
            hits[key] = hits.get(key, 0) + 1
    got = {
        (r["category"], r["neighbour_category"]): r["share"]
        for r in api.query("category-neighbours", db, k=k, probe=1).to_pylist()
    }
    for (fc, tc), n in hits.items():
        total = sum(v for (f2, _), v in hits.items() if f2 == fc)
        assert got[(fc, tc)] == pytest.approx(n / total)
    assert len(got) == len(hits)


def test_headers_declare_exactly_the_parameters_used(tmp_path):
    assert len(queries.load_all()) >= 11
    (tmp_path / "bad.sql").write_text("-- name: bad\n-- param: x INTEGER\nSELECT $y")
    with pytest.raises(N2vdbError, match="undeclared parameter"):
        queries.load_all(tmp_path)
    (tmp_path / "bad.sql").write_text("-- name: bad\n-- param: x INTEGER\n-- param: y INTEGER\nSELECT $y -- $x\n")
    with pytest.raises(N2vdbError, match="unused parameter"):
        queries.load_all(tmp_path)


def test_python_errors(filled):
    db, _ = filled
    with pytest.raises(UsageError, match="unknown query"):
        api.query("neares", db)
    with pytest.raises(UsageError, match="needs CONCEPT"):
        api.query("nearest", db)
    with pytest.raises(UsageError, match="expects INTEGER"):
        api.query("nearest", db, concept="dog", k="many")
    with pytest.raises(NotFound, match="did you mean dog"):
        api.query("nearest", db, concept="dgo")
    with pytest.raises(UsageError, match="must be one of"):
        api.query("nearest", db, concept="dog", kind="other")
    with pytest.raises(QueryError, match="line 1, column"):
        api.sql("SELEC 1", db)


def cli(*args, stdin=None):
    return run_cli(*args, stdin=stdin)


def fingerprint(db):
    con = duckdb.connect(str(db), read_only=True)
    tables = [t for (t,) in con.execute("SELECT table_name FROM information_schema.tables ORDER BY 1").fetchall()]
    out = {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}
    con.close()
    return out


@pytest.mark.parametrize(
    "args,message,code",
    [
        (["query", "nope"], "unknown query 'nope'", 2),
        (["query", "nearest"], "needs CONCEPT", 2),
        (["query", "nearest", "dog", "-k", "x"], "expects INTEGER", 2),
        (["query", "nearest", "dgo"], "unknown concept 'dgo'; did you mean dog", 2),
        (["query", "nearest", "dog", "--bogus", "1"], "has no option --bogus", 2),
        (["query", "nearest", "dog", "--probe", "9"], "no probe 9", 2),
        (["sql", "SELEC * FROM probes"], "syntax error", 1),
        (["sql", "DROP TABLE probes"], "read-only", 1),
        (["sql", "SELECT * FROM nosuch"], "nosuch", 1),
        (["query", "nearest", "dog", "-f", "xml"], "'xml' is not one of 'table', 'csv'", 2),
    ],
)
def test_cli_errors_are_one_line_and_change_nothing(filled, args, message, code):
    db, _ = filled
    before = fingerprint(db)
    result = cli(*args, "--db", str(db))
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert fingerprint(db) == before


def test_cli_query_formats_and_sql(filled):
    db, _ = filled
    csv_out = cli("query", "nearest", "dog", "-k", "2", "--probe", "1", "--db", str(db)).stdout
    assert csv_out.splitlines()[0] == "rank,concept,category,similarity" and len(csv_out.splitlines()) == 3
    js = json.loads(cli("query", "nearest", "dog", "-k", "2", "-p", "probe=1", "-f", "json", "--db", str(db)).stdout)
    assert len(js) == 2 and set(js[0]) == {"rank", "concept", "category", "similarity"}
    lines = cli("sql", "-f", "jsonl", "--db", str(db), stdin="SELECT 1 AS a UNION ALL SELECT 2").stdout.splitlines()
    assert sorted(json.loads(l)["a"] for l in lines) == [1, 2]
    md = cli("query", "exclusivity", "-p", "probe=1", "-f", "markdown", "--db", str(db)).stdout
    assert md.startswith("| concepts_per_filter | filters | share |")
    listing = cli("query", "--db", str(db), "-f", "tsv").stdout
    assert "nearest\tn2vdb query nearest CONCEPT" in listing
    table = cli("query", "nearest", "dog", "--probe=1", "-f", "table", "--limit", "2", "--db", str(db)).stdout
    assert "2 of 7 rows" in table and "similarity" in table


def test_empty_result_says_so(filled):
    result = cli("query", "nearest", "dog", "--db", str(filled[0]))  # probe 2 has no 'dog' embedding
    assert result.returncode == 0 and "no rows" in result.stderr


def test_sql_write_flag(tmp_path, filled):
    import shutil

    db = tmp_path / "w.duckdb"
    shutil.copy(filled[0], db)
    assert cli("sql", "--write", "CREATE TABLE notes AS SELECT 1 AS x", "--db", str(db)).returncode == 0
    assert cli("sql", "SELECT x FROM notes", "--db", str(db)).stdout.splitlines() == ["x", "1"]


@pytest.mark.parametrize("name", sorted(queries.load_all()))
def test_query_help_is_generated_from_the_header(name):
    named = queries.get(name)
    result = run_cli("query", name, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: n2vdb query {name}") and named.description in result.stdout
    for param in named.params:
        shown = param.name.upper() if param.required else f"--{param.name.replace('_', '-')}"
        listed = result.stdout.split("Parameters (declared in", 1)[1].splitlines()[1:]
        line = next(line for line in listed if shown in line.split(";")[0])
        assert (param.default or "") in line or param.type == "PROBE" or param.required
        for choice in param.choices:
            assert choice in line


def test_concept_scores_against_the_tables_by_hand(db_copy):
    """concept-scores recomputed in Python from filter_concept_iou, embeddings and concepts: the best
    filter is the highest train IoU (the lower filter on a tie), scored by its val IoU."""
    con = duckdb.connect(str(db_copy))
    k, dataset_id = con.execute("SELECT n_filters, dataset_id FROM probes WHERE probe_id = 1").fetchone()
    named = dict(con.execute("SELECT name, concept_id FROM concepts").fetchall())
    # a tie on train IoU (filter 7 must win over 200); a concept with no IoU rows but a classifier
    # (kept, without a best filter); a concept with neither (left out)
    con.execute("UPDATE filter_concept_iou SET iou = 2.0 WHERE concept_id = ? AND filter IN (7, 200)", [named["red-c"]])
    con.execute("DELETE FROM filter_concept_iou WHERE concept_id = ?", [named["striped"]])
    con.execute("DELETE FROM filter_concept_iou WHERE concept_id = ?", [named["dotted"]])
    con.execute("DELETE FROM embeddings WHERE concept_id = ?", [named["dotted"]])
    iou = {
        (c, f, s): v
        for c, f, s, v in con.execute("SELECT concept_id, filter, split, iou FROM filter_concept_iou").fetchall()
    }
    scores = {
        (c, kind): (v, ap)
        for c, kind, v, ap in con.execute(
            "SELECT concept_id, kind, val_score, val_ap FROM embeddings WHERE n_filters = ?", [k]
        ).fetchall()
    }
    expected = []
    for c, name, category, level in con.execute(
        "SELECT concept_id, name, category, level FROM concepts WHERE dataset_id = ?", [dataset_id]
    ).fetchall():
        train = [(v, -f) for (c2, f, s), v in iou.items() if c2 == c and s == "train"]
        best = -max(train)[1] if train else None
        cls, cls_ap = scores.get((c, "classification"), (None, None))
        if best is None and cls is None:
            continue
        seg = scores.get((c, "segmentation"), (None, None))[0]
        expected.append((name, category, level, best, iou.get((c, best, "val")), seg, cls, cls_ap))
    con.close()
    expected.sort(key=lambda r: (r[5] is None, -(r[5] or 0), r[0]))
    rows = api.query("concept-scores", db_copy, probe=1).to_pylist()
    columns = ("concept", "category", "level", "best_filter", "single_filter_iou", "embedding_iou")
    got = [tuple(r[c] for c in (*columns, "classification_accuracy", "classification_ap")) for r in rows]
    assert all(r["embedding_lower"] is None and r["single_filter_upper"] is None for r in rows)  # no significance run
    assert [r[0] for r in got] == [r[0] for r in expected]
    assert got == [pytest.approx(r) for r in expected]
    by_name = {r[0]: r for r in got}
    assert by_name["red-c"][3] == 7 and by_name["striped"][3] is None and "dotted" not in by_name


def test_sufficiency_curve_against_planted_embeddings(db_copy):
    """Planted sufficiency rows (top-F embeddings) per category, against the mean and share by hand:
    a NULL score is left out, and a full score of 0 gives no share."""
    con = duckdb.connect(str(db_copy))
    k = con.execute("SELECT n_filters FROM probes WHERE probe_id = 1").fetchone()[0]
    con.execute("DELETE FROM embeddings WHERE n_filters <> ?", [k])
    rng = np.random.default_rng(4)
    full = dict(
        con.execute(
            "SELECT concept_id, val_score FROM embeddings WHERE kind = 'segmentation' AND val_score IS NOT NULL"
        ).fetchall()
    )
    zero = sorted(full)[0]
    con.execute("UPDATE embeddings SET val_score = 0 WHERE kind = 'segmentation' AND concept_id = ?", [zero])
    full[zero] = 0.0
    planted = {}
    for c in full:
        for f in (1, 4, 16):
            score = None if (c, f) == (sorted(full)[1], 4) else float(rng.uniform(0, 0.5))
            con.execute(
                "INSERT INTO embeddings (probe_id, concept_id, kind, n_filters, weights, bias, val_score) "
                "VALUES (1, ?, 'segmentation', ?, [0.0]::FLOAT[], 0, ?)",
                [c, f, score],
            )
            if score is not None:
                planted[(c, f)] = score
    category = dict(con.execute("SELECT concept_id, category FROM concepts").fetchall())
    con.close()
    for c in full:
        planted[(c, k)] = full[c]
    groups = {}
    for (c, f), score in planted.items():
        groups.setdefault((category[c], f), []).append((score, score / full[c] if full[c] else None))
    expected = []
    for (cat, f), rows in sorted(groups.items()):
        shares = [s for _, s in rows if s is not None]
        expected.append((cat, f, len(rows), np.mean([s for s, _ in rows]), float(np.mean(shares)) if shares else None))
    got = [tuple(r.values()) for r in api.query("sufficiency-curve", db_copy, probe=1).to_pylist()]
    assert got == [pytest.approx(r) for r in expected]
    assert {r[1] for r in got} == {1, 4, 16, k}
    # classification has only its full embeddings here: one point per category, the whole of itself
    curve = api.query("sufficiency-curve", db_copy, probe=1, kind="classification").to_pylist()
    assert curve and all(r["n_filters"] == k and r["mean_share_of_full"] == pytest.approx(1.0) for r in curve)
