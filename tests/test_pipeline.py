"""The pipeline as one list (n2vdb/pipeline.py): the status machine, the stage table the integrity
checks join, a stage added by one entry, and the ingest entry points that prepare the database."""

import ast
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import duckdb
import pytest

from n2vdb import api, pipeline
from n2vdb import probe as probes
from n2vdb.errors import DatasetError
from n2vdb.ingest import IngestOptions, make_spec
from n2vdb.probe import TrainSettings
from n2vdb.store import read_connection, write_connection

ROOT = Path(__file__).resolve().parent.parent


def spec(kind: str = "map") -> probes.ProbeSpec:
    return probes.ProbeSpec("m", "l", "l", False, "w", 1, 8, (0.0,), (1.0,), kind=kind)


def test_the_stage_table_the_integrity_checks_join_equals_the_python_list(tmp_path):
    with write_connection(tmp_path / "t.duckdb") as con:
        stored = con.execute(
            "SELECT position, stage, fills, vector, per_extraction, sharded, partial FROM pipeline_stages"
            " ORDER BY position"
        ).fetchall()
    assert stored == [
        (i, s.name, list(s.fills), s.vector, s.per_extraction, s.sharded, s.partial)
        for i, s in enumerate(pipeline.STAGES, 1)
    ]


def test_the_status_machine_follows_the_list():
    walk = []
    status = pipeline.first_status(shares_extraction=False)
    while status != pipeline.COMPLETE:
        walk.append(status)
        status = pipeline.status_after(status, spec(), shares_extraction=False)
    assert walk == ["extracting", "thresholds", "iou", "embeddings"]
    # a vector layer has no spatial extent: thresholds go straight to the embeddings
    assert pipeline.status_after("thresholds", spec("vector"), False) == "embeddings"
    # a variant reads its source's activations: it starts at the thresholds
    assert pipeline.first_status(shares_extraction=True) == "thresholds"
    assert pipeline.status_after_shards(spec()) == "thresholds"
    assert pipeline.sharded("extracting") and not pipeline.sharded("thresholds")
    resumed = probes.Probe(1, "iou", None, 3, 2, 2, 1)
    assert [s.name for s in pipeline.remaining(resumed, spec())] == ["iou", "embeddings"]
    assert [s.name for s in pipeline.remaining(resumed, spec("vector"))] == ["embeddings"]


def test_a_new_stage_is_one_function_and_one_entry(tmp_path, synthetic_dir, monkeypatch):
    """A stage appended after the IoU: the runner says it, times it, and moves the status through it;
    the model loaded for extraction is no longer held by then."""
    seen, held = [], []

    def count_iou_rows(run: pipeline.StageRun) -> None:
        held.append(sorted(run.loaded))
        with run.store.reading() as con:
            seen.append(
                con.execute(
                    "SELECT status, (SELECT count(*) FROM filter_concept_iou WHERE probe_id = ?) FROM probes"
                    " WHERE probe_id = ?",
                    [run.probe.probe_id, run.probe.probe_id],
                ).fetchone()
            )
        with run.store.writing() as con:
            run.finish(con)

    stages = list(pipeline.STAGES)
    at = [s.name for s in stages].index("iou") + 1
    stages.insert(at, pipeline.Stage("audit", "audit", count_iou_rows, (), vector=False, timing="audit"))
    monkeypatch.setattr(pipeline, "STAGES", tuple(stages))
    db = tmp_path / "a.duckdb"
    api.add_dataset(synthetic_dir, "synthetic", db)
    probe_id = api.ingest(
        "alexnet", "conv5", db, dataset="synthetic", weights="random", limit=6, workers=0, train=TrainSettings(epochs=1)
    )
    con = duckdb.connect(str(db), read_only=True)
    iou_rows = con.execute("SELECT count(*) FROM filter_concept_iou").fetchone()[0]
    assert iou_rows > 0 and seen == [("audit", iou_rows)]  # ran after the IoU, at its own status
    assert held == [[]]
    assert con.execute("SELECT status FROM probes").fetchone()[0] == "complete"
    timed = [r[0] for r in con.execute("SELECT stage FROM stage_timings WHERE probe_id = ?", [probe_id]).fetchall()]
    assert "audit" in timed and "iou" in timed


