"""The bad-input matrix: every case is one CLI call that must fail with one line, its documented exit
code, no traceback, and the database exactly as it was.

docs/bad-input.md is generated from CASES (`python tests/test_bad_input.py > docs/bad-input.md`);
a test keeps the two in step.
"""

import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import duckdb
import pytest
import torch
import torchvision

from helpers import run_cli

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Case:
    name: str
    argv: list[str]  # after `n2vdb`; {db} {data} {tmp} are filled in
    message: str
    code: int
    prepare: Callable[[Path, Path], None] | None = None  # (dataset copy, tmp) -> None
    env: dict[str, str] | None = None  # extra environment ({tmp} filled in)
    stdout: str | None = None  # None = captured (must stay empty); 'closed'; or a path such as /dev/full
    db_sql: str | None = None  # applied to the database copy before the call (and before its fingerprint)
    registered: Callable[[Path, Path], None] | None = None  # like prepare, once the dataset is registered


def _replace(rel: str, content: bytes):
    def prepare(data: Path, tmp: Path) -> None:
        (data / rel).write_bytes(content)

    return prepare


def _truncate(rel: str):
    def prepare(data: Path, tmp: Path) -> None:
        raw = (data / rel).read_bytes()
        (data / rel).write_bytes(raw[: len(raw) // 2])

    return prepare


def _edit_index(edit):
    def prepare(data: Path, tmp: Path) -> None:
        lines = (data / "index.csv").read_text().splitlines()
        (data / "index.csv").write_text("\n".join(edit(lines)) + "\n")

    return prepare


def _drop_label(number: int):
    def prepare(data: Path, tmp: Path) -> None:
        path = data / "label.csv"
        path.write_text("\n".join(l for l in path.read_text().splitlines() if not l.startswith(f"{number},")) + "\n")

    return prepare


def _weights(kind: str):
    def prepare(data: Path, tmp: Path) -> None:
        if kind == "wrong":
            torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp / "w.pth")
        else:
            (tmp / "w.pth").write_bytes(b"definitely not a checkpoint")

    return prepare


def _newer_schema(data: Path, tmp: Path) -> None:
    pass  # applied by the test to its own copy of the database


IMG = "images/synth/000005.jpg"
MASK = "images/synth/000005_object.png"
INGEST = ["ingest", "alexnet", "conv5", "--weights", "random", "--workers", "0", "--epochs", "1", "--db", "{db}"]

CASES = [
    Case(
        "dataset directory missing",
        ["data", "add", "{tmp}/nowhere", "--name", "x", "--db", "{db}"],
        "does not exist",
        1,
    ),
    Case(
        "directory without index.csv",
        ["data", "add", "{data}", "--name", "x", "--db", "{db}"],
        "has no index.csv",
        1,
        lambda d, t: (d / "index.csv").unlink(),
    ),
    Case(
        "index.csv row with missing columns",
        ["data", "add", "{data}", "--name", "x", "--db", "{db}"],
        "line 3: expected",
        1,
        _edit_index(lambda ls: ls[:2] + [ls[2].split(",")[0] + ",train"] + ls[3:]),
    ),
    Case(
        "index.csv size that is not a number",
        ["data", "add", "{data}", "--name", "x", "--db", "{db}"],
        "expected an integer",
        1,
        _edit_index(lambda ls: ls[:1] + [ls[1].replace(",227,227,", ",big,227,", 1)] + ls[2:]),
    ),
    Case(
        "index.csv with a wrong header",
        ["data", "add", "{data}", "--name", "x", "--db", "{db}"],
        "header lacks",
        1,
        _edit_index(lambda ls: [ls[0].replace("split", "fold")] + ls[1:]),
    ),
    Case(
        "label.csv missing",
        ["data", "add", "{data}", "--name", "x", "--db", "{db}"],
        "has no label.csv",
        1,
        lambda d, t: (d / "label.csv").unlink(),
    ),
    Case(
        "mask PNG that cannot be decoded",
        ["data", "add", "{data}", "--name", "x", "--db", "{db}"],
        "cannot be decoded",
        1,
        _replace(MASK, b"\x89PNG\r\n\x1a\nnot really"),
    ),
    Case(
        "truncated mask PNG",
        ["data", "add", "{data}", "--name", "x", "--db", "{db}"],
        "cannot be decoded",
        1,
        _truncate(MASK),
    ),
    Case(
        "mask file missing",
        ["data", "add", "{data}", "--name", "x", "--db", "{db}"],
        "is missing",
        1,
        lambda d, t: (d / MASK).unlink(),
    ),
    Case(
        "label number not in label.csv",
        ["data", "add", "{data}", "--name", "x", "--db", "{db}"],
        "missing from label.csv",
        1,
        _drop_label(300),
    ),
    Case(
        "dataset name taken by another directory",
        ["data", "add", "{data}", "--name", "synthetic", "--db", "{db}"],
        "is taken by",
        1,
    ),
    Case("corrupt image", INGEST + ["--dataset", "x"], "cannot be decoded", 1, _replace(IMG, b"not a jpeg")),
    Case("truncated image", INGEST + ["--dataset", "x"], "cannot be decoded", 1, _truncate(IMG)),
    Case(
        "image file missing at data add",
        ["data", "add", "{data}", "--name", "y", "--db", "{db}"],
        "names image",
        1,
        lambda d, t: (d / IMG).unlink(),
    ),
    Case(
        "image file missing after data add",
        INGEST + ["--dataset", "x"],
        "is missing",
        1,
        registered=lambda d, t: (d / IMG).unlink(),
    ),
    Case("unknown dataset", INGEST + ["--dataset", "brodne"], "no dataset named 'brodne'", 1),
    Case("unknown model", ["ingest", "alexnett", "conv5", "--db", "{db}"], "did you mean alexnet", 2),
    Case("unknown layer", ["ingest", "alexnet", "conv9", "--db", "{db}"], "has no layer 'conv9'", 2),
    Case(
        "weights file of the wrong architecture",
        ["ingest", "alexnet", "conv5", "--weights", "{tmp}/w.pth", "--db", "{db}"],
        "do not fit AlexNet",
        2,
        _weights("wrong"),
    ),
    Case(
        "weights file that is not a checkpoint",
        ["ingest", "alexnet", "conv5", "--weights", "{tmp}/w.pth", "--db", "{db}"],
        "not a PyTorch state dict",
        2,
        _weights("garbage"),
    ),
    Case("quantile out of range", INGEST + ["--quantile", "1.5"], "--quantile must lie", 2),
    Case("GPU asked for that is not there", INGEST + ["--device", "cuda:99"], "CUDA device(s)", 2),
    Case("unknown device", INGEST + ["--device", "tpu"], "expected auto, cpu, cuda", 2),
    Case("unknown concept", ["query", "nearest", "dgo", "--db", "{db}"], "unknown concept 'dgo'", 2),
    Case("unknown query", ["query", "nearst", "--db", "{db}"], "did you mean nearest", 2),
    Case("parameter of the wrong type", ["query", "nearest", "red", "-k", "ten", "--db", "{db}"], "expects INTEGER", 2),
    Case("missing parameter", ["query", "similarity", "red", "--db", "{db}"], "needs B", 2),
    Case("SQL syntax error", ["sql", "SELEC 1", "--db", "{db}"], "syntax error", 1),
    Case("DROP without --write", ["sql", "DROP TABLE probes", "--db", "{db}"], "read-only", 1),
    Case(
        "unwritable database path",
        ["data", "synth", "{tmp}/s", "--images", "2", "--db", "{tmp}/no/such/dir/x.duckdb"],
        "does not exist",
        1,
    ),
    Case("no database yet (reading)", ["probes", "--db", "{tmp}/absent.duckdb"], "no database at", 1),
    Case("database from a newer n2vdb", ["probes", "--db", "{db}"], "newer than this n2vdb", 1, _newer_schema),
    # dataset trust (issue 11)
    Case(
        "image path leading out of the dataset",
        ["data", "add", "{data}", "--name", "x", "--db", "{db}"],
        "resolves outside the dataset directory",
        1,
        _edit_index(lambda ls: ls[:1] + [ls[1].replace("synth/000000.jpg", "../../../etc/hosts", 1)] + ls[2:]),
    ),
    Case(
        "absolute mask path",
        ["data", "add", "{data}", "--name", "x", "--db", "{db}"],
        "line 2, column 'object': '/etc/hosts' is an absolute path",
        1,
        _edit_index(lambda ls: ls[:1] + [ls[1].replace("synth/000000_object.png", "/etc/hosts", 1)] + ls[2:]),
    ),
    Case(
        "image that is a symlink out of the dataset",
        ["data", "add", "{data}", "--name", "x", "--db", "{db}"],
        "line 7, column 'image'",
        1,
        lambda d, t: ((d / IMG).unlink(), (d / IMG).symlink_to("/etc/hosts")),
    ),
    Case(
        "duplicate label number",
        ["data", "add", "{data}", "--name", "x", "--db", "{db}"],
        "label number 1 appears on lines 3 and 32",
        1,
        lambda d, t: (d / "label.csv").write_text((d / "label.csv").read_text() + "1,crimson-c,color(1),1,,\n"),
    ),
    Case(
        "duplicate concept name",
        ["data", "add", "{data}", "--name", "x", "--db", "{db}"],
        "concept name 'red-c' is used by labels 1 and 999",
        1,
        lambda d, t: (d / "label.csv").write_text((d / "label.csv").read_text() + "999,red-c,color(1),1,,\n"),
    ),
    Case(
        "concept names equal as file names",
        ["data", "add", "{data}", "--name", "x", "--db", "{db}"],
        "collide as file names ('red_c')",
        1,
        lambda d, t: (d / "label.csv").write_text((d / "label.csv").read_text() + "999,red_c,color(1),1,,\n"),
    ),
    Case(
        "duplicated category column",
        ["data", "add", "{data}", "--name", "x", "--db", "{db}"],
        "names column 'color' more than once",
        1,
        _edit_index(lambda ls: [ls[0].replace(",object,", ",color,")] + ls[1:]),
    ),
    Case(
        "label number above int32",
        ["data", "add", "{data}", "--name", "x", "--db", "{db}"],
        "outside 1..2147483647",
        1,
        lambda d, t: (d / "label.csv").write_text((d / "label.csv").read_text() + "4294967296,big,color(1),1,,\n"),
    ),
    Case(
        "segmentation size of 1e6",
        ["data", "add", "{data}", "--name", "x", "--db", "{db}"],
        "sizes must lie in 1..8192 px",
        1,
        _edit_index(lambda ls: ls[:1] + [ls[1].replace(",113,113,", ",1000000,1000000,", 1)] + ls[2:]),
    ),
    Case(
        "data add on a file",
        ["data", "add", "{data}/index.csv", "--name", "x", "--db", "{db}"],
        "is not a directory",
        1,
    ),
    Case("empty dataset name", ["data", "add", "{data}", "--name", "", "--db", "{db}"], "cannot be empty", 2),
    Case(
        "data synth under a file",
        ["data", "synth", "{data}/index.csv/set", "--images", "2", "--db", "{db}"],
        "cannot write the concept set in",
        1,
    ),
    # the SQL sandbox (issue 11; every escape in tests/test_sandbox.py)
    Case(
        "re-attaching the database writable",
        [
            "sql",
            "ATTACH '{tmp}/s.duckdb' AS s (READ_WRITE); USE s; "
            "DETACH n2v; ATTACH '{db}' AS w (READ_WRITE); DROP TABLE w.embeddings",
            "--db",
            "{db}",
        ],
        "LocalFileSystem has been disabled",
        1,
    ),
    Case(
        "COPY over another file",
        ["sql", "COPY (SELECT 'x') TO '{tmp}/other.duckdb' (FORMAT csv)", "--db", "{db}"],
        "SQL in n2vdb opens no files",
        1,
        lambda d, t: (t / "other.duckdb").write_bytes(b"precious"),
    ),
    Case("INSTALL an extension", ["sql", "INSTALL httpfs", "--db", "{db}"], "SQL in n2vdb opens no files", 1),
    Case(
        "--write with its own transaction",
        ["sql", "--write", "DELETE FROM embeddings; COMMIT", "--db", "{db}"],
        "--write already runs everything as one transaction",
        2,
    ),
    Case(
        "--write that fails half way",
        ["sql", "--write", "DELETE FROM embeddings; SELECT * FROM nope", "--db", "{db}"],
        "nope does not exist",
        1,
    ),
    # settings and errors (issue 11)
    Case("segmentation batch of 0", INGEST + ["--seg-batch", "0"], "--seg-batch must be at least 1", 2),
    Case("learning rate NaN", INGEST + ["--seg-lr", "nan"], "--seg-lr must be a finite number above 0", 2),
    Case("no training epochs", INGEST + ["--epochs", "0"], "--epochs must be at least 1", 2),
    Case("negative epochs", INGEST + ["--epochs", "-3"], "--epochs must be at least 1", 2),
    Case(
        "input size 0 (not the default)", INGEST + ["--input-size", "0"], "--input-size must be between 16 and 2048", 2
    ),
    Case("input size 100000", INGEST + ["--input-size", "100000"], "--input-size must be between 16 and 2048", 2),
    Case(
        "input size too small for the layer", INGEST + ["--input-size", "16"], "alexnet does not run on 16 px input", 2
    ),
    Case("forward batch of 0", INGEST + ["--batch-size", "0"], "--batch-size must be at least 1", 2),
    Case("negative worker count", INGEST + ["--workers", "-1"], "--workers must be between 0", 2),
    Case(
        "layer whose output reads as no map, tokens or vector",
        [
            "ingest",
            "vit_b_16",
            "encoder.layers.encoder_layer_0.self_attention.out_proj",
            "--weights",
            "random",
            "--db",
            "{db}",
        ],
        "never runs",
        2,
    ),
    Case(
        "empty layer name",
        ["ingest", "alexnet", "", "--weights", "random", "--db", "{db}"],
        "the layer name is empty",
        2,
    ),
    Case("markup in a concept name", ["query", "nearest", "[/x]", "--db", "{db}"], "unknown concept '[/x]'", 2),
    Case("markup in SQL", ["sql", 'SELECT "[/oops]"', "--db", "{db}"], 'column "[/oops]" was not found', 1),
    Case("markup in a model name", ["models", "[/m]"], "unknown model '[/m]'", 2),
    Case("unknown output format", ["sql", "SELECT 1", "-f", "xml", "--db", "{db}"], "'xml' is not one of 'table'", 2),
    Case("negative -k", ["query", "nearest", "red", "-k", "-5", "--db", "{db}"], "k must be between 1 and", 2),
    Case(
        "-k beyond 64 bits",
        ["query", "nearest", "red", "-k", "99999999999999999999", "--db", "{db}"],
        "k must be between 1 and 2147483647",
        2,
    ),
    Case("NULL as a concept", ["query", "nearest", "NULL", "--db", "{db}"], "unknown concept 'NULL'", 2),
    Case(
        "database directory that is a file",
        ["data", "add", "{data}", "--name", "x", "--db", "{tmp}/afile/x.duckdb"],
        "Not a directory",
        1,
        lambda d, t: (t / "afile").write_text(""),
    ),
    Case(
        "report --out that is a file",
        ["report", "--out", "{tmp}/afile", "--db", "{db}"],
        "a file of that name is in the way",
        1,
        lambda d, t: (t / "afile").write_text(""),
    ),
    Case(
        "show --out that is a directory",
        ["show", "filter", "3", "--out", "{tmp}", "--db", "{db}"],
        "give the name of a .png file",
        2,
    ),
    Case(
        "show --out below a file",
        ["show", "filter", "3", "--out", "{tmp}/afile/x.png", "--db", "{db}"],
        "a file of that name is in the way",
        1,
        lambda d, t: (t / "afile").write_text(""),
    ),
    Case("stdout on a full disk", ["probes", "--db", "{db}"], "No space left on device", 1, stdout="/dev/full"),
    Case("stdout closed", ["probes", "--db", "{db}"], "standard output is closed", 1, stdout="closed"),
    Case(
        "busy timeout that is not a number",
        ["probes", "--db", "{db}"],
        "N2VDB_BUSY_TIMEOUT='abc': expected a number of seconds",
        2,
        env={"N2VDB_BUSY_TIMEOUT": "abc"},
    ),
    Case(
        "binary SQL file",
        ["sql", "--file", "{tmp}/binary.sql", "--db", "{db}"],
        "is not a UTF-8 text file of SQL",
        2,
        lambda d, t: (t / "binary.sql").write_bytes(b"\xff\xfe\x00\xd0SELECT"),
    ),
    Case(
        "show filter on a probe without thresholds",
        ["show", "filter", "3", "--probe", "1", "--db", "{db}"],
        "has no thresholds yet",
        1,
        db_sql="DELETE FROM filters; UPDATE probes SET status = 'iou'",
    ),
    Case(
        "imagenet weights offline",
        ["ingest", "alexnet", "conv5", "--workers", "0", "--db", "{db}"],
        "cannot download",
        1,
        env={"TORCH_HOME": "{tmp}/torch"},
    ),
    Case(
        "foreign DuckDB file",
        ["data", "add", "{data}", "--name", "x", "--db", "{tmp}/other.duckdb"],
        "not an n2vdb database (it holds sales)",
        1,
        lambda d, t: duckdb.connect(str(t / "other.duckdb")).execute("CREATE TABLE sales (x INTEGER)").close(),
    ),
]


def fingerprint(db: Path) -> str:
    """Every table's and view's columns and rows, in any row order. A row enters as DuckDB's 64-bit
    hash of the whole row (blobs included): ~5x cheaper than hashing each row's repr in Python,
    and a changed row escapes only through a hash collision."""
    con = duckdb.connect(str(db), read_only=True)
    digest = hashlib.sha256()
    for (table,) in con.execute("SELECT table_name FROM information_schema.tables ORDER BY 1").fetchall():
        columns = con.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position",
            [table],
        ).fetchall()
        digest.update(repr((table, columns)).encode())
        for (row_hash,) in con.execute(f'SELECT hash(t) AS h FROM "{table}" t ORDER BY h').fetchall():
            digest.update(row_hash.to_bytes(8, "little"))
    con.close()
    return digest.hexdigest()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(tmp_path, db_copy, synthetic_dir, case):
    data = tmp_path / "data"
    shutil.copytree(synthetic_dir, data)
    if case.prepare:
        case.prepare(data, tmp_path)
    if case.prepare is _newer_schema:
        con = duckdb.connect(str(db_copy))
        con.execute("INSERT INTO schema_migrations (version, name, sha256) VALUES (9999, 'future', 'x')")
        con.close()
    if "--dataset" in case.argv and "x" in case.argv:
        from n2vdb import api

        api.add_dataset(data, "x", db_copy)
    if case.registered:
        case.registered(data, tmp_path)
    if case.db_sql:
        con = duckdb.connect(str(db_copy))
        con.execute(case.db_sql)
        con.close()
    before = fingerprint(db_copy)
    argv = [a.format(db=db_copy, data=data, tmp=tmp_path) for a in case.argv]
    env = {
        "N2VDB_HOME": str(tmp_path / "home"),
        **{k: v.format(tmp=tmp_path) for k, v in (case.env or {}).items()},
    }
    if case.stdout is None:  # in this process (a subprocess costs ~3 s of CPU for its imports)
        result = run_cli(*argv, env=env)
    else:  # a full disk or a closed descriptor under stdout: the process's own file descriptor 1
        with open(case.stdout if case.stdout != "closed" else os.devnull, "w") as out:
            result = subprocess.run(
                [sys.executable, "-m", "n2vdb", *argv],
                text=True,
                env={**os.environ, **env},
                stderr=subprocess.PIPE,
                stdout=out,
                preexec_fn=(lambda: os.close(1)) if case.stdout == "closed" else None,
            )
    assert result.returncode == case.code, result.stderr
    assert not result.stdout, result.stdout  # stdout carries only data: nothing on an error
    assert case.message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    if "ingest" not in argv or not any(a in case.name for a in ("image",)):
        assert fingerprint(db_copy) == before
    else:
        # a bad image stops extraction: batches before it stay (that is how ingest resumes) and
        # nothing else changes; the database stays consistent
        from n2vdb import api

        assert not [r for r in api.db_check(db_copy).to_pylist() if r["violations"]]


