"""One renderer for every result: a rich table on a terminal, csv when piped, or what -f asks for."""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from typing import IO

import pyarrow as pa
from rich.console import Console
from rich.table import Table
from rich.text import Text

FORMATS = ("table", "csv", "tsv", "json", "jsonl", "markdown")
_SCORE_COLUMN = re.compile(r"iou|score|similarity|share|accuracy|_r$|ratio")
_BAR_WIDTH = 10


def default_format(stream: IO = sys.stdout) -> str:
    return "table" if stream.isatty() else "csv"


def _plain(value) -> object:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.4e}"
    if isinstance(value, list):
        head = ", ".join(_cell(v) for v in value[:4])
        return f"[{head}, … {len(value)} values]" if len(value) > 4 else f"[{head}]"
    return str(value)


def _bar(value: float) -> str:
    filled = max(0.0, min(1.0, value)) * _BAR_WIDTH
    full = int(filled)
    return "█" * full + ("▌" if filled - full >= 0.5 else "")


def _table(result: pa.Table, limit: int | None, title: str | None) -> Table:
    rows = result.to_pylist()
    shown = rows[:limit] if limit else rows
    table = Table(title=title, show_lines=False, header_style="bold")
    numeric = {}
    for field in result.schema:
        is_num = pa.types.is_integer(field.type) or pa.types.is_floating(field.type) or pa.types.is_decimal(field.type)
        numeric[field.name] = is_num
        table.add_column(field.name, justify="right" if is_num else "left")
    bars = {
        f.name for f in result.schema
        if pa.types.is_floating(f.type) and _SCORE_COLUMN.search(f.name)
        and all(r[f.name] is None or (isinstance(r[f.name], float) and (math.isnan(r[f.name]) or 0 <= r[f.name] <= 1))
                for r in rows)
    }
    for row in shown:
        cells = []
        for name in result.column_names:
            value = row[name]
            text = Text(_cell(value))
            if name in bars and isinstance(value, float) and not math.isnan(value):
                text = Text.assemble((_bar(value).ljust(_BAR_WIDTH), "cyan"), " ", _cell(value))
            cells.append(text)
        table.add_row(*cells)
    if limit and len(rows) > limit:
        table.caption = f"{limit} of {len(rows)} rows (--limit)"
    return table


def render(result: pa.Table, fmt: str | None = None, *, limit: int | None = None, title: str | None = None,
           stream: IO | None = None) -> None:
    stream = stream or sys.stdout
    fmt = fmt or default_format(stream)
    rows = result.to_pylist()
    names = result.column_names
    if fmt == "table":
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
        stream.write("| " + " | ".join(names) + " |\n")
        stream.write("|" + "|".join("---" for _ in names) + "|\n")
        for row in rows:
            stream.write("| " + " | ".join(_cell(row[n]).replace("|", "\\|") for n in names) + " |\n")
    else:
        raise ValueError(f"unknown format {fmt!r}")


def _csv_value(value):
    if isinstance(value, list):
        return json.dumps(value)
    if isinstance(value, float) and math.isnan(value):
        return ""
    return value

