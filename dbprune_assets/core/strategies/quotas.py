"""Per-cluster quotas around the decisions: a strategy's quotas and M from
DBP's ``clusters`` table, the catalog's ``quotas`` rows, and the kept count of
every cluster (from a written decisions file or inside decide)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from dbprune_assets.core.store.atomic import scratch_dir
from dbprune_assets.core.store.duck import connect, create_view, parquet_files
from dbprune_assets.core.strategies.base import INPUTS
from dbprune_assets.core.strategies.registry import get, quota_names

if TYPE_CHECKING:
    import polars as pl


def strategy_quotas(strategy: str, clusters: pl.DataFrame) -> tuple[np.ndarray | None, int | None]:
    """``(quotas, M)`` of ``strategy`` from the DBP ``clusters`` table.

    ``M`` is the sum of the DBP quotas (every sized strategy keeps as many
    samples as DBP).  The quotas are the strategy's own
    (:meth:`~dbprune_assets.core.strategies.base.Strategy.quotas`, indexed by
    cluster id): dbp the table's ``quota`` column, ssp the same quota solve
    with uniform probabilities ``P_j = 1/k``; a strategy without quotas gets
    ``(None, M)``.
    """
    return get(strategy).quotas(clusters), int(clusters["quota"].sum())


def quota_table(strategy: str, quotas: np.ndarray, kept_per_cluster: np.ndarray | Mapping[int, int]) -> Any:
    """The SQL catalog's ``quotas`` rows: strategy, cluster, quota, kept (pyarrow Table).

    ``kept_per_cluster`` is an array indexed by cluster id or a mapping
    cluster -> kept (clusters absent from the mapping kept 0); compute it from
    written decisions with :func:`kept_per_cluster`.
    """
    import pyarrow as pa

    allowed = quota_names()
    if strategy not in allowed:
        raise ValueError(f"quotas exist for {', '.join(allowed)} only, not {strategy!r}")
    q = as_quotas(quotas)
    k = len(q)
    if isinstance(kept_per_cluster, Mapping):
        kept = np.zeros(k, dtype=np.int64)
        for c, n in kept_per_cluster.items():
            if not 0 <= int(c) < k:
                raise ValueError(f"kept_per_cluster names cluster {c}, outside 0..{k - 1}")
            kept[int(c)] = int(n)
    else:
        kept = np.asarray(kept_per_cluster, dtype=np.int64)
        if kept.shape != (k,):
            raise ValueError(f"kept_per_cluster has shape {kept.shape}, quotas ({k},)")
    return pa.table(
        {
            "strategy": pa.array([strategy] * k, pa.string()),
            "cluster": pa.array(np.arange(k, dtype=np.int32), pa.int32()),
            "quota": pa.array(q, pa.int64()),
            "kept": pa.array(kept, pa.int64()),
        }
    )


def kept_per_cluster(
    decisions_path: Path,
    tables: Path,
    k: int,
    tmp_root: Path,
    memory_limit: str = "1GB",
    threads: int | None = None,
) -> np.ndarray:
    """Kept samples per DBP cluster, from a written decisions file (SQL join on
    ``(shard, uid)`` with ``tables/assignments``); an int64 array of length k."""
    with scratch_dir(tmp_root, "kept-per-cluster-") as work:
        con = connect(Path(work), memory_limit, threads)
        try:
            create_view(con, "assign", parquet_files(Path(tables) / "assignments"), "assignments",
                        INPUTS["assignments"])
            create_view(con, "dec", [Path(decisions_path)], "decisions")
            return count_kept(con, "dec", k)
        finally:
            con.close()


def count_kept(con: Any, decisions_view: str, k: int) -> np.ndarray:
    """Kept samples per cluster of the view ``assign``, of the decisions in
    ``decisions_view`` (joined on ``(shard, uid)``); int64 (k,)."""
    rows = con.execute(
        f"""
        SELECT a.cluster, count(*) FROM (SELECT DISTINCT shard, uid FROM {decisions_view} WHERE keep) d
        JOIN assign a ON a.shard = d.shard AND a.uid = d.uid
        GROUP BY a.cluster
        """
    ).fetchall()
    out = np.zeros(k, dtype=np.int64)
    for c, n in rows:
        if not 0 <= c < k:
            raise ValueError(f"assignments name cluster {c}, outside 0..{k - 1}")
        out[c] = n
    return out


def as_quotas(quotas: Any) -> np.ndarray:
    """``quotas`` as int64 (k,); ValueError unless a 1-d array of whole numbers ≥ 0."""
    q = np.asarray(quotas)
    if q.ndim != 1:
        raise ValueError(f"quotas must be a 1-d array (one per cluster), got shape {q.shape}")
    if q.size and not np.issubdtype(q.dtype, np.integer):
        if not np.all(np.isfinite(q)) or not np.all(q == np.floor(q)):
            raise ValueError("quotas must be integers")
    q = q.astype(np.int64)
    if q.size and q.min() < 0:
        c = int(np.argmin(q))
        raise ValueError(f"quota of cluster {c} is negative ({int(q[c])})")
    return q
