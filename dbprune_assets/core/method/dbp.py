"""Density-Based Pruning (Abbas et al., ICLR 2024): the math of ``docs/design.md``
step 3, one formula per function.

Streaming: the only per-sample inputs are each candidate's cluster and cosine
distance to its centroid.  :func:`cluster_partial_sums` runs per shard and the
partial sums are added up; everything between that and the final selection is
``O(k)`` (or ``O(k^2)`` for :func:`d_inter`); :func:`cluster_table` puts it
together.  The selection itself runs out of core in DuckDB
(:func:`dbprune_assets.core.strategies.select_by_quota`);
:func:`select_hardest` is its in-memory reference (same order, same ties).

Settings read as written: ``keep_fraction`` and ``r`` are floats in the YAML; a
product such as ``floor(0.29 * 100)`` is computed on the decimal the person
wrote (``29``), not on the binary float (which would give 28).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from dbprune_assets.core.method.clip_filter import exact_fraction

if TYPE_CHECKING:
    import polars as pl


# ---------------------------------------------------------------------------
# per-cluster statistics
# ---------------------------------------------------------------------------


def cluster_partial_sums(cluster: np.ndarray, distance: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster ``(count int64 (k,), sum of distances float64 (k,))`` of one
    shard; add them up across shards and pass them to :func:`d_intra`."""
    cluster = np.asarray(cluster)
    distance = np.asarray(distance, dtype=np.float64)
    if cluster.shape != distance.shape or cluster.ndim != 1:
        raise ValueError(f"cluster {cluster.shape} and distance {distance.shape} must be aligned 1-D arrays")
    if len(cluster) and (int(cluster.min()) < 0 or int(cluster.max()) >= k):
        raise ValueError(f"cluster ids outside [0, {k}): k-means and assignments out of date?")
    if not np.isfinite(distance).all():
        raise ValueError("distances hold NaN/inf")
    c = cluster.astype(np.int64)
    return np.bincount(c, minlength=k).astype(np.int64), np.bincount(c, weights=distance, minlength=k).astype(np.float64)


def d_intra(sum_dist: np.ndarray, count: np.ndarray) -> np.ndarray:
    """``d_intra_j`` = mean cosine distance of cluster j's members to ``c_j``
    (float64 (k,)); NaN for an empty cluster."""
    s = np.asarray(sum_dist, dtype=np.float64)
    n = np.asarray(count, dtype=np.float64)
    if s.shape != n.shape:
        raise ValueError(f"sum_dist {s.shape} and count {n.shape} differ")
    if (n < 0).any():
        raise ValueError("negative cluster counts")
    out = np.full(s.shape, np.nan)
    ok = n > 0
    out[ok] = s[ok] / n[ok]
    return out


def d_inter(centroids: np.ndarray, l: int, block: int = 1024) -> np.ndarray:
    """``d_inter_j`` = mean over the ``l`` nearest *other* centroids m of
    ``1 - c_j . c_m`` (float64 (k,)); ``l`` is capped at ``k - 1``.

    With ``k = 1`` there is no other centroid: ``d_inter = [0.0]`` (so the
    complexity is 0 and the single cluster gets probability 1; no error).
    Memory ``O(block * k)``; the ``l`` nearest are summed in ascending order.
    """
    c = np.asarray(centroids, dtype=np.float64)
    if c.ndim != 2 or len(c) == 0:
        raise ValueError(f"centroids must be a non-empty (k, d) array, got shape {c.shape}")
    if not np.isfinite(c).all():
        raise ValueError("centroids hold NaN/inf")
    if l <= 0:
        raise ValueError(f"dbp.l={l} must be positive")
    k = len(c)
    if k == 1:
        return np.zeros(1)
    ll = min(int(l), k - 1)
    out = np.empty(k)
    for a in range(0, k, block):
        b = min(a + block, k)
        dist = 1.0 - c[a:b] @ c.T
        dist[np.arange(b - a), np.arange(a, b)] = np.inf  # not itself
        near = np.partition(dist, ll - 1, axis=1)[:, :ll] if ll < k - 1 else dist[:, :]
        near = np.sort(near, axis=1)[:, :ll]
        out[a:b] = near.mean(axis=1)
    return out


