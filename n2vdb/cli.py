"""The n2vdb command line: parses, calls n2vdb.api, renders. No logic lives here."""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import Annotated, Optional

import duckdb
import pyarrow as pa
import typer

from n2vdb import __version__, api, queries
from n2vdb.errors import N2vdbError, UsageError
from n2vdb.probe import TrainSettings
from n2vdb.progress import stderr
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
    profile: Annotated[str, typer.Option(help="builtin (29 concepts) | broden (Broden's categories and density)")] = "builtin",
    db: Db = None,
):
    """Write the built-in concept set as a Broden-format directory and register it."""
    root = api.synth(path, images, size, seed, name or None, db, profile=profile)
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
    preprocess: Annotated[Optional[str], typer.Option(help="torchvision | caffe (NetDissect-Lite's) [default: the weights' own]")] = None,
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
    if loss not in ("paper", "loglik"):
        raise UsageError("--loss must be paper or loglik")
    train = TrainSettings(epochs=epochs, seg_lr=seg_lr, seg_batch=seg_batch, seg_loss=loss, seg_bias=bias,
                          cls_lr=cls_lr, cls_batch=cls_batch, seed=seed, sufficiency=sufficiency)
    options = dict(dataset=dataset, weights=weights, seed=seed, device=device, limit=limit, input_size=input_size,
                   quantile=quantile, iou_mode=iou_mode, preprocess=preprocess, batch_size=batch_size,
                   workers=workers, train=train)
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
    write: Annotated[bool, typer.Option("--write", help="Allow statements that change this database; all of them "
                                        "run as one transaction (all or nothing)")] = False,
    read: Annotated[list[str], typer.Option("--read", metavar="NAME=PATH", help="Open PATH (a Parquet or CSV file, "
                    "a directory of them, or a glob) read-only and show it to the SQL as view NAME (repeatable); "
                    "the SQL itself still reaches no file")] = [],  # noqa: B006
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the last statement's result to "
                      "this .parquet or .csv file (created or replaced) instead of printing it")] = None,
    db: Db = None,
    fmt: Format = None,
    limit: Limit = None,
):
    """Run ad-hoc SQL against the database in a sandbox: read-only, no files, no extensions (docs/sandbox.md)."""
    from n2vdb import adhoc

    if statement is None:
        if file is not None:
            statement = _read_sql_file(file)
        elif not sys.stdin.isatty():
            statement = sys.stdin.read()
        else:
            raise UsageError("give SQL as an argument, with --file, or on stdin")
    result = api.sql(statement, db, write, adhoc.parse_reads(read), output)
    if result is None:
        stderr.print(f"wrote {output}")
        return
    _show(result, fmt, limit)


def _read_sql_file(file: Path) -> str:
    if not file.is_file():
        raise UsageError(f"no SQL file {file}")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{file} is not a UTF-8 text file of SQL") from None
    except OSError as exc:
        raise UsageError(f"cannot read {file}: {exc.strerror}") from None


# -- seeing it ---------------------------------------------------------------------------------

Probe = Annotated[Optional[int], typer.Option("--probe", help="Probe id [default: the newest complete one]")]
Out = Annotated[Optional[Path], typer.Option("--out", help="PNG file to write [default: n2v_out/...]")]


@show_app.command("concept")
def show_concept(
    name: str,
    probe: Probe = None,
    method: Annotated[str, typer.Option(help="segmentation (the embedding) | best_filter")] = "segmentation",
    over: Annotated[str, typer.Option(help="containing (per-image IoU) | all (classification score, every image)")] = "containing",
    out: Out = None,
    db: Db = None,
):
    """Images containing NAME at quantiles 1, .99, .95, .9, .75, .5 of its per-image IoU, masks overlaid
    (--over all: every image, at quantiles of the concept's classification score)."""
    from n2vdb.render.grids import sparkline

    path, samples, values = api.show_concept(name, db, probe, method, out, over)
    what = "classification score" if over == "all" else "per-image IoU"
    stderr.print(f"{what} over {len(values)} images  0 {sparkline(values)} 1  "
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


@app.command()
def reproduce(
    paper: Annotated[str, typer.Argument(help="net2vec")],
    models: Annotated[Optional[str], typer.Option(help="Comma-separated subset of alexnet,vgg16,googlenet,resnet50")] = None,
    offline: Annotated[Optional[bool], typer.Option("--offline/--online", help="[default: online when Broden and ImageNet weights are present]")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N images")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Embedding training epochs [default: the paper's 30]")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    db: Db = None,
    fmt: Format = None,
):
    """Run the paper's setting (AlexNet, VGG16, GoogLeNet, ResNet-50) and print its table beside n2vdb's."""
    chosen = [m.strip() for m in models.split(",") if m.strip()] if models else None
    table, notes = api.reproduce(paper, db, chosen, offline, limit=limit, epochs=epochs, device=device)
    for note in notes:
        stderr.print(note, markup=False, highlight=False)
    _show(table, fmt, title=f"reproduce {paper}")


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
def db_upgrade(db: Db = None):
    """Apply pending migrations (commands that write do this on their own)."""
    applied = api.db_upgrade(db)
    stderr.print(f"applied {', '.join(applied)}" if applied else "database is up to date")


def main() -> None:
    """Console entry point: one line on stderr and a non-zero exit for every user error."""
    debug = os.environ.get("N2VDB_DEBUG") == "1"
    try:
        app(standalone_mode=True)
    except N2vdbError as exc:
        if debug:
            traceback.print_exc()
        stderr.print(f"[red]Error:[/red] {exc}", highlight=False, markup=True)
        sys.exit(exc.exit_code)
    except duckdb.Error as exc:
        if debug:
            traceback.print_exc()
        from n2vdb.adhoc import describe_error

        stderr.print(f"[red]Error:[/red] database: {describe_error(exc)}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        stderr.print("interrupted; run the same command again to resume")
        sys.exit(130)
