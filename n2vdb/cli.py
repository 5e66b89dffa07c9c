"""The n2vdb command line: parses, calls n2vdb.api, renders. No logic lives here."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Annotated, Optional

import duckdb
import pyarrow as pa
import typer
from rich.text import Text

try:  # typer 0.2x carries its own copy of click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer uses click itself
    from click.exceptions import ClickException

from n2vdb import __version__, api, queries
from n2vdb.errors import N2vdbError, UsageError, describe_os_error
from n2vdb.probe import TrainSettings
from n2vdb.progress import ClosedOutput, stderr
from n2vdb.render.output import FORMATS, render

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Net2Vec as a database: how CNN filters encode concepts, queried with SQL.")
data_app = typer.Typer(no_args_is_help=True, help="Register, generate and fetch concept datasets.")
db_app = typer.Typer(no_args_is_help=True, help="Schema status and upgrades.")
show_app = typer.Typer(no_args_is_help=True, help="Images across a score distribution, as PNG grids.")
app.add_typer(data_app, name="data")
app.add_typer(db_app, name="db")
app.add_typer(show_app, name="show")

Db = Annotated[Optional[Path], typer.Option("--db", envvar="N2VDB_DB", help="Database file [default: ./n2v.duckdb]")]
Format = Annotated[Optional[str], typer.Option("--format", "-f", help=f"{'|'.join(FORMATS)} [default: table on a terminal, csv when piped]")]
Limit = Annotated[Optional[int], typer.Option("--limit", help="Rows shown in the table view")]


def _show(result: pa.Table, fmt: str | None, limit: int | None = None, title: str | None = None) -> None:
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if result.num_rows == 0:
        stderr.print("(no rows)")
    render(result, fmt, limit=limit, title=title)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"n2vdb {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version")] = False,
) -> None:
    """Net2Vec (Fong & Vedaldi, CVPR 2018) as a DuckDB database."""


# -- data --------------------------------------------------------------------------------------

@data_app.command("add")
def data_add(path: Path, name: Annotated[str, typer.Option("--name", help="Name to register it under")], db: Db = None):
    """Import a Broden-format directory (index.csv, label.csv, images/)."""
    dataset_id = api.add_dataset(path, name, db)
    stderr.print(f"dataset {name!r} registered (id {dataset_id})")


@data_app.command("list")
def data_list(db: Db = None, fmt: Format = None):
    """Show registered datasets."""
    _show(api.datasets(db), fmt)


@data_app.command("synth")
def data_synth(
    path: Path,
    images: Annotated[int, typer.Option(help="Number of images")] = 300,
    size: Annotated[int, typer.Option(help="Image size in px (segmentations at half)")] = 227,
    seed: Annotated[int, typer.Option(help="Random seed")] = 0,
    name: Annotated[str, typer.Option(help="Register under this name ('' to skip)")] = "synthetic",
    db: Db = None,
):
    """Write the built-in concept set as a Broden-format directory and register it."""
    root = api.synth(path, images, size, seed, name or None, db)
    stderr.print(f"wrote {images} images to {root}" + (f", registered as {name!r}" if name else ""))


@data_app.command("fetch")
def data_fetch(
    release: Annotated[str, typer.Argument(help="broden1_224 | broden1_227 | broden1_384")],
    directory: Annotated[Path, typer.Option("--dir", help="Where to download and unpack")] = Path("data"),
    db: Db = None,
):
    """Download, verify, unpack and register Broden (needs internet)."""
    root = api.fetch_broden(release, directory)
    api.add_dataset(root, release, db)
    stderr.print(f"{release} unpacked in {root} and registered")


# -- ingest and probes -------------------------------------------------------------------------

@app.command()
def ingest(
    model: str,
    layer: str,
    dataset: Annotated[Optional[str], typer.Option(help="Registered dataset [default: broden if registered, else synthetic]")] = None,
    weights: Annotated[str, typer.Option(help="imagenet | random | PATH to a state dict")] = "imagenet",
    seed: Annotated[int, typer.Option(help="Seed for random weights and training")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N images")] = None,
    input_size: Annotated[Optional[int], typer.Option(help="Input size in px [default: the model's]")] = None,
    quantile: Annotated[float, typer.Option(help="Threshold quantile per filter")] = 0.995,
    iou_mode: Annotated[str, typer.Option(help="net2vec (threshold, upsample) | netdissect (upsample, threshold)")] = "net2vec",
    epochs: Annotated[int, typer.Option(help="Embedding training epochs")] = 30,
    seg_lr: Annotated[float, typer.Option(help="Segmentation embedding learning rate")] = 1e-4,
    seg_batch: Annotated[int, typer.Option(help="Segmentation batch size")] = 16,
    loss: Annotated[str, typer.Option(help="paper (no log, as published) | loglik")] = "paper",
    bias: Annotated[bool, typer.Option(help="Learn a bias for segmentation embeddings")] = False,
    cls_lr: Annotated[float, typer.Option(help="Classification embedding learning rate")] = 0.1,
    cls_batch: Annotated[int, typer.Option(help="Classification batch size")] = 64,
    sufficiency: Annotated[bool, typer.Option(help="Retrain with the top-F filters for F = 1, 2, 4, ...")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per forward batch")] = 32,
    workers: Annotated[Optional[int], typer.Option(help="Image-decoding worker processes")] = None,
    shard: Annotated[Optional[str], typer.Option(help="Extract only shard i/N (or auto under torchrun) into --shard-dir")] = None,
    shard_dir: Annotated[Path, typer.Option(help="Where shards write Parquet parts")] = Path("n2v_shards"),
    db: Db = None,
):
    """Extract a layer's activations and compute thresholds, IoUs and embeddings (resumes if interrupted)."""
    train = TrainSettings(epochs=epochs, seg_lr=seg_lr, seg_batch=seg_batch, seg_loss=loss, seg_bias=bias,
                          cls_lr=cls_lr, cls_batch=cls_batch, seed=seed, sufficiency=sufficiency)
    options = dict(dataset=dataset, weights=weights, seed=seed, device=device, limit=limit, input_size=input_size,
                   quantile=quantile, iou_mode=iou_mode, batch_size=batch_size, workers=workers, train=train)
    if shard is not None:
        part_dir = api.ingest_shard(model, layer, shard, shard_dir, db, **options)
        stderr.print(f"shard written to {part_dir}; when every shard is done: n2vdb merge {shard_dir}")
        return
    start = time.perf_counter()
    probe_id = api.ingest(model, layer, db, **options)
    _summary(probe_id, model, layer, db, start)


