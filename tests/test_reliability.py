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
