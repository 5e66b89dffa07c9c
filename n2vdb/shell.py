"""`n2vdb shell`: an interactive SQL client on prompt_toolkit, and a script runner for piped input.

Each input (one or more statements ending in `;`, or one dot-command) opens its own connection and
closes it after the answer, so a shell left at its prompt never holds the database lock that an
ingest's short write sessions need. The price: temporary tables and SET last for one input only.
"""

from __future__ import annotations

import contextlib
import difflib
import re
import shlex
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

import duckdb
import pyarrow as pa
from prompt_toolkit import PromptSession
from prompt_toolkit.completion import Completer, Completion
from prompt_toolkit.filters import Condition
from prompt_toolkit.history import FileHistory

from n2vdb import adhoc, queries, results
from n2vdb.errors import N2vdbError, NotFound, UsageError
from n2vdb.render.output import FORMATS, default_format, render
from n2vdb.resources import home
from n2vdb.store import interrupt, sandbox

HELP = """\
SQL ends with ;  (several lines are fine; Ctrl-C cancels a running statement, Ctrl-D leaves)
.query [NAME ARGS]     list the named queries, or run one: .query nearest dog -k 5 (-p key=value too)
.tables                tables and views
.schema [TABLE]        the CREATE statement of TABLE (all of them without TABLE)
.format [FMT]          output format: table, csv, tsv, json, jsonl, markdown
.limit [N]             rows shown by table and markdown (0: all)
.timeout [S]           seconds before a read-only statement is stopped (0: no limit)
.write on|off          allow statements that change the database (off: read-only)
.help                  this text
.quit                  leave (Ctrl-D too)"""

DOT_COMMANDS = (
    ".query", ".tables", ".schema", ".format", ".limit", ".timeout", ".write", ".help", ".quit", ".exit",
)  # fmt: skip
DEFAULT_ROW_LIMIT = 1000


class Cancelled(N2vdbError):
    """Ctrl-C while a statement ran."""


def history_path() -> Path:
    return home() / "shell_history"


@contextlib.contextmanager
def _open(db, write: bool) -> Iterator[duckdb.DuckDBPyConnection]:
    """The one place the shell opens the database: the sandbox `n2vdb sql` runs in (docs/sandbox.md)."""
    with sandbox(db, write=write) as con:
        yield con


_TOKENS = re.compile(r"'(?:[^']|'')*'?|\"(?:[^\"]|\"\")*\"?|--[^\n]*|/\*.*?(?:\*/|$)|;|[^'\";/-]+|.", re.S)


def statement_complete(text: str) -> bool:
    """True when TEXT ends with a `;` outside strings, quoted names and comments (or is a dot-command)."""
    stripped = text.strip()
    if not stripped or stripped.startswith("."):
        return True
    last = ""
    for token in _TOKENS.findall(stripped):
        if token.startswith("--") or token.startswith("/*") or token.isspace():
            if token.startswith("/*") and not token.endswith("*/"):
                return False
            continue
        if token[0] in "'\"" and (len(token) < 2 or token[-1] != token[0]):
            return False  # an unterminated string or name
        last = token
    return last == ";"


def split_script(text: str) -> Iterator[str]:
    """A script's inputs in order: dot-commands are whole lines; SQL runs up to a `;` that ends a line."""
    pending: list[str] = []
    for line in text.splitlines():
        if not pending and line.strip().startswith("."):
            yield line.strip()
            continue
        if not pending and not line.strip():
            continue
        pending.append(line)
        joined = "\n".join(pending)
        if statement_complete(joined):
            yield joined
            pending = []
    if pending and "\n".join(pending).strip():
        yield "\n".join(pending)  # a last statement without `;` still runs


