"""Cold-start latency of the CLI: wall time of fresh processes, beside `python3 -c pass` in the same run.

Every command is a new interpreter (as a person typing it gets), run --repeats times in rotation so
that load on the machine falls on all of them alike; the median is reported, with the CPU time the
process used (user + system, steadier than wall time on a busy machine). The database is a small
generated probe (bench/query.py's fill), so the time is start-up, not the query. Bytecode is cached
(in a scratch PYTHONPYCACHEPREFIX, whatever PYTHONDONTWRITEBYTECODE says), as an installed n2vdb has it.

    python bench/startup.py [--repeats 7]
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import save_result
from query import fill  # bench/query.py: a generated database, no model run

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(REPO), "N2VDB_QUIET": "1", "PYTHONPYCACHEPREFIX": str(Path(tmp) / "pyc")}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        db = Path(tmp) / "startup.duckdb"
        fill(db, n_probes=1, n_concepts=50, k=64)
        n2vdb = [sys.executable, "-m", "n2vdb"]
        cases = {
            "python3 -c pass": [sys.executable, "-c", "pass"],
            "n2vdb --help": n2vdb + ["--help"],
            'n2vdb sql "select 1"': n2vdb + ["sql", "select 1", "--db", str(db)],
            "n2vdb query nearest concept7 -k 5": n2vdb + ["query", "nearest", "concept7", "-k", "5", "--db", str(db)],
        }
        for argv in cases.values():  # once each: compiled bytecode and the page cache warm
            subprocess.run(argv, env=env, check=True, capture_output=True)
        times: dict[str, list[float]] = {name: [] for name in cases}
        cpu: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, argv in cases.items():
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                start = time.perf_counter()
                subprocess.run(argv, env=env, check=True, capture_output=True)
                times[name].append(time.perf_counter() - start)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu[name].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    base = statistics.median(times["python3 -c pass"])
    print(f"{'command':<38} {'median s':>9} {'min s':>7} {'- pass':>7} {'cpu s':>7}   ({args.repeats} runs each)")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<38} {median:9.3f} {min(values):7.3f} {median - base:7.3f} {statistics.median(cpu[name]):7.3f}")
    medians = {name: round(statistics.median(values), 3) for name, values in times.items()}
    cpu_medians = {name: round(statistics.median(values), 3) for name, values in cpu.items()}
    help_s, sql_s, query_s = (medians[name] for name in list(cases)[1:])
    save_result(
        "startup",
        f"median of {args.repeats} cold processes: `--help` {help_s:.2f} s, `sql 'select 1'` "
        f"{sql_s:.2f} s, a named query {query_s:.2f} s; `python3 -c pass` {base:.3f} s",
        {"median_s": medians, "median_cpu_s": cpu_medians, "repeats": args.repeats},
    )


if __name__ == "__main__":
    main()
