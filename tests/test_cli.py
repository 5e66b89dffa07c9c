"""The command line as a user meets it: README commands, help for every command."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def readme_block(heading: str) -> str:
    section = README.split(f"## {heading}\n", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S)[1].strip()


def all_commands() -> list[list[str]]:
    """Every command and group of the app, read from the app itself (a new command is covered at once)."""
    import typer

    from n2vdb.cli import app

    found = []

    def walk(command, path: list[str]) -> None:
        found.append(path)
        if hasattr(command, "commands"):  # a group (typer vendors its own click: no isinstance)
            for name, sub in command.commands.items():
                walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return found


@pytest.mark.parametrize("command", all_commands(), ids=lambda c: " ".join(c) or "n2vdb")
def test_every_command_has_help_and_is_documented(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0 and "Usage" in result.stdout, result.stderr
    assert " ".join(["n2vdb", *command]) in README


def test_the_command_list_is_complete():
    assert {"ingest", "sql", "query"} <= {c[0] for c in all_commands() if c}
    assert ["data", "add"] in all_commands() and ["db", "check"] in all_commands()


def test_version():
    result = subprocess.run([sys.executable, "-m", "n2vdb", "--version"], capture_output=True, text=True)
    assert re.fullmatch(r"n2vdb \d+\.\d+\.\d+\n", result.stdout)


def test_ci_runs_the_readme_test_command():
    assert readme_block("Tests") in (ROOT / ".ci" / "run").read_text()


def test_readme_start_command_works_for_a_new_user(tmp_path):
    """The README's first command, minus the install that already happened, in an empty directory."""
    command = readme_block("Start")
    install, rest = command.split(" && ", 1)
    assert install.startswith("python3 -m pip install")
    env = {k: v for k, v in os.environ.items() if not k.startswith("N2VDB")}
    env.update(N2VDB_HOME=str(tmp_path / "home"), PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    result = subprocess.run(rest, shell=True, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "n2v.duckdb").exists()
    lines = result.stdout.splitlines()
    assert lines[0] == "rank,concept,category,similarity"  # piped, so CSV
    assert len(lines) == 11 and lines[1].startswith("1,")
    assert "mean val IoU" in result.stderr and "Traceback" not in result.stderr


def test_models_lists_layers_with_shapes():
    result = run_cli("models", "alexnet")
    assert "conv5,features.11,256x13x13" in result.stdout
