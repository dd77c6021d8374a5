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

:func:`semdedup_pool` streams a whole pool: one pass over the shards appends
each row to an on-disk bucket of contiguous dedup clusters, then buckets are
processed one at a time, cluster by cluster.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from dbprune_assets.core.duck import TABLES, empty_frame, polars_schema
from dbprune_assets.core.kmeans import _as_utf8, check_rows
from dbprune_assets.core.progress import progress

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
    dev = torch.device(device)
    src = emb[order]
    if src.dtype not in (np.float16, np.float32):
        src = src.astype(np.float32)
    E = torch.from_numpy(np.ascontiguousarray(src)).to(dev).float()
    margin = 2.0 * _float32_error_bound(d, float(norms.max())) + 4.0 * 2.0**-24
    thr = 1.0 - float(eps)

    o_dup = torch.zeros(n, dtype=torch.bool, device=dev)
    o_pos = torch.full((n,), -1, dtype=torch.int64, device=dev)
    o_sim = torch.full((n,), float("-inf"), dtype=torch.float64, device=dev)
    w = min(tile, n)
    tri_full = torch.ones(w, w, dtype=torch.bool, device=dev).tril_()  # i >= j inside the diagonal block
    with _highest_matmul_precision(), torch.no_grad():
        for a in range(0, n, tile):
            b = min(a + tile, n)
            t = b - a
            S = E[:b] @ E[a:b].T  # (b, t): rows i < b, columns j in [a, b)
            S[a:b].masked_fill_(tri_full[:t, :t], float("-inf"))
            m32 = S.amax(dim=0)  # (t,)
            cand = S >= (m32 - margin)[None, :]
            if a == 0:
                cand[:, 0] = False  # column 0 has no predecessor
            del S
            ii, jj = cand.nonzero(as_tuple=True)
            del cand
            # exact scores of the candidate pairs
            vals = torch.empty(len(ii), dtype=torch.float64, device=dev)
            for p in range(0, len(ii), _EXACT_BATCH):
                q = min(p + _EXACT_BATCH, len(ii))
                vals[p:q] = (E[ii[p:q]].double() * E[a + jj[p:q]].double()).sum(dim=1)
            colmax = torch.full((t,), float("-inf"), dtype=torch.float64, device=dev)
            colmax.scatter_reduce_(0, jj, vals, reduce="amax", include_self=True)
            at_max = vals == colmax[jj]
            first = torch.full((t,), n, dtype=torch.int64, device=dev)
            first.scatter_reduce_(0, jj[at_max], ii[at_max], reduce="amin", include_self=True)
            has = first < n
            cols = torch.arange(a, b, device=dev)[has]
            o_sim[cols] = colmax[has]
            o_pos[cols] = first[has]
            o_dup[cols] = colmax[has] > thr
    r_dup = o_dup.cpu().numpy()
    r_pos = o_pos.cpu().numpy()
    r_sim = o_sim.cpu().numpy().astype(np.float32)
    is_dup[order] = r_dup
    max_sim[order] = r_sim
    mapped = np.where(r_dup, order[np.maximum(r_pos, 0)], -1)
    dup_of[order] = mapped
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
) -> Iterator["pl.DataFrame"]:  # noqa: F821
    """Stream SemDeDup over a pool; yields polars frames of duplicates.

    ``shards``: shard names in a fixed order; ``load_shard(name)`` returns its
    :class:`DedupShard`.  ``k``: number of dedup clusters.  ``tmp_dir``: a
    scratch folder (a private sub-folder is created there and removed at the
    end).  ``cluster_sizes`` (k,): rows per cluster if already known (e.g. from
    the assignments); otherwise a counting pass reads each shard's ``cluster``.

    Pass 1 reads each shard once and appends its rows, grouped by bucket, to
    raw bucket files (embedding bytes, a fixed-size record of cluster /
    distance / shard / row, and the uid bytes).  Pass 2 reads one bucket at a
    time and runs :func:`semdedup_cluster` on each of its clusters.  Memory:
    one shard in pass 1; one bucket (``<= bucket_rows`` rows, or one larger
    cluster) plus the ``O(tile * cluster)`` tile in pass 2.

    Each yielded frame covers one bucket (clusters in ascending id, rows by
    uid) with :data:`DUPLICATE_COLUMNS`: ``uid, shard, cluster, duplicate_of``
    (uid), ``duplicate_of_shard, similarity`` (float32, exact).  The output
    does not depend on shard order (uids assumed unique).
    """
    import polars as pl

    if k <= 0:
        raise ValueError(f"semdedup.dedup_k={k} must be positive")
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

    Path(tmp_dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="semdedup.", dir=tmp_dir))
    try:
        d: int | None = None
        dtype: np.dtype | None = None
        seen = np.zeros(k, dtype=np.int64)
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
            check_rows(emb, f"shard {name}", s.uids)
            cl = np.asarray(s.cluster, dtype=np.int64)
            seen += np.bincount(cl, minlength=k)
            if np.any(seen > sizes):
                raise ValueError(f"shard {name}: more rows in some dedup cluster than cluster_sizes says (stale sizes?)")
            bk = bucket_of[cl]
            order = np.argsort(bk, kind="stable")
            bounds = np.searchsorted(bk[order], np.arange(nb + 1))
            uids8 = _as_utf8(s.uids)
            ulen = np.strings.str_len(uids8).astype(np.int32)
            for b in np.flatnonzero(np.diff(bounds)):
                rows = order[bounds[b] : bounds[b + 1]]
                meta = np.empty(len(rows), dtype=_META)
                meta["cluster"] = cl[rows]
                meta["distance"] = np.asarray(s.distance, dtype=np.float32)[rows]
                meta["shard"] = si
                meta["row"] = rows
                meta["uid_len"] = ulen[rows]
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
            stem = work / f"b{b:06d}"
            if not Path(f"{stem}.meta").exists():
                continue
            meta = np.fromfile(f"{stem}.meta", dtype=_META)
            emb = np.fromfile(f"{stem}.emb", dtype=dtype).reshape(len(meta), d)
            raw = Path(f"{stem}.uid").read_bytes()
            for suffix in (".meta", ".emb", ".uid"):
                Path(f"{stem}{suffix}").unlink()
            ends = np.cumsum(meta["uid_len"], dtype=np.int64)
            starts = ends - meta["uid_len"]
            uids = np.array([raw[x:y].decode("utf-8") for x, y in zip(starts.tolist(), ends.tolist())], dtype=str)
            del raw
            o = np.lexsort((meta["row"], meta["shard"], meta["cluster"]))
            meta, uids = meta[o], uids[o]  # embeddings are gathered per cluster (no second bucket copy)
            cb = np.flatnonzero(np.diff(meta["cluster"])) + 1
            starts_c = np.concatenate([[0], cb])
            ends_c = np.concatenate([cb, [len(meta)]])
            parts = []
            for x, y in zip(starts_c.tolist(), ends_c.tolist()):
                if y - x < 2:
                    continue
                c = int(meta["cluster"][x])
                dup, dof, sim = semdedup_cluster(
                    emb[o[x:y]], meta["distance"][x:y], uids[x:y], eps, tile, device, what=f"dedup cluster {c}"
                )
                if not dup.any():
                    continue
                idx = np.flatnonzero(dup)
                src = x + idx
                tgt = x + dof[idx]
                parts.append(
                    pl.DataFrame(
                        {
                            "uid": uids[src],
                            "shard": shard_names[meta["shard"][src]],
                            "cluster": np.full(len(idx), c, dtype=np.int32),
                            "duplicate_of": uids[tgt],
                            "duplicate_of_shard": shard_names[meta["shard"][tgt]],
                            "similarity": sim[idx].astype(np.float32),
                        },
                        schema=polars_schema("duplicates"),
                    )
                )
            del meta, emb, uids
            if parts:
                yield pl.concat(parts).sort(["cluster", "uid"])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def empty_duplicates() -> "pl.DataFrame":  # noqa: F821
    """An empty frame with the columns and dtypes :func:`semdedup_pool` yields."""
    return empty_frame("duplicates")
