"""The n2vdb command line: parses, calls n2vdb.api, renders. No logic lives here."""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

try:  # typer 0.2x carries its own copy of click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
    from typer._click.exceptions import UsageError as ClickUsageError
except ImportError:  # pragma: no cover - older typer uses click itself
    from click.exceptions import ClickException, NoArgsIsHelpError
    from click.exceptions import UsageError as ClickUsageError

from n2vdb import __version__
from n2vdb.errors import N2vdbError, UsageError, describe_os_error
from n2vdb.render.output import FORMATS


class _NotImported(Exception):
    """Stands in for the errors of a module not imported yet: none of them can be in flight."""


class _Deferred:
    """A module, or one name in it, imported when a command first uses it: `n2vdb --help` and a
    named query must not pay for torch, numpy, matplotlib or the modules of commands they do not run."""

    def __init__(self, module: str, name: str | None = None):
        self._module, self._name = module, name

    def _resolve(self):
        found = importlib.import_module(self._module)
        return getattr(found, self._name) if self._name else found

    def __getattr__(self, attr: str):
        if attr == "Error" and self._module not in sys.modules:
            return _NotImported  # `except duckdb.Error` runs for every exit, --help's too
        return getattr(self._resolve(), attr)

    def __call__(self, *args, **kwargs):
        return self._resolve()(*args, **kwargs)


duckdb = _Deferred("duckdb")
api = _Deferred("n2vdb.api")
queries = _Deferred("n2vdb.queries")
adhoc = _Deferred("n2vdb.adhoc")
sandbox = _Deferred("n2vdb.store", "sandbox")
refuse_database_path = _Deferred("n2vdb.store", "refuse_database_path")
Rows = _Deferred("n2vdb.results", "Rows")
TrainSettings = _Deferred("n2vdb.probe", "TrainSettings")
say = _Deferred("n2vdb.progress", "say")
stderr = _Deferred("n2vdb.progress", "stderr")
render = _Deferred("n2vdb.render.output", "render")


class _Group(typer.core.TyperGroup):
    """A command group that remembers which command click resolved, so that an error about a library
    setting can be told in that command's own words (see _in_cli_words)."""

    def resolve_command(self, ctx, args):
        global _INVOKED
        name, command, rest = super().resolve_command(ctx, args)
        _INVOKED = command  # the innermost group resolves last: `data add` leaves `add`
        return name, command, rest


_INVOKED = None  # the command being run, once click has found it

app = typer.Typer(
    cls=_Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Net2Vec as a database: how CNN filters encode concepts, queried with SQL.",
)
data_app = typer.Typer(cls=_Group, no_args_is_help=True, help="Register, generate and fetch concept datasets.")
db_app = typer.Typer(cls=_Group, no_args_is_help=True, help="Schema status and upgrades.")
show_app = typer.Typer(cls=_Group, no_args_is_help=True, help="Images across a score distribution, as PNG grids.")
app.add_typer(data_app, name="data")
app.add_typer(db_app, name="db")
app.add_typer(show_app, name="show")

Db = Annotated[Optional[Path], typer.Option("--db", envvar="N2VDB_DB", help="Database file [default: ./n2v.duckdb]")]
Timeout = Annotated[
    Optional[float],
    typer.Option(help="Seconds before a read-only query is stopped [default: 600, or N2VDB_TIMEOUT; 0: none]"),
]
Format = Annotated[
    Optional[Literal[FORMATS]],  # a choice: click refuses anything else, naming the valid ones
    typer.Option("--format", "-f", help="[default: table on a terminal, csv when piped]"),
]
Limit = Annotated[Optional[int], typer.Option("--limit", help="Rows shown in the table view")]


