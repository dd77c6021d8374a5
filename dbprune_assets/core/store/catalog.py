"""The SQL catalog: ``$DBPRUNE_HOME/dbprune.duckdb`` holds *views* over the
parquet tables, never data.

Each view reads ``tables/<table>/*.parquet`` by absolute glob, so a partition
that is added or re-materialised shows up without touching the catalog; a table
with no file yet gets an empty view with the right column types.  The database
is opened read-write only for the moment it takes to (re)create views, and
every open retries while another process holds DuckDB's lock: that is how
parallel shard steps and a ``dbprune sql`` running beside a backfill coexist.
A query (``dbprune sql``) opens it read-only, in a sandbox that reads only the
home's tables, and refreshes only views that are out of date (:func:`query`).
Parquet files themselves are replaced by atomic rename, so a reader never sees
half a file.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any, Callable, Iterable, TypeVar

from dbprune_assets.core.store.duck import TABLES, absent_columns, parquet_source, sql_literal, view_sql
from dbprune_assets.core.running.faults import crash_point
from dbprune_assets.core.store.layout import Layout
from dbprune_assets.core.pool.uids import EFFECTIVE_STATUS
from dbprune_assets.core.store.sandbox import QueryRefused, QueryTimeout, check_read_only, close_quietly, fetch_arrow

__all__ = ["CATALOG_TABLES", "CatalogBusy", "QueryRefused", "QueryTimeout", "ensure_catalog", "query",
           "refresh_catalog", "stale_views", "with_retry"]

T = TypeVar("T")

#: the tables the catalog has a view of (columns and types: ``duck.TABLES``),
#: in creation order: a view others refer to comes first
CATALOG_TABLES: tuple[str, ...] = (
    "quotas", "duplicate_uids", "samples", "problems", "scores", "duplicates", "assignments", "centroids", "clusters", "decisions",
    "eval", "decision_runs", "quota_moves", "truth_quality",
)
#: columns a view computes from other views rather than reading from its files:
#: a cluster's ``kept`` is what the dbp decisions actually kept (via ``quotas``)
DERIVED: dict[str, dict[str, str]] = {
    "clusters": {"kept": "(SELECT q.kept FROM quotas q WHERE q.strategy = 'dbp' AND q.cluster = t.cluster)"},
    "samples": {"status": EFFECTIVE_STATUS},  # a uid an earlier shard has is duplicate_uid (core/pool/uids.py)
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


def _glob(layout: Layout, table: str) -> str | None:
    """The absolute glob ``table``'s view reads, or None while it has no file."""
    folder = layout.table_dir(table)
    return str(folder / "*.parquet") if folder.is_dir() and any(folder.glob("*.parquet")) else None


def view_statement(layout: Layout, table: str) -> str:
    """The ``CREATE OR REPLACE VIEW`` of ``table``: an absolute glob over its
    partitions (union by name), or an empty typed view while it has none."""
    glob = _glob(layout, table)
    source = parquet_source(glob, union_by_name=True) if glob is not None else None
    return view_sql(table, table, source, temp=False, derived=DERIVED.get(table),
                    absent=absent_columns(table, source))


def stale_views(layout: Layout, timeout_s: float = 60.0) -> list[str]:
    """The catalog tables whose view is missing or out of date (another glob,
    e.g. a moved home; an empty view of a table that now has files; other
    columns or types), read without writing the catalog file."""
    import duckdb

    if not layout.catalog.exists():
        return list(CATALOG_TABLES)

    def _do() -> tuple[dict[str, str], dict[str, list[tuple[str, str]]]]:
        con = duckdb.connect(str(layout.catalog), read_only=True)
        try:
            views = dict(con.execute("SELECT view_name, sql FROM duckdb_views() WHERE NOT internal").fetchall())
            cols: dict[str, list[tuple[str, str]]] = {}
            for t, c, ty in con.execute("SELECT table_name, column_name, data_type FROM duckdb_columns() "
                                        "WHERE NOT internal ORDER BY table_name, column_index").fetchall():
                cols.setdefault(t, []).append((c, ty))
            return views, cols
        finally:
            con.close()

    views, cols = with_retry(_do, timeout_s=timeout_s, what=str(layout.catalog))
    stale = []
    for t in CATALOG_TABLES:
        glob = _glob(layout, t)
        reads = t in views and glob is not None and sql_literal(glob) in views[t]
        if t not in views or cols.get(t) != list(TABLES[t].items()) or reads != (glob is not None):
            stale.append(t)
    return stale


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


def ensure_catalog(layout: Layout, timeout_s: float = 60.0) -> None:
    """Refresh the views that are out of date (:func:`stale_views`); the
    catalog file is not opened for writing when all are current.  A writer
    holding the catalog past ``timeout_s`` leaves the old views (globs, so
    still valid) in place."""
    stale = stale_views(layout, timeout_s=timeout_s)
    if stale:
        try:
            refresh_catalog(layout, stale, timeout_s=timeout_s)
        except CatalogBusy:
            if not layout.catalog.exists():
                raise


def query(layout: Layout, sql: str, timeout_s: float = 60.0, query_timeout_s: float | None = None) -> Any:
    """Run read-only SQL against the catalog (:mod:`.sandbox`: SELECT in its
    forms, EXPLAIN of one); returns a pyarrow Table.  Views are used as they
    are (a missing catalog is created); ``dbprune sql`` first calls
    :func:`ensure_catalog`.  ``timeout_s`` bounds the wait for the catalog's
    lock, ``query_timeout_s`` the query itself (:class:`.sandbox.QueryTimeout`;
    Ctrl-C interrupts it too).

    The connection is read-only and sandboxed: DuckDB may read files only under
    ``$DBPRUNE_HOME/tables/`` (``allowed_directories`` with
    ``enable_external_access`` off, then the configuration locked), so
    ``COPY … TO``, ``read_csv('/etc/passwd')``, ``ATTACH`` and extension loads
    are refused (:class:`QueryRefused`).
    """
    import duckdb

    if not layout.catalog.exists():
        refresh_catalog(layout, timeout_s=timeout_s)
    tables = str(layout.home / "tables") + os.sep

    def _do() -> Any:
        con = duckdb.connect(str(layout.catalog), read_only=True)
        try:
            con.execute("SET allowed_directories = ?", [[tables]])
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
            check_read_only(con, sql)
            try:
                return fetch_arrow(con, sql, query_timeout_s)
            except duckdb.PermissionException as e:
                raise QueryRefused(f"queries read only the catalog's tables (files under {tables}): {e}") from None
        finally:
            close_quietly(con)

    return with_retry(_do, timeout_s=timeout_s, what=str(layout.catalog))
