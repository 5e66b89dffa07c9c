"""`n2vdb shell`: scripts, dot-commands, completion, the read-only default, Ctrl-C, and a real terminal."""

import csv
import fcntl
import io
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import duckdb
from prompt_toolkit.document import Document
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from n2vdb import api
from n2vdb.shell import Shell, ShellCompleter, split_script, statement_complete

REPO = Path(__file__).resolve().parents[1]
LONG_QUERY = "SELECT count(*) FROM range(1000000000000) a(x) WHERE x % 7 = 3;"


def shell_for(db, fmt="csv"):
    out, err = io.StringIO(), io.StringIO()
    return Shell(db, fmt, out=out, err=err), out, err


def rows_of(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def test_statement_complete_ignores_semicolons_in_strings_names_and_comments():
    assert statement_complete("select 1;")
    assert statement_complete("select 1;  -- done")
    assert statement_complete(".tables")
    assert not statement_complete("select 1")
    assert not statement_complete("select ';")
    assert not statement_complete("select 'a;' ")
    assert statement_complete("select 'a;''b';")
    assert not statement_complete('select "x;')
    assert not statement_complete("select 1 -- ;")
    assert not statement_complete("select /* ; */ 1")
    assert not statement_complete("select 1 /* ;")


def test_split_script_keeps_multiline_statements_and_dot_commands_apart():
    script = ".format csv\nselect 1\n  + 2;\n\n.tables\nselect 'x;\ny';\nselect 3"
    assert list(split_script(script)) == [".format csv", "select 1\n  + 2;", ".tables", "select 'x;\ny';", "select 3"]


def test_script_runs_every_statement_and_errors_are_one_line(ingested_db):
    shell, out, err = shell_for(ingested_db)
    status = shell.run_script(
        "select count(*) as n from concepts;\nselect nosuch from concepts;\n"
        "select 1 +;\n.nonsense\nselect 40 + 2 as answer;\n"
    )
    with duckdb.connect(str(ingested_db), read_only=True) as con:
        n = con.execute("select count(*) from concepts").fetchone()[0]
    assert rows_of(out.getvalue()) == [["n"], [str(n)], ["answer"], ["42"]]
    errors = err.getvalue().splitlines()
    assert len(errors) == 3 and all(line.startswith("Error: ") for line in errors)
    assert "nosuch" in errors[0] and "did you mean .query" not in errors[2] and ".nonsense" in errors[2]
    assert status == 1
    clean, _, _ = shell_for(ingested_db)
    assert clean.run_script("select 1;") == 0


def test_read_only_until_write_on(db_copy):
    shell, out, err = shell_for(db_copy)
    shell.handle("create table notes(t varchar); insert into notes values ('x');")
    assert "Error:" in err.getvalue() and "read-only" in err.getvalue().lower()
    with duckdb.connect(str(db_copy), read_only=True) as con:
        assert con.execute("select count(*) from information_schema.tables where table_name='notes'").fetchone()[0] == 0
    shell.handle(".write on")
    shell.handle("create table notes(t varchar); insert into notes values ('x');")
    shell.handle(".write off")
    shell.handle("insert into notes values ('y');")
    assert [line.startswith("Error: ") for line in err.getvalue().splitlines()] == [True, False, False, True]
    with duckdb.connect(str(db_copy), read_only=True) as con:
        assert con.execute("select t from notes").fetchall() == [("x",)]
    assert "notes" in shell.vocabulary.tables  # completion learns the new table


def test_query_command_matches_the_api_and_the_cli_parameters(ingested_db):
    shell, out, err = shell_for(ingested_db)
    shell.handle(".query nearest red -k 3 --kind=segmentation")
    shell.handle(".query nearest red -p k=2")
    expected3 = api.query("nearest", ingested_db, concept="red", k=3, kind="segmentation").to_pylist()
    expected2 = api.query("nearest", ingested_db, concept="red", k=2).to_pylist()
    assert err.getvalue() == ""
    text = out.getvalue().strip().split("\n")
    header = text[0].split(",")
    first = rows_of("\n".join(text[: 1 + len(expected3)]))
    second = rows_of("\n".join(text[1 + len(expected3) :]))
    assert [r[header.index("concept")] for r in first[1:]] == [r["concept"] for r in expected3]
    assert [r[second[0].index("concept")] for r in second[1:]] == [r["concept"] for r in expected2]
    shell.handle(".query nearest red --bogus 1")
    shell.handle(".query nearest")
    shell.handle(".query nearst red")
    errors = err.getvalue().splitlines()
    assert len(errors) == 3
    assert "no option --bogus" in errors[0] and "needs CONCEPT" in errors[1] and "did you mean nearest" in errors[2]


def test_dot_commands(ingested_db):
    shell, out, err = shell_for(ingested_db)
    shell.handle(".tables")
    names = [r[0] for r in rows_of(out.getvalue())[1:]]
    assert {"concepts", "probes", "embeddings", "best_filters"} <= set(names)
    out.truncate(0), out.seek(0)
    shell.handle(".schema filters")
    assert out.getvalue().startswith("CREATE TABLE filters(") and "threshold_bound DOUBLE" in out.getvalue()
    shell.handle(".schema filtrs")
    assert "did you mean filters" in err.getvalue()
    shell.handle(".format jsonl")
    out.truncate(0), out.seek(0)
    shell.handle("select 1 as a union all select 2 order by a;")
    assert out.getvalue() == '{"a": 1}\n{"a": 2}\n'
    shell.handle(".format yaml")
    assert "unknown format 'yaml'" in err.getvalue() and shell.fmt == "jsonl"
    shell.handle(".write maybe")
    assert ".write takes on or off" in err.getvalue() and not shell.write
    out.truncate(0), out.seek(0)
    shell.handle(".help")
    assert ".query" in out.getvalue() and ".write on|off" in out.getvalue()
    shell.handle(".quit")
    assert shell.done


def test_table_view_shows_at_most_the_limit(ingested_db):
    shell, out, err = shell_for(ingested_db, fmt="markdown")
    shell.handle(".limit 3")
    shell.handle("select range as i from range(10);")
    lines = out.getvalue().splitlines()
    assert lines[2:] == ["| 0 |", "| 1 |", "| 2 |"]
    assert "first 3 rows shown" in err.getvalue()


def test_completion(ingested_db):
    shell, _, _ = shell_for(ingested_db)
    completer = ShellCompleter(shell)

    def complete(text):
        return [c.text for c in completer.get_completions(Document(text), None)]

    assert ".query" in complete(".qu")
    assert complete(".query nea") == ["nearest"]
    assert "red-c" in complete(".query nearest re")
    assert "--kind" in complete(".query nearest red --k")
    assert complete(".schema filter_c") == ["filter_concept_iou"]
    assert "csv" in complete(".format c")
    assert "select" in complete("sel") and "SELECT" in complete("SEL")
    assert "concepts" in complete("select * from conc")
    assert "threshold_bound" in complete("select threshold_b")
    assert complete("select * from concepts where name = 'gree") == ["green-c"]


def run_prompt(shell, keys: str):
    with create_pipe_input() as pipe:
        pipe.send_text(keys)
        session = shell.prompt_session(input=pipe, output=DummyOutput(), history=InMemoryHistory())
        status = shell.interact(session)
    return status, session


def test_prompt_multiline_statement_ctrl_c_clears_and_ctrl_d_leaves(ingested_db):
    shell, out, err = shell_for(ingested_db)
    keys = (
        "select 40\r"  # incomplete: Enter continues the statement
        "  + 2 as answer;\r"
        "select 'abandoned\x03"  # Ctrl-C at the prompt throws the line away
        ".format json\r"
        "select name from concepts where name = 'green-c';\r"
        "select nosuch;\r"
        "select 7 as after_error;\r"
        "\x04"
    )
    status, session = run_prompt(shell, keys)
    assert status == 0
    assert out.getvalue() == 'answer\n42\n[{"name": "green-c"}]\n[{"after_error": 7}]\n'
    assert len(err.getvalue().splitlines()) == 1 and "nosuch" in err.getvalue()
    assert list(session.history.get_strings())[:2] == ["select 40\n  + 2 as answer;", ".format json"]


def test_history_persists_under_n2vdb_home(ingested_db, tmp_path, monkeypatch):
    monkeypatch.setenv("N2VDB_HOME", str(tmp_path / "home"))
    shell, out, _ = shell_for(ingested_db)
    with create_pipe_input() as pipe:
        pipe.send_text("select 5 as five;\r\x04")
        shell.interact(shell.prompt_session(input=pipe, output=DummyOutput()))
    assert "select 5 as five;" in (tmp_path / "home" / "shell_history").read_text()
    again, _, _ = shell_for(ingested_db)
    with create_pipe_input() as pipe:
        session = again.prompt_session(input=pipe, output=DummyOutput())
        assert "select 5 as five;" in list(session.history.load_history_strings())


def test_ctrl_c_cancels_the_running_statement_and_the_session_goes_on(ingested_db):
    shell, out, err = shell_for(ingested_db)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    start = time.monotonic()
    timer.start()
    try:
        shell.handle(LONG_QUERY)
    finally:
        timer.cancel()
    assert time.monotonic() - start < 10
    assert (err.getvalue(), out.getvalue()) == ("cancelled\n", "")
    shell.handle("select 1 as still_here;")
    assert out.getvalue() == "still_here\n1\n"


class Terminal:
    """The other end of a pseudo-terminal: what was shown so far, read up to what we wait for."""

    def __init__(self, fd: int):
        self.fd, self.seen, self.read_to = fd, b"", 0

    def expect(self, needle: bytes, timeout: float = 60) -> bytes:
        deadline = time.monotonic() + timeout
        while needle not in self.seen[self.read_to :]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{needle!r} never appeared; the terminal showed {self.seen[-2000:]!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    self.seen += os.read(self.fd, 4096)
                except OSError:  # the child closed the terminal
                    break
        end = self.seen.index(needle, self.read_to) + len(needle)
        shown, self.read_to = self.seen[self.read_to : end], end
        return shown

    def type(self, keys: bytes) -> None:
        os.write(self.fd, keys)


def _own_terminal() -> None:
    """In the child: a new session whose controlling terminal is the pty, so that ^C there is SIGINT."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def test_in_a_real_terminal(ingested_db, tmp_path):
    """Type into a pseudo-terminal as a person would: a query, a cancelled one, then Ctrl-D."""
    main_fd, child_fd = pty.openpty()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "N2VDB_HOME": str(tmp_path / "home"),
        "TERM": "xterm",
        "COLUMNS": "100",
        "LINES": "40",
        "PROMPT_TOOLKIT_NO_CPR": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "n2vdb", "shell", "--db", str(ingested_db)],
        stdin=child_fd,
        stdout=child_fd,
        stderr=child_fd,
        env=env,
        close_fds=True,
        preexec_fn=_own_terminal,
    )
    os.close(child_fd)
    term = Terminal(main_fd)
    try:
        term.expect(b"n2vdb>")
        term.type(b"select 6 * 7 as answer;\r")
        answer = term.expect(b"42")
        assert b"answer" in answer and "┃".encode() in answer  # a rich table on a terminal
        term.expect(b"n2vdb>")
        term.type(LONG_QUERY.encode() + b"\r")
        time.sleep(1.0)
        term.type(b"\x03")
        term.expect(b"cancelled")
        term.expect(b"n2vdb>")
        term.type(b"\x04")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main_fd)
    assert "select 6 * 7 as answer;" in (tmp_path / "home" / "shell_history").read_text()
    (tmp_path / "screen.txt").write_bytes(term.seen)


def test_cli_shell_runs_piped_scripts(ingested_db, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "N2VDB_HOME": str(tmp_path / "home")}
    done = subprocess.run(
        [sys.executable, "-m", "n2vdb", "shell", "--db", str(ingested_db), "-f", "csv"],
        input=".query similarity red green\nselect 1 as one;\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    expected = api.query("similarity", ingested_db, a="red", b="green").to_pylist()[0]
    lines = done.stdout.splitlines()
    assert lines[-2:] == ["one", "1"]
    assert str(expected["similarity"]) in lines[1]
    missing = subprocess.run(
        [sys.executable, "-m", "n2vdb", "shell", "--db", str(tmp_path / "none.duckdb")],
        input="select 1;\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "no database" in missing.stderr


def test_the_shell_runs_in_the_sql_sandbox(db_copy, tmp_path):
    """The same guarantees as `n2vdb sql` (tests/test_sandbox.py): no files, and with .write on one
    transaction per input that changes this database only."""
    before = db_copy.read_bytes()
    shell, out, err = shell_for(db_copy)
    shell.handle(f"COPY (SELECT 1) TO '{tmp_path}/leak.csv';")
    shell.handle(f"ATTACH '{tmp_path}/new.duckdb' AS n (READ_WRITE);")
    assert not (tmp_path / "leak.csv").exists() and not (tmp_path / "new.duckdb").exists()
    assert db_copy.read_bytes() == before
    shell.handle(".write on")
    shell.handle("CREATE TABLE notes AS SELECT 1 AS x; SELECT * FROM no_such_table;")
    shell.handle("BEGIN; DROP TABLE probes; COMMIT;")
    shell.handle("ATTACH ':memory:' AS m;")
    errors = [line for line in err.getvalue().splitlines() if line.startswith("Error:")]
    assert len(errors) == 5 and "one transaction" in errors[3] and "ATTACH is refused" in errors[4]
    with duckdb.connect(str(db_copy), read_only=True) as con:
        tables = {t for (t,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert "notes" not in tables and "probes" in tables  # the failed input left nothing behind