class Shell:
    """The commands of a session, independent of where its input comes from."""

    def __init__(
        self,
        db=None,
        fmt: str | None = None,
        out: IO | None = None,
        err: IO | None = None,
        timeout: float | None = None,
    ):
        self.db = db
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.fmt = fmt or default_format(self.out)
        if self.fmt not in FORMATS:
            raise UsageError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
        self.write = False
        self.row_limit = DEFAULT_ROW_LIMIT
        self.timeout = interrupt.timeout_s(timeout)
        self.failures = 0
        self.done = False
        self.vocabulary = Vocabulary.load(db)

    # -- one input ------------------------------------------------------------------------------

    def handle(self, text: str) -> None:
        """Run one input; every error becomes one line on err and the session goes on."""
        text = text.strip()
        if not text:
            return
        try:
            if text.startswith("."):
                self._dot(text)
            else:
                self._sql(text)
        except Cancelled:
            self._say("cancelled")
        except N2vdbError as exc:
            self._error(str(exc))
        except duckdb.Error as exc:
            self._error(f"database: {adhoc.describe_error(exc)}")

    def _sql(self, text: str) -> None:
        statements = adhoc.statements(text)  # DuckDB's parser splits them
        if self.write:
            adhoc.check_writable(statements)  # as `n2vdb sql --write`: one transaction, this database only
        with _open(self.db, self.write) as con:
            if self.write:
                con.execute("BEGIN TRANSACTION")
            try:
                for statement in statements:
                    table = self._interruptible(con, statement.query)
                    if table is not None and (table.num_rows or statement.type == duckdb.StatementType.SELECT):
                        self._show(table)  # CREATE and the like answer with an empty Count column: not shown
                if self.write:
                    con.execute("COMMIT")
            except BaseException:
                if self.write:
                    with contextlib.suppress(duckdb.Error):
                        con.execute("ROLLBACK")
                raise
        if self.write:
            self.vocabulary = Vocabulary.load(self.db)  # tables may have come or gone

    def _interruptible(
        self, con: duckdb.DuckDBPyConnection, statement: str, params: dict | None = None
    ) -> pa.Table | None:
        """Run STATEMENT so that Ctrl-C (KeyboardInterrupt here) interrupts DuckDB (store/interrupt.py),
        and a read stops at the time limit (.timeout)."""
        limit = self.row_limit if self.fmt in ("table", "markdown") and self.row_limit else None

        def work() -> pa.Table | None:
            relation = con.sql(statement, params=params) if params else con.sql(statement)
            if relation is None:
                return None
            # One row past the limit tells the table that more exist, without reading them all.
            return results.arrow_table(relation.limit(limit + 1) if limit else relation)

        try:
            return interrupt.run(con, work, None if self.write else self.timeout)
        except KeyboardInterrupt:
            raise Cancelled("cancelled") from None
        except duckdb.InterruptException:
            raise Cancelled("cancelled") from None

    def _show(self, table: pa.Table | None, title: str | None = None) -> None:
        if table is None or table.num_columns == 0:
            return
        if table.num_rows == 0:
            self._say("(no rows)")
        limit = self.row_limit if self.fmt in ("table", "markdown") and self.row_limit else None
        if limit and table.num_rows > limit:
            self._say(f"first {limit} rows shown (.limit N changes it, .limit 0 shows all)")
            table = table.slice(0, limit)
        render(table, self.fmt, title=title, stream=self.out)
        self.out.flush()

    # -- dot-commands ---------------------------------------------------------------------------

    def _dot(self, text: str) -> None:
        try:
            words = shlex.split(text)
        except ValueError as exc:
            raise UsageError(f"cannot read {text!r}: {exc}") from None
        command, args = words[0], words[1:]
        handler = {
            ".query": self._query,
            ".tables": self._tables,
            ".schema": self._schema,
            ".format": self._format,
            ".limit": self._limit,
            ".timeout": self._timeout,
            ".write": self._write,
            ".help": lambda _: self._print(HELP),
            ".quit": self._quit,
            ".exit": self._quit,
        }.get(command)
        if handler is None:
            close = difflib.get_close_matches(command, DOT_COMMANDS, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise UsageError(f"unknown command {command}{hint} (.help lists them)")
        handler(args)

    def _query(self, args: list[str]) -> None:
        if not args:
            rows = [
                {"query": q.name, "usage": q.usage().replace("n2vdb query", ".query"), "description": q.description}
                for q in queries.load_all().values()
            ]
            self._show(pa.Table.from_pylist(rows))
            return
        named = queries.get(args[0])
        loose, params = _take_params(args[1:])
        values = queries.parse_query_args(named, loose, params)
        with _open(self.db, self.write) as con:
            bound = queries.bind(con, named, values)
            try:
                table = self._interruptible(con, named.sql, bound)
            except duckdb.Error as exc:
                raise N2vdbError(f"query {named.name} failed: {str(exc).splitlines()[0]}") from None
        self._show(table, title=named.name)

    def _tables(self, args: list[str]) -> None:
        with _open(self.db, self.write) as con:
            table = con.sql(
                "SELECT table_name AS name, lower(table_type) AS kind FROM information_schema.tables "
                "WHERE table_schema = 'main' ORDER BY table_name"
            ).to_arrow_table()
        self._show(table)

    def _schema(self, args: list[str]) -> None:
        with _open(self.db, self.write) as con:
            rows = con.execute(
                "SELECT table_name, sql FROM duckdb_tables() WHERE schema_name = 'main' AND NOT internal "
                "UNION ALL SELECT view_name, sql FROM duckdb_views() WHERE schema_name = 'main' AND NOT internal "
                "ORDER BY 1"
            ).fetchall()
        if args:
            wanted = {name: sql for name, sql in rows if name in args}
            missing = [a for a in args if a not in wanted]
            if missing:
                close = difflib.get_close_matches(missing[0], [n for n, _ in rows], n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise NotFound(f"no table or view {missing[0]!r}{hint} (.tables lists them)")
            rows = [(a, wanted[a]) for a in args]
        self._print("\n".join(sql.rstrip(";") + ";" for _, sql in rows))

    def _format(self, args: list[str]) -> None:
        if not args:
            self._print(self.fmt)
            return
        if args[0] not in FORMATS:
            raise UsageError(f"unknown format {args[0]!r}; choose one of {', '.join(FORMATS)}")
        self.fmt = args[0]

    def _limit(self, args: list[str]) -> None:
        if not args:
            self._print(str(self.row_limit))
            return
        if not args[0].isdigit():
            raise UsageError(f".limit takes a number of rows (0 for all), got {args[0]!r}")
        self.row_limit = int(args[0])

    def _timeout(self, args: list[str]) -> None:
        if not args:
            self._print(f"{self.timeout or 0:g}")
            return
        try:
            self.timeout = interrupt.timeout_s(float(args[0]))
        except ValueError:
            raise UsageError(f".timeout takes a number of seconds (0 for none), got {args[0]!r}") from None

    def _write(self, args: list[str]) -> None:
        if args not in (["on"], ["off"]):
            raise UsageError(f".write takes on or off (now {'on' if self.write else 'off'})")
        self.write = args == ["on"]
        self._say("write mode: statements may change the database" if self.write else "read-only")

    def _quit(self, args: list[str]) -> None:
        self.done = True

    # -- messages ---------------------------------------------------------------------------------

    def _print(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _say(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()

    def _error(self, text: str) -> None:
        self.failures += 1
        self._say(f"Error: {' '.join(text.split())}")  # one line, whatever DuckDB's message held

    # -- input sources ----------------------------------------------------------------------------

    def run_script(self, text: str) -> int:
        """Run every input of a script in order, going on after errors; 1 if any failed."""
        for item in split_script(text):
            self.handle(item)
            if self.done:
                break
        return 1 if self.failures else 0

    def interact(self, session=None) -> int:
        """The prompt loop: Enter runs a complete input, Ctrl-C clears the line, Ctrl-D leaves."""
        session = session or self.prompt_session()
        while not self.done:
            try:
                text = session.prompt(self._prompt)
            except KeyboardInterrupt:
                continue
            except EOFError:
                break
            self.handle(text)
        return 0

    def _prompt(self) -> str:
        return "n2vdb(write)> " if self.write else "n2vdb> "

    def prompt_session(self, **kwargs) -> PromptSession:
        if "history" not in kwargs:
            path = history_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            kwargs["history"] = FileHistory(str(path))
        session = PromptSession(
            completer=ShellCompleter(self),
            complete_while_typing=False,
            prompt_continuation=lambda width, line, wrap: "...> ".rjust(width),
            **kwargs,
        )
        # Enter inserts a newline until the input is a complete statement or a dot-command.
        session.multiline = Condition(lambda: not statement_complete(session.default_buffer.text))
        return session


def _take_params(words: list[str]) -> tuple[list[str], list[str]]:
    """Separate the CLI's `-p key=value` / `--param key=value` items from a query's own words."""
    loose, params = [], []
    i = 0
    while i < len(words):
        word = words[i]
        if word in ("-p", "--param"):
            if i + 1 >= len(words):
                raise UsageError(f"{word} needs key=value")
            params.append(words[i + 1])
            i += 2
            continue
        if word.startswith(("-p=", "--param=")):
            params.append(word.partition("=")[2])
        else:
            loose.append(word)
        i += 1
    return loose, params


class Vocabulary:
    """What tab completion offers: DuckDB's keywords, the tables, their columns, queries and concepts."""

    def __init__(
        self,
        keywords: Iterable[str],
        tables: Iterable[str],
        columns: Iterable[str],
        concepts: Iterable[str],
        query_names: Iterable[str],
        options: dict[str, list[str]],
    ):
        self.keywords = sorted(set(keywords))
        self.tables = sorted(set(tables))
        self.columns = sorted(set(columns))
        self.concepts = sorted(set(concepts))
        self.query_names = sorted(set(query_names))
        self.options = options

    @classmethod
    def load(cls, db) -> Vocabulary:
        named = queries.load_all()
        options = {
            q.name: [f"--{p.name.replace('_', '-')}" for p in q.params if not p.required] for q in named.values()
        }
        with _open(db, False) as con:
            keywords = [k.upper() for (k,) in con.execute("SELECT keyword_name FROM duckdb_keywords()").fetchall()]
            found = con.execute(
                "SELECT table_name, column_name FROM duckdb_columns() WHERE schema_name = 'main' AND NOT internal"
            ).fetchall()
            concepts = [n for (n,) in con.execute("SELECT DISTINCT name FROM concepts").fetchall()]
        return cls(keywords, [t for t, _ in found], [c for _, c in found], concepts, named, options)


_WORD = re.compile(r"[\w\-.]*$")


class ShellCompleter(Completer):
    """Completes dot-commands and their arguments, and SQL words (concept names inside quotes)."""

    def __init__(self, shell: Shell):
        self.shell = shell

    def candidates(self, before: str) -> tuple[str, list[str]]:
        """The word being typed and what may complete it, for the text before the cursor."""
        vocab = self.shell.vocabulary
        word = _WORD.search(before).group()
        stripped = before.lstrip()
        if stripped.startswith("."):
            words = stripped.split()
            if len(words) <= 1 and not before.endswith(" "):
                return word, list(DOT_COMMANDS)
            command = words[0]
            position = len(words) - (0 if before.endswith(" ") else 1)  # index of the word being typed
            if command == ".query":
                if position == 1:
                    return word, vocab.query_names
                name = words[1]
                return word, vocab.options.get(name, []) + vocab.concepts
            if command == ".schema":
                return word, vocab.tables
            if command == ".format":
                return word, list(FORMATS)
            if command == ".write":
                return word, ["on", "off"]
            return word, []
        quoted = re.search(r"'([\w\-]*)$", before)  # inside a string: a concept name
        if quoted:
            return quoted.group(1), vocab.concepts
        word = re.search(r"\w*$", before).group()
        lower = word[:1].islower()
        keywords = [k.lower() for k in vocab.keywords] if lower else vocab.keywords
        return word, vocab.tables + vocab.columns + keywords

    def get_completions(self, document, complete_event):
        word, options = self.candidates(document.text_before_cursor)
        seen = set()
        for option in options:
            if option.lower().startswith(word.lower()) and option not in seen and option != word:
                seen.add(option)
                yield Completion(option, start_position=-len(word))


def main(db=None, fmt: str | None = None, stdin: IO | None = None, timeout: float | None = None) -> int:
    """`n2vdb shell`: interactive on a terminal, a script runner when stdin is a file or a pipe."""
    stdin = stdin or sys.stdin
    if not stdin.isatty():
        shell = Shell(db, fmt, timeout=timeout)
        return shell.run_script(stdin.read())
    shell = Shell(db, fmt, timeout=timeout)
    shell._say("n2vdb shell: SQL ends with ;  .help lists commands, Ctrl-D leaves")
    return shell.interact()
