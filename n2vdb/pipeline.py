"""The ingest pipeline: one ordered list of stages, and the runner that takes a probe through them.

A probe's `status` names the next stage it needs ('complete' once past the last). Everything that
depends on the order derives from STAGES: where a new probe starts, which stage comes after which
(set here, never by a stage), resume, what `merge` still runs after the shards, and the integrity
checks (queries/integrity.sql joins the table pipeline_stages, which a migration keeps equal to this
list; tests/test_pipeline.py asserts they agree).

A new stage is one function taking a StageRun, one entry below and a migration (its tables, and its
row of pipeline_stages). The function reads what it needs, writes its rows in one transaction and
calls `run.finish(con)` inside that transaction, so the rows and the status move together: a killed
ingest never leaves a stage's rows under a status that says they are still to come.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import duckdb

from n2vdb import extract, timings
from n2vdb import probe as probes
from n2vdb.data.broden import BrodenDataset
from n2vdb.embed import stage as embed_stage
from n2vdb.errors import N2vdbError
from n2vdb.models import weights as weights_mod
from n2vdb.models.device import pick_device
from n2vdb.progress import say
from n2vdb.stats import iou as iou_stage
from n2vdb.stats.thresholds import compute_thresholds
from n2vdb.store.sessions import Store

if TYPE_CHECKING:
    from n2vdb.ingest import IngestOptions

COMPLETE = "complete"  # the status after the last stage


@dataclass
class StageRun:
    """What a stage function gets: the probe, how it was asked for, and the hook that ends it."""

    store: Store
    probe: probes.Probe
    spec: probes.ProbeSpec
    dataset: BrodenDataset
    options: IngestOptions
    workers: int
    finish: Callable[[duckdb.DuckDBPyConnection], None] = lambda con: None
    loaded: dict[str, Any] = field(default_factory=dict)  # what the stages' prepare loaded (the model)


@dataclass(frozen=True)
class Stage:
    name: str  # the probe's status while this stage is the next to run
    title: str  # the progress line: "probe N: TITLE"
    run: Callable[[StageRun], None]
    fills: tuple[str, ...]  # the tables it writes
    vector: bool = True  # applies to vector layers (False: they have no spatial extent to segment)
    per_extraction: bool = False  # its rows belong to the extraction: a variant reads its source's instead
    sharded: bool = False  # `ingest --shard` runs it, into Parquet; `merge` imports its rows
    partial: bool = False  # commits as it goes (resumable), so its rows exist before it is done
    timing: str | None = None  # the stage_timings row the runner records (None: the stage records its own)
    pairs: bool = False  # the timing counts (image, concept) pairs
    # Called for every stage still to run in the transaction that creates or finds the probe, so that
    # what can fail on bad input (weights) fails before anything is written; False: nothing left to do.
    prepare: Callable[[duckdb.DuckDBPyConnection, StageRun], bool] | None = None


def _prepare_extraction(con: duckdb.DuckDBPyConnection, run: StageRun) -> bool:
    if not extract.remaining_rows(con, run.probe, run.spec, run.dataset):
        return False
    options = run.options
    run.loaded["net"] = weights_mod.load(run.spec.model, options.weights, options.seed, run.spec.input_size).net
    return True


def _extraction(run: StageRun) -> None:
    options = run.options
    # The model is let go with its stage: the later stages read the stored activations only, and
    # would otherwise hold its weights to the end (59 MB of VGG16's up to conv5_3).
    net = run.loaded.pop("net")
    extract.extract(run.store, run.probe, run.spec, run.dataset, net, options.device, options.batch_size, run.workers)


def _thresholds(run: StageRun) -> None:
    compute_thresholds(run.store, run.probe, run.spec.quantile, finish=run.finish)


def _iou(run: StageRun) -> None:
    device = pick_device(run.options.device)
    iou_stage.run(run.store, run.probe, run.dataset, run.spec.iou_mode, run.workers, device, finish=run.finish)


def _embeddings(run: StageRun) -> None:
    device = pick_device(run.options.device)
    segmentation = run.spec.kind != "vector"  # a vector layer trains classification embeddings only
    embed_stage.run(
        run.store, run.probe, run.dataset, run.spec.train, run.workers, device, segmentation, finish=run.finish
    )


STAGES: tuple[Stage, ...] = (
    Stage(
        "extracting",
        "extracting activations",
        _extraction,
        ("activations",),
        per_extraction=True,
        sharded=True,
        partial=True,
        timing="extraction",
        prepare=_prepare_extraction,
    ),
    Stage("thresholds", "thresholds", _thresholds, ("filters",), timing="thresholds"),
    Stage(
        "iou",
        "single-filter IoU",
        _iou,
        ("filter_concept_iou", "image_concept_scores"),
        vector=False,
        timing="iou",
        pairs=True,
    ),
    Stage("embeddings", "concept embeddings", _embeddings, ("embeddings", "image_concept_scores")),
)


def statuses() -> tuple[str, ...]:
    """Every status a probe can have, in pipeline order (read from STAGES at each call, so a stage
    added to the list, by a test too, is part of the machine at once)."""
    return (*(s.name for s in STAGES), COMPLETE)


def applies(stage: Stage, spec: probes.ProbeSpec, shares_extraction: bool) -> bool:
    """Whether PROBE needs STAGE: vector layers skip the spatial stages; a variant that shares another
    probe's extraction skips the stages whose rows it reads from there."""
    return (stage.vector or spec.kind != "vector") and not (stage.per_extraction and shares_extraction)


