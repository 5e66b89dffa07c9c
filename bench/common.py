"""Shared set-up for the benchmarks: a generated concept set, registered in a scratch database."""

import resource
import tempfile
from pathlib import Path

from n2vdb import api


def scratch(images: int, size: int = 227) -> tuple[Path, Path, tempfile.TemporaryDirectory]:
    """(dataset dir, db path, the TemporaryDirectory that owns them)."""
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name) / "synthetic"
    db = Path(tmp.name) / "bench.duckdb"
    api.synth(root, images=images, size=size, name="synthetic", db=db)
    return root, db, tmp


def ingested(images: int) -> tuple[Path, Path, tempfile.TemporaryDirectory]:
    """scratch() plus a finished alexnet conv5 probe (random weights, 1 training epoch) as probe 1."""
    from n2vdb.probe import TrainSettings

    root, db, tmp = scratch(images)
    api.ingest("alexnet", "conv5", db, dataset="synthetic", weights="random", workers=0,
               train=TrainSettings(epochs=1))
    return root, db, tmp


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
