"""Crash and resume: SIGKILL at several points of an ingest, then finish; nothing lost or duplicated."""

import os
import signal
import subprocess
import sys
import time

import duckdb
import pytest

from n2vdb import api

TABLES = (("activations", "image_id"), ("filters", "filter"), ("filter_concept_iou", "filter, concept_id, split"),
          ("embeddings", "concept_id, kind, n_filters"), ("image_concept_scores", "image_id, concept_id, method"))


def ingest_command(db):
    return [sys.executable, "-m", "n2vdb", "ingest", "alexnet", "conv5", "--weights", "random", "--dataset",
            "synthetic", "--workers", "0", "--epochs", "10", "--db", str(db)]


def kill_when(db, trigger: str, delay: float) -> str:
    """Start an ingest, SIGKILL it `delay` seconds after stderr shows `trigger`; return what it printed."""
    env = {**os.environ, "N2VDB_QUIET": "0"}
    process = subprocess.Popen(ingest_command(db), stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    for line in process.stderr:
        seen.append(line)
        if trigger in line:
            time.sleep(delay)
            process.send_signal(signal.SIGKILL)
            break
    process.wait()
    assert process.returncode == -signal.SIGKILL, f"ingest ended before {trigger!r}: {''.join(seen)}"
    return "".join(seen)


def check(db):
    failed = [r for r in api.db_check(db).to_pylist() if r["violations"]]
    assert not failed, failed


@pytest.mark.parametrize("points", [
    [("extracting activations", 0.5), ("single-filter IoU", 0.1), ("concept embeddings", 0.8)],
    [("thresholds", 0.0), ("concept embeddings", 0.2)],
])
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, synthetic_dir, ingested_db, points):
    db = tmp_path / "k.duckdb"
    api.add_dataset(synthetic_dir, "synthetic", db)
    for trigger, delay in points:
        kill_when(db, trigger, delay)
        check(db)  # a killed ingest leaves a consistent database (the WAL replays on open)
    finished = subprocess.run(ingest_command(db), capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    check(db)
    mine = duckdb.connect(str(db), read_only=True)
    reference = duckdb.connect(str(ingested_db), read_only=True)
    assert mine.execute("SELECT probe_id, status FROM probes").fetchall() == [(1, "complete")]
    for table, order in TABLES:
        ours = mine.execute(f"SELECT * EXCLUDE (probe_id) FROM {table} ORDER BY {order}").fetchall()
        theirs = reference.execute(f"SELECT * EXCLUDE (probe_id) FROM {table} ORDER BY {order}").fetchall()
        assert ours == theirs, table


def test_db_check_catches_damage(db_copy):
    con = duckdb.connect(str(db_copy))
    con.execute("DELETE FROM filters WHERE filter = 3")
    con.execute("INSERT INTO image_concept_scores VALUES (1, 0, 999999, 'segmentation', 1, 2, 0.5, NULL)")
    con.close()
    failed = {r["check_name"] for r in api.db_check(db_copy).to_pylist() if r["violations"]}
    assert failed == {"probes past thresholds without one threshold per filter",
                      "IoU, embedding or score rows of unknown probes, filters or concepts"}
    result = subprocess.run([sys.executable, "-m", "n2vdb", "db", "check", "--db", str(db_copy)],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "2 integrity check(s) failed" in result.stderr


def test_two_shards_under_torchrun_merge_into_the_unsharded_result(tmp_path, synthetic_dir, ingested_db):
    """The README's torchrun example, on CPU: thresholds, IoUs and every other table equal a single run's."""
    db = tmp_path / "s.duckdb"
    shards = tmp_path / "shards"
    api.add_dataset(synthetic_dir, "synthetic", db)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "n2vdb"]
    args = ["ingest", "alexnet", "conv5", "--weights", "random", "--dataset", "synthetic", "--workers", "0",
            "--epochs", "10", "--shard", "auto", "--shard-dir", str(shards), "--db", str(db)]
    result = subprocess.run(torchrun + args, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    parts = sorted(p.parent.name for p in shards.glob("probe-*/shard-*/part-*.parquet"))
    assert parts.count("shard-0-of-2") == parts.count("shard-1-of-2") == 2  # 40 images each, batches of 32
    # the shard files are plain Parquet: DuckDB reads them without n2vdb
    con = duckdb.connect()
    ids = con.execute(f"SELECT list(image_id ORDER BY image_id) FROM read_parquet('{shards}/*/*/*.parquet')").fetchone()[0]
    assert ids == list(range(80))
    con.close()
    merged = subprocess.run([sys.executable, "-m", "n2vdb", "merge", str(shards), "--db", str(db)],
                            capture_output=True, text=True)
    assert merged.returncode == 0, merged.stderr
    check(db)
    mine = duckdb.connect(str(db), read_only=True)
    reference = duckdb.connect(str(ingested_db), read_only=True)
    for table, order in TABLES:
        ours = mine.execute(f"SELECT * EXCLUDE (probe_id) FROM {table} ORDER BY {order}").fetchall()
        theirs = reference.execute(f"SELECT * EXCLUDE (probe_id) FROM {table} ORDER BY {order}").fetchall()
        assert ours == theirs, table


def test_merge_refuses_unfinished_shards(tmp_path, synthetic_dir):
    db = tmp_path / "s.duckdb"
    api.add_dataset(synthetic_dir, "synthetic", db)
    api.ingest_shard("alexnet", "conv5", "0/2", tmp_path / "shards", db, dataset="synthetic", weights="random",
                     workers=0, limit=8)
    result = subprocess.run([sys.executable, "-m", "n2vdb", "merge", str(tmp_path / "shards"), "--db", str(db)],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "shard 1/2 is not finished" in result.stderr
    assert api.probes(db).num_rows == 0
    with pytest.raises(Exception, match="expected i/N"):
        api.ingest_shard("alexnet", "conv5", "1of2", tmp_path / "shards", db)


def test_queries_get_answers_while_an_ingest_writes(tmp_path, synthetic_dir, monkeypatch):
    """Readers are let in between the ingest's short write sessions; they never see a torn state."""
    from n2vdb.errors import DatabaseBusy

    monkeypatch.setenv("N2VDB_BUSY_TIMEOUT", "1")
    db = tmp_path / "c.duckdb"
    api.add_dataset(synthetic_dir, "synthetic", db)
    command = ingest_command(db) + ["--batch-size", "8"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    counts, busy = [], 0
    while process.poll() is None:
        try:
            rows = api.sql("SELECT (SELECT count(*) FROM activations), (SELECT count(*) FROM filters),"
                           " (SELECT status FROM probes)", db).to_pylist()
            counts.append(tuple(rows[0].values()))
        except DatabaseBusy:
            busy += 1
        time.sleep(0.05)
    assert process.wait() == 0, process.stderr.read()
    seen = [c for c in counts if c[2] is not None]
    assert len(seen) >= 3, (counts, busy)
    activations = [c[0] for c in seen]
    assert activations == sorted(activations)  # only ever grows, batch by batch
    assert all(a % 8 == 0 or a == 80 for a in activations)  # whole batches only
    assert all(f in (0, 256) for _, f, _ in seen)  # thresholds appear all at once
    check(db)
