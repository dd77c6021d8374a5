"""Which run decided what: provenance on every decision row, and a row of
history per run and strategy.

* ``decisions`` carry ``run_id`` and ``fit_id``: the run that last *changed*
  the row (its keep and reason) and the fits in force then.  A row the run
  decides as before keeps its earlier run and fit, so after an incremental run
  ``SELECT run_id, count(*) FROM decisions GROUP BY 1`` says which rows that
  run touched.
* ``decision_runs`` (one file per run and strategy): samples, kept, and how
  many were added (new (shard, uid)), removed (gone from the pool) and
  re-decided (kept before and pruned now, or the reverse).
* ``quota_moves`` (quota strategies): per cluster whose quota or kept count
  changed, before and after.

Plain functions over DuckDB and polars; the ``pruned_subset`` asset passes the
run id and the fits (``core/method/stages.py:make_subset``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: the provenance columns every decision row ends with
PROVENANCE_COLUMNS = ("run_id", "fit_id")


@dataclass(frozen=True)
class Provenance:
    """Who decides: the Dagster run, the fits in force (``fit_id`` of each,
    e.g. ``semdedup 1f2e… dbp 9a8b…``; empty without fits) and when (ISO 8601, UTC)."""

    run_id: str
    fit_id: str
    at: str


def has_provenance(con: Any, path: Path) -> bool:
    """Whether the decisions file ``path`` exists and carries provenance columns."""
    if not path.is_file():
        return False
    cols = {r[0] for r in con.execute("SELECT name FROM parquet_schema(?)", [str(path)]).fetchall()}
    return set(PROVENANCE_COLUMNS) <= cols


def provenance_sql(select: str, previous: Path | None) -> tuple[str, int]:
    """Wrap the decisions query ``select`` (its rows as ``n``) with the
    provenance columns: the ``previous`` file's run and fit where it decided
    the same (shard, uid) the same way, else the parameters (run, fit); a row
    without a run (decided outside a run) counts as new.  Unordered, so that
    the caller can store it before sorting: DuckDB spills each of the join and
    the sort past its memory limit, but not both in one query (measured: out
    of memory at 256 MB over 2.5M rows).  Only the ``corrupt`` rows of the
    previous file are grouped: a uid repeated in a shard is corrupt but for
    its first row, so the other rows are one per (shard, uid) already (a
    repeat would double a row, which ``decide``'s one-per-sample check
    refuses), and grouping them all took half the join's time.  Returns the SQL and how many
    parameters it adds: run and fit, which come before ``select``'s own."""
    # one query whether or not there is a previous file, so that both write the same schema
    prev = ("(SELECT * FROM (VALUES (NULL::VARCHAR, NULL::VARCHAR, NULL::BOOLEAN, NULL::VARCHAR, NULL::VARCHAR, "
            "NULL::VARCHAR)) v(shard, uid, keep, reason, run_id, fit_id) WHERE false)" if previous is None
            else "read_parquet('%s')" % str(previous).replace("'", "''"))
    return f"""
        SELECT n.*, coalesce(p.run_id, CAST(? AS VARCHAR)) AS run_id,
               CASE WHEN p.run_id IS NULL THEN CAST(? AS VARCHAR) ELSE p.fit_id END AS fit_id
        FROM ({select}) n
        LEFT JOIN (SELECT shard, uid, keep, reason, run_id, fit_id FROM {prev} WHERE run_id <> '' AND reason <> 'corrupt'
                   UNION ALL
                   SELECT shard, uid, keep, reason, min(run_id), min(fit_id) FROM {prev}
                   WHERE run_id <> '' AND reason = 'corrupt' GROUP BY ALL) p
          ON p.shard IS NOT DISTINCT FROM n.shard AND p.uid IS NOT DISTINCT FROM n.uid
         AND p.keep = n.keep AND p.reason = n.reason""", 2


