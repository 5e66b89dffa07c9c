"""One renderer for every result: a rich table on a terminal, csv when piped, or what -f asks for.

Views for people (table, markdown) format each column once: scores at a fixed number of decimals,
other decimals at one precision chosen for the column, integral values as integers, so the digits
line up down the column. Machine formats (csv, tsv, json, jsonl) keep every digit.

A result is a pyarrow Table or an n2vdb.results.Rows (what named queries and `n2vdb sql` give the
CLI, fetched without pyarrow); both are read through Rows. rich is imported where it is used: the CLI
imports this module for FORMATS alone.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from typing import IO

from n2vdb.results import FLOATING, OTHER, Rows

FORMATS = ("table", "csv", "tsv", "json", "jsonl", "markdown")
SCORE_COLUMN = re.compile(r"iou|score|similarity|share|accuracy|_ap$|_r$|ratio|^r$")
SCORE_DECIMALS = 4
SIGNIFICANT = 4  # digits kept for the largest value of a column of other decimals
_BAR_WIDTH = 10


def default_format(stream: IO = sys.stdout) -> str:
    return "table" if stream.isatty() else "csv"


def _plain(value) -> object:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def column_formatter(name: str, values: Sequence) -> Callable[[object], str]:
    """How to show every value of one column, decided from its name and all of its values."""
    numbers = [v for v in values if isinstance(v, float) and not math.isnan(v)]
    if not numbers or any(not (_missing(v) or isinstance(v, (int, float))) for v in values):
        return cell
    if all(v.is_integer() and abs(v) < 1e15 for v in numbers):
        return lambda v: "" if _missing(v) else str(int(v))  # counts that arrived as doubles
    if SCORE_COLUMN.search(name) and all(abs(v) <= 1 for v in numbers):
        decimals = SCORE_DECIMALS
    else:
        largest = max(abs(v) for v in numbers)
        if largest >= 1e6 or largest < 1e-4 and largest != 0:
            return lambda v: "" if _missing(v) else f"{v:.{SIGNIFICANT - 1}e}"
        whole_digits = max(1, math.floor(math.log10(largest)) + 1) if largest else 1
        decimals = max(0, SIGNIFICANT - whole_digits)
    return lambda v: "" if _missing(v) else f"{v:.{decimals}f}"


def cell(value) -> str:
    """One value on its own (lists, text, a lone number), for places without a column around it."""
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.4e}"
    if isinstance(value, list):
        head = ", ".join(cell(v) for v in value[:4])
        return f"[{head}, … {len(value)} values]" if len(value) > 4 else f"[{head}]"
    return str(value)


def formatted_columns(rows: list[dict], names: Sequence[str]) -> dict[str, Callable[[object], str]]:
    return {n: column_formatter(n, [r[n] for r in rows]) for n in names}


def _bar(value: float) -> str:
    filled = max(0.0, min(1.0, value)) * _BAR_WIDTH
    full = int(filled)
    return "█" * full + ("▌" if filled - full >= 0.5 else "")


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def visible(text: str) -> str:
    """TEXT with control characters (ESC, BEL, backspace, ...) written as \\xNN, so that a value
    cannot move the cursor, recolour or retitle the terminal that shows a table."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}", text)


def _table(result, limit: int | None, title: str | None):
    from rich.table import Table
    from rich.text import Text

    result = as_rows(result)
    rows = result.to_pylist()
    shown = rows[:limit] if limit else rows
    # Text objects throughout: a concept named "[bold]dog" is shown as typed, never as markup.
    table = Table(title=Text(visible(title)) if title else None, show_lines=False, header_style="bold")
    for name, kind in zip(result.column_names, result.kinds):
        table.add_column(Text(visible(name)), justify="left" if kind == OTHER else "right")
    bars = {
        name
        for name, kind in zip(result.column_names, result.kinds)
        if kind == FLOATING and SCORE_COLUMN.search(name) and all(_missing(r[name]) or 0 <= r[name] <= 1 for r in rows)
    }
    formats = formatted_columns(shown, result.column_names)
    for row in shown:
        cells = []
        for name in result.column_names:
            value = row[name]
            text = Text(visible(formats[name](value)))
            if name in bars and not _missing(value):
                text = Text.assemble((_bar(value).ljust(_BAR_WIDTH), "cyan"), " ", formats[name](value))
            cells.append(text)
        table.add_row(*cells)
    if limit and len(rows) > limit:
        table.caption = Text(f"{limit} of {len(rows)} rows (--limit)", no_wrap=True, overflow="ignore")
    return table


def render(
    result, fmt: str | None = None, *, limit: int | None = None, title: str | None = None, stream: IO | None = None
) -> None:
    stream = stream or sys.stdout
    fmt = fmt or default_format(stream)
    result = as_rows(result)
    rows = result.to_pylist()
    names = result.column_names
    if fmt == "table":
        from rich.console import Console

        Console(file=stream, highlight=False).print(_table(result, limit, title))
    elif fmt in ("csv", "tsv"):
        writer = csv.writer(stream, delimiter="," if fmt == "csv" else "\t", lineterminator="\n")
        writer.writerow(names)
        for row in rows:
            writer.writerow(["" if row[n] is None else _csv_value(row[n]) for n in names])
    elif fmt == "json":
        json.dump([{n: _plain(r[n]) for n in names} for r in rows], stream, default=str)
        stream.write("\n")
    elif fmt == "jsonl":
        for row in rows:
            stream.write(json.dumps({n: _plain(row[n]) for n in names}, default=str) + "\n")
    elif fmt == "markdown":
        shown = rows[:limit] if limit else rows
        formats = formatted_columns(shown, names)
        stream.write("| " + " | ".join(n.replace("|", "\\|") for n in names) + " |\n")
        stream.write("|" + "|".join("---" for _ in names) + "|\n")
        for row in shown:
            stream.write("| " + " | ".join(formats[n](row[n]).replace("|", "\\|") for n in names) + " |\n")
    else:
        raise ValueError(f"unknown format {fmt!r}")


def as_rows(result) -> Rows:
    """A Rows as it is; a pyarrow Table read into one."""
    return result if isinstance(result, Rows) else Rows.from_arrow(result)


def _csv_value(value):
    if isinstance(value, list):
        return json.dumps(value)
    if isinstance(value, float) and math.isnan(value):
        return ""
    return value
