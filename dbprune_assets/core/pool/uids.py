"""Every uid once, across the pool: the first occurrence in shard order keeps a uid.

Ingest (:mod:`dbprune_assets.core.pool.shards`) applies the rule inside a shard: a
row whose uid an earlier row of the shard has gets status ``duplicate_uid``
when it is otherwise ``ok``.  Across shards the rule needs the whole pool,
while ingest and embeddings run per shard, in any order, and shards come and
go.  So ``pool_manifest`` (which runs after every shard's ingest, and which
every global step depends on) applies it with :func:`mark_cross_shard`:

* a row of shard B is a *cross-shard duplicate* when its ingest status is
  ``ok`` and a row of an earlier shard A (sorted shard names, the order
  ``dbprune run`` lists them) has its uid, whatever that row's status (32-hex
  uids compare case-insensitively);
* those rows go to ``tables/duplicate_uids/all.parquet`` (shard, key, row,
  uid, first_shard, first_key) and, as problems naming both locations (stage
  ``pool_manifest``), to ``tables/problems/all.parquet``.

The per-shard ``samples`` files keep ingest's statuses, so a shard's
embeddings (made from them) never change because another shard came or went.
Everything that reads the pool-wide status reads ``samples`` through
:data:`EFFECTIVE_STATUS` (:func:`samples_view`), which turns the listed rows
into ``duplicate_uid`` (decided ``corrupt``); SemDeDup and the candidates
drop the listed rows from the embedded ones (:func:`drop_superseded`,
:func:`usable_view`), so DBP never sees them.  The result is a
function of the shards' samples only (deterministic), recomputed whenever
``pool_manifest`` is, i.e. whenever a shard is added, removed or re-ingested:
when shard A leaves the pool, B's row is ``ok`` again.  Memory: DuckDB out of
core over the uid columns.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from dbprune_assets.core.store.atomic import remove, scratch_dir, write_parquet
from dbprune_assets.core.store.duck import connect, create_view, parquet_source, polars_schema, view_sql
from dbprune_assets.core.store.layout import UNPARTITIONED, Layout

if TYPE_CHECKING:
    import polars as pl

#: the pool-wide table of cross-shard duplicates (``duck.TABLES``)
TABLE = "duplicate_uids"
#: ``problems.stage`` of the rows this module writes
STAGE = "pool_manifest"
#: a samples row's status with the cross-shard rule applied (``t``: the samples
#: row; needs a view ``duplicate_uids`` beside it), for a view's ``derived`` status
EFFECTIVE_STATUS = ("CASE WHEN EXISTS (SELECT 1 FROM duplicate_uids u WHERE u.shard = t.shard AND u.row = t.row) "
                    "THEN 'duplicate_uid' ELSE t.status END")


def table_file(tables: Path) -> Path:
    """``<tables>/duplicate_uids/all.parquet`` under a tables root."""
    return Path(tables) / TABLE / f"{UNPARTITIONED}.parquet"


def find_cross_shard(samples_files: Sequence[Path], work: Path) -> "pl.DataFrame":
    """The cross-shard duplicates among the samples files (module docstring), ordered by (shard, row)."""
    con = connect(work)
    try:
        create_view(con, "samples", list(samples_files), columns=("uid", "shard", "key", "row", "status"))
        frame = con.sql(
            """
            WITH ids AS (  -- a 32-hex uid compares case-insensitively (shards.uid_identity)
              SELECT *, CASE WHEN regexp_full_match(uid, '[0-9a-fA-F]{32}') THEN lower(uid) ELSE uid END AS id
              FROM samples
            ), firsts AS (
              SELECT id, shard, key FROM ids
              QUALIFY row_number() OVER (PARTITION BY id ORDER BY shard, row) = 1
            )
            SELECT s.shard, s.key, s.row, s.uid, f.shard AS first_shard, f.key AS first_key
            FROM ids s JOIN firsts f ON f.id = s.id
            WHERE s.status = 'ok' AND s.shard > f.shard
            ORDER BY s.shard, s.row
            """
        ).pl()
    finally:
        con.close()
    return frame.cast(polars_schema(TABLE))


def mark_cross_shard(layout: Layout, shards: Sequence[str]) -> "pl.DataFrame":
    """Apply the rule to the pool's ``shards``: write (or remove, when there is
    none) ``tables/duplicate_uids/all.parquet`` and its problems rows; returns
    the duplicates."""
    import polars as pl

    files = [p for p in (layout.table("samples", s) for s in shards) if p.exists()]
    with scratch_dir(layout.tmp, "uids-") as work:
        found = find_cross_shard(files, Path(work))
    problems = pl.DataFrame(
        [(shard, key, STAGE, f"uid {uid} of key {key} (shard {shard}) was seen first at key {first_key} of shard "
                             f"{first_shard}: the first occurrence in shard order keeps the uid, this row is skipped "
                             "(status duplicate_uid)")
         for shard, key, _, uid, first_shard, first_key in found.iter_rows()],
        schema=polars_schema("problems"), orient="row",
    )
    for table, frame in ((TABLE, found), ("problems", problems)):
        if frame.height:
            write_parquet(layout.table(table), frame, layout.tmp)
        else:
            remove(layout.table(table))
    return found


def superseded_rows(tables: Path, shard: str) -> "pl.Series":
    """The ``row`` of each cross-shard duplicate of ``shard`` (empty when none)."""
    import polars as pl

    path = table_file(tables)
    if not path.exists():
        return pl.Series("row", [], pl.Int32)
    return pl.scan_parquet(path).filter(pl.col("shard") == shard).select("row").collect()["row"]


def drop_superseded(tables: Path, shard: str, frame: "pl.DataFrame") -> "pl.DataFrame":
    """``frame`` (rows of ``shard`` with a ``row`` column) without its cross-shard duplicates."""
    import polars as pl

    rows = superseded_rows(tables, shard)
    return frame.filter(~pl.col("row").is_in(rows.implode())) if rows.len() else frame


def _duplicates_view(con: Any, tables: Path) -> None:
    """The temp view ``duplicate_uids`` (shard, row) of the tables root ``tables``."""
    dup = table_file(tables)
    create_view(con, TABLE, [dup] if dup.exists() else [], columns=("shard", "row"))


def samples_view(con: Any, name: str, samples_files: Sequence[Path], tables: Path,
                 columns: Sequence[str] | None = None) -> None:
    """A temp view ``name`` over ``samples_files`` whose ``status`` is the
    effective one (:data:`EFFECTIVE_STATUS`, with the duplicates under the
    tables root ``tables``); also creates the temp view ``duplicate_uids``."""
    _duplicates_view(con, tables)
    source = parquet_source(list(samples_files)) if samples_files else None
    con.execute(view_sql(name, "samples", source, columns=columns, derived={"status": EFFECTIVE_STATUS}))


def usable_view(con: Any, name: str, rows_view: str, tables: Path) -> None:
    """A temp view ``name``: the rows of ``rows_view`` (shard, row, ...) less the
    cross-shard duplicates under the tables root ``tables`` (SQL's
    :func:`drop_superseded`, for the candidates' embedded rows)."""
    _duplicates_view(con, tables)
    con.execute(f'CREATE OR REPLACE TEMP VIEW "{name}" AS SELECT r.* FROM "{rows_view}" r '
                f"ANTI JOIN {TABLE} d ON d.shard = r.shard AND d.row = r.row")
