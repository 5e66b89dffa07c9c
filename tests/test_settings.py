"""Nonsense settings are refused by the library before anything is written; db check flags NaN results."""

import math

import duckdb
import pytest
import torch
import torchvision
from test_bad_input import fingerprint

from n2vdb import api
from n2vdb.errors import ModelError, UsageError
from n2vdb.ingest import IngestOptions
from n2vdb.models import registry
from n2vdb.probe import TrainSettings

from helpers import run_cli


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("epochs", 0, "epochs must be at least 1"),
        ("epochs", -3, "epochs must be at least 1"),
        ("epochs", 2.5, "epochs must be a whole number"),
        ("seg_batch", 0, "seg_batch must be at least 1"),
        ("cls_batch", -1, "cls_batch must be at least 1"),
        ("seg_lr", math.nan, "seg_lr must be a finite number above 0"),
        ("seg_lr", 0.0, "seg_lr must be a finite number above 0"),
        ("cls_lr", math.inf, "cls_lr must be a finite number above 0"),
        ("cls_lr", -0.1, "cls_lr must be a finite number above 0"),
        ("seg_loss", "log", "seg_loss 'log': choose one of paper, loglik"),
        ("seg_bias", "yes", "seg_bias must be true or false"),
        ("seed", -1, "seed must be between 0 and"),
        ("sufficiency", 1, "sufficiency must be true or false"),
    ],
)
def test_training_settings_are_checked(field, value, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")) as raised:
        TrainSettings(**{field: value})
    assert raised.value.param == field  # the Python name, for the CLI to translate


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("input_size", 0, "input_size must be between 16 and 2048, got 0"),  # not "the default"
        ("input_size", 1, "input_size must be between"),
        ("input_size", 100000, "input_size must be between"),
        ("batch_size", 0, "batch_size must be at least 1"),
        ("workers", -1, "workers must be between 0"),
        ("limit", 0, "limit must be at least 1"),
        ("quantile", math.nan, "quantile must lie strictly between 0 and 1"),
        ("quantile", 1.0, "quantile must lie strictly between 0 and 1"),
        ("iou_mode", "fast", "iou_mode 'fast': choose one of"),
        ("dataset", "", "dataset is empty"),
        ("weights", "", "weights is empty"),
        ("train", {"epochs": 3}, "TrainSettings"),
    ],
)
def test_ingest_options_are_checked(field, value, message):
    with pytest.raises(UsageError, match=message) as raised:
        IngestOptions(**{field: value})
    assert raised.value.param == (None if field == "train" else field)


@pytest.mark.parametrize(
    ("command", "settings"),
    [
        ("ingest", ("n2vdb.ingest:IngestOptions", "n2vdb.probe:TrainSettings")),
        ("formulas", ("n2vdb.formulas.stage:FormulaSettings",)),
        ("significance", ("n2vdb.significance.stage:SignificanceSettings",)),
    ],
)
def test_the_cli_defaults_are_the_librarys(command, settings):
    """Until each setting is declared once (issue 28), the CLI's copy of a default must be the
    library's: an API caller and a CLI user get the same probe for the same settings."""
    import dataclasses
    import importlib

    import typer

    from n2vdb import cli

    library = {}
    for spec in settings:
        module, name = spec.split(":")
        cls = getattr(importlib.import_module(module), name)
        cls()  # the defaults pass their own checks
        library.update({f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING})
    options = {p.name: p.default for p in typer.main.get_command(cli.app).commands[command].params}
    shared = sorted(set(options) & set(library))
    assert len(shared) >= 5
    assert {n: options[n] for n in shared} == {n: library[n] for n in shared}


