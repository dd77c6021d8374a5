"""The quota strategies ``dbp`` and ``ssp``: per-cluster quotas ``N_j`` over
DBP's clusters, and of every cluster the ``N_j`` candidates farthest from its
centroid (ties by uid, then shard and row).

They differ only in the cluster probabilities ``P_j`` the quotas are solved
with (``docs/design.md``, "The method, exactly"): ``dbp`` takes the quotas of
the ``clusters`` table, solved with ``P = softmax(C / tau)``; ``ssp``
(SSP-Pruning, the reference's ``uniform``) solves the same quota problem, same
sizes, lower bounds and M, with ``P_j = 1/k``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dbprune_assets.core.method import dbp
from dbprune_assets.core.strategies.base import Strategy, check_size, scalar

if TYPE_CHECKING:
    import polars as pl


@dataclass(frozen=True)
class QuotaStrategy(Strategy):
    """Keep, of every DBP cluster, its quota of members farthest from the centroid."""

    uniform: bool = False  #: solve the quotas with ``P_j = 1/k`` (ssp) instead of DBP's softmax

    def quotas(self, clusters: pl.DataFrame) -> np.ndarray:
        t = clusters.sort("cluster")
        if not self.uniform:
            return t["quota"].to_numpy().astype(np.int64)
        sizes = t["size"].to_numpy().astype(np.int64)
        lb = t["lower_bound"].to_numpy().astype(np.int64)
        return dbp.solve_quotas(dbp.ssp_probabilities(len(sizes)), sizes, int(t["quota"].sum()), lb)

    def select(self, con: Any, M: int | None, quotas: np.ndarray | None, seed: int) -> int:
        assert M is not None and quotas is not None
        n_cand = scalar(con, "SELECT count(*) FROM candidates")
        check_size(self.name, M, n_cand, "candidates")
        check_quotas(con, self.name, quotas, M)
        select_by_quota(con, quotas)
        return n_cand


def check_quotas(con: Any, strategy: str, q: np.ndarray, M: int) -> None:
    """The quotas sum to M, name every cluster of the view ``assign`` and
    none is above its cluster's size."""
    k = len(q)
    if int(q.sum()) != M:
        raise ValueError(f"{strategy}: quotas sum to {int(q.sum())}, but M = {M}")
    sizes = dict(con.execute("SELECT cluster, count(*) FROM assign GROUP BY cluster").fetchall())
    outside = sorted(c for c in sizes if c >= k)
    if outside:
        raise ValueError(f"{strategy}: assignments name cluster {outside[0]}, but there are {k} quotas (clusters 0..{k - 1})")
    size = np.zeros(k, dtype=np.int64)
    for c, n in sizes.items():
        size[c] = n
    over = np.flatnonzero(q > size)
    if over.size:
        c = int(over[0])
        raise ValueError(f"{strategy}: quota of cluster {c} is {int(q[c])}, above the cluster's size {int(size[c])}: "
                         "the quotas (cluster_complexity) were computed over other assignments than "
                         "cluster_assignments holds now (a shard came or went since); materialise "
                         "cluster_complexity and what it reads first (dbprune run --select '*pruned_subset')")


def select_by_quota(con: Any, quotas: np.ndarray) -> None:
    """DBP's selection: create the temp table ``sel(shard, row)`` holding, of
    every cluster ``c`` of the view ``assign`` (the assignments' columns),
    the ``quotas[c]`` members farthest from the centroid (ties by uid, then
    shard and row); clusters beyond ``quotas`` keep none.  The window's sort
    spills past the connection's memory limit (``duck.connect``).
    :func:`dbprune_assets.core.method.dbp.select_hardest` is the in-memory reference."""
    import pyarrow as pa

    q = np.asarray(quotas, dtype=np.int64)
    con.register("quota_in", pa.table({"cluster": pa.array(np.arange(len(q), dtype=np.int64)), "quota": pa.array(q)}))
    con.execute(
        """
        CREATE TEMP TABLE sel AS
        SELECT r.shard, r.row FROM (
          SELECT a.shard, a.row, a.cluster,
                 row_number() OVER (PARTITION BY a.cluster ORDER BY a.distance DESC, a.uid ASC, a.shard ASC, a.row ASC) AS rn
          FROM assign a
        ) r JOIN quota_in q ON q.cluster = r.cluster
        WHERE r.rn <= q.quota
        """
    )
    con.unregister("quota_in")


_QUOTA_INPUTS = ("candidates", "duplicates", "assignments")

DBP = QuotaStrategy(
    "dbp", "DBP: per-cluster quotas N_j from the clusters' complexity (P = softmax(C / tau)), "
           "the N_j candidates farthest from their centroid",
    needs=_QUOTA_INPUTS, sized=True, quota_based=True)
SSP = QuotaStrategy(
    "ssp", "SSP-Pruning: the same quota solve with uniform P_j = 1/k, the N_j candidates farthest from their centroid",
    needs=_QUOTA_INPUTS, sized=True, quota_based=True, uniform=True)
