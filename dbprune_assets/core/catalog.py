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
from typing import Any, Callable, TypeVar

from .faults import crash_point
from .layout import Layout

T = TypeVar("T")

#: table -> (column, DuckDB type); the contract of shared/DESIGN.md plus a few extras
SCHEMAS: dict[str, list[tuple[str, str]]] = {
    "samples": [
        ("uid", "VARCHAR"), ("shard", "VARCHAR"), ("key", "VARCHAR"), ("row", "INTEGER"),
        ("caption", "VARCHAR"), ("width", "INTEGER"), ("height", "INTEGER"), ("status", "VARCHAR"),
    ],
    "problems": [("shard", "VARCHAR"), ("key", "VARCHAR"), ("stage", "VARCHAR"), ("cause", "VARCHAR")],
    "scores": [("uid", "VARCHAR"), ("shard", "VARCHAR"), ("clip_score", "FLOAT")],
    "duplicates": [("uid", "VARCHAR"), ("shard", "VARCHAR"), ("duplicate_of", "VARCHAR"), ("similarity", "FLOAT")],
    "assignments": [
        ("uid", "VARCHAR"), ("shard", "VARCHAR"), ("row", "INTEGER"), ("cluster", "INTEGER"), ("distance", "FLOAT"),
    ],
    "centroids": [("cluster", "INTEGER"), ("vector", "FLOAT[]")],
    "clusters": [
        ("cluster", "INTEGER"), ("size", "BIGINT"), ("d_intra", "DOUBLE"), ("d_inter", "DOUBLE"),
        ("complexity", "DOUBLE"), ("probability", "DOUBLE"), ("quota", "BIGINT"), ("lower_bound", "BIGINT"), ("kept", "BIGINT"),
    ],
    "quotas": [("strategy", "VARCHAR"), ("cluster", "INTEGER"), ("quota", "BIGINT"), ("kept", "BIGINT")],
    "decisions": [
        ("strategy", "VARCHAR"), ("uid", "VARCHAR"), ("shard", "VARCHAR"), ("keep", "BOOLEAN"), ("reason", "VARCHAR"),
    ],
    "eval": [
        ("strategy", "VARCHAR"), ("seed", "INTEGER"), ("task", "VARCHAR"), ("metric", "VARCHAR"), ("value", "DOUBLE"),
    ],
}


class CatalogBusy(RuntimeError):
    """The catalog stayed locked by another process for the whole retry window."""


def _is_lock_error(err: BaseException) -> bool:
    text = str(err).lower()
    return "lock" in text or "conflicting" in text or "being used" in text


def with_retry(fn: Callable[[], T], timeout_s: float = 60.0, what: str = "catalog") -> T:
    """Run ``fn`` retrying (with jitter) while DuckDB reports a file lock."""
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


def _quote(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


#: columns a view computes from other views rather than reading from its files:
#: a cluster's ``kept`` is what the dbp decisions actually kept (via ``quotas``)
DERIVED: dict[str, dict[str, str]] = {
    "clusters": {"kept": "(SELECT q.kept FROM quotas q WHERE q.strategy = 'dbp' AND q.cluster = t.cluster)"},
}
#: views that others refer to are created first
ORDER = ["quotas"] + [t for t in SCHEMAS if t != "quotas"]


def view_sql(layout: Layout, table: str) -> str:
    derived = DERIVED.get(table, {})
    cols = [(c, t) for c, t in SCHEMAS[table] if c not in derived]
    folder = layout.table_dir(table)
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if files:
        pattern = _quote(str(folder / "*.parquet"))
        select = [f'CAST(t."{c}" AS {ty}) AS "{c}"' for c, ty in cols]
        select += [f'CAST({expr} AS {dict(SCHEMAS[table])[c]}) AS "{c}"' for c, expr in derived.items()]
        return (
            f'CREATE OR REPLACE VIEW "{table}" AS SELECT {", ".join(select)} '
            f"FROM read_parquet({pattern}, union_by_name = true) t"
        )
    typed = ", ".join(f'CAST(NULL AS {t}) AS "{c}"' for c, t in SCHEMAS[table])
    return f'CREATE OR REPLACE VIEW "{table}" AS SELECT {typed} WHERE false'


def refresh_catalog(layout: Layout, tables: list[str] | None = None, timeout_s: float = 60.0) -> None:
    """(Re)create the catalog's views in one brief read-write open.

    ``tables`` says which tables changed (kept for callers' clarity); every view
    is recreated since some refer to others.
    """
    import duckdb

    # all views, always: it is a handful of statements, and views refer to each other
    names = ORDER
    layout.catalog.parent.mkdir(parents=True, exist_ok=True)

    def _do() -> None:
        con = duckdb.connect(str(layout.catalog))
        try:
            con.execute("BEGIN")
            for t in names:
                con.execute(view_sql(layout, t))
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
