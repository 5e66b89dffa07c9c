"""The formulas of a probe: masks streamed from the store and the dataset into a spill, the beam
search over it (search.py), and its rows (migrations/0013) written in one transaction.

A run is keyed by its settings: the same settings on the same probe find the stored run (nothing to
do), other settings make a run beside it. Nothing is written until the search is done, so a killed
run leaves no rows and runs again from the start.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import partial

import duckdb
import numpy as np
import pyarrow as pa
import torch

from n2vdb import activations as acts_store
from n2vdb import timings, validate
from n2vdb.data import pool
from n2vdb.data.broden import BrodenDataset, ImageRow
from n2vdb.errors import UsageError
from n2vdb.formulas import masks as fmasks
from n2vdb.formulas import search
from n2vdb.formulas.kernel import OPS
from n2vdb.probe import Probe
from n2vdb.progress import progress_bar, say
from n2vdb.stats import netdissect
from n2vdb.store import writer
from n2vdb.store.connection import first, transaction
from n2vdb.store.sessions import Store

SPLITS = ("all", "train")
CHUNK_IMAGES = 128  # images per chunk of the spill: a pass holds one chunk


@dataclass(frozen=True)
class FormulaSettings:
    beam_size: int = 5  # compexp's BEAM_SIZE
    max_length: int = 3  # compexp's MAX_FORMULA_LENGTH: labels in a formula
    penalty: float = 1.0  # compexp's FORMULA_COMPLEXITY_PENALTY
    categories: tuple[str, ...] | None = None  # None: every category of the dataset
    split: str = "all"  # 'all': every image, as compexp; 'train': search train, report val

    def __post_init__(self) -> None:
        validate.whole("beam_size", self.beam_size, 1, 1000)
        validate.whole("max_length", self.max_length, 1, 10)
        validate.positive("penalty", self.penalty)
        validate.choice("split", self.split, SPLITS)
        if self.categories is not None and (
            isinstance(self.categories, str) or not all(isinstance(c, str) for c in self.categories)
        ):
            raise UsageError("categories must be a list of category names", param="categories")

    def resolved(self, dataset: BrodenDataset) -> FormulaSettings:
        """These settings with the categories named (the dataset's, in its order, where None)."""
        if self.categories is None:
            return FormulaSettings(self.beam_size, self.max_length, self.penalty, tuple(dataset.categories), self.split)
        unknown = [c for c in self.categories if c not in dataset.categories]
        if unknown or not self.categories:
            raise UsageError(
                f"categories names {unknown[0]!r}, which is no category of the dataset ({', '.join(dataset.categories)})"
                if unknown
                else "categories is empty: name at least one",
                param="categories",
            )
        return FormulaSettings(
            self.beam_size, self.max_length, self.penalty, tuple(dict.fromkeys(self.categories)), self.split
        )

    @property
    def key(self) -> str:
        data = asdict(self)
        data["categories"] = list(data["categories"] or [])
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:20]


def check_probe(con: duckdb.DuckDBPyConnection, probe: Probe) -> None:
    """Refuse a probe whose units have no masks to explain yet (no thresholds), or ever (a vector)."""
    from n2vdb.probe import has_thresholds

    if not has_thresholds(con, probe):
        raise UsageError(f"probe {probe.probe_id} has no thresholds yet; finish its ingest first")
    kind = first(con.execute("SELECT settings->>'kind' FROM probes WHERE probe_id = ?", [probe.probe_id]))[0]
    if kind == "vector":
        raise UsageError(f"probe {probe.probe_id} is a vector layer: its units have no mask to explain")


def find_run(con: duckdb.DuckDBPyConnection, probe_id: int, settings: FormulaSettings) -> int | None:
    row = first(
        con.execute("SELECT run_id FROM formula_runs WHERE probe_id = ? AND settings_key = ?", [probe_id, settings.key])
    )
    return row[0] if row else None


def _label_side(dataset: BrodenDataset, categories: tuple[str, ...], index_of: dict[int, int], row: ImageRow):
    return fmasks.label_masks(dataset, categories, index_of, row)


def build_spills(
    con: duckdb.DuckDBPyConnection,
    probe: Probe,
    dataset: BrodenDataset,
    settings: FormulaSettings,
    index_of: dict[int, int],
    workers: int,
) -> dict[str, fmasks.ChunkSpill]:
    """The probe's images as packed chunks on disk, by split ('all', or 'train' and 'val')."""
    groups = ("all",) if settings.split == "all" else ("train", "val")
    spills = {g: fmasks.ChunkSpill() for g in groups}
    pending: dict[str, tuple[list, list]] = {g: ([], []) for g in groups}
    k, h, w = probe.n_filters, probe.height, probe.width

    def flush(group: str) -> None:
        images, units = pending[group]
        if images:
            spills[group].add(fmasks.make_chunk(images, units, k))
        pending[group] = ([], [])

    order = acts_store.stored_order(con, probe.activation_probe)
    rows = [dataset.rows[i] for i in order]
    decoded = pool.decoded(partial(_label_side, dataset, settings.categories, index_of), rows, workers)
    thresholds = netdissect.thresholds(con, probe.probe_id)
    with progress_bar() as bar:
        task = bar.add_task("formulas: masks", total=len(order))
        for ids, codes, scales in acts_store.iter_codes(con, probe.activation_probe, (k, h, w), batch=64):
            values = acts_store.dequantise(torch.as_tensor(codes), torch.as_tensor(scales))
            for i, image_id in enumerate(ids.tolist()):
                side = next(decoded)
                assert side.image_id == image_id, "activations and masks out of step"
                row = dataset.rows[image_id]
                group = "all" if settings.split == "all" else ("train" if row.split == "train" else "val")
                pending[group][0].append(side)
                pending[group][1].append(fmasks.unit_masks(values[i], thresholds, side.shape))
                if len(pending[group][0]) == CHUNK_IMAGES:
                    flush(group)
                bar.advance(task)
    for group in groups:
        flush(group)
    return spills


