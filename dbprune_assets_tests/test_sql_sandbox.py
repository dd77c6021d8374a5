"""``dbprune sql``'s sandbox: every read-only statement form runs, nothing that
writes runs however it is wrapped, and a runaway query stops at its limit."""

from __future__ import annotations

import time

import pytest

from dbprune_assets.core.store import catalog
from dbprune_assets.core.store.layout import Layout

from .conftest import run_cli


@pytest.mark.parametrize("sql", [
    "SELECT count(*) FROM samples",
    "FROM samples SELECT uid",
    "WITH s AS (SELECT * FROM samples) SELECT count(*) FROM s",
    "VALUES (1, 2)",
    "DESCRIBE samples",
    "SHOW TABLES",
    "SUMMARIZE samples",
    "PIVOT samples ON status IN ('ok') USING count(*)",
    "UNPIVOT (SELECT width, height FROM samples) ON width, height INTO NAME side VALUE px",
    "EXPLAIN SELECT * FROM samples",
    "EXPLAIN ANALYZE SELECT * FROM samples",
    "/* a comment */ explain analyze select 1",
    "SELECT 1; SELECT 2",
], ids=["select", "from-first", "with", "values", "describe", "show", "summarize", "pivot-in", "unpivot",
        "explain", "explain-analyze", "comment-explain", "two-selects"])
def test_read_only_statements_run(small_catalog: Layout, sql: str) -> None:
    assert catalog.query(small_catalog, sql).num_rows >= 1


@pytest.mark.parametrize("sql, expected", [
    ("EXPLAIN ANALYZE COPY (SELECT * FROM samples) TO '{inside}'", "COPY statements are refused"),
    ("EXPLAIN ANALYZE COPY samples TO '{inside}' (FORMAT parquet)", "COPY statements are refused"),
    ("EXPLAIN (ANALYZE) COPY samples TO '{inside}'", "refused"),
    ("-- c\nEXPLAIN ANALYZE CREATE TABLE t AS SELECT 1", "CREATE statements are refused"),
    ("EXPLAIN ANALYZE INSERT INTO samples VALUES (1)", "INSERT statements are refused"),
    ("SELECT 1; EXPLAIN ANALYZE COPY samples TO '{inside}'", "COPY statements are refused"),
    ("PIVOT samples ON status USING count(*)", "PIVOT needs an IN list"),
    ("CALL pragma_version()", "CALL statements are refused"),
    ("PRAGMA version", "PRAGMA statements are refused"),
], ids=["explain-analyze-copy", "explain-analyze-copy-table", "explain-options", "explain-create",
        "explain-insert", "second-statement", "pivot-without-in", "call", "pragma"])
def test_nothing_that_writes_runs_however_wrapped(small_catalog: Layout, sql: str, expected: str) -> None:
    layout = small_catalog
    inside = layout.table_dir("samples") / "x.parquet"
    with pytest.raises(catalog.QueryRefused, match=expected) as e:
        catalog.query(layout, sql.format(inside=inside))
    assert "allowed: SELECT" in str(e.value)
    assert sorted(p.name for p in layout.table_dir("samples").iterdir()) == ["00000.parquet"]
    assert catalog.query(layout, "SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 2}]


RUNAWAY = "SELECT count(*) FROM range(100000) a, range(100000) b WHERE a.range + b.range = -1"


def test_a_runaway_query_stops_at_its_time_limit(small_catalog: Layout) -> None:
    start = time.monotonic()
    with pytest.raises(catalog.QueryTimeout, match="time limit of 1 s"):
        catalog.query(small_catalog, RUNAWAY, query_timeout_s=1.0)
    assert time.monotonic() - start < 30  # interrupted, not run to the end
    assert catalog.query(small_catalog, "SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 2}]


def test_sql_command_refuses_explain_analyze_copy_and_writes_nothing(small_catalog: Layout) -> None:
    target = small_catalog.table_dir("samples") / "x.parquet"
    proc = run_cli("sql", f"EXPLAIN ANALYZE COPY (SELECT * FROM samples) TO '{target}'",
                   env={"DBPRUNE_HOME": str(small_catalog.home)}, timeout=120)
    assert proc.returncode == 2 and "SQL refused" in proc.stderr, proc.stderr
    assert not target.exists()


def test_sql_command_stops_at_its_timeout_and_on_ctrl_c(small_catalog: Layout) -> None:
    import os
    import signal
    import subprocess
    import sys

    env = {"DBPRUNE_HOME": str(small_catalog.home)}
    proc = run_cli("sql", "--timeout", "1", RUNAWAY, env=env, timeout=120)
    assert proc.returncode == 124 and "time limit of 1 s" in proc.stderr and "--timeout" in proc.stderr, proc.stderr
    # Ctrl-C (SIGINT) interrupts the running query at once
    # (a terminal's Ctrl-C; the child starts with SIGINT's default disposition even where
    # the test runner was started in the background, which makes a shell ignore SIGINT)
    child = subprocess.Popen([sys.executable, "-m", "dbprune_assets.cli", "sql", RUNAWAY],
                             env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(4.0)  # past start-up, into the query
    start = time.monotonic()
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130 and "interrupted" in err, err
    assert time.monotonic() - start < 15
