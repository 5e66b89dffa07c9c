"""Runaway statements stop (issue 31): Ctrl-C and SIGTERM interrupt any statement within a moment,
even one that never returns to Python, and reads stop at a time limit, so no reader holds the
database for long."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from n2vdb import api
from n2vdb.errors import QueryError, UsageError

from helpers import run_cli

ENDLESS = "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r) SELECT count(*) FROM r"
LONG = "SELECT sum(i) FROM range(1000000000000) t(i)"  # about 20 minutes of one core


@pytest.fixture
def db(tmp_path, ingested_db):
    target = tmp_path / "n2v.duckdb"
    shutil.copy(ingested_db, target)
    return target


def test_reads_stop_at_their_time_limit(db, monkeypatch):
    start = time.monotonic()
    result = run_cli("sql", ENDLESS, "--timeout", "0.5", "--db", str(db))
    assert result.returncode == 1 and "time limit of 0.5 s" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and time.monotonic() - start < 10
    with pytest.raises(QueryError, match="time limit of 0.3 s"):
        api.sql(LONG, db, timeout=0.3)
    monkeypatch.setenv("N2VDB_TIMEOUT", "0.3")
    with pytest.raises(QueryError, match="N2VDB_TIMEOUT changes the limit"):
        api.sql(LONG, db)
    shell = run_cli("shell", "--db", str(db), stdin=f".timeout 0.4\n{LONG};\nSELECT 42 AS answer;\n")
    assert "time limit of 0.4 s" in shell.stderr and "42" in shell.stdout, (shell.stdout, shell.stderr)
    monkeypatch.setenv("N2VDB_TIMEOUT", "soon")
    bad = run_cli("query", "nearest", "red", "--db", str(db))
    assert bad.returncode == 2 and "N2VDB_TIMEOUT='soon'" in bad.stderr
    with pytest.raises(UsageError, match="timeout must be"):
        api.sql("SELECT 1", db, timeout=-1)
    assert api.query("nearest", db, timeout=0, concept="red").num_rows > 0  # 0: no limit


@pytest.mark.parametrize(("sent", "code", "sql"), [(signal.SIGINT, 130, ENDLESS), (signal.SIGTERM, 143, LONG)])
def test_a_signal_stops_any_statement_at_once(db, sent, code, sql):
    env = {**os.environ, "N2VDB_TIMEOUT": "0"}
    process = subprocess.Popen(
        [sys.executable, "-m", "n2vdb", "sql", sql, "--db", str(db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    time.sleep(2)  # well inside the statement (a cold `n2vdb sql` starts in about 0.5 s)
    assert process.poll() is None
    process.send_signal(sent)
    start = time.monotonic()
    _, err = process.communicate(timeout=30)
    assert process.returncode == code and time.monotonic() - start < 2.0, err
    assert "Traceback" not in err
    # the lock is let go: a writer opens the database at once
    assert run_cli("sql", "--write", "CREATE TABLE scratch AS SELECT 1 AS x", "--db", str(db)).returncode == 0


def test_a_result_too_large_to_hold_is_refused_not_fetched(db, monkeypatch, tmp_path):
    monkeypatch.setenv("N2VDB_RESULT_MB", "5")
    big = "SELECT repeat('x', 100000) AS s FROM range(100)"  # 10 MB of text
    for args in (["sql", big], ["sql", big, "-f", "json"]):
        result = run_cli(*args, "--db", str(db))
        assert result.returncode == 1 and "passed 5 MB (N2VDB_RESULT_MB)" in result.stderr, result.stderr
        assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1
    with pytest.raises(QueryError, match="passed 5 MB"):
        api.sql(big, db)  # the pyarrow path
    shell = run_cli("shell", "--db", str(db), stdin=f".limit 0\n{big};\nSELECT 7 AS seven;\n")
    assert "passed 5 MB" in shell.stderr and "7" in shell.stdout
    out = tmp_path / "big.parquet"
    assert run_cli("sql", big, "-o", str(out), "--db", str(db)).returncode == 0  # a file streams: no limit
    assert out.stat().st_size > 0
    assert api.sql("SELECT repeat('x', 1000) AS s FROM range(100)", db).num_rows == 100  # 0.1 MB: fine
    monkeypatch.setenv("N2VDB_RESULT_MB", "lots")
    assert "N2VDB_RESULT_MB='lots'" in run_cli("sql", "SELECT 1", "--db", str(db)).stderr
