"""The SQL sandbox of ``dbprune sql``: which statements a catalog query may run,
and a query that stops at a time limit or on Ctrl-C.

A query may run **read-only statements** and nothing else, however they are
wrapped: every statement DuckDB parses out of the text must be a ``SELECT`` in
DuckDB's sense (``SELECT``, ``FROM …``, ``WITH …``, ``VALUES``, ``DESCRIBE``,
``SHOW``, ``SUMMARIZE``, ``PIVOT``/``UNPIVOT`` with an ``IN`` list), or an
``EXPLAIN`` / ``EXPLAIN ANALYZE`` of one.  ``EXPLAIN ANALYZE`` *executes* the
statement it explains, so the explained statement is parsed again and held to
the same rule: ``EXPLAIN ANALYZE COPY … TO`` is a ``COPY`` and is refused.
Every accepted statement must also serialise as a ``SELECT`` (DuckDB's
``json_serialize_sql`` serialises nothing else), a second, independent check
that nothing which writes slips through.

``PIVOT`` without an ``IN`` list is several statements to DuckDB (it first
creates an enum type of the values found), so it is refused with the form to
use instead.
"""

from __future__ import annotations

import json
import re
import threading
import time
from typing import Any

#: statement kinds a catalog query may run (``duckdb.StatementType`` names);
#: an ``EXPLAIN``'s own statement must be a ``SELECT``
READ_STATEMENTS = frozenset({"SELECT", "EXPLAIN"})
#: what ``dbprune sql`` runs, in words (its refusals and ``--help`` say it)
ALLOWED_WORDS = ("SELECT, FROM-first queries, WITH, VALUES, DESCRIBE, SHOW, SUMMARIZE, PIVOT/UNPIVOT with an "
                 "IN list, and EXPLAIN [ANALYZE] of those")
#: seconds a ``dbprune sql`` query may run unless ``--timeout`` says otherwise
DEFAULT_TIMEOUT_S = 300.0

_COMMENTS = r"(?:\s+|--[^\n]*\n?|/\*.*?\*/)*"
#: ``EXPLAIN``, ``EXPLAIN ANALYZE``, ``EXPLAIN (FORMAT json, …)`` at a statement's start
_EXPLAIN = re.compile(_COMMENTS + r"EXPLAIN\b" + _COMMENTS + r"(?:ANALY[SZ]E\b|\([^)]*\))?", re.IGNORECASE | re.DOTALL)


class QueryRefused(ValueError):
    """A catalog query that would write, or read outside the home's tables."""


class QueryTimeout(RuntimeError):
    """A catalog query that ran past its time limit (it was interrupted)."""


def _refuse(kind: str) -> QueryRefused:
    hint = ("PIVOT needs an IN list here (PIVOT t ON col IN (v1, v2) USING …): without one DuckDB runs several "
            "statements" if kind == "MULTI" else f"{kind} statements are refused")
    return QueryRefused(f"the catalog is read-only: {hint} (allowed: {ALLOWED_WORDS}); to save a result, use "
                        "`dbprune sql --format csv \"SELECT …\" > FILE`")


def check_read_only(con: Any, sql: str) -> None:
    """Raise :class:`QueryRefused` unless every statement of ``sql`` is a
    read-only one (see the module docstring)."""
    for statement in con.extract_statements(sql):
        kind, text = statement.type.name, statement.query
        if kind == "EXPLAIN":
            match = _EXPLAIN.match(text)
            inner = con.extract_statements(text[match.end():]) if match else []
            if len(inner) != 1 or inner[0].type.name != "SELECT":
                raise _refuse(inner[0].type.name if len(inner) == 1 else "EXPLAIN")
            kind, text = "SELECT", inner[0].query
        if kind != "SELECT":
            raise _refuse(kind)
        serialised = json.loads(con.execute("SELECT json_serialize_sql(?)", [text]).fetchall()[0][0])
        if serialised.get("error"):  # not a plain SELECT after all
            raise _refuse(f"non-SELECT ({serialised.get('error_message', 'unknown')})")


def _stop(con: Any, thread: threading.Thread, patience_s: float = 60.0) -> None:
    """Interrupt the query ``thread`` runs on ``con`` until it has ended: an
    interrupt that comes before DuckDB starts executing is not seen (or is
    refused as the connection being busy), so it is repeated every 0.1 s."""
    deadline = time.monotonic() + patience_s
    while thread.is_alive() and time.monotonic() < deadline:
        try:
            con.interrupt()
        except Exception:  # noqa: BLE001 - DuckDB refuses while it is still binding the query: try again
            pass
        thread.join(0.1)


def fetch_arrow(con: Any, sql: str, timeout_s: float | None) -> Any:
    """``con.sql(sql)`` as a pyarrow Table, interrupted after ``timeout_s``
    seconds (:class:`QueryTimeout`) or at Ctrl-C (``KeyboardInterrupt``): the
    query runs in a thread, and the waiting main thread interrupts DuckDB."""
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["table"] = con.sql(sql).to_arrow_table()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            result["error"] = e.with_traceback(None)

    thread = threading.Thread(target=work, name="dbprune-sql", daemon=True)
    thread.start()
    try:
        thread.join(timeout_s)
    except KeyboardInterrupt:
        _stop(con, thread)
        raise
    if thread.is_alive():
        _stop(con, thread)
        raise QueryTimeout(f"the query ran past its time limit of {timeout_s:g} s and was stopped; narrow it "
                           "(a WHERE on shard or strategy, a LIMIT) or give it longer with --timeout SECONDS")
    if "error" in result:
        raise result["error"]
    return result["table"]


def close_quietly(con: Any) -> None:
    """Close a query's connection; one whose query was just interrupted may
    still call itself busy, and then goes with its process (a read-only
    connection holds nothing to write back)."""
    try:
        con.close()
    except Exception:  # noqa: BLE001 - duckdb.ResourceInUseException after an interrupt
        pass
