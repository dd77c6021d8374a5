"""SemDeDup (Abbas et al. 2023), exactly as ``docs/design.md`` step 1.

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

:func:`semdedup_pool` streams a whole pool: one pass over the shards sorts
each row into a bucket of contiguous dedup clusters (the first buckets, up to
one bucket's worth of rows, in memory; the rest appended to files on disk),
then buckets are processed one at a time: one farthest-first sort per bucket,
column tiles of at most ``_MAX_TILE`` (tile ``[a, b)`` multiplies rows
``[0, b)`` only, so about half the lower triangle is skipped), consecutive
small clusters packed into one block-diagonal product (pairs across clusters
masked), and only the columns whose float32 maximum reaches ``1 - eps`` minus
the error margin re-scored exactly.  None of this changes a result: the
duplicates, their targets and similarities are those of
:func:`semdedup_cluster` on each cluster, whatever the grouping.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from dbprune_assets.core.store.duck import TABLES, empty_frame, polars_schema
from dbprune_assets.core.method.kmeans import _as_utf8, check_rows
from dbprune_assets.core.running.progress import progress

#: rows of one exact re-scoring batch (bounds the float64 gather memory)
_EXACT_BATCH = 1 << 15


@contextlib.contextmanager
def _highest_matmul_precision() -> Iterator[None]:
    """No TF32 / bf16 shortcuts for float32 matmuls inside the block (the
    float32 error bound of the filter assumes IEEE float32 products)."""
    import torch

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def farthest_first_order(distance: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Permutation: distance to the centroid descending, ties by id ascending
    (then input order)."""
    distance = np.asarray(distance)
    ids = np.asarray(ids)
    if ids.dtype == object:
        ids = ids.astype(str)
    return np.lexsort((ids, -distance.astype(np.float64)))


def _float32_error_bound(d: int, max_norm: float) -> float:
    """Bound on |fl32(x.y) - x.y| for float32 dot products of length d of rows
    with norm <= max_norm, whatever the summation order (Higham's gamma_d
    times sum |x_i y_i| <= |x||y|)."""
    u = 2.0**-24
    gamma = d * u / (1.0 - d * u)
    return gamma * max_norm * max_norm * (1.0 + 1e-6) + 1e-30


#: widest column tile computed at once: tile ``[a, b)`` multiplies rows ``[0, b)``
#: only, so narrower tiles skip more of the (unused) lower triangle
_MAX_TILE = 512
#: consecutive clusters of at most this many rows in all are scored in one
#: block-diagonal product (one tile), saving per-cluster overhead
_PACK_ROWS = 256


def _ordered_dedup(
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
    clusters masked).  ``margin``: twice the float32 error bound (plus slack).

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


def _as_float(x: np.ndarray) -> np.ndarray:
    """float16 / float32 rows as they are, anything else as float32."""
    return x if x.dtype in (np.float16, np.float32) else x.astype(np.float32)


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
    if not 0 < eps < 1:
        raise ValueError(f"semdedup.eps={eps} must be in (0, 1)")
    if tile <= 0:
        raise ValueError(f"compute.tile={tile} must be positive")
    is_dup = np.zeros(n, dtype=bool)
    dup_of = np.full(n, -1, dtype=np.int64)
    max_sim = np.full(n, -np.inf, dtype=np.float32)
    if n <= 1:
        return is_dup, dup_of, max_sim
    if not np.isfinite(dist).all():
        raise ValueError(f"{what}: distances to the centroid hold NaN/inf")
    norms = check_rows(emb, what)
    d = emb.shape[1]
    order = farthest_first_order(dist, ids)
    E = torch.from_numpy(np.ascontiguousarray(_as_float(emb[order]))).to(torch.device(device)).float()
    margin = 2.0 * _float32_error_bound(d, float(norms.max())) + 4.0 * 2.0**-24
    with _highest_matmul_precision(), torch.no_grad():
        o_dup, o_pos, o_sim = _ordered_dedup(E, 1.0 - float(eps), margin, min(tile, _MAX_TILE), True)
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
    is_dup = np.zeros(n, dtype=bool)
    dup_of = np.full(n, -1, dtype=np.int64)
    max_sim = np.full(n, -np.inf, dtype=np.float32)
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


