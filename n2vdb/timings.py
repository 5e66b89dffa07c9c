"""Stage timings as data (table stage_timings): seconds, images, (image, concept) pairs, peak RSS."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import duckdb

from n2vdb import heap


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (ru_maxrss: KB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


@dataclass
class StageTiming:
    stage: str
    seconds: float = 0.0
    images: int | None = None
    pairs: int | None = None
    peak_rss_mb: float | None = None


@contextmanager
def timed(stage: str, images: int | None = None, pairs: int | None = None) -> Iterator[StageTiming]:
    """Time the block; the caller may fill in images and pairs on the yielded record. Every stage runs
    through here, so here the heap is set not to keep what the stages free (n2vdb.heap)."""
    heap.bound_freed_memory(stage)
    record = StageTiming(stage, images=images, pairs=pairs)
    start = time.perf_counter()
    yield record
    record.seconds = time.perf_counter() - start
    record.peak_rss_mb = peak_rss_mb()


def save(con: duckdb.DuckDBPyConnection, probe_id: int, records: list[StageTiming]) -> None:
    """Write (or replace) the probe's rows for these stages; call inside the caller's transaction."""
    for r in records:
        con.execute("DELETE FROM stage_timings WHERE probe_id = ? AND stage = ?", [probe_id, r.stage])
        con.execute(
            "INSERT INTO stage_timings (probe_id, stage, seconds, images, pairs, peak_rss_mb)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [probe_id, r.stage, r.seconds, r.images, r.pairs, r.peak_rss_mb],
        )


def record(store, probe, timing: StageTiming, count_pairs: bool = False) -> None:
    """Save one stage of PROBE in a short write session; images (and pairs, if asked) default to the
    probe's stored images and their (image, concept) pairs."""
    from n2vdb.store.connection import first, transaction

    with store.writing() as con, transaction(con):
        if timing.images is None:
            timing.images = first(
                con.execute("SELECT count(*) FROM activations WHERE probe_id = ?", [probe.activation_probe])
            )[0]
        if count_pairs and timing.pairs is None:
            timing.pairs = first(
                con.execute(
                    "SELECT count(*) FROM image_concepts WHERE dataset_id = ? AND image_id IN"
                    " (SELECT image_id FROM activations WHERE probe_id = ?)",
                    [probe.dataset_id, probe.activation_probe],
                )
            )[0]
        save(con, probe.probe_id, [timing])
