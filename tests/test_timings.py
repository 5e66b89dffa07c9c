"""Stage timings as data: every stage of a probe records seconds, images, pairs and peak RSS."""

import duckdb

from n2vdb import api
from n2vdb.data.broden import BrodenDataset

from helpers import run_cli


def test_every_stage_records_its_timing(tmp_path, synthetic_dir):
    db = tmp_path / "t.duckdb"
    api.add_dataset(synthetic_dir, "synthetic", db)
    from n2vdb.probe import TrainSettings

    probe_id = api.ingest(
        "alexnet",
        "conv5",
        db,
        dataset="synthetic",
        weights="random",
        limit=16,
        workers=0,
        train=TrainSettings(epochs=1),
    )
    con = duckdb.connect(str(db), read_only=True)
    rows = {
        r[0]: r[1:]
        for r in con.execute(
            "SELECT stage, seconds, images, pairs, peak_rss_mb FROM stage_timings WHERE probe_id = ?", [probe_id]
        ).fetchall()
    }
    assert set(rows) == {"extraction", "thresholds", "iou", "segmentation", "classification"}
    assert all(seconds > 0 and images == 16 and rss > 50 for seconds, images, _, rss in rows.values())
    # pairs, brute force from the dataset's own masks
    ds = BrodenDataset.open(synthetic_dir)
    levels = ds.concept_levels()
    all_pairs = train_pixel_pairs = 0
    for row in ds.rows[:16]:
        ids, _ = ds.masks(row)
        all_pairs += len(ids)
        train_pixel_pairs += sum(levels[int(i)] == "pixel" for i in ids) if row.split == "train" else 0
    assert rows["iou"][2] == all_pairs
    assert rows["segmentation"][2] == train_pixel_pairs
    # classification: each concept's balanced train sample, twice its minority, every epoch's size
    train_images = {row.image_id for row in ds.rows[:16] if row.split == "train"}
    positives: dict[int, set[int]] = {}
    for image_id, concept_id in con.execute(
        "SELECT image_id, concept_id FROM image_concepts WHERE image_id IN (SELECT image_id FROM activations"
        " WHERE probe_id = ?) AND dataset_id = (SELECT dataset_id FROM probes WHERE probe_id = ?)",
        [probe_id, probe_id],
    ).fetchall():
        if image_id in train_images:
            positives.setdefault(concept_id, set()).add(image_id)
    n = len(train_images)
    assert rows["classification"][2] == sum(2 * min(len(p), n - len(p)) for p in positives.values()) > 0
    table = api.query("stage-timings", db, probe=probe_id).to_pylist()
    assert [r["stage"] for r in table] == ["extraction", "thresholds", "iou", "segmentation", "classification"]
    listed = [r for r in api.probes(db).to_pylist() if r["probe_id"] == probe_id][0]
    assert "segmentation" in listed["stage_seconds"] and "extraction" in listed["stage_seconds"]


def test_ingest_summary_prints_the_stages(tmp_path, synthetic_dir):
    db = tmp_path / "c.duckdb"
    api.add_dataset(synthetic_dir, "synthetic", db)
    result = run_cli(
        "ingest",
        "alexnet",
        "conv5",
        "--dataset",
        "synthetic",
        "--weights",
        "random",
        "--limit",
        "12",
        "--epochs",
        "1",
        "--workers",
        "0",
        "--db",
        db,
    )
    assert result.returncode == 0, result.stderr
    line = [l for l in result.stderr.splitlines() if l.startswith("stages: ")][0]
    for stage in ("extraction", "thresholds", "iou", "segmentation", "classification"):
        assert f"{stage} " in line
    assert "ms/image" in line and "peak RSS" in line