# ---------------------------------------------------------------------------
# the pool driver
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DedupShard:
    """What the pool driver needs of one shard (rows aligned).

    ``emb`` may be a read-only memmap (``np.load(path, mmap_mode="r")``): the
    counting pass then reads only ``cluster``.
    """

    name: str
    uids: np.ndarray  # (n,) str
    emb: np.ndarray  # (n, d) float16 as stored
    cluster: np.ndarray  # (n,) dedup cluster id in [0, k)
    distance: np.ndarray  # (n,) float32 cosine distance to the cluster's centroid


#: columns of the frames :func:`semdedup_pool` yields (the ``duplicates`` table)
DUPLICATE_COLUMNS: tuple[str, ...] = tuple(TABLES["duplicates"])

_META = np.dtype([("cluster", "<i4"), ("distance", "<f4"), ("shard", "<i4"), ("row", "<i8"), ("uid_len", "<i4")])


def plan_buckets(cluster_sizes: np.ndarray, bucket_rows: int) -> np.ndarray:
    """Bucket of each cluster: contiguous runs of cluster ids holding at most
    ``bucket_rows`` rows (a larger cluster gets a bucket of its own)."""
    sizes = np.asarray(cluster_sizes, dtype=np.int64)
    bucket = np.zeros(len(sizes), dtype=np.int64)
    b, fill = 0, 0
    for c, s in enumerate(sizes.tolist()):
        if fill > 0 and fill + s > bucket_rows:
            b, fill = b + 1, 0
        bucket[c] = b
        fill += s
    return bucket


def _validate_shard(s: DedupShard, k: int) -> None:
    n = len(s.uids)
    if s.emb.ndim != 2 or len(s.emb) != n or len(s.cluster) != n or len(s.distance) != n:
        raise ValueError(
            f"shard {s.name}: rows not aligned: {n} uids, emb {s.emb.shape}, "
            f"{len(s.cluster)} clusters, {len(s.distance)} distances"
        )
    if n and (int(np.min(s.cluster)) < 0 or int(np.max(s.cluster)) >= k):
        raise ValueError(f"shard {s.name}: dedup cluster ids outside [0, {k}) (k-means and assignments out of date?)")


def _work_units(starts: np.ndarray, ends: np.ndarray, pack: int) -> list[tuple[int, int, bool]]:
    """Row ranges ``(x, y, packed)`` to score, over consecutive clusters
    ``[starts[i], ends[i])`` (clusters of one row skipped): a cluster of more than
    ``pack`` rows alone, smaller ones packed together up to ``pack`` rows."""
    units: list[tuple[int, int, bool]] = []
    gx = gy = -1
    for x, y in zip(starts.tolist(), ends.tolist()):
        if y - x < 2:
            continue
        if y - x > pack:
            if gx >= 0:
                units.append((gx, gy, True))
                gx = -1
            units.append((x, y, False))
            continue
        if gx >= 0 and y - gx > pack:
            units.append((gx, gy, True))
            gx = -1
        if gx < 0:
            gx = x
        gy = y
    if gx >= 0:
        units.append((gx, gy, True))
    return units