def _show(result, fmt: str | None, limit: int | None = None, title: str | None = None) -> None:
    if result.num_rows == 0:
        stderr.print("(no rows)")
    render(result, fmt, limit=limit, title=title)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"n2vdb {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version")
    ] = False,
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
    profile: Annotated[
        str, typer.Option(help="builtin (29 concepts) | broden (Broden's categories and density)")
    ] = "builtin",
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
    dataset: Annotated[
        Optional[str], typer.Option(help="Registered dataset [default: broden if registered, else synthetic]")
    ] = None,
    weights: Annotated[str, typer.Option(help="imagenet | random | PATH to a state dict")] = "imagenet",
    seed: Annotated[int, typer.Option(help="Seed for random weights and training")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N images")] = None,
    input_size: Annotated[Optional[int], typer.Option(help="Input size in px [default: the model's]")] = None,
    quantile: Annotated[float, typer.Option(help="Threshold quantile per filter")] = 0.995,
    iou_mode: Annotated[
        str, typer.Option(help="net2vec (threshold, upsample) | netdissect (upsample, threshold)")
    ] = "net2vec",
    preprocess: Annotated[
        Optional[str], typer.Option(help="torchvision | caffe (NetDissect-Lite's) [default: the weights' own]")
    ] = None,
    epochs: Annotated[int, typer.Option(help="Embedding training epochs")] = 30,
    seg_lr: Annotated[float, typer.Option(help="Segmentation embedding learning rate")] = 1e-4,
    seg_batch: Annotated[int, typer.Option(help="Segmentation batch size")] = 16,
    seg_loss: Annotated[str, typer.Option("--loss", help="paper (no log, as published) | loglik")] = "paper",
    seg_bias: Annotated[
        bool, typer.Option("--bias/--no-bias", help="Learn a bias for segmentation embeddings")
    ] = False,
    cls_lr: Annotated[float, typer.Option(help="Classification embedding learning rate")] = 0.1,
    cls_batch: Annotated[int, typer.Option(help="Classification batch size")] = 64,
    sufficiency: Annotated[
        bool, typer.Option(help="Retrain with the top-F filters for the reference's F grids")
    ] = False,
    sufficiency_grid: Annotated[
        Optional[str], typer.Option(help="F values for --sufficiency, e.g. 1,2,4,8 [default: the reference's]")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward batch")] = 32,
    workers: Annotated[Optional[int], typer.Option(help="Image-decoding worker processes")] = None,
    shard: Annotated[
        Optional[str], typer.Option(help="Extract only shard i/N (or auto under torchrun) into --shard-dir")
    ] = None,
    shard_dir: Annotated[Path, typer.Option(help="Where shards write Parquet parts")] = Path("n2v_shards"),
    formulas: Annotated[
        bool, typer.Option(help="Then each unit's compositional formula (`n2vdb formulas` for its settings)")
    ] = False,
    significance: Annotated[
        bool,
        typer.Option(
            help="Then intervals, p- and q-values with the defaults, where they apply (`n2vdb significance` for "
            "other settings; docs/significance.md)"
        ),
    ] = True,
    db: Db = None,
):
    """Extract a layer's activations and compute thresholds, IoUs and embeddings (resumes if interrupted)."""
    from n2vdb.embed.stage import parse_grid  # here, not at the top: it imports torch

    train = TrainSettings(
        epochs=epochs,
        seg_lr=seg_lr,
        seg_batch=seg_batch,
        seg_loss=seg_loss,  # named as TrainSettings names them: its errors find their flag (_in_cli_words)
        seg_bias=seg_bias,
        cls_lr=cls_lr,
        cls_batch=cls_batch,
        seed=seed,
        sufficiency=sufficiency,
        sufficiency_grid=parse_grid(sufficiency_grid) if sufficiency_grid else None,
    )
    options = dict(
        dataset=dataset,
        weights=weights,
        seed=seed,
        device=device,
        limit=limit,
        input_size=input_size,
        quantile=quantile,
        iou_mode=iou_mode,
        preprocess=preprocess,
        batch_size=batch_size,
        workers=workers,
        train=train,
    )
    if shard is not None:
        part_dir = api.ingest_shard(model, layer, shard, shard_dir, db, **options)
        stderr.print(f"shard written to {part_dir}; when every shard is done: n2vdb merge {shard_dir}")
        return
    start = time.perf_counter()
    probe_id = api.ingest(model, layer, db, **options)
    if formulas:
        api.formulas(probe_id, db, workers=workers or 0)
    if significance:
        run_id, skipped = api.significance_where_it_applies(probe_id, db, workers or 0)
        stderr.print(f"significance: {skipped}" if skipped else f"significance stored as run {run_id}", markup=False)
    _summary(probe_id, model, layer, db, start)


@app.command()
def merge(
    shard_dir: Annotated[Path, typer.Argument(help="The --shard-dir the shards wrote to")] = Path("n2v_shards"),
    db: Db = None,
):
    """Fold finished shards into the database and run the remaining stages (thresholds, IoU, embeddings)."""
    start = time.perf_counter()
    for probe_id in api.merge(shard_dir, db):
        row = [r for r in api.probes(db).to_pylist() if r["probe_id"] == probe_id][0]
        _summary(probe_id, row["model"], row["layer"], db, start)


def _summary(probe_id: int, model: str, layer: str, db, start: float) -> None:
    summary = api.query("single-vs-embedding", db, probe=probe_id)
    overall = [r for r in summary.to_pylist() if r["category"] == "all"]
    stderr.print(f"probe {probe_id}: {model} {layer} done in {time.perf_counter() - start:.1f} s")
    stages = api.query("stage-timings", db, probe=probe_id).to_pylist()
    if stages:
        stderr.print(
            "stages: "
            + ", ".join(f"{r['stage']} {r['seconds']:.1f} s ({r['ms_per_image']} ms/image)" for r in stages)
            + f"; peak RSS {max(r['peak_rss_mb'] for r in stages):.0f} MB",
            markup=False,
        )
    if overall and overall[0]["concepts"]:  # none for a vector layer, which has no segmentation
        row = overall[0]
        stderr.print(
            f"mean val IoU over {row['concepts']} concepts: best single filter "
            f"{row['single_filter_iou']:.4f}, embedding {row['embedding_iou']:.4f}"
        )
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


# --help is the query's own (generated from its .sql header), so click must not take it first.
@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def query(
    ctx: typer.Context,
    name: Annotated[Optional[str], typer.Argument(help="Query name; omit to list them")] = None,
    param: Annotated[list[str], typer.Option("--param", "-p", help="key=value (repeatable)")] = [],  # noqa: B006
    db: Db = None,
    fmt: Format = None,
    limit: Limit = None,
    timeout: Timeout = None,
):
    """Run a named analysis from queries/ (arguments and --options as its header declares; NAME --help
    shows them)."""
    if "--help" in ctx.args or name == "--help":
        typer.echo(ctx.get_help() if name in (None, "--help") else queries.get(name).help())
        raise typer.Exit()
    if name is None:
        rows = [
            {"query": q.name, "usage": q.usage(), "description": q.description} for q in queries.load_all().values()
        ]
        _show(Rows.from_pylist(rows), fmt)
        return
    named = queries.get(name)
    values = queries.parse_query_args(named, list(ctx.args), param)
    # api.query's work, with the result as Python rows: a cold `n2vdb query` never imports pyarrow
    with sandbox(db) as con:
        result = queries.run_rows(con, name, timeout, **values)
    _show(result, fmt, limit, title=name)


@app.command()
def sql(
    statement: Annotated[Optional[str], typer.Argument(help="SQL; omit to read --file or stdin")] = None,
    file: Annotated[Optional[Path], typer.Option("--file", help="Read SQL from a file")] = None,
    write: Annotated[
        bool,
        typer.Option(
            "--write",
            help="Allow statements that change this database; all of them run as one transaction (all or nothing)",
        ),
    ] = False,
    read: Annotated[
        list[str],
        typer.Option(
            "--read",
            metavar="NAME=PATH",
            help="Open PATH (a Parquet or CSV file, "
            "a directory of them, or a glob) read-only and show it to the SQL as view NAME (repeatable); "
            "the SQL itself still reaches no file",
        ),
    ] = [],  # noqa: B006
    output: Annotated[
        Optional[Path],
        typer.Option(
            "--output",
            "-o",
            help="Write the last statement's result to "
            "this .parquet or .csv file (created or replaced) instead of printing it",
        ),
    ] = None,
    db: Db = None,
    fmt: Format = None,
    limit: Limit = None,
    timeout: Timeout = None,
):
    """Run ad-hoc SQL against the database in a sandbox: read-only, no files, no extensions (docs/sandbox.md)."""
    if statement is None:
        if file is not None:
            statement = _read_sql_file(file)
        elif not sys.stdin.isatty():
            statement = sys.stdin.read()
        else:
            raise UsageError("give SQL as an argument, with --file, or on stdin")
    reads = adhoc.parse_reads(read)
    if output is not None:
        refuse_database_path(output, db, "output")
    # api.sql's work, with the result as Python rows: a cold `n2vdb sql` never imports pyarrow
    with sandbox(db, write=write) as con:
        adhoc.register_files(con, reads)
        result = adhoc.run(con, statement, write=write, output=output, rows=True, timeout=timeout)
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


@app.command()
def shell(db: Db = None, fmt: Format = None, timeout: Timeout = None):
    """Interactive SQL, named queries as .query NAME ARGS (.help); with piped stdin, runs it as a script."""
    from n2vdb import shell as shell_mod

    raise typer.Exit(shell_mod.main(db, fmt, timeout=timeout))


@app.command()
def export(
    dest: Annotated[
        str, typer.Argument(help="A directory (Parquet) or a URL: sqlite:///FILE, postgresql://USER@HOST/DB")
    ],
    probe: Annotated[
        Optional[int], typer.Option("--probe", help="Only this probe (and its dataset); replaces its rows there")
    ] = None,
    db: Db = None,
):
    """Copy the public tables to Parquet files or a SQL server, in bounded chunks."""
    counts = api.export(dest, db, probe, progress=lambda table, rows: say(f"{table}: {rows} rows"))
    stderr.print(f"exported {sum(counts.values())} rows in {len(counts)} tables")


# -- seeing it ---------------------------------------------------------------------------------

Probe = Annotated[Optional[int], typer.Option("--probe", help="Probe id [default: the newest complete one]")]
Out = Annotated[Optional[Path], typer.Option("--out", help="PNG file to write [default: n2v_out/...]")]


@show_app.command("concept")
def show_concept(
    name: str,
    probe: Probe = None,
    method: Annotated[str, typer.Option(help="segmentation (the embedding) | best_filter")] = "segmentation",
    over: Annotated[
        str, typer.Option(help="containing (per-image IoU) | all (classification score, every image)")
    ] = "containing",
    out: Out = None,
    db: Db = None,
):
    """Images containing NAME at quantiles 1, .99, .95, .9, .75, .5 of its per-image IoU, masks overlaid
    (--over all: every image, at quantiles of the concept's classification score)."""
    from n2vdb.render.grids import sparkline

    path, samples, values = api.show_concept(name, db, probe, method, out, over)
    what = "classification score" if over == "all" else "per-image IoU"
    stderr.print(
        f"{what} over {len(values)} images  0 {sparkline(values)} 1  median {sorted(values)[len(values) // 2]:.3f}"
    )
    typer.echo(str(path))


@show_app.command("filter")
def show_filter(
    filter_id: Annotated[int, typer.Argument(metavar="K")], probe: Probe = None, out: Out = None, db: Db = None
):
    """Images at quantiles of filter K's peak activation, its thresholded mask overlaid."""
    path, _ = api.show_filter(filter_id, db, probe, out)
    typer.echo(str(path))


@app.command("formulas")
def formulas_cmd(
    probe: Probe = None,
    beam_size: Annotated[int, typer.Option("--beam", help="Beam width (compexp's BEAM_SIZE)")] = 5,
    max_length: Annotated[int, typer.Option("--length", help="Labels in a formula, at most")] = 3,
    penalty: Annotated[float, typer.Option(help="Score = IoU x penalty^(length - 1)")] = 1.0,
    categories: Annotated[
        Optional[str], typer.Option(help="Label categories, e.g. object,part,scene,texture,color [default: all]")
    ] = None,
    split: Annotated[str, typer.Option(help="all (every image, as compexp) | train (val IoU reported)")] = "all",
    workers: Annotated[int, typer.Option(help="Mask-decoding worker processes")] = 0,
    db: Db = None,
):
    """Explain each unit by a formula of labels (AND, OR, AND NOT), by compexp's beam search."""
    chosen = [c.strip() for c in categories.split(",") if c.strip()] if categories is not None else None
    run_id = api.formulas(probe, db, beam_size, max_length, penalty, chosen, split, workers)
    stderr.print(f"formulas stored as run {run_id}; n2vdb query unit-formulas shows them")


@app.command("significance")
def significance_cmd(
    probe: Probe = None,
    replicates: Annotated[int, typer.Option(help="Poisson bootstrap replicates")] = 200,
    level: Annotated[float, typer.Option(help="Confidence level of the intervals")] = 0.95,
    labels: Annotated[int, typer.Option(help="Each unit's best labels (train IoU) tested on val")] = 10,
    filters: Annotated[int, typer.Option(help="Each concept's best filters (train IoU) given intervals")] = 10,
    permutations: Annotated[int, typer.Option(help="Null draws per test (smallest p = 1 / (N + 1))")] = 1000,
    seed: Annotated[int, typer.Option(help="Seeds the bootstrap weights and the permutations")] = 0,
    block: Annotated[
        int, typer.Option(help="Val images of one size a permutation re-pairs (larger: more power for rare labels)")
    ] = 32,
    workers: Annotated[int, typer.Option(help="Mask-decoding worker processes")] = 0,
    db: Db = None,
):
    """Bootstrap intervals beside the scores, permutation p- and q-values for each unit's best labels."""
    run_id = api.significance(probe, db, replicates, level, labels, filters, permutations, seed, workers, block)
    stderr.print(f"significance stored as run {run_id}; n2vdb query significant-labels shows the labels that pass")


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
    models: Annotated[
        Optional[str], typer.Option(help="Comma-separated subset of alexnet,vgg16,googlenet,resnet50")
    ] = None,
    offline: Annotated[
        Optional[bool],
        typer.Option("--offline/--online", help="[default: online when Broden and ImageNet weights are present]"),
    ] = None,
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
def db_upgrade(
    db: Db = None,
    adopt: Annotated[
        bool, typer.Option("--adopt", help="Add n2vdb's tables to a DuckDB file that already holds other tables")
    ] = False,
):
    """Apply pending migrations (commands that write do this on their own)."""
    applied = api.db_upgrade(db, adopt)
    stderr.print(f"applied {', '.join(applied)}" if applied else "database is up to date")


def main() -> None:
    """Console entry point: one line on stderr and a non-zero exit for every user error."""
    code = 1
    try:
        code = _run()
    except BaseException:
        if not _SIGNALLED:
            raise
    # Whatever the signal became on its way (DuckDB turns it into "Query interrupted"), the exit says
    # so; a Ctrl-C that a command handled and went on from (the shell's cancel) is not an exit.
    if _SIGNALLED == 143 or (_SIGNALLED == 130 and code != 0):
        code = _interrupted(_SIGNALLED)
    sys.exit(code)


def _sql_as_argument(argv: list[str]) -> list[str]:
    """`n2vdb sql "-- why\nSELECT ..."`: SQL that starts with a comment looks like an option to click.
    No option has whitespace before its '=', so such a word is the SQL: it goes last, after '--'."""
    if not argv or argv[0] != "sql":
        return argv
    for i, word in enumerate(argv[1:], 1):
        if word.startswith("-") and any(c.isspace() for c in word.split("=", 1)[0]):
            return [*argv[:i], *argv[i + 1 :], "--", word]
    return argv


def _run() -> int:
    global _INVOKED, _SIGNALLED, _SAID_INTERRUPTED
    # Each run starts afresh: tests run several in one process, and a Ctrl-C another test sent after
    # an earlier run installed _terminated must not make this one report "interrupted".
    _INVOKED, _SIGNALLED, _SAID_INTERRUPTED = None, 0, False
    debug = os.environ.get("N2VDB_DEBUG") == "1"
    signal.signal(signal.SIGTERM, _terminated)  # unwind (roll back, stop DataLoader workers) instead of dying
    signal.signal(signal.SIGINT, _terminated)  # as Python's own, but never lost in a fork hook
    if sys.stdout is None:  # started with stdout closed: fail on the first write, not on a None
        from n2vdb.progress import ClosedOutput

        sys.stdout = ClosedOutput()
    try:
        try:
            argv = _sql_as_argument(sys.argv[1:])
            code = _branch(argv)(args=argv, standalone_mode=False)  # click's errors and Ctrl-C come here
        finally:
            sys.stdout.flush()  # an output error (a full disk, a closed pipe) is reported here, not at exit
    except (KeyboardInterrupt, typer.Abort, Terminated) as exc:
        return _interrupted(143 if isinstance(exc, Terminated) else 130)
    except NoArgsIsHelpError as exc:  # `n2vdb data`: the group's help, as asked
        exc.show()
        return exc.exit_code
    except ClickUsageError as exc:  # one line like every other error, not click's usage box
        return _fail(_click_usage_message(exc), exc.exit_code, debug)
    except ClickException as exc:
        exc.show()
        return exc.exit_code
    except UsageError as exc:
        return _fail(_in_cli_words(exc), exc.exit_code, debug)
    except N2vdbError as exc:
        return _fail(str(exc), exc.exit_code, debug)
    except duckdb.Error as exc:
        return _fail(f"database: {_describe_sql_error(exc)}", 1, debug)
    except OSError as exc:
        return _fail(describe_os_error(exc), 1, debug)
    except UnicodeDecodeError as exc:
        return _fail(f"input is not UTF-8 text ({exc.reason} at byte {exc.start}); give a text file", 1, debug)
    except MemoryError:
        return _fail("out of memory; try a smaller --batch-size, --limit or input", 1, debug)
    if code == 130:  # typer turns Ctrl-C into a silent exit 130
        return _interrupted(130)
    return code or 0


def _branch(args: list[str]) -> typer.Typer:
    """The app with only the command that ARGS start with (its own definition, not a copy): click then
    builds that command's options instead of every command's (~10 ms of each start). With no command
    named (--help, --version, a typo) it is the whole app."""
    first = args[0] if args else None
    commands = [
        c for c in app.registered_commands if (c.name or typer.main.get_command_name(c.callback.__name__)) == first
    ]
    groups = [g for g in app.registered_groups if g.name == first]
    if not commands and not groups:
        return app
    branch = copy.copy(app)
    branch.registered_commands, branch.registered_groups = commands, groups
    return branch


class Terminated(BaseException):  # like KeyboardInterrupt: no `except Exception` swallows it
    """SIGTERM, raised where the process is so that transactions roll back and workers stop."""


# Python ignores an exception raised in these (hooks it calls around os.fork, finalizers): a SIGTERM
# that lands in one is raised again a moment later, in ordinary code.
_SWALLOWING = {"_releaseLock", "_acquireLock", "_at_fork_reinit", "_after_at_fork_child_reinit_locks", "__del__"}


def _terminated(signum, frame) -> None:
    """SIGTERM and SIGINT: unwind the main process with Terminated / KeyboardInterrupt, so that
    transactions roll back and workers stop; a forked worker ends as the signal asks."""
    global _SIGNALLED, _PENDING
    if os.getpid() != _MAIN_PID:  # a forked worker (a pool's, a DataLoader's) inherits this handler
        signal.signal(signum, signal.SIG_DFL)
        if signum == signal.SIGTERM:
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise KeyboardInterrupt
    if signum == signal.SIGALRM:  # a signal deferred out of a hook that would have swallowed it
        signum = _PENDING
    _SIGNALLED = 143 if signum == signal.SIGTERM else 130
    if signum == signal.SIGTERM:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    if frame is not None and frame.f_code.co_name in _SWALLOWING:
        _PENDING = signum
        signal.signal(signal.SIGALRM, _terminated)
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        return
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


_MAIN_PID = os.getpid()
_SIGNALLED = 0  # 143 after SIGTERM, 130 after SIGINT: the exit code, however the exception travelled
_PENDING = signal.SIGINT  # the signal a SIGALRM stands for, when one was deferred
_SAID_INTERRUPTED = False


def _in_cli_words(exc: UsageError) -> str:
    """A library error names a setting as Python does (`epochs`); here it is the option that sets it
    (`--epochs`), found among the declarations of the command that ran."""
    for param in getattr(_INVOKED, "params", ()):
        if exc.param is not None and param.name == exc.param and param.param_type_name == "option":
            return exc.in_words(next((o for o in param.opts if o.startswith("--")), param.opts[0]))
    return str(exc)


def _click_usage_message(exc: ClickUsageError) -> str:
    """Click's complaint (a bad choice names the valid ones) and where the command's options are listed."""
    # typer coerces values with pydantic, which prefixes what a validator raised with "Value error, "
    message = exc.format_message().replace("Value error, ", "")
    return f"{message} (`{exc.ctx.command_path} --help` shows its usage)" if exc.ctx else message


def _describe_sql_error(exc) -> str:
    from n2vdb.adhoc import describe_error

    return describe_error(exc)


def _interrupted(code: int) -> int:
    global _SAID_INTERRUPTED
    if not _SAID_INTERRUPTED:
        _SAID_INTERRUPTED = True
        _print_error_line("interrupted; run the same command again to resume", prefix=False)
    return code


def _fail(message: str, code: int, debug: bool) -> int:
    if debug:
        import traceback  # N2VDB_DEBUG only: 4 ms of every start otherwise

        traceback.print_exc()
    _print_error_line(message)
    return code


def _print_error_line(message: str, prefix: bool = True) -> None:
    """User text is printed as it is: a Text is never parsed as markup."""
    from rich.text import Text

    line = Text(" ".join(message.splitlines()))
    if prefix:
        line = Text("Error: ", style="red") + line
    with contextlib.suppress(OSError):
        stderr.print(line, highlight=False)
