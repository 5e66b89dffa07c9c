"""Cold start (issue 16 item 4): a named query, `n2vdb sql` and --help never import torch, pyarrow or
numpy, and what they print is what the pyarrow path printed; --format is a choice; library errors name
Python parameters and the CLI says the flag (issue 14 items 3 and 4)."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import duckdb
import pytest
from test_queries import filled  # noqa: F401 - the fixture: two probes with embeddings

from n2vdb import api, results
from n2vdb.errors import UsageError
from n2vdb.probe import TrainSettings
from n2vdb.render.output import FORMATS, render

from helpers import run_cli

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "pyarrow", "numpy")

# Every kind of column a result can have: those fetched as DuckDB's Python values and those that go
# through Arrow (MAP, INTERVAL, HUGEINT, UUID, fixed-size ARRAY, TIMESTAMPTZ, TIMESTAMP_NS).
EVERY_TYPE = """
SELECT 1::TINYINT AS ti, 2::SMALLINT AS si, 3 AS i, 4::BIGINT AS bi, 5::UTINYINT AS uti, 6::UBIGINT AS ubi,
       0.1::FLOAT AS f, 0.34669965505599976::DOUBLE AS iou, 'nan'::DOUBLE AS nan_score, 1e-7 AS tiny, 12345678.5::DOUBLE AS big,
       'x' AS v, '[/red]' AS markup, true AS b, NULL AS n, 1.25::DECIMAL(5, 2) AS dec,
       DATE '2020-01-02' AS d, TIME '01:02:03' AS t, TIMESTAMP '2020-01-02 03:04:05.123456' AS ts,
       TIMESTAMP_MS '2020-01-02 03:04:05.123' AS ts_ms, '\\x01'::BLOB AS bl, 'a'::ENUM('a', 'b') AS e,
       [1, 2, 3, 4, 5] AS li, ['a', NULL] AS lv, [0.5, 0.25]::DOUBLE[] AS ld, {'a': 1, 'b': [1.5]} AS st,
       MAP {'k': 1} AS m, INTERVAL 3 DAY AS iv, 123::HUGEINT AS h, '7e2d8a5c-1d2b-4c3e-9f00-0123456789ab'::UUID AS u,
       [1.5, 2.5]::FLOAT[2] AS arr, TIMESTAMPTZ '2020-01-02 03:04:05+00' AS tz, TIMESTAMP_NS '2020-01-01' AS ns
"""


def test_rows_fetched_by_duckdb_equal_what_arrow_gives_for_every_type():
    con = duckdb.connect()
    relation = con.sql(EVERY_TYPE + " UNION ALL " + EVERY_TYPE.replace("SELECT 1::TINYINT", "SELECT NULL::TINYINT"))
    fetched = results.fetch(relation)
    via_arrow = results.Rows.from_arrow(relation.to_arrow_table())
    assert fetched.column_names == via_arrow.column_names and fetched.kinds == via_arrow.kinds
    # repr: the same values of the same types (Decimal is not float, a tuple is not a list; NaN equals NaN)
    assert repr(fetched.rows) == repr(via_arrow.rows)
    assert fetched.kinds[:7] == ["integer"] * 6 + ["floating"] and fetched.kinds[15] == "decimal"


def test_duckdb_fetch_is_the_path_for_simple_columns():
    """The Arrow fallback is taken only where a column needs it (else the fast path would be a no-op)."""
    con = duckdb.connect()
    simple = con.sql("SELECT 1 AS a, 0.5::DOUBLE AS b, 'x' AS c, [1, 2] AS d, {'e': 'f'} AS g")
    with mock.patch.dict(sys.modules, {"pyarrow": None}):  # `import pyarrow` fails in here
        assert results.fetch(simple).rows == [{"a": 1, "b": 0.5, "c": "x", "d": [1, 2], "g": {"e": "f"}}]
        with pytest.raises(ImportError):
            results.fetch(con.sql("SELECT MAP {'k': 1} AS m"))
    assert results.fetch(con.sql("SELECT MAP {'k': 1} AS m")).rows == [{"m": [("k", 1)]}]  # Arrow's value


def _rendered(result, fmt, **kwargs) -> str:
    out = io.StringIO()
    render(result, fmt, stream=out, **kwargs)
    return out.getvalue()


@pytest.mark.parametrize("fmt", FORMATS)
def test_answers_print_as_the_arrow_path_printed(filled, fmt):  # noqa: F811
    db, _ = filled
    for title, args, arrow in [
        (
            "nearest",
            ["query", "nearest", "dog", "-k", "5", "--probe", "1"],
            api.query("nearest", db, concept="dog", k=5, probe=1),
        ),
        (None, ["sql", EVERY_TYPE], api.sql(EVERY_TYPE, db)),
    ]:
        result = run_cli(*args, "--db", db, "-f", fmt)
        assert result.returncode == 0, result.stderr
        assert result.stdout == _rendered(arrow, fmt, title=title) and result.stdout.strip()


def test_cold_answers_import_no_torch_pyarrow_or_numpy(filled, tmp_path):  # noqa: F811
    """One fresh interpreter runs the fast paths one after another; after each, none of the heavy
    modules may be loaded."""
    db, _ = filled
    commands = [
        ["--help"],
        ["sql", "SELECT 1 AS one", "--db", str(db)],
        ["query", "nearest", "dog", "-k", "5", "--probe", "1", "--db", str(db)],
        ["query", "nearest", "dog", "-k", "5", "--probe", "1", "--db", str(db), "-f", "table"],
        ["query", "--db", str(db)],
        ["query", "nearest", "--help"],
        ["sql", "SELECT 1", "-f", "xml"],
    ]
    report = tmp_path / "modules.json"
    script = f"""
