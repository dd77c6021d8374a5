"""SemDeDup inside a dedup cluster: the exact tiled kernel.

Inside each dedup cluster, members are ordered farthest-first from the centroid
(ties by uid); with ``S = E Eᵀ`` in that order, member ``j`` is a duplicate when
``max_{i<j} S[i, j] > 1 - eps``.  The rule is pairwise, not transitive: of a
duplicate pair the member farther from the centroid survives, and ``j`` is
flagged even when its most similar predecessor is itself a duplicate.

:func:`semdedup_cluster` computes the column maxima in column tiles with torch
(GPU when ``device="cuda"``), memory ``O(tile * n)``, never the full ``n x n``
matrix.  The tile product is float32 (embeddings are stored float16); float32
is only used as a *filter*: for every column, all predecessors whose float32
similarity is within the float32 error bound of the column's maximum are
re-scored exactly (float64 products of float16 values are exact and so is their
sum, see :func:`semdedup_cluster`), and the decision, ``duplicate_of`` and the
reported similarity come from the exact values.  Results are therefore
bit-identical across tile sizes, thread counts and CPU/GPU, and equal to the
full-matrix reference :func:`semdedup_bruteforce`.

:func:`ordered_dedup` is the tiled loop itself, on rows already in
farthest-first order; the pool driver (:mod:`dbprune_assets.core.method.semdedup`)
calls it on whole clusters or on packs of small ones.
"""

from __future__ import annotations

import functools

import numpy as np

from dbprune_assets.core.method.kmeans import check_rows
from dbprune_assets.core.running.device import highest_matmul_precision

#: rows of one exact re-scoring batch (bounds the float64 gather memory)
_EXACT_BATCH = 1 << 15
#: widest column tile computed at once: tile ``[a, b)`` multiplies rows ``[0, b)``
#: only, so narrower tiles skip more of the (unused) lower triangle
_MAX_TILE = 512