def test_a_stage_that_does_not_finish_is_refused_and_its_probe_stays(tmp_path, synthetic_dir, monkeypatch):
    stages = [s if s.name != "thresholds" else replace(s, run=lambda run: None) for s in pipeline.STAGES]
    monkeypatch.setattr(pipeline, "STAGES", tuple(stages))
    db = tmp_path / "f.duckdb"
    api.add_dataset(synthetic_dir, "synthetic", db)
    with pytest.raises(RuntimeError, match="thresholds returned without calling run.finish"):
        api.ingest("alexnet", "conv5", db, dataset="synthetic", weights="random", limit=4, workers=0)
    with read_connection(db) as con:
        assert con.execute("SELECT status FROM probes").fetchall() == [("thresholds",)]


def seeded_home(tmp_path, synthetic_dir) -> Path:
    """An N2VDB_HOME whose built-in concept set is generated already (registering it is the point)."""
    home = tmp_path / "home"
    shutil.copytree(synthetic_dir, home / "synthetic")
    return home


def test_make_spec_only_reads(tmp_path, synthetic_dir, monkeypatch):
    """On a database without the built-in set, make_spec says so instead of trying to register it."""
    monkeypatch.setenv("N2VDB_HOME", str(seeded_home(tmp_path, synthetic_dir)))
    db = tmp_path / "r.duckdb"
    with write_connection(db):
        pass
    with read_connection(db) as con, pytest.raises(DatasetError, match="no dataset named 'synthetic'"):
        make_spec(con, "alexnet", "conv5", IngestOptions(weights="random"))


def test_a_shard_on_a_database_without_the_builtin_set_registers_it(tmp_path, synthetic_dir, monkeypatch):
    monkeypatch.setenv("N2VDB_HOME", str(seeded_home(tmp_path, synthetic_dir)))
    db = tmp_path / "s.duckdb"
    api.add_dataset(synthetic_dir, "other", db)  # a database, but not the set the ingest defaults to
    part_dir = api.ingest_shard("alexnet", "conv5", "0/2", tmp_path / "shards", db, weights="random", limit=4)
    assert sorted(api.datasets(db).column("name").to_pylist()) == ["other", "synthetic"]
    assert sorted(p.name for p in part_dir.iterdir()) == ["done", "part-00000000.parquet"]


def test_the_readme_torchrun_example_works_as_the_first_command_in_a_new_directory(
    tmp_path, synthetic_dir, ingested_db
):
    """No database, no registered set: the first rank creates both, the other waits; merge finishes."""
    here = tmp_path / "new"
    here.mkdir()
    env = {**os.environ, "N2VDB_HOME": str(seeded_home(tmp_path, synthetic_dir)), "PYTHONPATH": str(ROOT)}
    env.pop("N2VDB_DB", None)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "n2vdb"]
    ingest = ["ingest", "alexnet", "conv5", "--weights", "random", "--shard", "auto", "--shard-dir", "shards"]
    small = ["--limit", "8", "--workers", "0", "--epochs", "1"]
    sharded = subprocess.run(torchrun + ingest + small, cwd=here, env=env, capture_output=True, text=True)
    assert sharded.returncode == 0, sharded.stderr[-2000:]
    merged = subprocess.run(
        [sys.executable, "-m", "n2vdb", "merge", "shards"], cwd=here, env=env, capture_output=True, text=True
    )
    assert merged.returncode == 0, merged.stderr[-2000:]
    db = here / "n2v.duckdb"
    assert not [r for r in api.db_check(db).to_pylist() if r["violations"]]
    mine = duckdb.connect(str(db), read_only=True)
    assert mine.execute("SELECT d.name, p.status FROM probes p JOIN datasets d USING (dataset_id)").fetchall() == [
        ("synthetic", "complete")
    ]
    # the first 8 images' activations are those of the unsharded reference run
    reference = duckdb.connect(str(ingested_db), read_only=True)
    query = "SELECT image_id, scales, codes, pooled FROM activations WHERE image_id < 8 ORDER BY image_id"
    assert mine.execute(query).fetchall() == reference.execute(query).fetchall()


