"""Shared set-up for the benchmarks: a generated concept set, registered in a scratch database, and
save_result, which every bench script calls once at the end.

save_result(name, headline, figures) writes bench/results/NAME.json:

    save_result("extract", f"{ratio:.2f}x of a bare forward pass", {"ratio": ratio, "images": n})

- name: the script's file name without .py (bench/readme.py finds the row by it);
- headline: one line for a reader, built by the script from its own figures (the README's
  "measured" cell; bench/readme.py copies it verbatim, so never type a figure into it by hand);
- figures: the numbers behind it (JSON-serialisable: numbers, strings, lists, dicts);
- command: the command line that produced it; by default this process's own
  (`python bench/NAME.py ARGS...`), so a script need not pass it.

Also recorded: the UTC time, the seconds since this module was imported (about the run's length),
nproc, the load average when this module was imported (the run's start) and at the call (its end),
torch's thread count and OMP_NUM_THREADS. `python bench/readme.py` then rebuilds the README's
Performance table from bench/results/*.json; a new bench also needs its row in readme.py's BENCHES
(what it measures, and the quick arguments `readme.py --run` reruns it with).
"""

import datetime
import json
import os
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

from n2vdb import api

RESULTS = Path(__file__).resolve().parent / "results"
_LOAD_AT_START = os.getloadavg()
_STARTED = time.time()


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
    api.ingest("alexnet", "conv5", db, dataset="synthetic", weights="random", workers=0, train=TrainSettings(epochs=1))
    return root, db, tmp


def ingest_profile(db: Path, workers: int, epochs: int, device: str = "cpu") -> int:
    """`ingest alexnet conv5` (random weights) of the registered broden-profile set: scale.py's and
    rss_profile.py's run. Returns the probe id."""
    from n2vdb.probe import TrainSettings

    return api.ingest(
        "alexnet",
        "conv5",
        db,
        dataset="broden-profile",
        weights="random",
        workers=workers,
        device=device,
        train=TrainSettings(epochs=epochs),
    )


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def vm_rss_mb() -> float:
    """The process's resident set now (VmRSS), in MB: what the diagnostics sample over time."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def this_command() -> list[str]:
    """`[OMP_NUM_THREADS=N] python bench/NAME.py ARGS...` for the running script, from wherever it was started."""
    omp = [f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] if "OMP_NUM_THREADS" in os.environ else []
    return [*omp, "python", f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]]


def machine() -> dict:
    torch = sys.modules.get("torch")  # only if the bench used it: importing torch here would cost a second
    return {
        "nproc": os.cpu_count(),
        "load_start": [round(x, 2) for x in _LOAD_AT_START],
        "load_end": [round(x, 2) for x in os.getloadavg()],
        "torch_threads": torch.get_num_threads() if torch else None,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def save_result(
    name: str, headline: str, figures: dict, command: list[str] | None = None, directory: Path | None = None
) -> Path:
    """Write DIRECTORY/NAME.json (default bench/results/) and return its path; see the module docstring."""
    if "\n" in headline:
        raise ValueError("a bench headline is one line")
    record = {
        "name": name,
        "command": shlex.join(command or this_command()),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "wall_s": round(time.time() - _STARTED, 1),
        "machine": machine(),
        "headline": headline,
        "figures": figures,
    }
    directory = Path(directory or RESULTS)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"result saved to {path}")
    return path
