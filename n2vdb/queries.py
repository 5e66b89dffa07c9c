"""Named SQL queries: queries/NAME.sql with a small header that declares them.

    -- name: nearest
    -- description: Nearest concepts by cosine similarity of L2-normalised embeddings.
    -- param: concept CONCEPT                  (required: no default)
    -- param: k INTEGER(1..) = 10
    -- param: kind CHOICE(segmentation,classification) = segmentation

Only the leading comment block is parsed. Parameters are bound by DuckDB as $name, never pasted into
the SQL; every declared parameter must be used and every used one declared. Types: INTEGER, DOUBLE,
VARCHAR, BOOLEAN, CHOICE(a,b,...), PROBE (a probe id; default: the newest complete probe) and CONCEPT
(a concept name; 'red' finds 'red-c'; unknown names get close matches). INTEGER is 32-bit and may be
bounded, INTEGER(1..) or INTEGER(0..100). A default of NULL means "no value"; a value the user types is
never special, so `NULL` typed as a concept is an unknown concept.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb

from n2vdb import probe as probes
from n2vdb import results
from n2vdb.errors import N2vdbError, NotFound, QueryError, UsageError
from n2vdb.resources import sql_dir
from n2vdb.store import interrupt

if TYPE_CHECKING:
    import pyarrow as pa

_PARAM = re.compile(r"^(?P<name>[a-z_][a-z0-9_]*)\s+(?P<type>[A-Z]+(?:\([^)]*\))?)(?:\s*=\s*(?P<default>.+))?$")
_USED = re.compile(r"\$([a-z_][a-z0-9_]*)")
_STRINGS_AND_COMMENTS = re.compile(r"'(?:[^']|'')*'|--[^\n]*")
_SIMPLE_TYPES = {"INTEGER", "DOUBLE", "VARCHAR", "BOOLEAN", "PROBE", "CONCEPT"}
_BOUNDS = re.compile(r"^INTEGER\((?P<low>-?\d+)?\.\.(?P<high>-?\d+)?\)$")
INT32 = (-(2**31), 2**31 - 1)


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    default: str | None  # None = required; 'NULL' = optional without a value
    choices: tuple[str, ...] = ()
    bounds: tuple[int, int] = INT32  # INTEGER only

    @property
    def required(self) -> bool:
        return self.default is None and self.type != "PROBE"


@dataclass(frozen=True)
class NamedQuery:
    name: str
    description: str
    params: tuple[Param, ...]
    sql: str
    path: Path

    def usage(self) -> str:
        parts = []
        for p in self.params:
            kind = "|".join(p.choices) if p.choices else p.type.lower()
            shown = p.name.upper() if p.required else f"[--{p.name} {kind}]"
            parts.append(shown)
        return f"n2vdb query {self.name} " + " ".join(parts)

    def help(self) -> str:
        """`n2vdb query NAME --help`: generated from the file's header, so it cannot fall out of step."""
        lines = [
            f"Usage: {self.usage()} [--db PATH] [-f FORMAT] [--limit N] [-p key=value]",
            "",
            f"  {self.description}",
            "",
            f"Parameters (declared in queries/{self.path.name}):",
        ]
        for p in self.params:
            flag = p.name.upper() if p.required else f"--{p.name.replace('_', '-')}"
            if len(p.name) == 1 and not p.required:
                flag = f"-{p.name}, {flag}"
            kind = f"one of {', '.join(p.choices)}" if p.choices else p.type.lower()
            if p.type == "PROBE":
                default = "default: the newest complete probe"
            elif p.required:
                default = "required"
            else:
                default = f"default: {p.default}"
            lines.append(f"  {flag:<22} {kind}; {default}")
        return "\n".join(lines)


def _parse(path: Path) -> NamedQuery:
    text = path.read_text()
    meta: dict[str, str] = {}
    params: list[Param] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.startswith("--"):
            break
        body = line[2:].strip()
        key, _, value = body.partition(":")
        key, value = key.strip(), value.strip()
        if key == "param":
            match = _PARAM.match(value)
            if not match:
                raise N2vdbError(f"{path.name} line {number}: bad parameter declaration {value!r}")
            kind, choices, bounds = match["type"], (), INT32
            if kind.startswith("CHOICE("):
                choices = tuple(c.strip() for c in kind[7:-1].split(","))
                kind = "CHOICE"
            elif _BOUNDS.match(kind):
                low, high = _BOUNDS.match(kind).group("low", "high")
                bounds = (max(INT32[0], int(low)) if low else INT32[0], min(INT32[1], int(high)) if high else INT32[1])
                kind = "INTEGER"
            elif kind not in _SIMPLE_TYPES:
                raise N2vdbError(f"{path.name} line {number}: unknown parameter type {kind}")
            params.append(Param(match["name"], kind, match["default"], choices, bounds))
        elif key in ("name", "description"):
            meta[key] = value
    name = meta.get("name") or path.stem
    if name != path.stem:
        raise N2vdbError(f"{path.name}: header names it {name!r}; the file must be {name}.sql")
    used = set(_USED.findall(_STRINGS_AND_COMMENTS.sub("", text)))
    declared = {p.name for p in params}
    if used - declared:
        raise N2vdbError(f"{path.name}: uses undeclared parameter(s) {', '.join(sorted(used - declared))}")
    if declared - used:
        raise N2vdbError(f"{path.name}: declares unused parameter(s) {', '.join(sorted(declared - used))}")
    return NamedQuery(name, meta.get("description", ""), tuple(params), text, path)