def farthest_first_order(distance: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Permutation: distance to the centroid descending, ties by id ascending
    (then input order)."""
    distance = np.asarray(distance)
    ids = np.asarray(ids)
    if ids.dtype == object:
        ids = ids.astype(str)
    return np.lexsort((ids, -distance.astype(np.float64)))


def check_eps_and_tile(eps: float, tile: int) -> None:
    """Raise ValueError naming the setting when ``eps`` is not in (0, 1) or
    ``tile`` is not positive."""
    if not 0 < eps < 1:
        raise ValueError(f"semdedup.eps={eps} must be in (0, 1)")
    if tile <= 0:
        raise ValueError(f"compute.tile={tile} must be positive")


def tile_width(tile: int) -> int:
    """The column tile actually computed for a ``tile`` setting (at most ``_MAX_TILE``)."""
    return min(tile, _MAX_TILE)


def _float32_error_bound(d: int, max_norm: float) -> float:
    """Bound on |fl32(x.y) - x.y| for float32 dot products of length d of rows
    with norm <= max_norm, whatever the summation order (Higham's gamma_d
    times sum |x_i y_i| <= |x||y|)."""
    u = 2.0**-24
    gamma = d * u / (1.0 - d * u)
    return gamma * max_norm * max_norm * (1.0 + 1e-6) + 1e-30


def filter_margin(d: int, max_norm: float) -> float:
    """The float32 filter's margin for rows of length ``d`` and norm <=
    ``max_norm``: twice the float32 error bound, plus slack."""
    return 2.0 * _float32_error_bound(d, max_norm) + 4.0 * 2.0**-24


def device_rows(rows: np.ndarray, device: str) -> "torch.Tensor":  # noqa: F821
    """Stored rows (float16 / float32; anything else as float32) as float32 on
    ``device``: the exact float16 values."""
    import torch

    x = rows if rows.dtype in (np.float16, np.float32) else rows.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.device(device)).float()


def ordered_dedup(
    E: "torch.Tensor",  # noqa: F821
    thr: float,
    margin: float,
    tile: int,
    every_column: bool,
    seg: "torch.Tensor | None" = None,  # noqa: F821
) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:  # noqa: F821
    """The tiled column maxima of one cluster, or of a few packed clusters.

    ``E`` (m, d) float32 (exact float16 values) on the device, each cluster's
    members contiguous and in farthest-first order; ``seg`` (m,) the cluster of
    each row when several are packed (then ``m <= tile``: one tile, pairs across
    clusters masked).  ``margin``: :func:`filter_margin`.

    Returns, per row (torch, on the device): duplicate flag, row of the most
    similar earlier member of its cluster (earliest on ties; -1 when not
    scored), exact similarity (float64; -inf when not scored).  With
    ``every_column`` every member with a predecessor is scored exactly; else
    only those whose float32 maximum reaches ``thr - margin`` (a superset of
    the duplicates, since the float32 maximum is within half the margin of the
    exact one), which gives the same duplicates, targets and similarities.
    """
    import torch

    m = len(E)
    dev = E.device
    w = min(tile, m)
    if seg is not None and w < m:
        raise ValueError(f"{m} packed rows exceed the tile width {tile}")
    tri = _lower_triangle(tile, str(dev))[:w, :w]  # i >= j inside the diagonal block
    if seg is not None:
        tri = tri | (seg[:, None] != seg[None, :])
    floor = float("-inf") if every_column else thr - margin
    best = torch.full((m,), float("-inf"), dtype=torch.float64, device=dev)  # exact column maxima
    first = torch.full((m,), m, dtype=torch.int64, device=dev)  # earliest row reaching it
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    npend = 0
    for a in range(0, m, w):
        b = min(a + w, m)
        t = b - a
        S = E[:b] @ E[a:b].T  # (b, t): rows i < b, columns j in [a, b)
        S[a:b].masked_fill_(tri[:t, :t], float("-inf"))
        m32 = S.amax(dim=0)  # (t,)
        sel = (m32 > floor).nonzero().squeeze(1)  # columns worth an exact score
        if len(sel) == 0:
            continue
        if len(sel) < t:
            S, m32 = S[:, sel], m32[sel]
        cand = S >= (m32 - margin)[None, :]
        del S
        ii, jl = cand.nonzero(as_tuple=True)
        del cand
        pending.append((ii, (a + sel)[jl]))
        npend += len(ii)
        if npend >= _EXACT_BATCH or b == m:  # a column's candidates all come from one tile
            _rescore(E, pending, best, first)
            pending, npend = [], 0
    if pending:
        _rescore(E, pending, best, first)
    has = first < m
    return best > thr, torch.where(has, first, -1), best


@functools.lru_cache(maxsize=4)
def _lower_triangle(w: int, device: str) -> "torch.Tensor":  # noqa: F821
    """(w, w) bool, True where row >= column."""
    import torch

    return torch.ones(w, w, dtype=torch.bool, device=torch.device(device)).tril_()


def _rescore(
    E: "torch.Tensor",  # noqa: F821
    pairs: list[tuple["torch.Tensor", "torch.Tensor"]],  # noqa: F821
    best: "torch.Tensor",  # noqa: F821
    first: "torch.Tensor",  # noqa: F821
) -> None:
    """Exact (float64) scores of the candidate pairs ``(i, j)``; per column
    ``j`` the maximum into ``best`` and the earliest ``i`` reaching it into
    ``first`` (every candidate of a column in this call)."""
    import torch

    ii = torch.cat([p[0] for p in pairs])
    jj = torch.cat([p[1] for p in pairs])
    vals = torch.empty(len(ii), dtype=torch.float64, device=E.device)
    for p in range(0, len(ii), _EXACT_BATCH):
        q = min(p + _EXACT_BATCH, len(ii))
        vals[p:q] = (E[ii[p:q]].double() * E[jj[p:q]].double()).sum(dim=1)
    best.scatter_reduce_(0, jj, vals, reduce="amax", include_self=True)
    at_max = vals == best[jj]
    first.scatter_reduce_(0, jj[at_max], ii[at_max], reduce="amin", include_self=True)


def _no_duplicates(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``is_dup``, ``duplicate_of`` and ``max_sim`` of ``n`` members none of
    which has been scored yet."""
    return np.zeros(n, dtype=bool), np.full(n, -1, dtype=np.int64), np.full(n, -np.inf, dtype=np.float32)


def semdedup_cluster(
    emb: np.ndarray,
    distance_to_centroid: np.ndarray,
    ids: np.ndarray,
    eps: float,
    tile: int = 4096,
    device: str = "cpu",
    *,
    what: str = "dedup cluster",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SemDeDup inside one cluster.

    Parameters: ``emb`` (n, d) the members' embeddings as stored (float16;
    float32 accepted), ``distance_to_centroid`` (n,) their stored cosine
    distances, ``ids`` (n,) the tie-break key (uids), ``eps``, ``tile`` the
    column tile width, ``device`` ``"cpu"`` or ``"cuda"``.

    Returns, in the input order: ``is_dup`` bool (n,); ``duplicate_of`` int64
    (n,), the input index of the most similar earlier member when ``is_dup``
    (ties: the earliest in farthest-first order), else -1; ``max_sim`` float32
    (n,), ``max_{i<j} S[i, j]`` (``-inf`` for the first member).

    Exactness: every float16 value is a multiple of 2**-24, so each product is
    a multiple of 2**-48 and, for rows of norm <= ~1, every partial sum is
    exactly representable in float64 whatever the order (rows of norm < 5): the float64
    re-scoring is the exact dot product.  The float32 tile (error <= ``delta``,
    see ``_float32_error_bound``) only selects, per column, the predecessors
    within ``2 delta`` of the float32 maximum, which always contain every exact
    maximiser.  Memory: ``O(tile * n)`` (float32 tile plus a bool mask; pairs
    of near-equal candidates are re-scored in batches).  A cluster of many
    identical rows makes every pair a candidate (slower, same memory bound).
    Tiles wider than ``_MAX_TILE`` are computed ``_MAX_TILE`` columns at a time.
    """
    import torch

    emb = np.asarray(emb)
    n = len(emb)
    dist = np.asarray(distance_to_centroid)
    ids = np.asarray(ids)
    if emb.ndim != 2 or dist.shape != (n,) or ids.shape != (n,):
        raise ValueError(f"{what}: shapes emb {emb.shape}, distance {dist.shape}, ids {ids.shape} do not match")
    check_eps_and_tile(eps, tile)
    is_dup, dup_of, max_sim = _no_duplicates(n)
    if n <= 1:
        return is_dup, dup_of, max_sim
    if not np.isfinite(dist).all():
        raise ValueError(f"{what}: distances to the centroid hold NaN/inf")
    norms = check_rows(emb, what)
    order = farthest_first_order(dist, ids)
    E = device_rows(emb[order], device)
    margin = filter_margin(emb.shape[1], float(norms.max()))
    with highest_matmul_precision(), torch.no_grad():
        o_dup, o_pos, o_sim = ordered_dedup(E, 1.0 - float(eps), margin, tile_width(tile), True)
    r_dup = o_dup.cpu().numpy()
    r_pos = o_pos.cpu().numpy()
    r_sim = o_sim.cpu().numpy().astype(np.float32)
    is_dup[order] = r_dup
    max_sim[order] = r_sim
    dup_of[order] = np.where(r_dup, order[np.maximum(r_pos, 0)], -1)
    return is_dup, dup_of, max_sim


def semdedup_bruteforce(
    emb: np.ndarray, distance_to_centroid: np.ndarray, ids: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference: the full ``n x n`` matrix in float64 (exact for float16
    embeddings), same outputs and tie rules as :func:`semdedup_cluster`.  For
    tests and benchmarks only."""
    emb = np.asarray(emb)
    n = len(emb)
    is_dup, dup_of, max_sim = _no_duplicates(n)
    if n <= 1:
        return is_dup, dup_of, max_sim
    order = farthest_first_order(distance_to_centroid, ids)
    E = emb[order].astype(np.float64)
    S = E @ E.T
    S[np.tril_indices(n)] = -np.inf  # keep i < j only
    m = S.max(axis=0)
    pos = S.argmax(axis=0)  # first maximum = earliest in farthest-first order
    dup = m > 1.0 - eps
    dup[0] = False
    is_dup[order] = dup
    max_sim[order] = m.astype(np.float32)
    dup_of[order] = np.where(dup, order[pos], -1)
    return is_dup, dup_of, max_sim