def _dedup_bucket(
    meta: np.ndarray,
    emb: np.ndarray,
    uids: np.ndarray,
    shard_names: np.ndarray,
    sizes: np.ndarray,
    max_norm: np.ndarray,
    thr: float,
    tile: int,
    device: str,
) -> "pl.DataFrame | None":  # noqa: F821
    """SemDeDup of every cluster of one bucket (whole clusters; rows in any
    order): one farthest-first sort of the bucket, then :func:`_ordered_dedup`
    on each cluster or pack of small clusters.  Same duplicates, targets and
    similarities as :func:`semdedup_cluster` per cluster; None when there are
    none."""
    import polars as pl
    import torch

    cl = meta["cluster"]
    dist = meta["distance"]
    bad = ~np.isfinite(dist)
    if bad.any():
        hit = np.unique(cl[bad])
        hit = hit[sizes[hit] >= 2]
        if len(hit):
            raise ValueError(
                f"dedup cluster {int(hit[0])}: distances to the centroid hold NaN/inf "
                "(re-materialise dedup_assignments)"
            )
    # by cluster, then farthest first, ties by uid, then shard order (as semdedup_cluster's input order)
    o = np.lexsort((meta["row"], meta["shard"], uids, -dist.astype(np.float64), cl))
    cls = cl[o]
    cb = np.flatnonzero(np.diff(cls)) + 1
    starts = np.concatenate([[0], cb])
    ends = np.concatenate([cb, [len(o)]])
    w = min(tile, _MAX_TILE)
    d = emb.shape[1]
    dev = torch.device(device)
    src_l, tgt_l, sim_l = [], [], []
    with _highest_matmul_precision(), torch.no_grad():
        for x, y, packed in _work_units(starts, ends, min(_PACK_ROWS, w)):
            E = torch.from_numpy(np.ascontiguousarray(_as_float(emb[o[x:y]]))).to(dev).float()
            unit_cl = cls[x:y]
            margin = 2.0 * _float32_error_bound(d, float(max_norm[unit_cl].max())) + 4.0 * 2.0**-24
            seg = torch.from_numpy(unit_cl.astype(np.int64)).to(dev) if packed else None
            o_dup, o_pos, o_sim = _ordered_dedup(E, thr, margin, w, False, seg)
            idx = torch.nonzero(o_dup).squeeze(1)
            if len(idx) == 0:
                continue
            src_l.append(x + idx.cpu().numpy())
            tgt_l.append(x + o_pos[idx].cpu().numpy())
            sim_l.append(o_sim[idx].cpu().numpy().astype(np.float32))
    if not src_l:
        return None
    src = o[np.concatenate(src_l)]
    tgt = o[np.concatenate(tgt_l)]
    frame = pl.DataFrame(
        {
            "uid": uids[src],
            "shard": shard_names[meta["shard"][src]],
            "cluster": cl[src].astype(np.int32),
            "duplicate_of": uids[tgt],
            "duplicate_of_shard": shard_names[meta["shard"][tgt]],
            "similarity": np.concatenate(sim_l),
        },
        schema=polars_schema("duplicates"),
    )
    return frame.sort(["cluster", "uid"])


class _MemoryBucket:
    """A bucket regrouped in memory: its rows preallocated (sizes are known up
    front), filled shard by shard in pass 1."""

    def __init__(self, rows: int, d: int, dtype: np.dtype) -> None:
        self.meta = np.empty(rows, dtype=_META)
        self.emb = np.empty((rows, d), dtype=dtype)
        self.uids: list[np.ndarray] = []
        self.fill = 0

    def add(self, meta: np.ndarray, emb: np.ndarray, uids8: np.ndarray) -> None:
        x, y = self.fill, self.fill + len(meta)
        self.meta[x:y] = meta
        self.emb[x:y] = emb
        self.uids.append(uids8)
        self.fill = y

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """meta, embeddings and str uids of the rows added."""
        uids = np.strings.decode(np.concatenate(self.uids), "utf-8")
        return self.meta[: self.fill], self.emb[: self.fill], uids