@pytest.mark.parametrize(
    "model, layer, size", [("alexnet", "conv5", 227), ("alexnet", "conv2", 300), ("resnet18", "layer3", 160)]
)
def test_layer_check_gives_the_shape_a_real_forward_pass_gives(model, layer, size):
    spec = registry.resolve_layer(model, layer, size)  # the check every ingest makes before writing
    net = torchvision.models.get_model(model, weights=None).eval()
    seen = {}
    net.get_submodule(spec.module).register_forward_hook(lambda _m, _i, out: seen.update(shape=out.shape))
    with torch.no_grad():
        net(torch.zeros(1, 3, size, size))
    assert tuple(spec.shape) == tuple(seen["shape"][1:])


def test_a_layer_the_input_is_too_small_for_is_named():
    with pytest.raises(ModelError, match="alexnet does not run on 16 px input"):
        registry.resolve_layer("alexnet", "conv5", 16)


@pytest.mark.parametrize(
    "layer, options",
    [
        ("no_such_layer", {}),
        ("", {}),
        (" ", {}),
        ("conv5", {"input_size": 20}),
        ("conv5", {"train": TrainSettings(epochs=1)} | {"batch_size": 0}),
    ],
)
def test_nothing_is_written_before_a_setting_is_refused(db_copy, layer, options):
    before = fingerprint(db_copy)
    with pytest.raises(UsageError):
        api.ingest("alexnet", layer, db_copy, dataset="synthetic", weights="random", workers=0, **options)
    assert fingerprint(db_copy) == before
    assert api.probes(db_copy).num_rows == 1  # no orphan probe in 'extracting'


@pytest.mark.parametrize(
    "damage",
    [
        "UPDATE filters SET threshold = 'nan' WHERE filter = 0",
        "UPDATE filters SET max_value = 'inf' WHERE filter = 1",
        "UPDATE filter_concept_iou SET iou = 'nan' WHERE filter = 2",
        "UPDATE embeddings SET weights = list_transform(weights, lambda w: w / 0) WHERE concept_id = "
        "(SELECT min(concept_id) FROM embeddings)",
        "UPDATE embeddings SET bias = '-inf' WHERE concept_id = (SELECT min(concept_id) FROM embeddings)",
        "UPDATE embeddings SET val_score = 'nan' WHERE concept_id = (SELECT min(concept_id) FROM embeddings)",
        "UPDATE image_concept_scores SET score = 'nan' WHERE method = 'classification' AND image_id = "
        "(SELECT min(image_id) FROM image_concept_scores WHERE method = 'classification')",
        "UPDATE image_concept_scores SET iou = 'inf' WHERE method = 'best_filter' AND image_id = "
        "(SELECT min(image_id) FROM image_concept_scores WHERE method = 'best_filter')",
        "UPDATE activations SET scales = list_transform(scales, lambda s: s + 'inf'::FLOAT) WHERE image_id = 3",
    ],
)
def test_db_check_flags_nan_and_infinity(db_copy, damage):
    con = duckdb.connect(str(db_copy))
    changed = con.execute(damage).fetchone()[0]
    con.close()
    assert changed >= 1
    failed = {r["check_name"]: r["violations"] for r in api.db_check(db_copy).to_pylist() if r["violations"]}
    assert set(failed) - {"IoU rows whose iou disagrees with intersection / union"} == {
        "NaN or infinite stored numbers"
    }
    assert failed["NaN or infinite stored numbers"] == changed


def test_a_sound_database_has_no_nan(ingested_db):
    checks = {r["check_name"]: r["violations"] for r in api.db_check(ingested_db).to_pylist()}
    assert checks["NaN or infinite stored numbers"] == 0


def test_user_text_is_printed_as_typed(tmp_path, synthetic_dir):
    """A name that looks like rich markup is registered and echoed literally (it used to commit, then crash)."""

    db = tmp_path / "m.duckdb"
    result = run_cli("data", "add", synthetic_dir, "--name", "[/x]", "--db", db)
    assert result.returncode == 0, result.stderr
    assert "dataset '[/x]' registered" in result.stderr
    assert api.datasets(db).column("name").to_pylist() == ["[/x]"]