@app.command()
def merge(shard_dir: Annotated[Path, typer.Argument(help="The --shard-dir the shards wrote to")] = Path("n2v_shards"),
          db: Db = None):
    """Fold finished shards into the database and run the remaining stages (thresholds, IoU, embeddings)."""
    start = time.perf_counter()
    for probe_id in api.merge(shard_dir, db):
        row = [r for r in api.probes(db).to_pylist() if r["probe_id"] == probe_id][0]
        _summary(probe_id, row["model"], row["layer"], db, start)


def _summary(probe_id: int, model: str, layer: str, db, start: float) -> None:
    summary = api.query("single-vs-embedding", db, probe=probe_id)
    overall = [r for r in summary.to_pylist() if r["category"] == "all"]
    stderr.print(f"probe {probe_id}: {model} {layer} done in {time.perf_counter() - start:.1f} s")
    if overall:
        row = overall[0]
        stderr.print(f"mean val IoU over {row['concepts']} concepts: best single filter "
                     f"{row['single_filter_iou']:.4f}, embedding {row['embedding_iou']:.4f}")
    stderr.print("next: `n2vdb query` lists analyses, e.g. `n2vdb query single-vs-embedding`")


@app.command("probes")
def probes_cmd(db: Db = None, fmt: Format = None):
    """List probes and their status."""
    _show(api.probes(db), fmt)


@app.command()
def models(model: Annotated[Optional[str], typer.Argument()] = None, fmt: Format = None):
    """List models, or one model's friendly layers with their output shapes."""
    _show(api.models(model), fmt)


# -- queries -----------------------------------------------------------------------------------