def _position(status: str) -> int:
    order = statuses()
    if status not in order:
        raise N2vdbError(f"probe status {status!r} is no stage of this n2vdb ({', '.join(order)})")
    return order.index(status)


def first_status(shares_extraction: bool) -> str:
    """Where a new probe starts (any kind of layer: vector probes skip later, as they reach a stage)."""
    return next(s.name for s in STAGES if not (s.per_extraction and shares_extraction))


def status_after(status: str, spec: probes.ProbeSpec, shares_extraction: bool) -> str:
    """The status of a probe once the stage STATUS names (and every later one it skips) is done."""
    for stage in STAGES[_position(status) + 1 :]:
        if applies(stage, spec, shares_extraction):
            return stage.name
    return COMPLETE


def status_after_shards(spec: probes.ProbeSpec) -> str:
    """Where a merged probe resumes: after the last stage the shards ran."""
    return status_after([s.name for s in STAGES if s.sharded][-1], spec, False)


def sharded(status: str) -> bool:
    """Whether a probe at STATUS still waits for the rows of a sharded stage (merge imports them)."""
    return status != COMPLETE and STAGES[_position(status)].sharded


def remaining(probe: probes.Probe, spec: probes.ProbeSpec) -> Iterator[Stage]:
    """The stages a probe still needs, in order, from its status on."""
    for stage in STAGES[_position(probe.status) :] if probe.status != COMPLETE else ():
        if applies(stage, spec, probe.source_probe_id is not None):
            yield stage


def find_or_create(con: duckdb.DuckDBPyConnection, spec: probes.ProbeSpec) -> tuple[probes.Probe, bool]:
    """(probe, created): the probe of SPEC, made at the pipeline's first stage if new."""
    return probes.get_or_create(con, spec, statuses(), first_status(shares_extraction=True))


def prepare(con: duckdb.DuckDBPyConnection, run: StageRun) -> dict[str, bool]:
    """Run the prepare hooks of the stages still to do: stage name -> whether it has work left."""
    return {s.name: s.prepare is None or s.prepare(con, run) for s in remaining(run.probe, run.spec)}


def run_all(run: StageRun, work: dict[str, bool]) -> None:
    """Take the probe through every stage it still needs, timing each and advancing its status."""
    shares = run.probe.source_probe_id is not None
    skipped = [s.title for s in STAGES[_position(run.probe.status) :] if not s.vector]
    if run.spec.kind == "vector" and skipped:  # (the embeddings stage skips segmentation itself)
        say(f"probe {run.probe.probe_id}: a vector layer; {', '.join(skipped)} and segmentation do not apply")
    for stage in list(remaining(run.probe, run.spec)):
        following = status_after(stage.name, run.spec, shares)
        finished: list[str] = []

        def finish(con: duckdb.DuckDBPyConnection, after: str = following, said: list[str] = finished) -> None:
            probes.set_status(con, run.probe.probe_id, after)
            said.append(after)

        run.finish = finish
        has_work = work.get(stage.name, True)
        if has_work:
            say(f"probe {run.probe.probe_id}: {stage.title}")
            with timings.timed(stage.timing or stage.name) as timing:
                stage.run(run)
        if not finished:
            if has_work and not stage.partial:
                raise RuntimeError(f"stage {stage.name} returned without calling run.finish(con)")
            with run.store.writing() as con:  # its rows are committed already
                finish(con)
        with run.store.reading() as con:
            run.probe = probes.load(con, run.probe.probe_id)
        if has_work and stage.timing:
            timings.record(run.store, run.probe, timing, count_pairs=stage.pairs)