def _decode_uids(raw: bytes, lengths: np.ndarray) -> np.ndarray:
    """str uids from their concatenated UTF-8 bytes and byte lengths."""
    n = len(lengths)
    if n and int(lengths.min()) == int(lengths.max()) > 0:  # all the same length (hex uids): no Python loop
        return np.strings.decode(np.frombuffer(raw, dtype=f"S{int(lengths[0])}", count=n), "utf-8")
    ends = np.cumsum(lengths, dtype=np.int64)
    starts = ends - lengths
    return np.array([raw[x:y].decode("utf-8") for x, y in zip(starts.tolist(), ends.tolist())], dtype=str)


def semdedup_pool(
    shards: Sequence[str],
    load_shard: Callable[[str], DedupShard],
    k: int,
    eps: float,
    tile: int,
    tmp_dir: str | Path,
    device: str = "cpu",
    *,
    cluster_sizes: np.ndarray | None = None,
    bucket_rows: int = 262_144,
    memory_rows: int | None = None,
) -> Iterator["pl.DataFrame"]:  # noqa: F821
    """Stream SemDeDup over a pool; yields polars frames of duplicates.

    ``shards``: shard names in a fixed order; ``load_shard(name)`` returns its
    :class:`DedupShard`.  ``k``: number of dedup clusters.  ``tmp_dir``: a
    scratch folder (a private sub-folder is created there and removed at the
    end).  ``cluster_sizes`` (k,): rows per cluster if already known (e.g. from
    the assignments); otherwise a counting pass reads each shard's ``cluster``.

    Pass 1 reads each shard once and sorts its rows into buckets of
    consecutive clusters (``<= bucket_rows`` rows, or one larger cluster):
    the first buckets, as long as they hold ``<= memory_rows`` rows in all
    (default ``bucket_rows``), into arrays preallocated in memory; the others
    appended to raw bucket files (embedding bytes, a fixed-size record of
    cluster / distance / shard / row, and the uid bytes).  Pass 2 takes one
    bucket at a time and scores its clusters as :func:`semdedup_cluster`
    would (see the module docstring).  Memory: one shard plus the in-memory
    buckets in pass 1; the in-memory buckets not yet processed, or one bucket
    from disk, plus the ``O(tile * cluster)`` tile in pass 2.

    Each yielded frame covers one bucket (clusters in ascending id, rows by
    uid) with :data:`DUPLICATE_COLUMNS`: ``uid, shard, cluster, duplicate_of``
    (uid), ``duplicate_of_shard, similarity`` (float32, exact).  The output
    does not depend on shard order (uids assumed unique).
    """
    import polars as pl

    if k <= 0:
        raise ValueError(f"semdedup.dedup_k={k} must be positive")
    if not 0 < eps < 1:
        raise ValueError(f"semdedup.eps={eps} must be in (0, 1)")
    if tile <= 0:
        raise ValueError(f"compute.tile={tile} must be positive")
    thr = 1.0 - float(eps)
    shards = list(shards)
    shard_names = np.asarray(shards, dtype=str)
    if cluster_sizes is None:
        sizes = np.zeros(k, dtype=np.int64)
        for name in progress(shards, desc="semdedup: count", unit="shard"):
            s = load_shard(name)
            _validate_shard(s, k)
            sizes += np.bincount(np.asarray(s.cluster, dtype=np.int64), minlength=k)
    else:
        sizes = np.asarray(cluster_sizes, dtype=np.int64)
        if sizes.shape != (k,):
            raise ValueError(f"cluster_sizes has shape {sizes.shape}, expected ({k},)")
    bucket_of = plan_buckets(sizes, bucket_rows)
    nb = int(bucket_of.max()) + 1 if k else 0
    bucket_size = np.bincount(bucket_of, weights=sizes, minlength=nb).astype(np.int64)
    # the first buckets, up to memory_rows rows in all, are regrouped in memory
    in_memory = np.cumsum(bucket_size) <= (bucket_rows if memory_rows is None else memory_rows)
    mem: dict[int, _MemoryBucket] = {}

    Path(tmp_dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="semdedup.", dir=tmp_dir))
    try:
        d: int | None = None
        dtype: np.dtype | None = None
        seen = np.zeros(k, dtype=np.int64)
        max_norm = np.zeros(k, dtype=np.float32)  # largest row norm per cluster (the float32 error bound)
        # ---- pass 1: shard -> buckets
        for si, name in enumerate(progress(shards, desc="semdedup: bucket", unit="shard")):
            s = load_shard(name)
            _validate_shard(s, k)
            n = len(s.uids)
            if n == 0:
                continue
            emb = np.asarray(s.emb)
            if d is None:
                d, dtype = emb.shape[1], emb.dtype
            elif emb.shape[1] != d or emb.dtype != dtype:
                raise ValueError(f"shard {name}: embeddings {emb.dtype} (n, {emb.shape[1]}) differ from earlier shards' {dtype} (n, {d})")
            norms = check_rows(emb, f"shard {name}", s.uids)
            cl = np.asarray(s.cluster, dtype=np.int64)
            np.maximum.at(max_norm, cl, norms)
            seen += np.bincount(cl, minlength=k)
            if np.any(seen > sizes):
                raise ValueError(f"shard {name}: more rows in some dedup cluster than cluster_sizes says (stale sizes?)")
            bk = bucket_of[cl]
            order = np.argsort(bk, kind="stable")
            bounds = np.searchsorted(bk[order], np.arange(nb + 1))
            uids8 = _as_utf8(s.uids)
            ulen = np.strings.str_len(uids8).astype(np.int32)
            distance = np.asarray(s.distance, dtype=np.float32)
            for b in np.flatnonzero(np.diff(bounds)):
                rows = order[bounds[b] : bounds[b + 1]]
                meta = np.empty(len(rows), dtype=_META)
                meta["cluster"] = cl[rows]
                meta["distance"] = distance[rows]
                meta["shard"] = si
                meta["row"] = rows
                meta["uid_len"] = ulen[rows]
                if in_memory[b]:
                    if b not in mem:
                        mem[b] = _MemoryBucket(int(bucket_size[b]), d, dtype)
                    mem[b].add(meta, emb[rows], uids8[rows])
                    continue
                stem = work / f"b{b:06d}"
                with open(f"{stem}.meta", "ab") as f:
                    f.write(meta.tobytes())
                with open(f"{stem}.emb", "ab") as f:
                    f.write(np.ascontiguousarray(emb[rows]).tobytes())
                with open(f"{stem}.uid", "ab") as f:
                    f.write(b"".join(uids8[rows].tolist()))
            del s, emb
        if not np.array_equal(seen, sizes):
            raise ValueError("semdedup_pool: the shards hold fewer rows per dedup cluster than cluster_sizes says (stale sizes?)")
        # ---- pass 2: bucket -> clusters
        for b in progress(range(nb), desc="semdedup: dedup", unit="bucket"):
            if b in mem:
                meta, emb, uids = mem.pop(b).arrays()
            else:
                stem = work / f"b{b:06d}"
                if not Path(f"{stem}.meta").exists():
                    continue
                meta = np.fromfile(f"{stem}.meta", dtype=_META)
                emb = np.fromfile(f"{stem}.emb", dtype=dtype).reshape(len(meta), d)
                raw = Path(f"{stem}.uid").read_bytes()
                for suffix in (".meta", ".emb", ".uid"):
                    Path(f"{stem}{suffix}").unlink()
                uids = _decode_uids(raw, meta["uid_len"])
                del raw
            frame = _dedup_bucket(meta, emb, uids, shard_names, sizes, max_norm, thr, tile, device)
            del meta, emb, uids
            if frame is not None:
                yield frame
    finally:
        shutil.rmtree(work, ignore_errors=True)


def empty_duplicates() -> "pl.DataFrame":  # noqa: F821
    """An empty frame with the columns and dtypes :func:`semdedup_pool` yields."""
    return empty_frame("duplicates")
