"""Smaller holes an adversarial user found (issue 31, item 3), each closed: USE hidden behind a
comment, control characters in values, paths shown by duckdb_settings(), SQL that starts with a
comment, and an ingest that fails on bad input leaving a database behind."""

from __future__ import annotations

import os
import shutil

import pytest

from helpers import run_cli


@pytest.fixture
def db(tmp_path, ingested_db):
    target = tmp_path / "n2v.duckdb"
    shutil.copy(ingested_db, target)
    return target


@pytest.mark.parametrize("sql", ["/* c */ USE system", "-- c\nUSE system", "  /* a */ /* b */\n use system"])
def test_use_behind_comments_is_refused_in_write_mode(db, sql):
    result = run_cli("sql", "--write", sql, "--db", str(db))
    assert result.returncode == 2 and "USE is refused" in result.stderr, result.stderr


def test_control_characters_in_values_never_reach_the_terminal_raw(db):
    result = run_cli(
        "sql", "SELECT 'a' || chr(27) || '[2J' || chr(7) AS " + '"x' + "\x1b" + '"', "-f", "table", "--db", str(db)
    )
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "a\\x1b[2J\\x07" in result.stdout and "x\\x1b" in result.stdout


def test_settings_show_readers_no_home_directory(db):
    result = run_cli("sql", "SELECT value FROM duckdb_settings()", "-f", "csv", "--db", str(db))
    assert result.returncode == 0 and os.path.expanduser("~") not in result.stdout


def test_sql_that_starts_with_a_comment_is_sql(db):
    for args in (
        ["-- the answer\nSELECT 42 AS answer", "--db", str(db)],
        ["--db", str(db), "--c\nSELECT 42 AS answer"],
    ):
        result = run_cli("sql", *args, "-f", "csv")
        assert result.returncode == 0 and result.stdout.split() == ["answer", "42"], result.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["nosuch", "conv5", "--weights", "random"], "unknown model 'nosuch'"),
        (["alexnet", "conv5", "--weights", "BAD"], "not a PyTorch state dict"),
    ],
)
def test_an_ingest_refused_for_bad_input_leaves_no_database(tmp_path, synthetic_dir, args, says):
    bad = tmp_path / "bad.pth"
    bad.write_text("not weights")
    db = tmp_path / "new.duckdb"
    env = {"N2VDB_HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir()
    shutil.copytree(synthetic_dir, tmp_path / "home" / "synthetic")  # the built-in set, without generating it
    result = run_cli("ingest", *[str(bad) if a == "BAD" else a for a in args], "--db", str(db), env=env)
    assert result.returncode != 0 and says in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth", "home"]


def test_a_missing_postgres_driver_is_one_line_naming_the_pip_command(db, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if not installed: importing it fails
    result = run_cli("export", "postgresql://nobody@/x?host=/nonexistent", "--db", str(db))
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "needs psycopg 3: pip install 'n2vdb[export]'" in result.stderr


def test_data_add_refuses_a_row_whose_image_is_missing_and_leaves_no_database(tmp_path, synthetic_dir):
    root = tmp_path / "set"
    shutil.copytree(synthetic_dir, root)
    victim = sorted((root / "images").rglob("*.jpg"))[3]
    victim.unlink()
    db = tmp_path / "new.duckdb"
    result = run_cli("data", "add", str(root), "--name", "x", "--db", str(db))
    assert result.returncode == 1 and f"names image {victim.relative_to(root / 'images')}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not db.exists()
    (root / "index.csv").write_text("not,a,header\n")
    assert run_cli("data", "add", str(root), "--name", "x", "--db", str(db)).returncode == 1 and not db.exists()