def decisions_by_key(param: str) -> str:
    """The decisions file ``param`` one row per (shard, uid): ``k`` whether it
    is kept.  Only the ``corrupt`` rows repeat a key (a uid repeated in a
    shard is corrupt but for its first row, :func:`provenance_sql`) and are
    never kept, so the other rows are taken as they are and a corrupt key
    counts once, where no other row has it: the same keys and ``k`` as
    grouping every row by (shard, uid) with ``bool_or(keep)``, without
    aggregating the whole file."""
    return f"""(SELECT shard, uid, keep AS k FROM read_parquet({param}) WHERE reason <> 'corrupt'
                UNION ALL
                SELECT shard, uid, false AS k FROM (SELECT DISTINCT shard, uid FROM read_parquet({param})
                                                    WHERE reason = 'corrupt') c
                ANTI JOIN (SELECT shard, uid FROM read_parquet({param}) WHERE reason <> 'corrupt') o
                  ON o.shard IS NOT DISTINCT FROM c.shard AND o.uid IS NOT DISTINCT FROM c.uid)"""


def run_changes(con: Any, new: Path, previous: Path | None) -> dict[str, int]:
    """Samples, kept, added, removed, re-decided, newly kept and newly pruned
    between the ``previous`` decisions file (None: none before) and ``new``,
    by (shard, uid): a key is kept when any of its rows is (:func:`decisions_by_key`)."""
    if previous is None or not previous.is_file():
        samples, kept = con.execute(f"SELECT count(*), count(*) FILTER (WHERE k) FROM {decisions_by_key('$new')}",
                                    {"new": str(new)}).fetchone()
        return {"samples": samples, "kept": kept, "added": samples, "removed": 0, "redecided": 0,
                "newly_kept": kept, "newly_pruned": 0}
    row = con.execute(f"""
        WITH n AS {decisions_by_key('$new')}, p AS {decisions_by_key('$prev')}
        SELECT count(n.uid), count(*) FILTER (WHERE n.k), count(*) FILTER (WHERE p.uid IS NULL AND p.shard IS NULL),
               count(*) FILTER (WHERE n.uid IS NULL AND n.shard IS NULL),
               count(*) FILTER (WHERE n.k <> p.k), count(*) FILTER (WHERE n.k AND NOT p.k),
               count(*) FILTER (WHERE p.k AND NOT n.k)
        FROM n FULL JOIN p ON p.shard IS NOT DISTINCT FROM n.shard AND p.uid IS NOT DISTINCT FROM n.uid
    """, {"new": str(new), "prev": str(previous)}).fetchone()
    names = ("samples", "kept", "added", "removed", "redecided", "newly_kept", "newly_pruned")
    return {name: int(v or 0) for name, v in zip(names, row)}


def run_row(who: Provenance, strategy: str, changes: dict[str, int]) -> "Any":
    """The ``decision_runs`` row (a one-row polars frame) of one strategy in one run."""
    import polars as pl

    return pl.DataFrame([{"run_id": who.run_id, "at": who.at, "strategy": strategy, "fit_id": who.fit_id,
                          **changes}])


def quota_moves(who: Provenance, strategy: str, before: "Any | None", after: "Any") -> "Any":
    """The ``quota_moves`` rows: each cluster whose quota or kept count differs
    between the ``before`` and ``after`` quota tables (cluster, quota, kept;
    polars or arrow; ``before`` None: every cluster is new)."""
    import polars as pl

    a = (after if isinstance(after, pl.DataFrame) else pl.from_arrow(after)).select("cluster", "quota", "kept")
    if before is None:
        b = pl.DataFrame(schema={"cluster": a.schema["cluster"], "quota_before": pl.Int64, "kept_before": pl.Int64})
    else:
        b = before.select("cluster", quota_before=pl.col("quota").cast(pl.Int64), kept_before=pl.col("kept").cast(pl.Int64))
    moved = a.join(b, on="cluster", how="full", coalesce=True).with_columns(
        pl.col("quota").cast(pl.Int64), pl.col("kept").cast(pl.Int64))
    moved = moved.filter(pl.col("quota").ne_missing(pl.col("quota_before"))
                         | pl.col("kept").ne_missing(pl.col("kept_before")))
    return moved.sort("cluster").select(
        pl.lit(who.run_id).alias("run_id"), pl.lit(who.at).alias("at"), pl.lit(strategy).alias("strategy"),
        pl.col("cluster").cast(pl.Int32), "quota_before", "quota", "kept_before", "kept",
        move=(pl.col("quota").fill_null(0) - pl.col("quota_before").fill_null(0)))