def test_db_status_reads_the_database_every_command_opens(tmp_path, monkeypatch):
    db = tmp_path / "env.duckdb"
    with write_connection(db):
        pass
    monkeypatch.setenv("N2VDB_DB", str(db))
    assert all(api.db_status().column("applied").to_pylist())


def _imported(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_boundaries_connection_needs_no_migrations_and_the_api_holds_no_sql():
    store = ROOT / "n2vdb" / "store"
    assert not {"n2vdb.store.migrate", "n2vdb.store.database"} & _imported(store / "connection.py")
    strings = [
        n.value
        for n in ast.walk(ast.parse((ROOT / "n2vdb" / "api.py").read_text()))
        if isinstance(n, ast.Constant) and isinstance(n.value, str)
    ]
    assert not [s for s in strings if any(word in s for word in ("SELECT ", "INSERT ", "UPDATE ", "DELETE "))]


def test_migration_0010_moves_variants_without_thresholds_back_to_their_stage(tmp_path):
    """Before 0010 a variant started at 'iou' and computed its thresholds there; 'iou' now means done."""
    from n2vdb.resources import sql_dir
    from n2vdb.store import connect, migrate

    older = tmp_path / "older"
    older.mkdir()
    for path in sql_dir("migrations").glob("*.sql"):
        if int(path.name[:4]) < 10:
            shutil.copy(path, older / path.name)
    con = connect(tmp_path / "old.duckdb", read_only=False)
    migrate.upgrade(con, older)
    con.execute("INSERT INTO datasets (name, path, n_images, n_concepts) VALUES ('d', '/d', 1, 1)")
    for key, status in (("variant", "iou"), ("thresholded", "iou"), ("done", "complete")):
        con.execute(
            "INSERT INTO probes (probe_key, model, weights, layer, dataset_id, n_filters, height, width, settings,"
            " status) VALUES (?, 'm', 'w', 'l', 1, 2, 1, 1, '{}', ?)",
            [key, status],
        )
    for probe_id in (2, 3):
        con.execute("INSERT INTO filters VALUES (?, 0, 1, 0, 1, 1), (?, 1, 1, 0, 1, 1)", [probe_id, probe_id])
    later = sorted(int(p.name[:4]) for p in sql_dir("migrations").glob("*.sql") if int(p.name[:4]) >= 10)
    assert [m.version for m in migrate.upgrade(con)] == later  # 0010 and whatever came after it
    assert con.execute("SELECT probe_key, status FROM probes ORDER BY probe_id").fetchall() == [
        ("variant", "thresholds"),
        ("thresholded", "iou"),
        ("done", "complete"),
    ]
    con.close()


EMBEDDING_ROWS = (
    "DELETE FROM embeddings",
    "DELETE FROM image_concept_scores WHERE method IN ('segmentation', 'classification')",
)


@pytest.mark.parametrize(
    "damage, expected",
    [
        (["UPDATE probes SET status = 'segmenting'"], {"probes at a status that is no pipeline stage"}),
        (["UPDATE probes SET status = 'iou'"], {"rows of unfinished stages"}),  # its IoU and embeddings exist
        (["DELETE FROM filter_concept_iou"], {"probes past a stage without rows in a table it fills"}),
        (EMBEDDING_ROWS, {"probes past a stage without rows in a table it fills"}),
        ([*EMBEDDING_ROWS, "UPDATE probes SET status = 'embeddings'"], set()),  # a probe waiting for its embeddings
    ],
)
def test_the_stage_checks_follow_the_stage_table(db_copy, damage, expected):
    con = duckdb.connect(str(db_copy))
    for statement in damage:
        con.execute(statement)
    con.close()
    failed = {r["check_name"] for r in api.db_check(db_copy).to_pylist() if r["violations"]}
    assert failed == expected