def load_all(directory: Path | None = None) -> dict[str, NamedQuery]:
    directory = directory or sql_dir("queries")
    return {q.name: q for q in (_parse(p) for p in sorted(directory.glob("*.sql")))}


def get(name: str, directory: Path | None = None) -> NamedQuery:
    found = load_all(directory)
    if name not in found:
        close = difflib.get_close_matches(name, list(found), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UsageError(f"unknown query {name!r}{hint} (`n2vdb query` lists them)")
    return found[name]


def parse_query_args(query: NamedQuery, args: list[str], params: list[str]) -> dict[str, str]:
    """Command-line words for a named query -> raw parameter values (bind() converts them): ARGs fill the
    required parameters in order, --name VALUE / --name=VALUE (and -k for one-letter names) the others,
    and PARAMS are key=value items (the CLI's -p). Shared by `n2vdb query` and the shell's `.query`."""
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


def resolve_concept(con: duckdb.DuckDBPyConnection, name: str, dataset_id: int | None) -> str:
    """The stored concept name for what the user typed: exact, else without the Broden suffix (-c, -s ...)."""
    where, args = ("WHERE dataset_id = ?", [dataset_id]) if dataset_id is not None else ("", [])
    names = sorted({n for (n,) in con.execute(f"SELECT DISTINCT name FROM concepts {where}", args).fetchall()})
    if name in names:
        return name
    stem = [n for n in names if re.sub(r"-[a-z]$", "", n) == name]
    if len(stem) == 1:
        return stem[0]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise NotFound(f"unknown concept {name!r}{hint}")


def _convert(con, query: NamedQuery, param: Param, raw, dataset_id: int | None):
    text = str(raw)
    try:
        if param.type == "INTEGER":
            number = int(text)
            low, high = param.bounds
            if not low <= number <= high:
                raise UsageError(f"query {query.name}: {param.name} must be between {low} and {high}, got {number}")
            return number
        if param.type == "DOUBLE":
            return float(text)
        if param.type == "BOOLEAN":
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
    except ValueError:
        raise UsageError(f"query {query.name}: parameter {param.name} expects {param.type}, got {text!r}") from None
    if param.type == "CHOICE" and text not in param.choices:
        raise UsageError(f"query {query.name}: {param.name} must be one of {', '.join(param.choices)}, got {text!r}")
    if param.type == "CONCEPT":
        return resolve_concept(con, text, dataset_id)
    return text


def bind(con: duckdb.DuckDBPyConnection, query: NamedQuery, values: dict[str, object]) -> dict[str, object]:
    """Check, convert and complete the parameters (defaults, newest probe, concept names)."""
    unknown = set(values) - {p.name for p in query.params}
    if unknown:
        raise UsageError(f"query {query.name} has no parameter {sorted(unknown)[0]!r}; usage: {query.usage()}")
    bound: dict[str, object] = {}
    dataset_id = None
    for param in sorted(query.params, key=lambda p: p.type == "CONCEPT"):  # probes first: concepts need its dataset
        given = values.get(param.name)  # None = not given; what the user typed is never special, not even NULL
        raw = given if given is not None else (None if param.default == "NULL" else param.default)
        if param.type == "PROBE":
            probe_id = (
                probes.latest(con) if raw is None else _convert(con, query, Param("probe", "INTEGER", None), raw, None)
            )
            dataset_id = probes.load(con, probe_id).dataset_id
            bound[param.name] = probe_id
            continue
        if raw is None:
            if param.default == "NULL":
                bound[param.name] = None
                continue
            raise UsageError(f"query {query.name} needs {param.name.upper()}; usage: {query.usage()}")
        bound[param.name] = _convert(con, query, param, _unquote(raw), dataset_id)
    return bound


def _unquote(raw):
    if isinstance(raw, str) and len(raw) >= 2 and raw[0] == raw[-1] == "'":
        return raw[1:-1]
    return raw


def run(con: duckdb.DuckDBPyConnection, name: str, timeout: float | None = None, **values) -> pa.Table:
    """Run a named query; the Python API for notebooks (`.to_pandas()` on the result for a DataFrame).
    Ctrl-C stops it at once, and TIMEOUT seconds (store/interrupt.timeout_s) at the latest."""
    return _run(con, name, values, results.arrow_table, timeout)


def run_rows(con: duckdb.DuckDBPyConnection, name: str, timeout: float | None = None, **values) -> results.Rows:
    """run(), the result as Python rows (n2vdb.results): the CLI's answer needs no pyarrow."""
    return _run(con, name, values, results.fetch, timeout)


def _run(con, name: str, values: dict, fetch, timeout: float | None):
    query = get(name)
    bound = bind(con, query, values)
    limit = interrupt.timeout_s(timeout)
    try:
        return interrupt.run(con, lambda: fetch(con.sql(query.sql, params=bound)), limit)
    except duckdb.Error as exc:
        raise QueryError(f"query {name} failed: {str(exc).splitlines()[0]}") from None