def test_the_in_process_cli_shows_what_a_process_would(tmp_path, monkeypatch):
    """The matrix above runs in this process: a crash must still read as a traceback with exit 1,
    a warning must still reach stderr, and main()'s signal handlers must not outlive the call."""
    import signal
    import warnings

    from n2vdb import api
    from n2vdb.errors import N2vdbError

    sigterm = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(api, "probes", lambda db: 1 / 0)
    crashed = run_cli("probes", "--db", tmp_path / "x.duckdb")
    assert crashed.returncode == 1 and "Traceback" in crashed.stderr and "ZeroDivisionError" in crashed.stderr

    def warn_then_fail(db):
        warnings.warn("the sky is low", UserWarning, stacklevel=1)
        raise N2vdbError("stop here")

    monkeypatch.setattr(api, "probes", warn_then_fail)
    warned = run_cli("probes", "--db", tmp_path / "x.duckdb")
    assert warned.returncode == 1 and "the sky is low" in warned.stderr
    assert len(warned.stderr.strip().splitlines()) > 1  # so the matrix's one-line check would fail
    assert signal.getsignal(signal.SIGTERM) is sigterm


def test_database_busy(tmp_path, db_copy):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import duckdb, time
        con = duckdb.connect({str(db_copy)!r})
        print("ready", flush=True)
        time.sleep(30)"""),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        result = subprocess.run(
            [sys.executable, "-m", "n2vdb", "query", "exclusivity", "--db", str(db_copy)],
            capture_output=True,
            text=True,
            env={**os.environ, "N2VDB_BUSY_TIMEOUT": "0.5"},  # how long it waits is not this test's point
        )
        assert result.returncode == 1
        assert f"database busy: {db_copy} is locked by PID {holder.pid}" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        holder.kill()
        holder.wait()


def _limit_file_size(size: int):
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return limit


def test_disk_full(tmp_path, db_copy, synthetic_dir):
    """A write that runs out of space (RLIMIT_FSIZE stands in for a full disk) rolls back whole."""
    before = fingerprint(db_copy)
    limit = 4096  # the WAL this transaction needs is larger: its commit fails, as on a full disk
    result = subprocess.run(
        [sys.executable, "-m", "n2vdb", "data", "add", str(synthetic_dir), "--name", "again", "--db", str(db_copy)],
        capture_output=True,
        text=True,
        preexec_fn=_limit_file_size(limit),
    )
    assert result.returncode == 1, result.stderr
    assert "File too large" in result.stderr  # the operating system's reason, not a follow-on error
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert fingerprint(db_copy) == before


def markdown() -> str:
    lines = [
        "# Bad input: what n2vdb says",
        "",
        "Generated from `tests/test_bad_input.py` (`python tests/test_bad_input.py > docs/bad-input.md`).",
        "Every case prints one `Error:` line on stderr, exits with the code shown, prints no traceback,",
        "and leaves the database as it was (a bad image met during extraction leaves the batches",
        "before it, from which the same command resumes). Exit codes: 1 = runtime error, 2 = usage error.",
        "Also tested: a database locked by another process (`database busy: ... locked by PID N`, exit 1)",
        "and a full disk during `data add` (exit 1, the transaction rolled back).",
        "",
        "| case | command | the error says | exit |",
        "|---|---|---|---|",
    ]
    for c in CASES:
        command = " ".join(["n2vdb", *c.argv]).replace("{db}", "DB").replace("{data}", "DATA").replace("{tmp}", "TMP")
        lines.append(f"| {c.name} | `{command}` | {c.message} | {c.code} |")
    return "\n".join(lines) + "\n"


def test_docs_table_is_generated_from_these_cases():
    assert (ROOT / "docs" / "bad-input.md").read_text() == markdown()
    assert len(CASES) >= 20


if __name__ == "__main__":
    sys.stdout.write(markdown())
