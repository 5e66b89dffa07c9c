"""`n2vdb ingest MODEL LAYER`: the whole pipeline for one probe, resumable stage by stage."""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from n2vdb import extract, timings, validate
from n2vdb import probe as probes
from n2vdb.data import importer
from n2vdb.data.broden import BrodenDataset
from n2vdb.data.synth import generate
from n2vdb.data.writing import os_errors
from n2vdb.embed import stage as embed_stage
from n2vdb.errors import UsageError
from n2vdb.models import registry
from n2vdb.models import weights as weights_mod
from n2vdb.models.device import pick_device
from n2vdb.progress import say
from n2vdb.resources import home
from n2vdb.stats import iou as iou_stage
from n2vdb.stats.thresholds import compute_thresholds
from n2vdb.store.connection import first, transaction
from n2vdb.store.sessions import Store

SYNTHETIC = "synthetic"


def ensure_synthetic(con: duckdb.DuckDBPyConnection, images: int = 300, size: int = 227, seed: int = 0) -> int:
    """Register the built-in concept set, generating it under N2VDB_HOME on first use."""
    found = importer.find_dataset(con, SYNTHETIC)
    if found:
        return found[0]
    root = home() / SYNTHETIC
    if not (root / "index.csv").exists():
        say(f"generating the built-in concept set ({images} images) in {root}")
        with os_errors("write the built-in concept set", root):
            generate(root, images=images, size=size, seed=seed)
    return importer.add_dataset(con, root, SYNTHETIC)


def default_dataset(con: duckdb.DuckDBPyConnection) -> str:
    """Broden when one is registered, else the built-in concept set."""
    for entry in importer.list_datasets(con):
        if entry["name"].startswith("broden"):
            return entry["name"]
    return SYNTHETIC


# Inputs below 16 px leave nothing of a CNN's deeper layers; above 2048 px one image's activations
# reach gigabytes. A model that needs more (or less) fails the layer check below with its reason.
INPUT_SIZES = (16, 2048)


@dataclass
class IngestOptions:
    dataset: str | None = None
    weights: str = "imagenet"
    seed: int = 0
    device: str = "auto"
    limit: int | None = None
    input_size: int | None = None
    quantile: float = 0.995
    iou_mode: str = "net2vec"
    preprocess: str | None = None  # None: the weights' own (torchvision's for torchvision weights)
    batch_size: int = 32
    workers: int | None = None
    train: probes.TrainSettings = probes.TrainSettings()

    def __post_init__(self) -> None:
        """Every setting is checked before anything is written (the Python API is a front door too)."""
        if self.dataset is not None and (not isinstance(self.dataset, str) or not self.dataset.strip()):
            raise UsageError("--dataset is empty; `n2vdb data list` shows the registered names")
        if not isinstance(self.weights, str) or not self.weights.strip():
            raise UsageError("--weights is empty; give imagenet, random or a state-dict file")
        validate.whole("--seed", self.seed, 0, 2**63 - 1)
        if self.limit is not None:
            validate.whole("--limit", self.limit, 1)
        if self.input_size is not None:  # 0 is refused, not taken for the default
            validate.whole("--input-size", self.input_size, *INPUT_SIZES)
        if isinstance(self.quantile, bool) or not isinstance(self.quantile, (int, float)) or not 0 < self.quantile < 1:
            raise UsageError(f"--quantile must lie strictly between 0 and 1 (0.995 = top 0.5%), got {self.quantile!r}")
        validate.choice("--iou-mode", self.iou_mode, iou_stage.MODES)
        if self.preprocess is not None:
            validate.choice("--preprocess", self.preprocess, extract.PREPROCESS)
        validate.whole("--batch-size", self.batch_size, 1)
        if self.workers is not None:
            validate.whole("--workers", self.workers, 0, 256)
        if not isinstance(self.train, probes.TrainSettings):
            raise UsageError("train= expects an n2vdb.probe.TrainSettings")