def run(
    store: Store,
    probe: Probe,
    dataset: BrodenDataset,
    settings: FormulaSettings,
    workers: int = 0,
) -> int:
    """Search every unit's formulas of PROBE under SETTINGS and store them; returns the run_id (that
    of the stored run, where these settings have one already)."""
    settings = settings.resolved(dataset)
    with store.reading() as con:
        found = find_run(con, probe.probe_id, settings)
    if found is not None:
        return found
    numbers = sorted(dataset.labels)
    index_of = {n: i for i, n in enumerate(numbers)}
    with timings.timed("formulas") as timing:
        with store.reading() as con:
            spills = build_spills(con, probe, dataset, settings, index_of, workers)
        try:
            search_in = spills["all" if settings.split == "all" else "train"]
            images = sum(len(c.image_ids) for c in search_in)

            def on_pass(step: int) -> None:
                say(f"probe {probe.probe_id}: formulas, pass {step + 1} of {settings.max_length} done")

            units = search.beam_search(
                lambda: iter(search_in),
                probe.n_filters,
                len(numbers),
                settings.beam_size,
                settings.max_length,
                settings.penalty,
                on_pass,
            )
            val = None
            if settings.split == "train":
                wanted = [[s.formula for beam in u.beams for s in beam] for u in units]
                val = search.evaluate(iter(spills["val"]), wanted, len(numbers)) if any(wanted) else None
        finally:
            for spill in spills.values():
                spill.close()
        timing.images = images
    names = {i: dataset.labels[n].name for i, n in enumerate(numbers)}
    with store.writing() as con, transaction(con):
        run_id = first(
            con.execute("SELECT coalesce(max(run_id), 0) + 1 FROM formula_runs WHERE probe_id = ?", [probe.probe_id])
        )[0]
        data = asdict(settings)
        data["categories"] = list(settings.categories)
        con.execute(
            "INSERT INTO formula_runs (probe_id, run_id, settings_key, settings, beam_size, max_length, penalty,"
            " categories, split, images) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                probe.probe_id,
                run_id,
                settings.key,
                json.dumps(data, sort_keys=True),
                settings.beam_size,
                settings.max_length,
                settings.penalty,
                list(settings.categories),
                settings.split,
                images,
            ],
        )
        beams, terms = _rows(probe.probe_id, run_id, units, val, names, numbers)
        writer.insert(con, "formula_beams", beams)
        writer.insert(con, "formula_terms", terms)
        timings.save(con, probe.probe_id, [timing])
    return run_id


def _rows(probe_id, run_id, units, val, names, numbers) -> tuple[pa.Table, pa.Table]:
    beams: dict[str, list] = {c: [] for c in ("filter", "step", "rank", "formula", "n_labels", "length")}
    beams.update({c: [] for c in ("score", "iou", "intersection", "union_", "val_iou")})
    terms: dict[str, list] = {c: [] for c in ("filter", "step", "rank", "position", "op", "concept_id")}
    for u in units:
        at = 0
        for step, beam in enumerate(u.beams):
            for rank, s in enumerate(beam, 1):
                beams["filter"].append(u.unit)
                beams["step"].append(step)
                beams["rank"].append(rank)
                beams["formula"].append(search.text(s.formula, names.__getitem__))
                beams["n_labels"].append(len(s.formula))
                beams["length"].append(search.length(s.formula))
                beams["score"].append(s.score)
                beams["iou"].append(s.iou)
                beams["intersection"].append(s.intersection)
                beams["union_"].append(s.union)
                if val is None:
                    beams["val_iou"].append(None)
                else:
                    inter, area, unit_area = val[u.unit][at]
                    union = area + unit_area - inter
                    beams["val_iou"].append(inter / union if union else 0.0)
                at += 1
                for position, (op, label) in enumerate(s.formula):
                    terms["filter"].append(u.unit)
                    terms["step"].append(step)
                    terms["rank"].append(rank)
                    terms["position"].append(position)
                    terms["op"].append(OPS.get(op, "LEAF"))
                    terms["concept_id"].append(int(numbers[label]))
    head = {"probe_id": probe_id, "run_id": run_id}
    as_table = lambda cols: pa.table(
        {**{k: pa.array(np.full(len(cols["filter"]), v, np.int32)) for k, v in head.items()}, **cols}
    )
    beams_t = as_table(beams).cast(
        pa.schema(
            [
                ("probe_id", pa.int32()),
                ("run_id", pa.int32()),
                ("filter", pa.int32()),
                ("step", pa.int32()),
                ("rank", pa.int32()),
                ("formula", pa.string()),
                ("n_labels", pa.int32()),
                ("length", pa.int32()),
                ("score", pa.float64()),
                ("iou", pa.float64()),
                ("intersection", pa.int64()),
                ("union_", pa.int64()),
                ("val_iou", pa.float64()),
            ]
        )
    )
    return beams_t, as_table(terms)
