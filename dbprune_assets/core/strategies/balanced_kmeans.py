"""The ``balanced_kmeans`` strategy: hierarchical k-means with balanced
sampling (Vo et al., "Automatic Data Curation for Self-Supervised Learning: A
Clustering-Based Approach", TMLR 2024; reference code
facebookresearch/ssl-data-curation).

Web data is long-tailed: a flat k-means spends most centroids on the
frequent concepts, and sampling per cluster then still over-represents them.
Vo et al. cluster hierarchically, each level a k-means of the centroids of
the level below, so the top level's clusters spread evenly over concepts,
then sample top-down with equal shares.

* **Level 1** is SemDeDup's k-means (``dedup_centroids``, every ok sample's
  image embedding; a sample's leaf is its ``dedup_assignments`` cluster).
* **Level t > 1**: spherical k-means (50 iterations, the best of 5 seeded
  starts from ``balanced_kmeans.seed``) of level t-1's centroids into ``k_t``
  clusters, then
  ``balanced_kmeans.resampling_steps`` resampling steps (the paper's 10): take
  of each cluster the ``s_t`` points closest to its centroid, re-run k-means on
  them, re-assign every point; ``s_t`` is half the level's mean cluster size
  (as in the reference's configs), and a level with ``s_t <= 1`` is not
  resampled.
* ``levels`` / ``k`` ``auto``: a level per tenfold fewer clusters
  (``k_t = k_{t-1} // 10`` while that is at least 2), at most 4 levels, as
  the paper's 10M / 500k / 50k / 10k hierarchy narrows.
* **Balanced sampling** (the reference's ``hierarchical_sampling``): the
  budget M is split over the top level's clusters so that each gets
  ``min(size, x)`` with the largest ``x`` that fits, the remainder one each to
  clusters above ``x`` (chosen with a generator seeded by ``selection.seed``);
  each cluster's share is split over its children the same way, down to the
  leaves.  A cluster's size counts the candidates under it.
* In each leaf the strategy keeps its share of candidates **closest** to the
  leaf's centroid (the reference's web-image setting, ties by uid) or, with
  ``pick: random``, those of smallest ``uid_hash(selection.seed, uid)``.

It selects from the candidates, as ``dbp`` does, and keeps exactly M.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from dbprune_assets.core.strategies.base import Prepared, Strategy, StrategyContext, check_size, scalar, table_rows

#: k-means iterations of the levels above the first (the reference's)
NITER = 50
#: k-means runs per level above the first, the best kept (faiss' nredo)
RESTARTS = 5
#: the most levels ``auto`` builds (the paper's hierarchy)
MAX_LEVELS = 4


def level_sizes(k1: int, levels: int | str, k: Sequence[int] | str) -> list[int]:
    """The clusters of each level, bottom up, level 1 = ``k1`` (SemDeDup's)."""
    if k != "auto":
        ks = [int(v) for v in k]
        if levels != "auto" and int(levels) != len(ks) + 1:
            raise ValueError(f"strategies.balanced_kmeans: levels = {levels} but k names {len(ks)} levels above the "
                             f"first; give levels = {len(ks) + 1} or levels: auto")
    else:
        ks = []
        n_levels = MAX_LEVELS if levels == "auto" else int(levels)
        prev = k1
        while len(ks) + 1 < n_levels and (prev // 10 >= 2 or levels != "auto"):
            prev = max(2, prev // 10)
            ks.append(prev)
    out = [int(k1), *ks]
    for below, above in zip(out, out[1:]):
        if not 1 <= above <= below:
            raise ValueError(f"strategies.balanced_kmeans.k: a level of {above} clusters above one of {below}; "
                             "each level needs between 1 and as many clusters as the level below")
    return out


@dataclass(frozen=True)
class Level:
    centroids: np.ndarray  #: unit (k_t, d)
    parent: np.ndarray  #: for each cluster of the level below, its cluster here (int64)


def _kmeans(x: np.ndarray, k: int, seed: int, threads: int) -> np.ndarray:
    """The best (highest summed cosine to the nearest centroid) of :data:`RESTARTS`
    spherical k-means runs from seeds ``seed, seed + 1, ...`` (faiss' ``nredo``:
    the levels above the first are small, and one random start can merge two
    groups and split another)."""
    from dbprune_assets.core.method.kmeans import spherical_kmeans

    best, best_fit = None, -np.inf
    for r in range(RESTARTS):
        c = spherical_kmeans(x, k, NITER, seed + 7_919 * r, use_gpu=False, threads=threads,
                             max_points_per_centroid=None, what="balanced_kmeans centroids")
        fit = float((x @ c.T).max(axis=1).sum())
        if fit > best_fit:
            best, best_fit = c, fit
    assert best is not None
    return best


def _assign(x: np.ndarray, c: np.ndarray, threads: int) -> tuple[np.ndarray, np.ndarray]:
    from dbprune_assets.core.method.kmeans import nearest_centroid

    label, dist = nearest_centroid(x, c, use_gpu=False, threads=threads, what="balanced_kmeans centroids")
    return label.astype(np.int64), dist


def build_level(x: np.ndarray, k: int, resampling_steps: int, seed: int, threads: int = 0) -> Level:
    """One level above: k-means of ``x`` (the level below's unit centroids)
    with the resampling steps of the module docstring."""
    c = _kmeans(x, k, seed, threads)
    label, dist = _assign(x, c, threads)
    s = int(round(len(x) / k / 2))
    for step in range(resampling_steps if s > 1 else 0):
        picked = np.concatenate([members[np.argsort(dist[members], kind="stable")[:s]]
                                 for j in range(k) if (members := np.flatnonzero(label == j)).size])
        if len(picked) < k:
            break
        c = _kmeans(x[np.sort(picked)], k, seed + step + 1, threads)
        label, dist = _assign(x, c, threads)
    return Level(c, label)


def water_fill(sizes: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Shares ``n_j = min(size_j, x)`` with the largest ``x`` whose total fits
    ``target``, plus one each for ``target - sum`` clusters of size above ``x``
    (drawn by ``rng``): ``sum n = target`` exactly, ``n_j <= size_j``.
    ValueError when the sizes hold fewer than ``target``."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if target > sizes.sum():
        raise ValueError(f"cannot take {target} from clusters holding {int(sizes.sum())}")
    if target == sizes.sum():
        return sizes.copy()
    lo, hi = 0, int(sizes.max())  # sum(min(lo, sizes)) <= target < sum(min(hi, sizes))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if np.minimum(mid, sizes).sum() <= target:
            lo = mid
        else:
            hi = mid
    out = np.minimum(lo, sizes)
    rest = int(target - out.sum())
    if rest:
        above = np.flatnonzero(sizes > lo)
        out[rng.choice(above, size=rest, replace=False)] += 1
    return out


def balanced_quotas(leaf_sizes: np.ndarray, parents: Sequence[np.ndarray], M: int, seed: int) -> np.ndarray:
    """Each leaf's share of ``M`` by balanced sampling down the hierarchy;
    ``parents[t][j]`` is the level-(t+2) cluster of level-(t+1) cluster ``j``."""
    rng = np.random.default_rng(seed)
    sizes = [np.asarray(leaf_sizes, dtype=np.int64)]
    for parent in parents:
        sizes.append(np.bincount(parent, weights=sizes[-1], minlength=int(parent.max()) + 1).astype(np.int64))
    share = water_fill(sizes[-1], M, rng)
    for level in range(len(parents) - 1, -1, -1):
        parent, below = parents[level], sizes[level]
        child_share = np.zeros(len(below), dtype=np.int64)
        for j in np.flatnonzero(share):
            kids = np.flatnonzero(parent == j)
            child_share[kids] = water_fill(below[kids], int(share[j]), rng)
        share = child_share
    return share


class BalancedKmeansStrategy(Strategy):
    """Keep, of every SemDeDup cluster, its balanced share of candidates."""

    def prepare(self, ctx: StrategyContext) -> Prepared:
        import polars as pl

        from dbprune_assets.core.method.embstore import read_centroids

        cfg = ctx.settings.strategies.balanced_kmeans
        c1 = read_centroids(ctx.layout, "dedup_centroids")
        ks = level_sizes(len(c1), cfg.levels, cfg.k)
        x, parents = c1, []
        for t, k in enumerate(ks[1:]):
            level = build_level(x, k, cfg.resampling_steps, cfg.seed + 101 * (t + 1), ctx.threads or 0)
            parents.append(level.parent)
            x = level.centroids
        sizes = _leaf_sizes(ctx, len(c1))
        assert ctx.M is not None
        check_size(self.name, ctx.M, int(sizes.sum()), "candidates")
        quotas = balanced_quotas(sizes, parents, ctx.M, ctx.seed)
        path = ctx.work / "leaf_quotas.parquet"
        pl.DataFrame({"cluster": np.arange(len(quotas), dtype=np.int32), "quota": quotas,
                      "pick": [cfg.pick] * len(quotas)}).write_parquet(path)
        return Prepared(views={"leaf_quotas": [path]}, notes=[
            f"balanced_kmeans: levels of {' > '.join(map(str, ks))} clusters (level 1: SemDeDup's); "
            f"{int(np.count_nonzero(quotas))} leaves keep samples, at most {int(quotas.max(initial=0))} each"])

    def select(self, con: Any, M: int | None, quotas: np.ndarray | None, seed: int) -> int:
        assert M is not None
        n_cand = int(scalar(con, "SELECT count(*) FROM candidates"))
        check_size(self.name, M, n_cand, "candidates")
        pick = scalar(con, "SELECT coalesce(any_value(pick), 'closest') FROM leaf_quotas")
        order = "a.distance ASC" if pick == "closest" else f"uid_hash(c.uid, CAST({int(seed)} AS BIGINT)) ASC"
        con.execute(f"""
            CREATE TEMP TABLE sel AS
            SELECT r.shard, r.row FROM (
              SELECT c.shard, c.row, a.cluster,
                     row_number() OVER (PARTITION BY a.cluster ORDER BY {order}, c.uid ASC, c.shard ASC, c.row ASC) AS rn
              FROM candidates c JOIN dedup_assignments a ON a.shard = c.shard AND a.row = c.row
            ) r JOIN leaf_quotas q ON q.cluster = r.cluster
            WHERE r.rn <= q.quota""")
        return n_cand


def _leaf_sizes(ctx: StrategyContext, k1: int) -> np.ndarray:
    """Candidates per SemDeDup cluster (index = cluster id)."""
    rows = table_rows(ctx, """SELECT a.cluster, count(*) FROM candidates c
                              JOIN dedup_assignments a ON a.shard = c.shard AND a.row = c.row GROUP BY 1""",
                      {"candidates": ("shard", "row"), "dedup_assignments": ("shard", "row", "cluster")})
    sizes = np.zeros(k1, dtype=np.int64)
    for c, n in rows:
        if not 0 <= c < k1:
            raise ValueError(f"dedup_assignments name cluster {c}, but SemDeDup has {k1} centroids; "
                             "re-materialise dedup_assignments")
        sizes[c] = n
    return sizes


BALANCED_KMEANS = BalancedKmeansStrategy(
    "balanced_kmeans", "hierarchical k-means over SemDeDup's clusters, the budget split evenly down the hierarchy, "
                       "each leaf's share closest to its centroid",
    needs=("candidates", "duplicates", "dedup_assignments"), sized=True,
    reference="Vo et al., Automatic Data Curation for Self-Supervised Learning: A Clustering-Based Approach, TMLR 2024")
