"""Crash and resume: SIGKILL at several points of an ingest, then finish; nothing lost or duplicated."""

import os
import signal
import subprocess
import sys
import time

import duckdb
import pytest

from n2vdb import api
from n2vdb.errors import UsageError
from n2vdb.probe import TrainSettings

from helpers import run_cli

TABLES = (
    ("activations", "image_id"),
    ("filters", "filter"),
    ("filter_concept_iou", "filter, concept_id, split"),
    ("embeddings", "concept_id, kind, n_filters"),
    ("image_concept_scores", "image_id, concept_id, method"),
)


def ingest_command(db):
    return [
        sys.executable,
        "-m",
        "n2vdb",
        "ingest",
        "alexnet",
        "conv5",
        "--weights",
        "random",
        "--dataset",
        "synthetic",
        "--workers",
        "0",
        "--epochs",
        "10",
        "--db",
        str(db),
    ]


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


@pytest.mark.parametrize(
    "points",
    [
        [("extracting activations", 0.5), ("single-filter IoU", 0.1), ("concept embeddings", 0.8)],
        [("thresholds", 0.0), ("concept embeddings", 0.2)],
    ],
)
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, synthetic_dir, ingested_db, points):
    db = tmp_path / "k.duckdb"
    api.add_dataset(synthetic_dir, "synthetic", db)
    for trigger, delay in points:
        kill_when(db, trigger, delay)
        check(db)  # a killed ingest leaves a consistent database (the WAL replays on open)
    finished = run_cli(*ingest_command(db)[3:])  # the resume itself needs no process of its own
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
    # the table has no key (migrations/0012): two copies of one stored row are caught by the check
    con.execute(
        "INSERT INTO image_concept_scores SELECT * FROM image_concept_scores "
        "WHERE method = 'best_filter' ORDER BY image_id, concept_id LIMIT 2"
    )
    con.close()
    checks = {r["check_name"]: r["violations"] for r in api.db_check(db_copy).to_pylist()}
    failed = {name for name, n in checks.items() if n}
    assert failed == {
        "probes past thresholds without one threshold per filter",
        "IoU, embedding or score rows of unknown probes, filters or concepts",
        "per-image scores stored twice (the same probe, image, concept and method)",
    }
    assert checks["per-image scores stored twice (the same probe, image, concept and method)"] == 2
    result = run_cli("db", "check", "--db", db_copy)
    assert result.returncode == 1 and "3 integrity check(s) failed" in result.stderr


def test_two_shards_under_torchrun_merge_into_the_unsharded_result(tmp_path, synthetic_dir, ingested_db):
    """The README's torchrun example, on CPU: thresholds, IoUs and every other table equal a single run's."""
    db = tmp_path / "s.duckdb"
    shards = tmp_path / "shards"
    api.add_dataset(synthetic_dir, "synthetic", db)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "n2vdb"]
    args = [*ingest_command(db)[3:], "--shard", "auto", "--shard-dir", str(shards)]  # the unsharded run's, sharded
    result = subprocess.run(torchrun + args, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    parts = sorted(p.parent.name for p in shards.glob("probe-*/shard-*/part-*.parquet"))
    assert parts.count("shard-0-of-2") == parts.count("shard-1-of-2") == 2  # 40 images each, batches of 32
    # the shard files are plain Parquet: DuckDB reads them without n2vdb
    con = duckdb.connect()
    ids = con.execute(
        f"SELECT list(image_id ORDER BY image_id) FROM read_parquet('{shards}/*/*/*.parquet')"
    ).fetchone()[0]
    assert ids == list(range(80))
    con.close()
    merged = run_cli("merge", shards, "--db", db)
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
    api.ingest_shard(
        "alexnet", "conv5", "0/2", tmp_path / "shards", db, dataset="synthetic", weights="random", workers=0, limit=8
    )
    result = run_cli("merge", tmp_path / "shards", "--db", db)
    assert result.returncode == 1 and "shard 1/2 is not finished" in result.stderr
    assert api.probes(db).num_rows == 0
    with pytest.raises(UsageError, match="expected i/N"):
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
            rows = api.sql(
                "SELECT (SELECT count(*) FROM activations), (SELECT count(*) FROM filters),"
                " (SELECT status FROM probes)",
                db,
            ).to_pylist()
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


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory, synthetic_dir):
    """A database with the dataset registered and two finished shards of an 8-image probe."""
    root = tmp_path_factory.mktemp("shards")
    db = root / "s.duckdb"
    api.add_dataset(synthetic_dir, "synthetic", db)
    for shard in ("0/2", "1/2"):
        api.ingest_shard(
            "alexnet",
            "conv5",
            shard,
            root / "shards",
            db,
            dataset="synthetic",
            weights="random",
            workers=0,
            limit=8,
            batch_size=2,
            train=TrainSettings(epochs=1),
        )
    return db, root / "shards"


