"""Probes: one (model, weights, layer, dataset, input size, settings) combination and its lifecycle.

A probe's key hashes every input that changes its results; running the same ingest again finds the
probe and resumes it. Probes that differ only in analysis settings (quantile, IoU mode, training)
share one extraction: the later one points at the first through source_probe_id.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import duckdb

from n2vdb import provenance, validate
from n2vdb.errors import NotFound
from n2vdb.store.connection import first

SEG_LOSSES = ("paper", "loglik")


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 30
    seg_lr: float = 1e-4
    seg_batch: int = 16
    seg_loss: str = "paper"  # 'paper' (no logarithm, as the reference code) | 'loglik'
    seg_bias: bool = False
    cls_lr: float = 0.1
    cls_batch: int = 64
    seed: int = 0
    sufficiency: bool = False
    sufficiency_grid: tuple[int, ...] | None = None  # None: the reference's grids (embed/stage.py)

    def __post_init__(self) -> None:
        # Refused here, not in the CLI: a zero batch or a NaN rate would store NaN weights marked complete.
        validate.whole("epochs", self.epochs, 1)
        validate.positive("seg_lr", self.seg_lr)
        validate.whole("seg_batch", self.seg_batch, 1)
        validate.choice("seg_loss", self.seg_loss, SEG_LOSSES)
        validate.flag("seg_bias", self.seg_bias)
        validate.positive("cls_lr", self.cls_lr)
        validate.whole("cls_batch", self.cls_batch, 1)
        validate.whole("seed", self.seed, 0, 2**63 - 1)
        validate.flag("sufficiency", self.sufficiency)


@dataclass(frozen=True)
class ProbeSpec:
    model: str
    layer: str  # friendly name or dotted path, as typed
    module: str  # resolved dotted module path
    relu: bool
    weights: str  # resolved id: imagenet:..., random:seed=N, file:NAME:sha256=...
    dataset_id: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    limit: int | None = None
    quantile: float = 0.995
    iou_mode: str = "net2vec"  # 'net2vec' (threshold, upsample) | 'netdissect' (upsample, threshold)
    # 'torchvision': (pixel / 255 - mean) / std; 'caffe': (pixel - mean) / std on 0..255 (NetDissect-Lite)
    preprocess: str = "torchvision"
    train: TrainSettings = field(default_factory=TrainSettings)
    # What the layer puts out (n2vdb.models.layers): kind 'map' | 'tokens' | 'vector' (a vector has no
    # segmentation stages), and how it reads as [K, H, W]: nchw | nhwc | tokens:PREFIX:GHxGW | vector.
    kind: str = "map"
    layout: str = "nchw"
    interpolation: str = "bilinear"  # the resize filter the weights' preprocessing names

    def extraction_settings(self) -> dict:
        return {k: v for k, v in self.settings().items() if k not in ("quantile", "iou_mode", "train")}

    def settings(self) -> dict:
        data = asdict(self)
        if data["train"]["sufficiency_grid"] is None:
            del data["train"]["sufficiency_grid"]  # keeps the keys of probes made before the option
        else:
            data["train"]["sufficiency_grid"] = list(data["train"]["sufficiency_grid"])
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @property
    def extraction_key(self) -> str:
        return _digest(self.extraction_settings())

    @property
    def key(self) -> str:
        return _digest(self.settings())


# Settings added after probes were first stored, at the value every earlier probe had. They are left
# out of the key at that value, so the same command after an upgrade still finds (resumes, or skips)
# the probes a database already holds; any other value is part of the key.
_LATER_DEFAULTS = {"preprocess": "torchvision", "kind": "map", "layout": "nchw", "interpolation": "bilinear"}


def _digest(data: dict) -> str:
    keyed = {k: v for k, v in data.items() if k not in _LATER_DEFAULTS or v != _LATER_DEFAULTS[k]}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class Probe:
    probe_id: int
    status: str
    source_probe_id: int | None
    n_filters: int | None
    height: int | None
    width: int | None
    dataset_id: int

    @property
    def activation_probe(self) -> int:
        """The probe whose activations rows this probe reads."""
        return self.source_probe_id or self.probe_id


def get_or_create(
    con: duckdb.DuckDBPyConnection, spec: ProbeSpec, order: Sequence[str], variant_start: str
) -> tuple[Probe, bool]:
    """(probe, created). ORDER: the statuses in pipeline order (n2vdb.pipeline.find_or_create). A new
    probe starts at ORDER[0], or shares the finished extraction of a probe with the same extraction
    key (one at VARIANT_START or later) and starts at VARIANT_START."""
    found = load_by_key(con, spec.key)
    if found:
        return found, False
    source = None
    for probe_id, settings, status in con.execute(
        "SELECT probe_id, settings, status FROM probes WHERE dataset_id = ? AND source_probe_id IS NULL",
        [spec.dataset_id],
    ).fetchall():
        stored = json.loads(settings)
        if (
            order.index(status) >= order.index(variant_start)
            and _digest({k: v for k, v in stored.items() if k not in ("quantile", "iou_mode", "train")})
            == spec.extraction_key
        ):
            source = probe_id
            break
    status = order[0] if source is None else variant_start
    probe_id = first(
        con.execute(
            "INSERT INTO probes (probe_key, model, weights, layer, dataset_id, source_probe_id, settings, status,"
            " provenance) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING probe_id",
            [
                spec.key,
                spec.model,
                spec.weights,
                spec.layer,
                spec.dataset_id,
                source,
                json.dumps(spec.settings()),
                status,
                provenance.as_json(),
            ],
        )
    )[0]
    if source is not None:
        con.execute(
            "UPDATE probes SET n_filters = s.n_filters, height = s.height, width = s.width"
            " FROM probes s WHERE s.probe_id = ? AND probes.probe_id = ?",
            [source, probe_id],
        )
    return load(con, probe_id), True


def _from_row(row) -> Probe:
    return Probe(*row)


_COLUMNS = "probe_id, status, source_probe_id, n_filters, height, width, dataset_id"


def load_by_key(con: duckdb.DuckDBPyConnection, key: str) -> Probe | None:
    row = first(con.execute(f"SELECT {_COLUMNS} FROM probes WHERE probe_key = ?", [key]))
    return _from_row(row) if row else None


def load(con: duckdb.DuckDBPyConnection, probe_id: int) -> Probe:
    row = first(con.execute(f"SELECT {_COLUMNS} FROM probes WHERE probe_id = ?", [probe_id]))
    if not row:
        raise NotFound(f"no probe {probe_id} (`n2vdb probes` lists them)")
    return _from_row(row)


def set_status(con: duckdb.DuckDBPyConnection, probe_id: int, status: str) -> None:
    con.execute(
        "UPDATE probes SET status = ?, finished_at = CASE WHEN ? = 'complete' THEN current_timestamp END"
        " WHERE probe_id = ?",
        [status, status, probe_id],
    )


def has_thresholds(con: duckdb.DuckDBPyConnection, probe: Probe) -> bool:
    """Whether every filter of PROBE has its threshold stored (table filters)."""
    n = first(con.execute("SELECT count(*) FROM filters WHERE probe_id = ?", [probe.probe_id]))[0]
    return bool(probe.n_filters) and n == probe.n_filters


def count(con: duckdb.DuckDBPyConnection) -> int:
    """How many probes the database holds, at any stage."""
    return first(con.execute("SELECT count(*) FROM probes"))[0]


def latest(con: duckdb.DuckDBPyConnection, complete_only: bool = True) -> int:
    where = "WHERE status = 'complete'" if complete_only else ""
    row = first(con.execute(f"SELECT max(probe_id) FROM probes {where}"))
    if not row or row[0] is None:
        raise NotFound("no finished probe in this database: run `n2vdb ingest MODEL LAYER` first")
    return row[0]


def list_probes(con: duckdb.DuckDBPyConnection) -> list[dict]:
    cur = con.execute(
        "SELECT p.probe_id, p.model, p.layer, p.weights, d.name AS dataset, p.n_filters,"
        " p.height || 'x' || p.width AS map, p.status, p.settings->>'quantile' AS quantile,"
        " p.settings->>'iou_mode' AS iou_mode, p.source_probe_id, p.created_at,"
        " (SELECT string_agg(t.stage || ' ' || round(t.seconds, 1) || ' s', ', ' ORDER BY t.recorded_at)"
        "  FROM stage_timings t WHERE t.probe_id = p.probe_id) AS stage_seconds"
        " FROM probes p JOIN datasets d USING (dataset_id) ORDER BY p.probe_id"
    )
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]
