"""Rendering: columns that read well in table views, every digit in machine formats, no markup."""

import csv
import io
import json
import math

import pyarrow as pa

from n2vdb.render.output import column_formatter, render

SCORES = [0.394, 0.05469, 0.34669965505599976, float("nan"), None]


def rendered(table: pa.Table, fmt: str, **kw) -> str:
    out = io.StringIO()
    render(table, fmt, stream=out, **kw)
    return out.getvalue()


def markdown_column(text: str, index: int) -> list[str]:
    return [line.split(" | ")[index].strip("| ") for line in text.splitlines()[2:]]


def test_scores_share_fixed_decimals_down_the_column():
    table = pa.table({"concept": ["a", "b", "c", "d", "e"], "val_iou": SCORES})
    shown = markdown_column(rendered(table, "markdown"), 1)
    assert shown == ["0.3940", "0.0547", "0.3467", "", ""]


def test_other_decimals_get_one_precision_chosen_by_the_largest_value():
    thresholds = [12.3456, 0.5, 3.25]
    fmt = column_formatter("threshold", thresholds)
    assert [fmt(v) for v in thresholds] == ["12.35", "0.50", "3.25"]
    big = column_formatter("max_value", [1234.6, 2.25])
    assert [big(1234.6), big(2.25)] == ["1235", "2"]
    tiny = column_formatter("threshold_bound", [3e-6, 1.5e-5])
    assert tiny(3e-6) == "3.000e-06"
    # the same numbers under a score name: scores stay at four decimals even when they are tiny
    assert column_formatter("iou", [3e-6])(3e-6) == "0.0000"


def test_counts_are_integers_even_when_they_arrive_as_doubles():
    table = pa.table({"concepts": pa.array([3.0, 12.0, None], pa.float64()), "filters": [1, 20, 300]})
    text = rendered(table, "markdown")
    assert markdown_column(text, 0) == ["3", "12", ""]
    assert markdown_column(text, 1) == ["1", "20", "300"]


def test_rich_table_aligns_scores_and_keeps_the_column_precision():
    table = pa.table({"concept": ["a", "b", "c"], "similarity": [0.9, -0.123456, 0.05]})
    text = rendered(table, "table")
    for shown in ("0.9000", "-0.1235", "0.0500"):
        assert shown in text


def test_machine_formats_keep_full_precision():
    table = pa.table({"iou": SCORES[:3]})
    assert [float(r[0]) for r in list(csv.reader(io.StringIO(rendered(table, "csv"))))[1:]] == SCORES[:3]
    assert [r["iou"] for r in json.loads(rendered(table, "json"))] == SCORES[:3]
    assert [json.loads(line)["iou"] for line in rendered(table, "jsonl").splitlines()] == SCORES[:3]
    tsv = rendered(table, "tsv").splitlines()
    assert tsv[3] == repr(SCORES[2])
    assert math.isclose(float(tsv[1]), 0.394)


def test_user_text_is_never_rich_markup():
    table = pa.table({"[bold]name": ["[bold]dog", "[red]cat[/red]", "[link=http://x]y"]})
    text = rendered(table, "table", title="[blink]nearest")
    for literal in ("[bold]dog", "[red]cat[/red]", "[link=http://x]y", "[bold]name", "[blink]nearest"):
        assert literal in text
    ansi = io.StringIO()
    from rich.console import Console

    from n2vdb.render.output import _table

    Console(file=ansi, force_terminal=True, color_system="standard").print(_table(table, None, "[blink]t"))
    assert "\x1b[5m" not in ansi.getvalue() and "[blink]t" in ansi.getvalue()


def test_lists_and_limits():
    table = pa.table({"weights": [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]], "n": [1]})
    text = rendered(table, "markdown")
    assert "[0.1, 0.2, 0.3, 0.4, … 6 values]" in text
    many = pa.table({"i": list(range(10))})
    assert len(rendered(many, "markdown", limit=3).splitlines()) == 2 + 3
    assert "3 of 10 rows" in rendered(many, "table", limit=3)
