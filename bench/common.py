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


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
