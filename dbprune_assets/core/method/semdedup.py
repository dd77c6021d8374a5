"""SemDeDup (Abbas et al. 2023) over a whole pool, exactly as ``docs/design.md`` step 1.

Inside each dedup cluster, members are ordered farthest-first from the centroid
(ties by uid); with ``S = E Eᵀ`` in that order, member ``j`` is a duplicate when
``max_{i<j} S[i, j] > 1 - eps`` (pairwise, not transitive).  The rule inside one
cluster, its exact tiled kernel and the full-matrix reference are
:mod:`dbprune_assets.core.method.semdedup_kernel` (``semdedup_cluster``,
``semdedup_bruteforce``).

:func:`semdedup_pool` streams a whole pool: one pass over the shards sorts
each row into a bucket of contiguous dedup clusters
(:mod:`dbprune_assets.core.method.semdedup_buckets`: the first buckets, up to
one bucket's worth of rows, in memory; the rest appended to files on disk),
then buckets are processed one at a time: one farthest-first sort per bucket,
column tiles of at most the kernel's ``_MAX_TILE`` (tile ``[a, b)`` multiplies rows
``[0, b)`` only, so about half the lower triangle is skipped), consecutive
small clusters packed into one block-diagonal product (pairs across clusters
masked), and only the columns whose float32 maximum reaches ``1 - eps`` minus
the error margin re-scored exactly.  None of this changes a result: the
duplicates, their targets and similarities are those of ``semdedup_cluster``
on each cluster, whatever the grouping.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from dbprune_assets.core.method.kmeans import check_rows
from dbprune_assets.core.method.semdedup_buckets import BucketStore, plan_buckets
from dbprune_assets.core.method.semdedup_kernel import (
    check_eps_and_tile,
    device_rows,
    filter_margin,
    ordered_dedup,
    tile_width,
)
from dbprune_assets.core.running.device import highest_matmul_precision
from dbprune_assets.core.running.progress import progress
from dbprune_assets.core.store.duck import TABLES, empty_frame, polars_schema

#: consecutive clusters of at most this many rows in all are scored in one
#: block-diagonal product (one tile), saving per-cluster overhead
_PACK_ROWS = 256


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


def _validate_shard(s: DedupShard, k: int) -> None:
    n = len(s.uids)
    if s.emb.ndim != 2 or len(s.emb) != n or len(s.cluster) != n or len(s.distance) != n:
        raise ValueError(
            f"shard {s.name}: rows not aligned: {n} uids, emb {s.emb.shape}, "
            f"{len(s.cluster)} clusters, {len(s.distance)} distances"
        )
    if n and (int(np.min(s.cluster)) < 0 or int(np.max(s.cluster)) >= k):
        raise ValueError(f"shard {s.name}: dedup cluster ids outside [0, {k}) (k-means and assignments out of date?)")


# ---------------------------------------------------------------------------
# one bucket
# ---------------------------------------------------------------------------


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


def _check_distances(cl: np.ndarray, dist: np.ndarray, sizes: np.ndarray) -> None:
    """Raise ValueError naming the first dedup cluster of two or more members
    whose distances to the centroid hold NaN/inf (a lone member is compared
    with nothing)."""
    bad = ~np.isfinite(dist)
    if bad.any():
        hit = np.unique(cl[bad])
        hit = hit[sizes[hit] >= 2]
        if len(hit):
            raise ValueError(
                f"dedup cluster {int(hit[0])}: distances to the centroid hold NaN/inf "
                "(re-materialise dedup_assignments)"
            )


def _bucket_order(meta: np.ndarray, uids: np.ndarray) -> np.ndarray:
    """The bucket's rows by cluster, then farthest first, ties by uid, then
    shard order (``semdedup_cluster``'s input order)."""
    return np.lexsort((meta["row"], meta["shard"], uids, -meta["distance"].astype(np.float64), meta["cluster"]))


def _score_units(
    emb: np.ndarray, order: np.ndarray, cls: np.ndarray, max_norm: np.ndarray, thr: float, tile: int, device: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """:func:`ordered_dedup` on each cluster, or pack of small clusters, of a
    bucket's rows ``emb`` taken in ``order`` (:func:`_bucket_order`; ``cls``:
    their clusters in that order).

    Returns the positions in ``order`` of the duplicates and of their
    targets, and the exact similarities (float32); None when there are none.
    """
    import torch

    cb = np.flatnonzero(np.diff(cls)) + 1
    starts = np.concatenate([[0], cb])
    ends = np.concatenate([cb, [len(cls)]])
    w = tile_width(tile)
    d = emb.shape[1]
    src_l, tgt_l, sim_l = [], [], []
    with highest_matmul_precision(), torch.no_grad():
        for x, y, packed in _work_units(starts, ends, min(_PACK_ROWS, w)):
            E = device_rows(emb[order[x:y]], device)
            unit_cl = cls[x:y]
            margin = filter_margin(d, float(max_norm[unit_cl].max()))
            seg = torch.from_numpy(unit_cl.astype(np.int64)).to(E.device) if packed else None
            o_dup, o_pos, o_sim = ordered_dedup(E, thr, margin, w, False, seg)
            idx = torch.nonzero(o_dup).squeeze(1)
            if len(idx) == 0:
                continue
            src_l.append(x + idx.cpu().numpy())
            tgt_l.append(x + o_pos[idx].cpu().numpy())
            sim_l.append(o_sim[idx].cpu().numpy().astype(np.float32))
    if not src_l:
        return None
    return np.concatenate(src_l), np.concatenate(tgt_l), np.concatenate(sim_l)


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
    order): one farthest-first sort of the bucket, then :func:`ordered_dedup`
    on each cluster or pack of small clusters.  Same duplicates, targets and
    similarities as ``semdedup_cluster`` per cluster; None when there are
    none."""
    import polars as pl

    cl = meta["cluster"]
    _check_distances(cl, meta["distance"], sizes)
    o = _bucket_order(meta, uids)
    found = _score_units(emb, o, cl[o], max_norm, thr, tile, device)
    if found is None:
        return None
    src, tgt = o[found[0]], o[found[1]]
    frame = pl.DataFrame(
        {
            "uid": uids[src],
            "shard": shard_names[meta["shard"][src]],
            "cluster": cl[src].astype(np.int32),
            "duplicate_of": uids[tgt],
            "duplicate_of_shard": shard_names[meta["shard"][tgt]],
            "similarity": found[2],
        },
        schema=polars_schema("duplicates"),
    )
    return frame.sort(["cluster", "uid"])


# ---------------------------------------------------------------------------
# the pool driver
# ---------------------------------------------------------------------------


def _cluster_sizes(
    shards: list[str], load_shard: Callable[[str], DedupShard], k: int, cluster_sizes: np.ndarray | None
) -> np.ndarray:
    """Rows per dedup cluster: ``cluster_sizes`` checked, or counted by a pass
    over the shards' ``cluster`` columns."""
    if cluster_sizes is None:
        sizes = np.zeros(k, dtype=np.int64)
        for name in progress(shards, desc="semdedup: count", unit="shard"):
            s = load_shard(name)
            _validate_shard(s, k)
            sizes += np.bincount(np.asarray(s.cluster, dtype=np.int64), minlength=k)
        return sizes
    sizes = np.asarray(cluster_sizes, dtype=np.int64)
    if sizes.shape != (k,):
        raise ValueError(f"cluster_sizes has shape {sizes.shape}, expected ({k},)")
    return sizes


def _bucket_store(work: Path, sizes: np.ndarray, bucket_rows: int, memory_rows: int | None) -> BucketStore:
    """The buckets of clusters of ``sizes`` rows (:func:`plan_buckets`): the
    first ones, up to ``memory_rows`` rows in all (default ``bucket_rows``),
    regrouped in memory, the others in files under ``work``."""
    bucket_of = plan_buckets(sizes, bucket_rows)
    nb = int(bucket_of.max()) + 1 if len(sizes) else 0
    bucket_size = np.bincount(bucket_of, weights=sizes, minlength=nb).astype(np.int64)
    in_memory = np.cumsum(bucket_size) <= (bucket_rows if memory_rows is None else memory_rows)
    return BucketStore(work, bucket_of, bucket_size, in_memory)


def _fill_buckets(
    shards: list[str], load_shard: Callable[[str], DedupShard], k: int, sizes: np.ndarray, store: BucketStore
) -> np.ndarray:
    """Pass 1: every shard's rows into their buckets, checking the rows and
    the cluster sizes on the way.  Returns the largest row norm of each
    cluster (what the float32 error bound needs)."""
    seen = np.zeros(k, dtype=np.int64)
    max_norm = np.zeros(k, dtype=np.float32)
    for si, name in enumerate(progress(shards, desc="semdedup: bucket", unit="shard")):
        s = load_shard(name)
        _validate_shard(s, k)
        if len(s.uids) == 0:
            continue
        emb = np.asarray(s.emb)
        store.check_embeddings(name, emb)
        norms = check_rows(emb, f"shard {name}", s.uids)
        cl = np.asarray(s.cluster, dtype=np.int64)
        np.maximum.at(max_norm, cl, norms)
        seen += np.bincount(cl, minlength=k)
        if np.any(seen > sizes):
            raise ValueError(f"shard {name}: more rows in some dedup cluster than cluster_sizes says (stale sizes?)")
        store.add_shard(si, emb, cl, s.distance, s.uids)
        del s, emb
    if not np.array_equal(seen, sizes):
        raise ValueError("semdedup_pool: the shards hold fewer rows per dedup cluster than cluster_sizes says (stale sizes?)")
    return max_norm


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
    bucket at a time and scores its clusters as ``semdedup_cluster``
    would (see the module docstring).  Memory: one shard plus the in-memory
    buckets in pass 1; the in-memory buckets not yet processed, or one bucket
    from disk, plus the ``O(tile * cluster)`` tile in pass 2.

    Each yielded frame covers one bucket (clusters in ascending id, rows by
    uid) with :data:`DUPLICATE_COLUMNS`: ``uid, shard, cluster, duplicate_of``
    (uid), ``duplicate_of_shard, similarity`` (float32, exact).  The output
    does not depend on shard order (uids assumed unique).
    """
    if k <= 0:
        raise ValueError(f"semdedup.dedup_k={k} must be positive")
    check_eps_and_tile(eps, tile)
    thr = 1.0 - float(eps)
    shards = list(shards)
    shard_names = np.asarray(shards, dtype=str)
    sizes = _cluster_sizes(shards, load_shard, k, cluster_sizes)
    Path(tmp_dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="semdedup.", dir=tmp_dir))
    try:
        store = _bucket_store(work, sizes, bucket_rows, memory_rows)
        max_norm = _fill_buckets(shards, load_shard, k, sizes, store)
        # pass 2: bucket -> clusters
        for b in progress(range(store.n_buckets), desc="semdedup: dedup", unit="bucket"):
            bucket = store.take(b)
            if bucket is None:
                continue
            frame = _dedup_bucket(*bucket, shard_names, sizes, max_norm, thr, tile, device)
            del bucket
            if frame is not None:
                yield frame
    finally:
        shutil.rmtree(work, ignore_errors=True)


def empty_duplicates() -> "pl.DataFrame":  # noqa: F821
    """An empty frame with the columns and dtypes :func:`semdedup_pool` yields."""
    return empty_frame("duplicates")