def complexity(d_inter_: np.ndarray, d_intra_: np.ndarray) -> np.ndarray:
    """``C_j = d_inter_j * d_intra_j``; an empty or NaN cluster gets the mean of
    the others (as the reference code does).  Error when no cluster has one."""
    a = np.asarray(d_inter_, dtype=np.float64)
    b = np.asarray(d_intra_, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"d_inter {a.shape} and d_intra {b.shape} differ")
    c = a * b
    ok = np.isfinite(c)
    if not ok.any():
        raise ValueError("no cluster has a finite complexity (every cluster empty?)")
    if not ok.all():
        c = c.copy()
        c[~ok] = c[ok].mean()
    return c


def softmax_probabilities(C: np.ndarray, tau: float) -> np.ndarray:
    """``P = softmax(C / tau)`` in float64, computed stably (max subtracted)."""
    if not tau > 0:
        raise ValueError(f"dbp.tau={tau} must be positive")
    z = np.asarray(C, dtype=np.float64) / float(tau)
    if z.ndim != 1 or len(z) == 0:
        raise ValueError(f"complexities must be a non-empty 1-D array, got shape {z.shape}")
    if not np.isfinite(z).all():
        raise ValueError("complexities hold NaN/inf (apply complexity() first)")
    e = np.exp(z - z.max())
    return e / e.sum()


def ssp_probabilities(k: int) -> np.ndarray:
    """SSP-Pruning (the reference's ``uniform``): ``P_j = 1 / k``."""
    if k <= 0:
        raise ValueError(f"k={k} must be positive")
    return np.full(int(k), 1.0 / k)


# ---------------------------------------------------------------------------
# quotas
# ---------------------------------------------------------------------------


def target_size(n_candidates: int, keep_fraction: float | None = None, target_size: int | None = None) -> int:
    """``M = floor(keep_fraction * n_candidates)`` or the absolute ``target_size``.

    Exactly one must be given.  Errors: fraction outside (0, 1], target <= 0 or
    larger than the candidates.
    """
    n = int(n_candidates)
    if n < 0:
        raise ValueError(f"n_candidates={n} must be >= 0")
    if (keep_fraction is None) == (target_size is None):
        raise ValueError("set exactly one of dbp.keep_fraction or dbp.target_size (the other null)")
    if keep_fraction is not None:
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"dbp.keep_fraction={keep_fraction} must be in (0, 1]")
        return int(math.floor(exact_fraction(keep_fraction) * n))
    t = int(target_size)  # type: ignore[arg-type]
    if t <= 0:
        raise ValueError(f"dbp.target_size={t} must be positive")
    if t > n:
        raise ValueError(f"dbp.target_size={t} exceeds the {n} candidates; lower dbp.target_size or use dbp.keep_fraction")
    return t