def _query_arguments(query: queries.NamedQuery, args: list[str], params: list[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    positional = [p for p in query.params if p.required]
    optional_by_flag = {}
    for p in query.params:
        optional_by_flag[f"--{p.name}"] = p.name
        optional_by_flag[f"--{p.name.replace('_', '-')}"] = p.name
        if len(p.name) == 1:
            optional_by_flag[f"-{p.name}"] = p.name
    i = 0
    loose = []
    while i < len(args):
        arg = args[i]
        if arg.startswith("-") and arg not in ("-",):
            flag, eq, inline = arg.partition("=")
            if flag not in optional_by_flag:
                raise UsageError(f"query {query.name} has no option {flag}; usage: {query.usage()}")
            if eq:
                values[optional_by_flag[flag]] = inline
            else:
                if i + 1 >= len(args):
                    raise UsageError(f"option {flag} needs a value")
                values[optional_by_flag[flag]] = args[i + 1]
                i += 1
        else:
            loose.append(arg)
        i += 1
    if len(loose) > len(positional):
        raise UsageError(f"query {query.name} takes {len(positional)} argument(s); usage: {query.usage()}")
    for param, value in zip(positional, loose):
        values[param.name] = value
    for item in params:
        key, eq, value = item.partition("=")
        if not eq:
            raise UsageError(f"-p expects key=value, got {item!r}")
        values[key.strip()] = value
    return values


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def query(
    ctx: typer.Context,
    name: Annotated[Optional[str], typer.Argument(help="Query name; omit to list them")] = None,
    param: Annotated[list[str], typer.Option("--param", "-p", help="key=value (repeatable)")] = [],  # noqa: B006
    db: Db = None,
    fmt: Format = None,
    limit: Limit = None,
):
    """Run a named analysis from queries/ (arguments and --options as its header declares)."""
    if name is None:
        rows = [{"query": q.name, "usage": q.usage(), "description": q.description} for q in queries.load_all().values()]
        _show(pa.Table.from_pylist(rows), fmt)
        return
    named = queries.get(name)
    values = _query_arguments(named, list(ctx.args), param)
    _show(api.query(name, db, **values), fmt, limit, title=name)


@app.command()
def sql(
    statement: Annotated[Optional[str], typer.Argument(help="SQL; omit to read --file or stdin")] = None,
    file: Annotated[Optional[Path], typer.Option("--file", help="Read SQL from a file")] = None,
    write: Annotated[bool, typer.Option("--write", help="Allow statements that change the database")] = False,
    db: Db = None,
    fmt: Format = None,
    limit: Limit = None,
):
    """Run ad-hoc SQL against the database (read-only unless --write)."""
    if statement is None:
        if file is not None:
            if not file.is_file():
                raise UsageError(f"no SQL file {file}")
            statement = file.read_text()
        elif not sys.stdin.isatty():
            statement = sys.stdin.read()
        else:
            raise UsageError("give SQL as an argument, with --file, or on stdin")
    _show(api.sql(statement, db, write), fmt, limit)


# -- seeing it ---------------------------------------------------------------------------------

Probe = Annotated[Optional[int], typer.Option("--probe", help="Probe id [default: the newest complete one]")]
Out = Annotated[Optional[Path], typer.Option("--out", help="PNG file to write [default: n2v_out/...]")]


@show_app.command("concept")
def show_concept(
    name: str,
    probe: Probe = None,
    method: Annotated[str, typer.Option(help="segmentation (the embedding) | best_filter")] = "segmentation",
    out: Out = None,
    db: Db = None,
):
    """Images containing NAME at quantiles 1, .99, .95, .9, .75, .5 of its per-image IoU, masks overlaid."""
    from n2vdb.render.grids import sparkline

    path, samples, values = api.show_concept(name, db, probe, method, out)
    stderr.print(f"per-image IoU over {len(values)} images  0 {sparkline(values)} 1  "
                 f"median {sorted(values)[len(values) // 2]:.3f}")
    typer.echo(str(path))


@show_app.command("filter")
def show_filter(filter_id: Annotated[int, typer.Argument(metavar="K")], probe: Probe = None, out: Out = None,
                db: Db = None):
    """Images at quantiles of filter K's peak activation, its thresholded mask overlaid."""
    path, _ = api.show_filter(filter_id, db, probe, out)
    typer.echo(str(path))


@app.command()
def report(
    out: Annotated[Path, typer.Option("--out", help="Directory for index.html and its images")],
    probe: Probe = None,
    cards: Annotated[int, typer.Option(help="Concepts given a card with image grids")] = 8,
    db: Db = None,
):
    """Write a static HTML report of a probe (opens from disk, no server)."""
    page = api.report(out, db, probe, cards)
    typer.echo(str(page))


# -- db ----------------------------------------------------------------------------------------

@db_app.command("status")
def db_status(db: Db = None, fmt: Format = None):
    """Migrations known to this n2vdb and whether the database has them."""
    _show(api.db_status(db), fmt)


@db_app.command("check")
def db_check(db: Db = None, fmt: Format = None):
    """Integrity checks: references, row counts, probes marked complete only when complete."""
    result = api.db_check(db)
    _show(result, fmt)
    failed = [r for r in result.to_pylist() if r["violations"]]
    if failed:
        raise N2vdbError(f"{len(failed)} integrity check(s) failed: {', '.join(r['check_name'] for r in failed)}")
    stderr.print(f"all {result.num_rows} integrity checks pass")


@db_app.command("upgrade")
def db_upgrade(db: Db = None, adopt: Annotated[bool, typer.Option(
        "--adopt", help="Add n2vdb's tables to a DuckDB file that already holds other tables")] = False):
    """Apply pending migrations (commands that write do this on their own)."""
    applied = api.db_upgrade(db, adopt)
    stderr.print(f"applied {', '.join(applied)}" if applied else "database is up to date")


def main() -> None:
    """Console entry point: one line on stderr and a non-zero exit for every user error."""
    sys.exit(_run())


def _run() -> int:
    debug = os.environ.get("N2VDB_DEBUG") == "1"
    signal.signal(signal.SIGTERM, _terminated)  # unwind (roll back, stop DataLoader workers) instead of dying
    if sys.stdout is None:  # started with stdout closed: fail on the first write, not on a None
        sys.stdout = ClosedOutput()
    try:
        try:
            code = app(standalone_mode=False)  # click's errors and Ctrl-C come here instead of exiting
        finally:
            sys.stdout.flush()  # an output error (a full disk, a closed pipe) is reported here, not at exit
    except (KeyboardInterrupt, typer.Abort, Terminated) as exc:
        return _interrupted(143 if isinstance(exc, Terminated) else 130)
    except ClickException as exc:
        exc.show()
        return exc.exit_code
    except N2vdbError as exc:
        return _fail(str(exc), exc.exit_code, debug)
    except duckdb.Error as exc:
        return _fail(f"database: {api.describe_sql_error(exc)}", 1, debug)
    except OSError as exc:
        return _fail(describe_os_error(exc), 1, debug)
    except UnicodeDecodeError as exc:
        return _fail(f"input is not UTF-8 text ({exc.reason} at byte {exc.start}); give a text file", 1, debug)
    except MemoryError:
        return _fail("out of memory; try a smaller --batch-size, --limit or input", 1, debug)
    if code == 130:  # typer turns Ctrl-C into a silent exit 130
        return _interrupted(130)
    return code or 0


class Terminated(BaseException):  # like KeyboardInterrupt: no `except Exception` swallows it
    """SIGTERM, raised where the process is so that transactions roll back and workers stop."""


def _terminated(_signum, _frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    if os.getpid() != _MAIN_PID:  # a forked worker (a pool's, a DataLoader's) inherits this: end as asked
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise Terminated


_MAIN_PID = os.getpid()


def _interrupted(code: int) -> int:
    _print_error_line("interrupted; run the same command again to resume", prefix=False)
    return code


def _fail(message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    _print_error_line(message)
    return code


def _print_error_line(message: str, prefix: bool = True) -> None:
    """User text is printed as it is: a Text is never parsed as markup."""
    line = Text(" ".join(message.splitlines()))
    if prefix:
        line = Text("Error: ", style="red") + line
    with contextlib.suppress(OSError):
        stderr.print(line, highlight=False)
