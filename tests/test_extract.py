"""Stage 1: stored activations against a direct forward pass, thresholds against numpy, resume, weights."""

import shutil
from dataclasses import replace
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from n2vdb import api
from n2vdb.data.broden import BrodenDataset
from n2vdb.errors import ModelError, WeightsUnavailable
from n2vdb.models import registry, weights
from n2vdb.probe import ProbeSpec, TrainSettings

from helpers import run_cli

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def direct_conv5(root: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Float conv5 activations computed here from scratch: whole image resized to 227, normalised."""
    torch.manual_seed(seed)
    net = torchvision.models.alexnet(weights=None).eval()
    dataset = BrodenDataset.open(root)
    batch = []
    for row in dataset.rows:
        img = Image.open(root / "images" / row.image).convert("RGB").resize((227, 227), Image.BILINEAR)
        batch.append((np.asarray(img, np.float32) / 255 - MEAN) / STD)
    x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
    with torch.no_grad():
        out = net.features[:12](x)  # through the ReLU after conv5
    return np.array([r.image_id for r in dataset.rows]), out.numpy()


@pytest.fixture(scope="module")
def direct(synthetic_dir):
    return direct_conv5(synthetic_dir)


def test_dequantised_activations_within_half_a_step(ingested_db, direct):
    ids, expected = direct
    got_ids, got = api.activations(1, ingested_db)
    assert np.array_equal(got_ids, ids)
    step = expected.reshape(*expected.shape[:2], -1).max(axis=2) / 255
    err = np.abs(got - expected).reshape(*expected.shape[:2], -1).max(axis=2)
    assert np.all(err <= step / 2 + 1e-6 * (1 + step))
    assert err.max() > 0  # it really is quantised


def test_thresholds_match_numpy_within_the_stated_bound(ingested_db, direct):
    _, expected = direct
    con = duckdb.connect(str(ingested_db), read_only=True)
    rows = con.execute("SELECT threshold, threshold_bound FROM filters WHERE probe_id = 1 ORDER BY filter").fetchall()
    thresholds, bounds = np.array(rows).T
    exact = np.quantile(expected.transpose(1, 0, 2, 3).reshape(expected.shape[1], -1).astype(np.float64), 0.995, axis=1)
    assert np.all(np.abs(thresholds - exact) <= bounds + 1e-7)
    assert np.all(bounds <= expected.max(axis=(0, 2, 3)) / 510 + 1e-7)


def test_sql_macro_reads_the_same_values(ingested_db):
    ids, acts = api.activations(1, ingested_db, image_ids=[3, 7])
    con = duckdb.connect(str(ingested_db), read_only=True)
    rows = con.execute(
        "SELECT a.image_id, f, p, activation(a.codes, a.scales, f, p, pr.height * pr.width)"
        " FROM activations a JOIN probes pr USING (probe_id), range(0, 256, 37) t(f), range(0, 169, 11) s(p)"
        " WHERE a.image_id IN (3, 7)"
    ).fetchall()
    assert len(rows) == 2 * 7 * 16
    for image_id, f, p, value in rows:
        assert value == pytest.approx(acts[list(ids).index(image_id), f].reshape(-1)[p], rel=1e-6, abs=1e-12)


def test_bytes_per_value(db_copy):
    """What the activations cost on disk, as DuckDB counts its blocks (dropping the table frees
    them), not as a formula: about 1 byte per value, the scales included (stored uncompressed, see
    store/connection.py; 1.05 at 4,000 images), plus at most one partly filled 256 KB block per
    column for each row group a write session checkpointed (at this size, a loaded machine's
    extraction commits in two sessions or more, and those blocks are a third of the table).
    Vacuum off, as n2vdb's own connections have it: else this checkpoint would also reclaim the
    space of other tables' replaced rows, and count it."""
    con = duckdb.connect(str(db_copy))
    con.execute("SET max_vacuum_tasks = 0")
    k, h, w = con.execute("SELECT n_filters, height, width FROM probes").fetchone()
    assert con.execute(
        "SELECT count(*) FILTER (WHERE octet_length(codes) <> ? OR len(scales) <> ?) FROM activations", [k * h * w, k]
    ).fetchone() == (0,)  # one uint8 code per value, one scale per (image, filter)
    values = con.execute("SELECT count(*) FROM activations").fetchone()[0] * k * h * w
    groups, columns = con.execute(
        "SELECT count(DISTINCT row_group_id), count(DISTINCT column_name) FROM pragma_storage_info('activations')"
    ).fetchone()
    used = lambda: con.execute("SELECT used_blocks, block_size FROM pragma_database_size()").fetchone()  # noqa: E731
    before, block = used()
    con.execute("DROP TABLE activations; CHECKPOINT")
    after, _ = used()
    con.close()
    assert 0 < (before - after) * block <= 1.05 * values + groups * columns * block


def test_resume_after_a_failure_gives_the_uninterrupted_result(tmp_path, synthetic_dir, ingested_db):
    broken = tmp_path / "synthetic"
    shutil.copytree(synthetic_dir, broken)
    victim = broken / "images" / "synth" / "000050.jpg"
    good = victim.read_bytes()
    victim.write_bytes(b"not a jpeg")
    db = tmp_path / "r.duckdb"
    api.add_dataset(broken, "synthetic", db)
    cmd = [
        "ingest",
        "alexnet",
        "conv5",
        "--weights",
        "random",
        "--dataset",
        "synthetic",
        "--workers",
        "0",
        "--batch-size",
        "16",
        "--epochs",
        "10",
        "--db",
        str(db),
    ]
    failed = run_cli(*cmd)
    assert failed.returncode == 1
    assert "000050.jpg cannot be decoded" in failed.stderr and "Traceback" not in failed.stderr
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(*) FROM activations").fetchone()[0] == 48  # three whole batches
    con.close()
    victim.write_bytes(good)
    resumed = run_cli(*cmd)
    assert resumed.returncode == 0, resumed.stderr
    mine = duckdb.connect(str(db), read_only=True)
    reference = duckdb.connect(str(ingested_db), read_only=True)
    for table, order in (
        ("activations", "image_id"),
        ("filters", "filter"),
        ("filter_concept_iou", "filter, concept_id, split"),
        ("embeddings", "concept_id, kind, n_filters"),
        ("image_concept_scores", "image_id, concept_id, method"),
    ):
        a = mine.execute(f"SELECT * EXCLUDE (probe_id) FROM {table} ORDER BY {order}").fetchall()
        b = reference.execute(f"SELECT * EXCLUDE (probe_id) FROM {table} ORDER BY {order}").fetchall()
        assert a == b, table
    assert mine.execute("SELECT count(*), count(DISTINCT image_id) FROM activations").fetchone() == (80, 80)
    mine.close()
    again = run_cli(*cmd, env={"N2VDB_QUIET": "0"})
    assert again.returncode == 0 and "already complete" in again.stderr


def test_variant_reuses_activations(db_copy):
    api.ingest(
        "alexnet",
        "conv5",
        db_copy,
        dataset="synthetic",
        weights="random",
        workers=0,
        quantile=0.99,
        iou_mode="netdissect",
        train=TrainSettings(epochs=1),
    )
    con = duckdb.connect(str(db_copy), read_only=True)
    assert con.execute("SELECT probe_id, source_probe_id, status FROM probes ORDER BY probe_id").fetchall() == [
        (1, None, "complete"),
        (2, 1, "complete"),
    ]
    assert con.execute("SELECT DISTINCT probe_id FROM activations").fetchall() == [(1,)]
    t1, t2 = (con.execute(f"SELECT avg(threshold) FROM filters WHERE probe_id = {p}").fetchone()[0] for p in (1, 2))
    assert t2 < t1


def test_every_setting_reaches_the_probe_key():
    base = ProbeSpec(
        model="alexnet",
        layer="conv5",
        module="features.11",
        relu=False,
        weights="random:seed=0",
        dataset_id=1,
        input_size=227,
        mean=(0.1, 0.2, 0.3),
        std=(1.0, 1.0, 1.0),
    )
    changes = dict(
        model="vgg16",
        layer="conv4",
        module="features.9",
        relu=True,
        weights="random:seed=1",
        dataset_id=2,
        input_size=224,
        mean=(0.0, 0.2, 0.3),
        std=(1.0, 2.0, 1.0),
        limit=10,
        quantile=0.99,
        iou_mode="netdissect",
        preprocess="caffe",
        train=TrainSettings(epochs=3),
        kind="tokens",
        layout="tokens:1:14x14",
        interpolation="bicubic",
    )
    assert set(changes) == {f for f in ProbeSpec.__dataclass_fields__}
    keys = {base.key}
    for field, value in changes.items():
        keys.add(replace(base, **{field: value}).key)
    assert len(keys) == len(changes) + 1
    for field in TrainSettings.__dataclass_fields__:
        value = getattr(TrainSettings(), field)
        if value is None:  # an optional setting (sufficiency_grid): any given value
            other = (1, 2)
        else:
            other = (not value) if isinstance(value, bool) else ("loglik" if isinstance(value, str) else value * 2 + 1)
        assert replace(base, train=TrainSettings(**{field: other})).key != base.key, field
    # analysis settings do not change what is extracted
    assert replace(base, quantile=0.9).extraction_key == base.extraction_key


def test_imagenet_weights_load_from_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    entry = torchvision.models.AlexNet_Weights.DEFAULT
    cached = weights.hub_checkpoint(entry.url)
    assert cached.parent == tmp_path / "hub" / "checkpoints"
    cached.parent.mkdir(parents=True)
    torch.manual_seed(123)
    saved = torchvision.models.alexnet(weights=None).state_dict()
    torch.save(saved, cached)
    loaded = weights.load("alexnet", "imagenet")
    assert torch.equal(loaded.net.state_dict()["features.10.weight"], saved["features.10.weight"])
    assert loaded.weights_id == f"imagenet:{entry}"


def test_missing_imagenet_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailable) as info:
        weights.load("alexnet", "imagenet")
    message = str(info.value)
    assert str(tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth") in message
    assert "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in message


def test_weights_file_places_style_and_wrong_architecture(tmp_path):
    places = torchvision.models.alexnet(weights=None, num_classes=365)
    path = tmp_path / "places.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in places.state_dict().items()}}, path)
    loaded = weights.load("alexnet", str(path))
    assert loaded.net.classifier[-1].out_features == 365
    assert loaded.weights_id.startswith("file:places.pth:sha256=")
    wrong = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), wrong)
    with pytest.raises(ModelError, match="do not fit AlexNet"):
        weights.load("alexnet", str(wrong))