def lower_bounds(sizes: np.ndarray, M: int, k: int, r: float) -> np.ndarray:
    """``lb_j = max(0, min(m, |C_j| - 1))`` with ``m = floor(r * M / k)`` for
    ``r > 0`` and ``m = 1`` for ``r = 0`` (int64 (k,))."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.ndim != 1 or len(sizes) != k:
        raise ValueError(f"sizes has shape {sizes.shape}, expected ({k},)")
    if r < 0:
        raise ValueError(f"dbp.r={r} must be >= 0")
    m = int(math.floor(exact_fraction(r) * int(M) / int(k))) if r > 0 else 1
    return np.maximum(0, np.minimum(m, sizes - 1)).astype(np.int64)


def _check_quota_inputs(P: np.ndarray, sizes: np.ndarray, M: int, lb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    P = np.asarray(P, dtype=np.float64)
    ub = np.asarray(sizes, dtype=np.int64)
    lb = np.asarray(lb, dtype=np.int64)
    k = len(P)
    if P.ndim != 1 or k == 0 or ub.shape != (k,) or lb.shape != (k,):
        raise ValueError(f"P {P.shape}, sizes {ub.shape} and lb {lb.shape} must be aligned non-empty 1-D arrays")
    if not np.isfinite(P).all() or (P < 0).any():
        raise ValueError("probabilities must be finite and >= 0")
    if (ub < 0).any() or (lb < 0).any():
        raise ValueError("cluster sizes and lower bounds must be >= 0")
    if (lb > ub).any():
        j = int(np.flatnonzero(lb > ub)[0])
        raise ValueError(f"lower bound {lb[j]} of cluster {j} exceeds its size {ub[j]}")
    if M < 0:
        raise ValueError(f"M={M} must be >= 0")
    total = int(ub.sum())
    if M > total:
        raise ValueError(f"M={M} exceeds the {total} candidates; lower dbp.keep_fraction / dbp.target_size")
    slb = int(lb.sum())
    if slb > M:
        raise ValueError(
            f"the per-cluster lower bounds sum to {slb} > M={M} ({k} clusters); lower dbp.r (cluster balance) "
            f"or dbp.k, or raise dbp.keep_fraction / dbp.target_size"
        )
    return P, ub, lb


def quota_relaxation(P: np.ndarray, sizes: np.ndarray, M: int, lb: np.ndarray) -> tuple[np.ndarray, float]:
    """The continuous solution of ``min ½‖N − M·P‖²  s.t.  Σ N = M,  lb ≤ N ≤ sizes``:
    ``(N float64 (k,), λ)`` with ``N_j = clip(M·P_j + λ, lb_j, |C_j|)``.

    ``f(λ) = Σ_j clip(M·P_j + λ, lb_j, |C_j|)`` is piecewise linear and
    non-decreasing with breakpoints ``lb_j − M·P_j`` and ``|C_j| − M·P_j``: λ is
    found by bisection over the sorted breakpoints (``O(k log k)``) and then
    exactly on the linear piece that contains ``f = M`` (float64).  These are
    the KKT conditions of the QP, so ``N`` is its unique optimum.
    """
    P, ub, lb = _check_quota_inputs(P, sizes, M, lb)
    a = float(M) * P
    lbf, ubf = lb.astype(np.float64), ub.astype(np.float64)

    def f(lam: float) -> float:
        return float(np.clip(a + lam, lbf, ubf).sum())

    bp = np.unique(np.concatenate([lbf - a, ubf - a]))
    lo, hi = 0, len(bp) - 1  # f(bp[lo]) = Σlb <= M <= Σub = f(bp[hi])
    if f(bp[lo]) >= M:
        lam = float(bp[lo])
    else:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if f(bp[mid]) < M:
                lo = mid
            else:
                hi = mid
        x0, x1 = float(bp[lo]), float(bp[hi])
        f0 = f(x0)
        mid = 0.5 * (x0 + x1)
        nfree = int(((lbf - a < mid) & (mid < ubf - a)).sum())
        lam = x0 + (M - f0) / nfree if nfree else x1
        lam = min(max(lam, x0), x1)
    return np.clip(a + lam, lbf, ubf), lam


def solve_quotas(P: np.ndarray, sizes: np.ndarray, M: int, lb: np.ndarray) -> np.ndarray:
    """Integer quotas (int64 (k,)): ``Σ N_j = M`` exactly, ``lb_j ≤ N_j ≤ |C_j|``.

    The continuous optimum of :func:`quota_relaxation`, then floors, then +1 by
    largest remainder among clusters below their cap, ties by cluster id (the
    lower id first); remainders equal in float64 are compared exactly.  Errors (with the numbers and the setting to change):
    ``Σ lb > M``, ``M > Σ |C_j|``, misaligned or invalid inputs.
    """
    N, lam = quota_relaxation(P, sizes, M, lb)
    ub = np.asarray(sizes, dtype=np.int64)
    lbi = np.asarray(lb, dtype=np.int64)
    F = np.clip(np.floor(N).astype(np.int64), lbi, ub)
    R = int(M) - int(F.sum())
    if R < 0:  # pragma: no cover - cannot happen: F <= N and Σ N = M
        raise AssertionError(f"quota rounding overshoot by {-R}")
    if R:
        rem = N - F
        ids = np.arange(len(N))
        elig = np.flatnonzero(F < ub)
        if len(elig) < R:  # pragma: no cover - Σ ub >= M was checked
            raise AssertionError("not enough clusters below their cap")
        order = elig[np.lexsort((ids[elig], -rem[elig]))]
        cut = rem[order[R - 1]]
        above, tied = order[rem[order] > cut], order[rem[order] == cut]
        if len(above) + len(tied) > R:  # the last place is contested: rank the tie exactly
            tied = _exact_remainder_order(tied, P, M, lam, N, lbi, ub, F)
        F[np.concatenate([above, tied[: R - len(above)]])] += 1
    return F


def _exact_remainder_order(tied: np.ndarray, P: np.ndarray, M: int, lam: float, N: np.ndarray,
                           lb: np.ndarray, ub: np.ndarray, F: np.ndarray) -> np.ndarray:
    """``tied`` (clusters whose float64 remainders are equal) ranked by their
    exact remainders, largest first, then by cluster id.

    float64 loses a difference in ``P`` smaller than an ulp of ``M·P_j + λ``
    (e.g. ``P_j = 1e-162`` beside ``P_i = 0``), which would hand the +1 to the
    lower id although the exact optimum gives it to the larger ``P``.  A free
    cluster's remainder is ``M·P_j + λ − F_j`` in rationals; a clipped one
    sits on an integer bound, remainder 0.
    """
    from fractions import Fraction

    lam_q = Fraction(float(lam))

    def exact(j: int) -> Fraction:
        if lb[j] < N[j] < ub[j]:
            return Fraction(int(M)) * Fraction(float(P[j])) + lam_q - int(F[j])
        return Fraction(0)

    return np.array(sorted(tied.tolist(), key=lambda j: (-exact(j), j)), dtype=np.int64)


# ---------------------------------------------------------------------------
# selection: keep the N_j hardest (farthest from the centroid) per cluster
# ---------------------------------------------------------------------------


def select_hardest(cluster: np.ndarray, distance: np.ndarray, uids: np.ndarray, quotas: np.ndarray) -> np.ndarray:
    """In-memory selection (for tests and small pools): bool (n,) keep mask.

    Within each cluster, members are ranked by distance to the centroid
    descending, ties by uid ascending (code-point order, the same as DuckDB's
    byte order of UTF-8); the first ``quotas[cluster]`` are kept.  Same result
    as :func:`dbprune_assets.core.strategies.select_by_quota` (which also ties
    by shard and row: uids are unique).
    """
    cluster = np.asarray(cluster, dtype=np.int64)
    distance = np.asarray(distance)
    uids = np.asarray(uids)
    if uids.dtype == object:
        uids = uids.astype(str)
    q = np.asarray(quotas, dtype=np.int64)
    n = len(cluster)
    if distance.shape != (n,) or uids.shape != (n,):
        raise ValueError("cluster, distance and uids must be aligned 1-D arrays")
    if n and (int(cluster.min()) < 0 or int(cluster.max()) >= len(q)):
        raise ValueError(f"cluster ids outside [0, {len(q)})")
    if not np.isfinite(distance).all():
        raise ValueError("distances hold NaN/inf")
    sizes = np.bincount(cluster, minlength=len(q))
    if (q > sizes).any() or (q < 0).any():
        j = int(np.flatnonzero((q > sizes) | (q < 0))[0])
        raise ValueError(f"quota {q[j]} of cluster {j} is outside [0, {sizes[j]}]")
    order = np.lexsort((uids, -distance.astype(np.float64), cluster))
    cs = cluster[order]
    rank = np.arange(n) - np.searchsorted(cs, cs, side="left")
    keep = np.zeros(n, dtype=bool)
    keep[order] = rank < q[cs]
    return keep


# ---------------------------------------------------------------------------
# everything per cluster, as the `clusters` table
# ---------------------------------------------------------------------------


def cluster_table(
    centroids: np.ndarray, count: np.ndarray, sum_dist: np.ndarray, *, l: int, tau: float, M: int, r: float
) -> pl.DataFrame:
    """The ``clusters`` table of DBP (polars, typed by ``duck.TABLES``, without
    the ``kept`` column the catalog derives): per cluster ``cluster, size,
    d_intra, d_inter, complexity, probability, quota, lower_bound``.

    ``count`` / ``sum_dist``: the summed :func:`cluster_partial_sums` of every
    shard; ``l``, ``tau``, ``r``: the settings; ``M``: :func:`target_size`.
    The SSP baseline's quotas come from this table too
    (:func:`dbprune_assets.core.strategies.strategy_quotas`).
    """
    import polars as pl

    from dbprune_assets.core.store.duck import polars_schema

    k = len(centroids)
    count = np.asarray(count, dtype=np.int64)
    di = d_intra(sum_dist, count)
    de = d_inter(centroids, l)
    C = complexity(de, di)
    P = softmax_probabilities(C, tau)
    lb = lower_bounds(count, M, k, r)
    columns = {
        "cluster": np.arange(k), "size": count, "d_intra": di, "d_inter": de, "complexity": C,
        "probability": P, "quota": solve_quotas(P, count, M, lb), "lower_bound": lb,
    }
    schema = polars_schema("clusters")
    return pl.DataFrame({c: pl.Series(c, v, dtype=schema[c]) for c, v in columns.items()})
