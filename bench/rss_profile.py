"""Where the ingest's memory goes, per stage, at several sizes of the broden profile.

    python bench/rss_profile.py --sizes 1000,4000 [--epochs 30] [--mark MODULE:FUNCTION ...]
        [--stop-after STAGE]

Each size runs in its own process, as bench/scale.py's do: it writes (or reuses, with --data DIR) the
broden profile, then runs `ingest alexnet conv5` (random weights) while a thread samples the process's
resident set (VmRSS) every few milliseconds. Per stage (and per --mark'ed function, e.g.
n2vdb.embed.classification:train): RSS at its start, the most resident during it, the peak so far at
its end (ru_maxrss, what stage_timings records), its wall and process CPU seconds. Knobs
(N2VDB_CACHE_MEMORY, N2VDB_DUCKDB_*) pass through the environment. A diagnostic: it prints, and saves
no result (the README's peak RSS is bench/scale.py's).
"""

import argparse
import functools
import importlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from common import vm_rss_mb


class Sampler:
    """VmRSS every INTERVAL seconds in a thread; spans record (name, start, end) on its clock."""

    def __init__(self, interval: float = 0.005) -> None:
        self.samples: list[tuple[float, float]] = []
        self.spans: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), vm_rss_mb()))
            time.sleep(interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @contextmanager
    def span(self, name: str):
        from n2vdb.timings import peak_rss_mb

        span = {"name": name, "start_rss_mb": vm_rss_mb(), "start": time.perf_counter(), "cpu0": time.process_time()}
        try:
            yield
        finally:
            span["end"] = time.perf_counter()
            span["cpu_s"] = time.process_time() - span.pop("cpu0")
            span["peak_so_far_mb"] = peak_rss_mb()
            self.spans.append(span)

    def summary(self) -> list[dict]:
        out = []
        for s in self.spans:
            inside = [r for t, r in self.samples if s["start"] <= t <= s["end"]] or [s["start_rss_mb"]]
            out.append(
                {
                    "name": s["name"],
                    "seconds": s["end"] - s["start"],
                    "cpu_s": s["cpu_s"],
                    "start_rss_mb": s["start_rss_mb"],
                    "max_rss_mb": max(inside),
                    "peak_so_far_mb": s["peak_so_far_mb"],
                }
            )
        return out


def wrap(sampler: Sampler, target: str) -> None:
    """Record every call of MODULE:FUNCTION as a span."""
    module_name, name = target.split(":")
    module = importlib.import_module(module_name)
    original = getattr(module, name)

    @functools.wraps(original)
    def spanned(*args, **kwargs):
        with sampler.span(target.split(".")[-1]):
            return original(*args, **kwargs)

    setattr(module, name, spanned)


class _Stop(Exception):
    """Raised after the --stop-after stage: the rest of the ingest is not measured."""


def one_size(
    images: int, epochs: int, workers: int, data: Path, marks: list[str], stop_after: str | None = None
) -> dict:
    from n2vdb import api, timings
    from n2vdb.data.synth import generate_broden

    from common import ingest_profile

    root = data / f"broden-{images}"
    if not (root / "index.csv").exists():
        generate_broden(root, images=images, workers=max(workers, 1))
    with tempfile.TemporaryDirectory() as tmp, Sampler() as sampler:
        db = Path(tmp) / "bench.duckdb"
        api.add_dataset(root, "broden-profile", db)
        original = timings.timed

        @contextmanager
        def timed(stage, *args, **kwargs):
            with sampler.span(stage), original(stage, *args, **kwargs) as record:
                yield record
            if stage == stop_after:
                raise _Stop

        timings.timed = timed
        for target in marks:
            wrap(sampler, target)
        try:
            ingest_profile(db, workers, epochs)
        except _Stop:
            pass
    return {"images": images, "epochs": epochs, "spans": sampler.summary()}


def table(results: list[dict]) -> str:
    lines = [f"{'images':>7} {'span':<28} {'start':>7} {'max':>7} {'peak':>7} {'wall s':>8} {'cpu s':>8}  (RSS in MB)"]
    for r in results:
        for s in r["spans"]:
            lines.append(
                f"{r['images']:7d} {s['name']:<28} {s['start_rss_mb']:7.0f} {s['max_rss_mb']:7.0f} "
                f"{s['peak_so_far_mb']:7.0f} {s['seconds']:8.1f} {s['cpu_s']:8.1f}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,4000")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each run")
    parser.add_argument("--data", type=Path, help="keep the generated datasets here, to reuse (default: a scratch dir)")
    parser.add_argument("--mark", action="append", default=[], help="MODULE:FUNCTION to time as a span too")
    parser.add_argument("--stop-after", help="the stage after which to stop (e.g. extraction)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["N2VDB_QUIET"] = "1"
    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(one_size(args.one, args.epochs, args.workers, args.data, args.mark, args.stop_after)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        data = args.data or Path(scratch)
        results = []
        for size in (int(s) for s in args.sizes.split(",")):
            command = [sys.executable, __file__, "--one", str(size), "--data", str(data)]
            command += ["--epochs", str(args.epochs), "--workers", str(args.workers), "--threads", str(args.threads)]
            command += [f"--mark={m}" for m in args.mark]
            command += [f"--stop-after={args.stop_after}"] * bool(args.stop_after)
            out = subprocess.run(command, capture_output=True, text=True, check=False)
            if out.returncode:
                sys.exit(f"size {size} failed:\n{out.stderr[-3000:]}")
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(table(results))


if __name__ == "__main__":
    main()