@pytest.mark.parametrize(
    "args,message",
    [
        (["alexnett", "conv5"], "did you mean alexnet"),
        (["alexnet", "conv6"], "did you mean conv5"),
        (["alexnet", "conv5", "--weights", "/no/such/file.pth"], "expected imagenet, random or an existing"),
    ],
)
def test_unknown_model_layer_weights(tmp_path, args, message):
    result = run_cli("ingest", *args, "--db", tmp_path / "x.duckdb")
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_layer_registry():
    assert registry.resolve_layer("alexnet", "conv5").module == "features.11"
    assert registry.resolve_layer("vgg16", "conv5_3").module == "features.29"
    assert registry.resolve_layer("resnet18", "layer4.1.conv2").module == "layer4.1.conv2"
    shapes = {row["layer"]: row["output"] for row in registry.layer_table("alexnet")}
    assert shapes["conv5"] == "256x13x13"
    with torch.device("meta"):  # the modules without allocating (or initialising) their weights
        vgg16, alexnet = torchvision.models.vgg16(weights=None), torchvision.models.alexnet(weights=None)
    assert isinstance(vgg16.features[29], torch.nn.ReLU)
    assert all(isinstance(alexnet.get_submodule(p), torch.nn.ReLU) for p in registry.FRIENDLY["alexnet"].values())


