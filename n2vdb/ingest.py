"""`n2vdb ingest MODEL LAYER`: the whole pipeline for one probe, resumable stage by stage."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace

import duckdb

from n2vdb import extract, pipeline, validate
from n2vdb import probe as probes
from n2vdb.data import importer
from n2vdb.data.broden import BrodenDataset
from n2vdb.data.synth import generate
from n2vdb.data.writing import os_errors
from n2vdb.embed import stage as embed_stage
from n2vdb.errors import N2vdbError, UsageError
from n2vdb.models import registry
from n2vdb.models import weights as weights_mod
from n2vdb.models.device import pick_device
from n2vdb.progress import say
from n2vdb.resources import home
from n2vdb.stats import iou as iou_stage
from n2vdb.store import db_path, read_connection, write_connection
from n2vdb.store.connection import transaction
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
            raise UsageError("dataset is empty; `n2vdb data list` shows the registered names", param="dataset")
        if not isinstance(self.weights, str) or not self.weights.strip():
            raise UsageError("weights is empty; give imagenet, random or a state-dict file", param="weights")
        validate.whole("seed", self.seed, 0, 2**63 - 1)
        if self.limit is not None:
            validate.whole("limit", self.limit, 1)
        if self.input_size is not None:  # 0 is refused, not taken for the default
            validate.whole("input_size", self.input_size, *INPUT_SIZES)
        if isinstance(self.quantile, bool) or not isinstance(self.quantile, (int, float)) or not 0 < self.quantile < 1:
            raise UsageError(
                f"quantile must lie strictly between 0 and 1 (0.995 = top 0.5%), got {self.quantile!r}",
                param="quantile",
            )
        validate.choice("iou_mode", self.iou_mode, iou_stage.MODES)
        if self.preprocess is not None:
            validate.choice("preprocess", self.preprocess, extract.PREPROCESS)
        validate.whole("batch_size", self.batch_size, 1)
        if self.workers is not None:
            validate.whole("workers", self.workers, 0, 256)
        if not isinstance(self.train, probes.TrainSettings):
            raise UsageError("train= expects an n2vdb.probe.TrainSettings")


@dataclass(frozen=True)
class LayerChoice:
    """What the model and layer resolve to, before any dataset is looked at."""

    layer_spec: registry.LayerSpec
    interpolation: str
    size: int
    weights_id: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    preprocess: str


def choose_layer(model: str, layer: str, options: IngestOptions) -> LayerChoice:
    """Check the model, layer, device, weights and grid; reads and writes nothing of the database, so
    bad input fails before a dataset is generated or registered."""
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
    return LayerChoice(layer_spec, prep.interpolation, size, weights_id, tuple(mean), tuple(std), preprocess)


def prepare_dataset(con: duckdb.DuckDBPyConnection, options: IngestOptions) -> IngestOptions:
    """The ingest's writes before its spec: the default dataset chosen, and the built-in set generated
    and registered on first use. Returns OPTIONS naming the dataset."""
    name = _dataset_name(con, options)
    if name == SYNTHETIC:
        ensure_synthetic(con)
    return replace(options, dataset=name)


def _dataset_name(con: duckdb.DuckDBPyConnection, options: IngestOptions) -> str:
    if options.dataset is not None:
        return options.dataset
    name = default_dataset(con)
    say(f"dataset: {name} (pass --dataset to choose)")
    return name


def prepare_database(db: str | os.PathLike | None, options: IngestOptions, wait_s: float) -> IngestOptions:
    """prepare_dataset for processes that only read the database (shards): creates and upgrades it and
    registers the dataset unless that is done. Shards started together (torchrun) all call it; the
    first takes the write lock and does the work, the others wait up to WAIT_S for the lock and find
    it done. Returns OPTIONS naming the dataset."""
    path = db_path(db)
    if path.exists():
        with contextlib.suppress(N2vdbError):  # busy, or behind on migrations: the writer below sees to it
            with read_connection(path, wait_s=wait_s) as con:
                if importer.find_dataset(con, options.dataset or default_dataset(con)):
                    return replace(options, dataset=_dataset_name(con, options))
    with write_connection(path, wait_s=wait_s) as con:
        return prepare_dataset(con, options)


def make_spec(
    con: duckdb.DuckDBPyConnection,
    model: str,
    layer: str,
    options: IngestOptions,
    choice: LayerChoice | None = None,
) -> ProbeSpecAndData:
    """The probe OPTIONS ask for, and its dataset; only reads (prepare_dataset writes what it needs
    first). CHOICE: choose_layer's answer, where the caller has it already."""
    choice = choice or choose_layer(model, layer, options)
    name = _dataset_name(con, options)
    dataset_id, path = importer.require_dataset(con, name)
    dataset = BrodenDataset.open(path)
    importer.verify_unchanged(con, dataset_id, name, dataset)  # new, resumed, sharded or merged alike
    spec = probes.ProbeSpec(
        model=model,
        layer=layer,
        module=choice.layer_spec.module,
        relu=choice.layer_spec.relu,
        weights=choice.weights_id,
        dataset_id=dataset_id,
        input_size=choice.size,
        mean=choice.mean,
        std=choice.std,
        limit=options.limit,
        quantile=options.quantile,
        iou_mode=options.iou_mode,
        preprocess=choice.preprocess,
        train=options.train,
        kind=choice.layer_spec.layout.kind,
        layout=choice.layer_spec.layout.encode(),
        interpolation=choice.interpolation,
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
    choice = choose_layer(model, layer, options)
    with store.writing() as con:
        options = prepare_dataset(con, options)
        made = make_spec(con, model, layer, options, choice)
        workers = extract.default_workers() if options.workers is None else options.workers
        # The probe row and what its stages load (the model) stand or fall together: bad weights leave no trace.
        with transaction(con):
            probe, created = pipeline.find_or_create(con, made.spec)
            run = pipeline.StageRun(store, probe, made.spec, made.dataset, options, workers)
            work = pipeline.prepare(con, run)
    if probe.status == pipeline.COMPLETE:
        say(f"probe {probe.probe_id} is already complete; nothing to do")
        return probe.probe_id
    if not created:
        say(f"resuming probe {probe.probe_id} at stage {probe.status}")
    pipeline.run_all(run, work)
    return probe.probe_id