def _rewrite_first_part(shards, change):
    import pyarrow.parquet as pq

    part = sorted(shards.glob("probe-*/shard-0-of-2/part-*.parquet"))[0]
    pq.write_table(change(pq.read_table(part)), part)


def _edit_column(name, edit):
    import pyarrow as pa

    def change(table):
        column = pa.array([edit(v) for v in table.column(name).to_pylist()], table.schema.field(name).type)
        return table.set_column(table.schema.get_field_index(name), name, column)

    return change


def _move_a_part(shards):
    part = sorted(shards.glob("probe-*/shard-0-of-2/part-*.parquet"))[0]
    part.rename(part.parent.parent / "shard-1-of-2" / "part-99999999.parquet")


def _stale_shard(shards):
    stale = next(shards.glob("probe-*")) / "shard-0-of-3"
    stale.mkdir()
    (stale / "done").write_text("3\n")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s: _rewrite_first_part(s, _edit_column("codes", lambda b: b[:-1])), "do not hold a 256x13x13 layer"),
        (lambda s: _rewrite_first_part(s, _edit_column("scales", lambda v: v[:-1])), "do not hold a 256x13x13 layer"),
        (
            lambda s: _rewrite_first_part(s, _edit_column("image_id", lambda i: i + 100000)),
            "name images this probe does not",
        ),
        (
            lambda s: _rewrite_first_part(s, _edit_column("image_id", lambda i: i + 10)),
            "name images this probe does not",
        ),
        (
            lambda s: _rewrite_first_part(s, lambda t: t.rename_columns(["image", "scales", "codes", "pooled"])),
            "does not have the columns n2vdb writes",
        ),
        (
            lambda s: sorted(s.glob("probe-*/shard-1-of-2/part-*.parquet"))[0].write_bytes(b"not parquet"),
            "is not a readable Parquet file",
        ),
        (_move_a_part, "sit in a shard that does not own their image"),
        (
            lambda s: sorted(s.glob("probe-*/shard-1-of-2/part-*.parquet"))[0].unlink(),
            "the parts hold 6 of the probe's 8",
        ),
        (_stale_shard, "holds shards of another run (shard-0-of-3"),
        (
            lambda s: (next(s.glob("probe-*")) / "spec.json").write_text('{"shards": 2}'),
            "is not a shard spec n2vdb wrote",
        ),
    ],
)
def test_merge_checks_every_part_before_writing(tmp_path, two_shards, damage, message):
    import shutil

    from test_bad_input import fingerprint

    db, shards = tmp_path / "s.duckdb", tmp_path / "shards"
    shutil.copy(two_shards[0], db)
    shutil.copytree(two_shards[1], shards)
    damage(shards)
    before = fingerprint(db)
    result = run_cli("merge", shards, "--db", db)
    assert result.returncode == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert fingerprint(db) == before


def test_undamaged_shards_merge(tmp_path, two_shards):
    import shutil

    db, shards = tmp_path / "s.duckdb", tmp_path / "shards"
    shutil.copy(two_shards[0], db)
    shutil.copytree(two_shards[1], shards)
    assert api.merge(shards, db) == [1]
    check(db)