def test_resnet18_layer4_end_to_end(tmp_path, synthetic_dir):
    db = tmp_path / "r.duckdb"
    api.add_dataset(synthetic_dir, "synthetic", db)
    result = run_cli(
        "ingest",
        "resnet18",
        "layer4",
        "--weights",
        "random",
        "--limit",
        "24",
        "--epochs",
        "1",
        "--workers",
        "0",
        "--db",
        db,
        env={"N2VDB_QUIET": "0"},
    )
    assert result.returncode == 0, result.stderr
    assert "probe 1: resnet18 layer4 done" in result.stderr
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT n_filters, height, width, status FROM probes").fetchall() == [(512, 7, 7, "complete")]
    assert con.execute("SELECT count(*) FROM activations").fetchone()[0] == 24


def test_probe_keys_of_earlier_releases_still_match():
    """A database made before preprocess/kind/layout/interpolation existed keeps its keys: the same
    command resumes or skips its probes. The literal is the key n2vdb 09c02e6 gave this spec."""
    spec = ProbeSpec(
        model="alexnet",
        layer="conv5",
        module="features.11",
        relu=True,
        weights="random:seed=0",
        dataset_id=1,
        input_size=227,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )
    assert spec.key == "b5c80559823321422c9a"
    assert ProbeSpec(**{**spec.__dict__, "preprocess": "caffe"}).key != spec.key
    assert ProbeSpec(**{**spec.__dict__, "kind": "tokens", "layout": "tokens:1:14x14"}).key != spec.key
