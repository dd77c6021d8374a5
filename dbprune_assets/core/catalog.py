"""The SQL catalog: ``$DBPRUNE_HOME/dbprune.duckdb`` holds *views* over the
parquet tables, never data.

Each view reads ``tables/<table>/*.parquet`` by absolute glob, so a partition
that is added or re-materialised shows up without touching the catalog; a table
with no file yet gets an empty view with the right column types.  The database
is opened read-write only for the moment it takes to (re)create views, and
every open retries while another process holds DuckDB's lock: that is how
parallel shard steps and a ``dbprune sql`` running beside a backfill coexist.
Parquet files themselves are replaced by atomic rename, so a reader never sees
half a file.
"""

from __future__ import annotations

import random
import time
from typing import Any, Callable, Iterable, TypeVar

from .duck import parquet_source, view_sql
from .faults import crash_point
from .layout import Layout

T = TypeVar("T")

#: the tables the catalog has a view of (columns and types: ``duck.TABLES``),
#: in creation order: a view others refer to comes first
CATALOG_TABLES: tuple[str, ...] = (
    "quotas", "samples", "problems", "scores", "duplicates", "assignments", "centroids", "clusters", "decisions",
    "eval",
)
#: columns a view computes from other views rather than reading from its files:
#: a cluster's ``kept`` is what the dbp decisions actually kept (via ``quotas``)
DERIVED: dict[str, dict[str, str]] = {
    "clusters": {"kept": "(SELECT q.kept FROM quotas q WHERE q.strategy = 'dbp' AND q.cluster = t.cluster)"},
}


class CatalogBusy(RuntimeError):
    """The catalog stayed locked by another process for the whole retry window."""


def _is_lock_error(err: BaseException) -> bool:
    text = str(err).lower()
    return "lock" in text or "conflicting" in text or "being used" in text


def with_retry(fn: Callable[[], T], timeout_s: float = 60.0, what: str = "catalog") -> T:
    """Run ``fn`` retrying (with jitter) while DuckDB reports a file lock.

    It lives here, not in ``duck``, because the catalog is the one DuckDB file
    that several processes open; every other database is a private scratch file.
    """
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        try:
            return fn()
        except Exception as err:  # duckdb raises IOException for locks
            if not _is_lock_error(err) or time.monotonic() > deadline:
                if _is_lock_error(err):
                    raise CatalogBusy(
                        f"{what} is locked by another process for over {timeout_s:.0f}s; "
                        "retry when the running step has finished"
                    ) from err
                raise
            time.sleep(delay + random.random() * delay)
            delay = min(delay * 2, 1.0)


def view_statement(layout: Layout, table: str) -> str:
    """The ``CREATE OR REPLACE VIEW`` of ``table``: an absolute glob over its
    partitions (union by name), or an empty typed view while it has none."""
    folder = layout.table_dir(table)
    has_files = folder.is_dir() and any(folder.glob("*.parquet"))
    source = parquet_source(str(folder / "*.parquet"), union_by_name=True) if has_files else None
    return view_sql(table, table, source, temp=False, derived=DERIVED.get(table))


def refresh_catalog(layout: Layout, tables: Iterable[str] | None = None, timeout_s: float = 60.0) -> None:
    """(Re)create the views of ``tables`` (None: all) in one brief read-write
    transaction, retrying while another process holds the lock.

    Views the catalog lacks (a new catalog file) are created too, so every
    table always has a view.  A view that others refer to (``clusters`` reads
    ``quotas``) resolves them when queried, so refreshing one alone is enough.
    """
    import duckdb

    wanted = set(CATALOG_TABLES if tables is None else tables)
    unknown = sorted(wanted - set(CATALOG_TABLES))
    if unknown:
        raise ValueError(f"the catalog has no table {unknown[0]!r}; known: {', '.join(CATALOG_TABLES)}")
    layout.catalog.parent.mkdir(parents=True, exist_ok=True)

    def _do() -> None:
        con = duckdb.connect(str(layout.catalog))
        try:
            con.execute("BEGIN")
            present = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
            for t in CATALOG_TABLES:
                if t in wanted or t not in present:
                    con.execute(view_statement(layout, t))
            crash_point("catalog", layout.catalog)
            con.execute("COMMIT")
        finally:
            con.close()

    with_retry(_do, timeout_s=timeout_s, what=str(layout.catalog))


def query(layout: Layout, sql: str, timeout_s: float = 60.0) -> Any:
    """Run read-only SQL against the catalog; returns a pyarrow Table."""
    import duckdb

    if not layout.catalog.exists():
        refresh_catalog(layout, timeout_s=timeout_s)

    def _do() -> Any:
        con = duckdb.connect(str(layout.catalog), read_only=True)
        try:
            return con.sql(sql).to_arrow_table()
        finally:
            con.close()

    return with_retry(_do, timeout_s=timeout_s, what=str(layout.catalog))