def test_the_writer_lock_holds_through_a_symlinked_db(tmp_path, synthetic_dir):
    """The lock is keyed by the file, not by the path typed: a second writer through a symlink is refused."""
    from n2vdb.errors import DatabaseBusy
    from n2vdb.store.sessions import Store

    db = tmp_path / "real" / "n2v.duckdb"
    db.parent.mkdir()
    api.add_dataset(synthetic_dir, "synthetic", db)
    link = tmp_path / "link.duckdb"
    link.symlink_to(db)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time\nfrom n2vdb.store.sessions import Store\n"
                f"with Store({str(db)!r}).exclusive_writer():\n    print('ready', flush=True)\n    time.sleep(30)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        for path in (link, db):
            with pytest.raises(DatabaseBusy, match=f"being written by PID {holder.pid}"):
                with Store(path).exclusive_writer():
                    pass
        result = subprocess.run(ingest_command(link), capture_output=True, text=True)
        assert result.returncode == 1 and f"being written by PID {holder.pid}" in result.stderr, result.stderr
    finally:
        holder.kill()
        holder.wait()
    with Store(link).exclusive_writer():  # free again once the holder is gone
        pass


def test_a_foreign_duckdb_file_gets_no_n2vdb_tables(tmp_path, synthetic_dir):
    from test_bad_input import fingerprint

    db = tmp_path / "other.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE sales (id INTEGER, amount DOUBLE); INSERT INTO sales VALUES (1, 2.5)")
    con.close()
    before = fingerprint(db)
    for argv, message in [
        (["data", "add", str(synthetic_dir), "--name", "s"], "not an n2vdb database (it holds sales)"),
        (["sql", "--write", "SELECT 1"], "db upgrade --adopt"),
        (["db", "upgrade"], "db upgrade --adopt"),
        (["probes"], "not an n2vdb database (it holds sales): pass the --db of an n2vdb database"),
    ]:
        result = run_cli(*argv, "--db", db)
        assert result.returncode == 1 and message in result.stderr, result.stderr
        assert fingerprint(db) == before
    adopted = run_cli("db", "upgrade", "--adopt", "--db", db)
    assert adopted.returncode == 0 and "applied 0001_init" in adopted.stderr, adopted.stderr
    api.add_dataset(synthetic_dir, "s", db)  # now it is n2vdb's too, and the other table is untouched
    assert api.sql("SELECT * FROM sales", db).to_pylist() == [{"id": 1, "amount": 2.5}]
    assert api.datasets(db).num_rows == 1


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_ingest_says_how_to_resume_and_stops_its_workers(tmp_path, synthetic_dir, sig, code):
    db = tmp_path / "i.duckdb"
    api.add_dataset(synthetic_dir, "synthetic", db)
    command = [a if a != "0" else "2" for a in ingest_command(db)] + ["--batch-size", "4"]  # 2 DataLoader workers
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, env={**os.environ, "N2VDB_QUIET": "0"}, start_new_session=True
    )
    for line in process.stderr:
        if "extracting activations" in line:
            break
    time.sleep(1.0)
    if sig == signal.SIGINT:
        os.killpg(process.pid, sig)  # as Ctrl-C in a terminal: the whole process group
    else:
        process.send_signal(sig)  # as `kill`: the main process only
    sent = time.monotonic()
    rest = process.stderr.read()  # EOF once every process holding stderr (workers too) has gone
    process.wait()
    elapsed = time.monotonic() - sent
    assert process.returncode == code, rest
    assert rest.strip().splitlines()[-1] == "interrupted; run the same command again to resume", rest
    assert "Traceback" not in rest
    assert elapsed < 4.0, elapsed
    check(db)
    again = run_cli(*command[3:])  # the resume needs no process of its own
    assert again.returncode == 0, again.stderr
    check(db)
