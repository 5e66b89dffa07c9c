"""`n2vdb reproduce net2vec`: offline on a small built-in set (random weights, tiny settings)."""

import duckdb
import numpy as np
import pytest
import torchvision
from typer.testing import CliRunner

from n2vdb import api, reproduce
from n2vdb.cli import app
from n2vdb.errors import UsageError
from n2vdb.store.sessions import Store


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, synthetic_dir):
    db = tmp_path_factory.mktemp("r") / "r.duckdb"
    api.add_dataset(synthetic_dir, "synthetic", db)
    table, notes = api.reproduce("net2vec", db, ["alexnet"], limit=48, epochs=2, workers=0)
    return db, table.to_pylist(), notes


def test_offline_table_sets_the_papers_numbers_beside_n2vdbs(reproduced):
    db, rows, notes = reproduced
    assert "offline (no Broden dataset registered)" in notes[0]
    assert any("Caffe" in n for n in notes)
    by = {(r["task"], r["category"]): r for r in rows}
    assert set(by) == (
        {("segmentation IoU", c) for c in reproduce.SEG_CATEGORIES}
        | {("classification accuracy", c) for c in reproduce.CLS_CATEGORIES}
    )
    color = by[("classification accuracy", "color")]
    assert (color["paper_embedding"], color["paper_single"]) == (0.868, 0.724)
    assert color["paper_source"] == "torchvision AlexNet relu5"
    overall = by[("segmentation IoU", "all")]
    assert (overall["paper_embedding"], overall["paper_single"]) == (0.115, 0.043)
    assert "Caffe" in overall["paper_source"]
    con = duckdb.connect(str(db), read_only=True)
    (probe_id,) = con.execute("SELECT probe_id FROM probes WHERE model = 'alexnet'").fetchone()
    settings = con.execute(
        "SELECT settings->>'preprocess', weights FROM probes WHERE probe_id = ?", [probe_id]
    ).fetchone()
    con.close()
    assert settings == ("caffe", "random:seed=0")
    seg = {r["category"]: r for r in api.query("single-vs-embedding", db, probe=probe_id).to_pylist()}
    for category in reproduce.SEG_CATEGORIES:
        row = by[("segmentation IoU", category)]
        assert row["n2vdb_embedding"] == seg[category]["embedding_iou"]
        assert row["n2vdb_single"] == seg[category]["single_filter_iou"]
    for row in rows:
        for kind in ("embedding", "single"):
            paper, ours, gap = row[f"paper_{kind}"], row[f"n2vdb_{kind}"], row[f"gap_{kind}"]
            assert gap == (None if paper is None or ours is None else pytest.approx(ours - paper))
    con.close()


def test_top_filter_baseline_is_the_largest_weight_retrained_alone(reproduced):
    db, rows, _ = reproduced
    con = duckdb.connect(str(db), read_only=True)
    full = dict(
        con.execute(
            "SELECT concept_id, weights FROM embeddings WHERE kind = 'classification' AND n_filters = 256"
        ).fetchall()
    )
    one = dict(
        con.execute(
            "SELECT concept_id, weights FROM embeddings WHERE kind = 'classification' AND n_filters = 1"
        ).fetchall()
    )
    assert set(one) == set(full) and one
    for concept, weights in one.items():
        nonzero = np.flatnonzero(np.array(weights))
        assert nonzero.tolist() == [int(np.argmax(np.abs(full[concept])))]
    # the query's per-category means, by hand
    scores = con.execute(
        "SELECT c.category, w.val_score, o.val_score FROM embeddings w"
        " JOIN embeddings o USING (probe_id, concept_id) JOIN concepts c USING (concept_id)"
        " WHERE w.kind = 'classification' AND o.kind = 'classification'"
        " AND w.n_filters = 256 AND o.n_filters = 1 AND NOT isnan(w.val_score)"
    ).fetchall()
    con.close()
    by = {r["category"]: r for r in rows if r["task"] == "classification accuracy"}
    for category in {c for c, _, _ in scores}:
        mine = [(w, o) for c, w, o in scores if c == category]
        assert by[category]["n2vdb_embedding"] == pytest.approx(np.mean([w for w, _ in mine]))
        assert by[category]["n2vdb_single"] == pytest.approx(np.mean([o for _, o in mine]))
        assert by[category]["concepts"] == len(mine)


def test_cli_resumes_and_prints_the_table(reproduced):
    db, rows, _ = reproduced
    result = CliRunner().invoke(
        app,
        ["reproduce", "net2vec", "--models", "alexnet", "--limit", "48", "--epochs", "2", "--db", str(db), "-f", "csv"],
    )
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith(("model,", "alexnet,"))]
    assert lines[0].startswith("model,layer,task,category,concepts,paper_embedding,n2vdb_embedding,gap_embedding")
    assert len(lines) == 1 + len(rows)


def test_online_when_broden_and_weights_are_present(tmp_path, monkeypatch, synthetic_dir):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    db = tmp_path / "o.duckdb"
    api.add_dataset(synthetic_dir, "broden_like", db)
    chosen = [("alexnet", "conv5")]
    assert reproduce.plan(Store(db), chosen, None).offline  # no weights cached yet
    cached = reproduce.weights_mod.hub_checkpoint(torchvision.models.get_model_weights("alexnet").DEFAULT.url)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    steps = reproduce.plan(Store(db), chosen, None)
    assert (steps.offline, steps.weights, steps.dataset, steps.preprocess) == (
        False,
        "imagenet",
        "broden_like",
        "caffe",
    )
    assert reproduce.plan(Store(db), chosen, True).offline


def test_bad_arguments_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="unknown paper"):
        api.reproduce("netdissect", tmp_path / "x.duckdb")
    with pytest.raises(UsageError, match="not in the paper's setting"):
        api.reproduce("net2vec", tmp_path / "x.duckdb", ["resnet18"])