def make_spec(con: duckdb.DuckDBPyConnection, model: str, layer: str, options: IngestOptions) -> ProbeSpecAndData:
    if not isinstance(layer, str) or not layer.strip():
        raise UsageError(f"the layer name is empty; `n2vdb models {model}` lists the layers")
    pick_device(options.device)  # an unusable device fails before anything is written
    embed_stage.check_grid(options.train.sufficiency_grid)
    prep = registry.preprocessing(registry.check_model(model))
    size = options.input_size or prep.size
    layer_spec = registry.resolve_layer(model, layer, size)
    weights_id, mean, std = weights_mod.identify(model, options.weights, options.seed)
    preprocess = options.preprocess or "torchvision"  # every weights n2vdb loads are torchvision's
    if preprocess == "caffe":
        mean, std = extract.CAFFE_MEAN, extract.CAFFE_STD
    name = options.dataset or default_dataset(con)
    if options.dataset is None:
        say(f"dataset: {name} (pass --dataset to choose)")
    dataset_id = ensure_synthetic(con) if name == SYNTHETIC else importer.require_dataset(con, name)[0]
    path = importer.find_dataset(con, name)[1]
    dataset = BrodenDataset.open(path)
    importer.verify_unchanged(con, dataset_id, name, dataset)  # new, resumed, sharded or merged alike
    spec = probes.ProbeSpec(
        model=model,
        layer=layer,
        module=layer_spec.module,
        relu=layer_spec.relu,
        weights=weights_id,
        dataset_id=dataset_id,
        input_size=size,
        mean=tuple(mean),
        std=tuple(std),
        limit=options.limit,
        quantile=options.quantile,
        iou_mode=options.iou_mode,
        preprocess=preprocess,
        train=options.train,
        kind=layer_spec.layout.kind,
        layout=layer_spec.layout.encode(),
        interpolation=prep.interpolation,
    )
    return ProbeSpecAndData(spec, dataset)


@dataclass
class ProbeSpecAndData:
    spec: probes.ProbeSpec
    dataset: BrodenDataset


def ingest(store: Store, model: str, layer: str, options: IngestOptions | None = None) -> int:
    """Run (or resume) every stage of the probe; returns its probe_id. One ingest writes a database at a
    time; readers get in between its short write sessions (n2vdb.store.sessions)."""
    with store.exclusive_writer():
        return _ingest(store, model, layer, options or IngestOptions())


def _ingest(store: Store, model: str, layer: str, options: IngestOptions) -> int:
    with store.writing() as con:
        made = make_spec(con, model, layer, options)
        spec, dataset = made.spec, made.dataset
        # The probe row and the model load stand or fall together: bad weights leave no trace.
        with transaction(con):
            probe, created = probes.get_or_create(con, spec)
            net = None
            if probe.status == "extracting" and extract.remaining_rows(con, probe, spec, dataset):
                net = weights_mod.load(model, options.weights, options.seed, spec.input_size).net
    if probe.status == "complete":
        say(f"probe {probe.probe_id} is already complete; nothing to do")
        return probe.probe_id
    if not created:
        say(f"resuming probe {probe.probe_id} at stage {probe.status}")
    workers = extract.default_workers() if options.workers is None else options.workers
    if probe.status == "extracting":
        if net is not None:
            say(f"probe {probe.probe_id}: extracting activations")
            with timings.timed("extraction") as timing:
                extract.extract(store, probe, spec, dataset, net, options.device, options.batch_size, workers)
            timings.record(store, probe, timing)
        with store.reading() as con:
            probe = probes.load(con, probe.probe_id)
        say(f"probe {probe.probe_id}: thresholds")
        with timings.timed("thresholds") as timing:
            compute_thresholds(store, probe, spec.quantile)
        timings.record(store, probe, timing)
    if probe.status == "iou":
        with store.reading() as con:
            needs_thresholds = probe.source_probe_id is not None or not _has_thresholds(con, probe)
            probe = probes.load(con, probe.probe_id)
        if needs_thresholds:
            say(f"probe {probe.probe_id}: thresholds")
            with timings.timed("thresholds") as timing:
                compute_thresholds(store, probe, spec.quantile)
            timings.record(store, probe, timing)
        if spec.kind == "vector":  # no spatial extent: the segmentation stages do not apply
            say(f"probe {probe.probe_id}: a vector layer; single-filter IoU and segmentation do not apply")
            with store.writing() as con:
                probes.set_status(con, probe.probe_id, "embeddings")
            probe.status = "embeddings"
        else:
            say(f"probe {probe.probe_id}: single-filter IoU")
            with timings.timed("iou") as timing:
                iou_stage.run(store, probe, dataset, spec.iou_mode, workers, pick_device(options.device))
            timings.record(store, probe, timing, count_pairs=True)
    if probe.status == "embeddings":
        say(f"probe {probe.probe_id}: concept embeddings")
        embed_stage.run(
            store,
            probe,
            dataset,
            spec.train,
            workers,
            pick_device(options.device),
            segmentation=spec.kind != "vector",
        )
    return probe.probe_id


def _has_thresholds(con: duckdb.DuckDBPyConnection, probe: probes.Probe) -> bool:
    n = first(con.execute("SELECT count(*) FROM filters WHERE probe_id = ?", [probe.probe_id]))[0]
    return n == probe.n_filters