import contextlib, io, json, sys
from n2vdb import cli
found = []
for argv in {commands!r}:
    sys.argv = ["n2vdb", *argv]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main()
        except SystemExit as exc:
            code = exc.code
    found.append({{"argv": argv, "code": code, "out": out.getvalue(), "heavy": [m for m in {HEAVY!r} if m in sys.modules]}})
open({str(report)!r}, "w").write(json.dumps(found))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "N2VDB_QUIET": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=tmp_path, timeout=120)
    runs = json.loads(report.read_text())
    assert [r["code"] for r in runs] == [0, 0, 0, 0, 0, 0, 2]
    assert runs[1]["out"] == "one\n1\n" and runs[2]["out"].startswith("rank,concept,category,similarity\n")
    assert all(r["out"] for r in runs[:6])  # each printed its answer
    assert [r["heavy"] for r in runs] == [[]] * len(commands)


def test_format_is_a_choice_refused_on_one_line(filled):  # noqa: F811
    db, _ = filled
    for args in (["sql", "SELECT 1"], ["query", "nearest", "dog"]):
        result = run_cli(*args, "-f", "xml", "--db", db)
        assert result.returncode == 2 and not result.stdout
        assert result.stderr.count("\n") == 1 and "Usage:" not in result.stderr, result.stderr
        assert "'xml' is not one of 'table', 'csv', 'tsv', 'json', 'jsonl', 'markdown'" in result.stderr
    other = run_cli("sql", "--nope")  # every click usage error is one line too
    assert other.returncode == 2 and other.stderr.count("\n") == 1 and "No such option: --nope" in other.stderr


@pytest.mark.parametrize(
    "field, value, flag, message",
    [
        ("epochs", 0, "--epochs", "must be at least 1, got 0"),
        ("seg_loss", "log", "--loss", "'log': choose one of paper, loglik"),  # the flag is not the field's name
        ("seg_lr", float("nan"), "--seg-lr", "must be a finite number above 0, got nan"),
    ],
)
def test_library_errors_name_the_parameter_and_the_cli_the_flag(tmp_path, field, value, flag, message):
    with pytest.raises(UsageError) as raised:
        TrainSettings(**{field: value})
    assert str(raised.value).startswith(f"{field} {message}") and "--" not in str(raised.value)
    assert raised.value.param == field
    result = run_cli("ingest", "alexnet", "conv5", flag, str(value), "--db", tmp_path / "x.duckdb")
    assert result.returncode == 2 and result.stderr == f"Error: {flag} {message}\n"
    assert not (tmp_path / "x.duckdb").exists()


def test_sandbox_errors_name_the_keyword_and_the_cli_the_flag(filled):  # noqa: F811
    db, _ = filled
    with pytest.raises(UsageError, match=r"^write already runs everything as one transaction") as raised:
        api.sql("COMMIT", db, write=True)
    assert raised.value.param == "write"
    result = run_cli("sql", "--write", "COMMIT", "--db", db)
    assert result.returncode == 2 and result.stderr.startswith("Error: --write already runs everything")
    with pytest.raises(UsageError, match=r"^output x\.txt: name a \.parquet or \.csv file"):
        api.sql("SELECT 1", db, output="x.txt")
    assert "Error: --output x.txt: name a" in run_cli("sql", "SELECT 1", "-o", "x.txt", "--db", db).stderr


def test_an_error_about_a_setting_begins_with_its_name():
    with pytest.raises(ValueError):
        UsageError("must be at least 1", param="epochs")
    assert UsageError("epochs must be at least 1", param="epochs").in_words("--epochs") == "--epochs must be at least 1"


def test_a_run_builds_only_its_command_from_the_same_definitions():
    import typer

    from n2vdb import cli

    whole = typer.main.get_command(cli.app)
    for name, command in whole.commands.items():
        branch = typer.main.get_command(cli._branch([name, "--help"]))
        assert list(branch.commands) == [name]
        built = branch.commands[name]
        assert built.help == command.help and list(getattr(built, "commands", ())) == list(
            getattr(command, "commands", ())
        )
        assert [(p.name, p.opts) for p in built.params] == [(p.name, p.opts) for p in command.params]
    for args in ([], ["--help"], ["--version"], ["sqll"]):  # no command named: the whole app (help, typo hints)
        assert cli._branch(args) is cli.app
