"""SemDeDup after shards were added or removed, against the same dedup
clusters, without redoing whole clusters.

The rule (``semdedup_kernel.py``): inside a cluster, members in farthest-first
order, member ``j`` is a duplicate when ``max_{i<j} S[i, j] > 1 - eps``, its
target the earliest ``i`` reaching that maximum, its similarity the exact
maximum.  When the clusters are kept (no refit), every old member keeps its
distance, so the old members keep their relative order and new ones fall in
between.  Then, per column ``j``:

* a **new** member needs its maximum over every member ahead of it;
* an old member **whose target left** (its shard was removed) needs the same:
  its old maximum is gone;
* any **other old** member needs only its maximum over the *new* members
  ahead of it: its maximum over the old ones is the previous run's (the
  similarity on record when it was a duplicate; at most ``1 - eps`` when it
  was not, so a new maximum above ``1 - eps`` wins).  An old duplicate whose
  new maximum ties the old one keeps the earlier of the two targets; its old
  exact similarity is recomputed from the two rows (the table holds it in
  float32).  A member that left changes no one else's maximum but those
  whose target it was: removing a predecessor only lowers a maximum, and a
  member whose maximum it reached (first, on ties) named it as its target.

Every pair scored involves a new member or a member whose target left: about
``2 · new · cluster`` products instead of ``cluster² / 2``.  Scores are exact
as in the kernel (a float32 filter within the error bound, then float64 sums
of float16 products, which are exact), so the result equals a full pass's
byte for byte: the same duplicates, targets and similarities, written in the
same per-bucket groups (:func:`~.semdedup.semdedup_pool`'s).  Clusters with
nothing to score keep their rows of the previous table (less the rows of
removed shards), read one bucket's clusters at a time.

:func:`changes_since` decides when this applies (:class:`DedupBasis`): the
same ``eps``, ``dedup_k`` and fit, and every shard of the previous pass that
is still there with the same assignments and usable rows.  Anything else (a
refit, a changed ``eps``, a shard re-assigned, a row whose uid another shard
now has or no longer has) takes the full pass.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from dbprune_assets.core.method.semdedup import DedupShard, _bucket_order, _fill_buckets
from dbprune_assets.core.method.semdedup_buckets import BucketStore, plan_buckets
from dbprune_assets.core.method.semdedup_kernel import (
    _EXACT_BATCH,
    _rescore,
    check_eps_and_tile,
    device_rows,
    filter_margin,
    tile_width,
)
from dbprune_assets.core.running.device import highest_matmul_precision
from dbprune_assets.core.running.progress import progress
from dbprune_assets.core.store.duck import polars_schema


# ---------------------------------------------------------------------------
# when a pass may build on the previous one


@dataclass(frozen=True)
class DedupBasis:
    """What a duplicates table was computed from: ``eps``, ``k``, the SemDeDup
    fit's data version, and per shard its ``dedup_assignments`` data version
    and usable rows (rows less those whose uid an earlier shard has)."""

    eps: float
    k: int
    fit: str
    shards: Mapping[str, tuple[str, int]]

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "shards": {s: list(v) for s, v in self.shards.items()}}, sort_keys=True)

    @classmethod
    def read(cls, path: Path) -> "DedupBasis | None":
        """The basis recorded at ``path``; None when absent or unreadable."""
        try:
            raw = json.loads(path.read_text())
            return cls(float(raw["eps"]), int(raw["k"]), str(raw["fit"]),
                       {str(s): (str(v[0]), int(v[1])) for s, v in raw["shards"].items()})
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return None


def changes_since(previous: DedupBasis | None, now: DedupBasis) -> tuple[list[str], list[str]] | None:
    """``(added, removed)`` shards since ``previous`` when the rest is as it
    was (same eps, k and fit; every previous shard still present has the same
    assignments and usable rows); None when a full pass is needed (also when
    nothing changed: a forced pass recomputes)."""
    if previous is None or (previous.eps, previous.k, previous.fit) != (now.eps, now.k, now.fit):
        return None
    if any(shard in now.shards and now.shards[shard] != tuple(v) for shard, v in previous.shards.items()):
        return None
    added = [shard for shard in now.shards if shard not in previous.shards]
    removed = sorted(shard for shard in previous.shards if shard not in now.shards)
    return (added, removed) if added or removed else None


# ---------------------------------------------------------------------------
# the kernel: maxima over the pairs that involve a new member


def added_pair_maxima(
    E: "torch.Tensor",  # noqa: F821
    new: "torch.Tensor",  # noqa: F821
    full: "torch.Tensor",  # noqa: F821
    thr: float,
    margin: float,
    tile: int,
) -> tuple["torch.Tensor", "torch.Tensor"]:  # noqa: F821
    """Per member of one cluster (rows of ``E`` in farthest-first order,
    float32 holding the stored values, on the device; ``new`` (m,) bool: the
    new members; ``full`` (m,) bool: the columns scored against every row
    ahead, a superset of ``new``): the exact maximum of ``S[i, j]`` over
    ``i < j`` with, unless ``full[j]``, ``i`` new, and the earliest ``i``
    reaching it.  Only columns whose float32 maximum reaches ``thr - margin``
    are scored (the others: ``-inf`` and ``m``), which includes every column
    whose exact maximum exceeds ``thr``.  Memory: ``O(tile * m)``."""
    import torch

    m, dev = len(E), E.device
    best = torch.full((m,), float("-inf"), dtype=torch.float64, device=dev)
    first = torch.full((m,), m, dtype=torch.int64, device=dev)
    pos = torch.arange(m, device=dev)
    new_pos = pos[new]
    floor = thr - margin
    # full columns against every row ahead; the others behind the first new member against the new rows
    rest = pos[~full & (pos > new_pos[0])] if len(new_pos) else pos[:0]
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    npend = 0
    for cols_all, rows_fixed in ((pos[full], None), (rest, new_pos)):
        for a in range(0, len(cols_all), tile):
            cols = cols_all[a : a + tile]
            last = int(cols[-1])
            rows = pos[:last] if rows_fixed is None else rows_fixed[rows_fixed < last]
            if len(rows) == 0:
                continue
            S = E[rows] @ E[cols].T  # (rows, t)
            S.masked_fill_(rows[:, None] >= cols[None, :], float("-inf"))
            m32 = S.amax(dim=0)
            sel = (m32 > floor).nonzero().squeeze(1)
            if len(sel) == 0:
                continue
            cand = S[:, sel] >= (m32[sel] - margin)[None, :]
            del S
            ii, jl = cand.nonzero(as_tuple=True)
            pending.append((rows[ii], cols[sel][jl]))
            npend += len(ii)
            if npend >= _EXACT_BATCH:  # each column's candidates come from this one tile
                _rescore(E, pending, best, first)
                pending, npend = [], 0
    if pending:
        _rescore(E, pending, best, first)
    return best, first


# ---------------------------------------------------------------------------
# one cluster, one bucket


def _exact_dot(a: np.ndarray, b: np.ndarray) -> float:
    """``a · b`` in float64 (exact for float16 rows, as the kernel's re-scoring)."""
    return float(np.dot(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)))


def merge_cluster(rows: np.ndarray, full: np.ndarray, keys: np.ndarray, previous: Mapping[str, tuple[str, float]],
                  best: np.ndarray, first: np.ndarray, thr: float) -> list[tuple[int, int, float]]:
    """The duplicates of one changed cluster, as ``(position, target position,
    exact similarity)``: ``rows`` (m, d) its members as stored, in
    farthest-first order, ``full`` (m,) the members scored against every one
    ahead (new, or their target left), ``keys`` (m,) each member's
    ``uid\\tshard``; ``previous``: the other old members' record, key ->
    (target key, similarity); ``best``/``first``: :func:`added_pair_maxima`."""
    where = {k: p for p, k in enumerate(keys.tolist())}
    out = []
    for p in range(len(keys)):
        b, f = float(best[p]), int(first[p])
        was = None if full[p] else previous.get(keys[p])
        if was is None:
            if b > thr:
                out.append((p, f, b))
            continue
        t = where[was[0]]
        s = _exact_dot(rows[t], rows[p])
        if b > s:
            out.append((p, f, b))
        else:
            out.append((p, min(t, f) if b == s else t, s))
    return out


def _changed_bucket(meta: np.ndarray, emb: np.ndarray, uids: np.ndarray, shard_names: np.ndarray,
                    is_new: np.ndarray, orphans: set[str], previous: "pl.DataFrame", max_norm: np.ndarray,
                    thr: float, tile: int, device: str) -> "pl.DataFrame":  # noqa: F821
    """The duplicates of a bucket's changed clusters (every member of each in
    ``meta``/``emb``/``uids``; ``is_new`` per shard index; ``orphans``: the
    ``uid\\tshard`` of old members whose target left; ``previous``: the
    previous table's rows of these clusters, less those of removed shards)."""
    import polars as pl
    import torch

    o = _bucket_order(meta, uids)
    cls = meta["cluster"][o]
    shard_of = meta["shard"][o]
    keys = np.char.add(np.char.add(uids[o].astype(str), "\t"), shard_names[shard_of])
    new = is_new[shard_of]
    full = new | np.fromiter((k in orphans for k in keys.tolist()), dtype=bool, count=len(keys))
    prev_keys = previous.select(pl.concat_str("uid", "shard", separator="\t"),
                                pl.concat_str("duplicate_of", "duplicate_of_shard", separator="\t"), "similarity")
    record = {k: (t, s) for k, t, s in prev_keys.iter_rows()}
    cb = np.flatnonzero(np.diff(cls)) + 1
    src, tgt, sim = [], [], []
    with highest_matmul_precision(), torch.no_grad():
        for x, y in zip(np.concatenate([[0], cb]).tolist(), np.concatenate([cb, [len(cls)]]).tolist()):
            if y - x < 2:
                continue
            rows = emb[o[x:y]]
            E = device_rows(rows, device)
            margin = filter_margin(emb.shape[1], float(max_norm[cls[x]]))
            best, first = added_pair_maxima(E, torch.from_numpy(new[x:y].copy()).to(E.device),
                                            torch.from_numpy(full[x:y].copy()).to(E.device), thr, margin,
                                            tile_width(tile))
            for p, t, s in merge_cluster(rows, full[x:y], keys[x:y], record, best.cpu().numpy(),
                                         first.cpu().numpy(), thr):
                src.append(x + p)
                tgt.append(x + t)
                sim.append(s)
    src_i, tgt_i = o[np.asarray(src, dtype=np.int64)], o[np.asarray(tgt, dtype=np.int64)]
    return pl.DataFrame(
        {
            "uid": uids[src_i], "shard": shard_names[meta["shard"][src_i]],
            "cluster": meta["cluster"][src_i].astype(np.int32),
            "duplicate_of": uids[tgt_i], "duplicate_of_shard": shard_names[meta["shard"][tgt_i]],
            "similarity": np.asarray(sim, dtype=np.float64).astype(np.float32),
        },
        schema=polars_schema("duplicates"),
    )


# ---------------------------------------------------------------------------
# the pool driver


def semdedup_added(
    shards: Sequence[str],
    added: Sequence[str],
    removed: Sequence[str],
    load_shard: Callable[[str], DedupShard],
    previous: Path,
    k: int,
    eps: float,
    tile: int,
    tmp_dir: str | Path,
    device: str = "cpu",
    *,
    cluster_sizes: np.ndarray,
    bucket_rows: int = 262_144,
    memory_rows: int | None = None,
) -> Iterator["pl.DataFrame"]:  # noqa: F821
    """:func:`~.semdedup.semdedup_pool`'s frames for the pool ``shards`` (rows
    per cluster ``cluster_sizes``), of which ``added`` are new since the
    duplicates table ``previous`` and ``removed`` were in it and are gone
    (module docstring; the caller checked that the rest is as it was,
    :func:`changes_since`).  Only the clusters the added shards reach or that
    lost a target are read and scored; the others' rows come from
    ``previous``.  Memory as ``semdedup_pool``'s, over those clusters' rows."""
    import polars as pl

    check_eps_and_tile(eps, tile)
    thr = 1.0 - float(eps)
    shards = list(shards)
    shard_names = np.asarray(shards, dtype=str)
    is_new = np.isin(shard_names, np.asarray(list(added), dtype=str))
    sizes = np.asarray(cluster_sizes, dtype=np.int64)
    old = pl.scan_parquet(previous).filter(~pl.col("shard").is_in(list(removed)))
    lost = old.filter(pl.col("duplicate_of_shard").is_in(list(removed))).select("uid", "shard", "cluster").collect()
    orphans = set(lost.select(pl.concat_str("uid", "shard", separator="\t")).to_series().to_list())
    changed = np.zeros(k, dtype=bool)
    changed[lost["cluster"].to_numpy().astype(np.int64)] = True
    for name in added:
        changed[np.unique(np.asarray(load_shard(name).cluster, dtype=np.int64))] = True
    bucket_of = plan_buckets(sizes, bucket_rows)  # the full pass's buckets: the same frames
    changed_sizes = np.where(changed, sizes, 0)

    def load_changed(name: str) -> DedupShard:
        s = load_shard(name)
        keep = changed[np.asarray(s.cluster, dtype=np.int64)]
        return DedupShard(s.name, s.uids[keep], np.asarray(s.emb)[keep], s.cluster[keep], s.distance[keep])

    Path(tmp_dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="semdedup-added.", dir=tmp_dir))
    try:
        nb = int(bucket_of.max()) + 1 if k else 0
        bucket_size = np.bincount(bucket_of, weights=changed_sizes, minlength=nb).astype(np.int64)
        in_memory = np.cumsum(bucket_size) <= (bucket_rows if memory_rows is None else memory_rows)
        store = BucketStore(work, bucket_of, bucket_size, in_memory)
        max_norm = _fill_buckets(shards, load_changed, k, changed_sizes, store)
        lows = np.searchsorted(bucket_of, np.arange(store.n_buckets))
        highs = np.searchsorted(bucket_of, np.arange(store.n_buckets), side="right")
        for b in progress(range(store.n_buckets), desc="semdedup: changes", unit="bucket"):
            lo, hi = int(lows[b]), int(highs[b])
            before = old.filter(pl.col("cluster").is_between(lo, hi - 1)).collect()
            touched = pl.Series(changed[before["cluster"].to_numpy().astype(np.int64)], dtype=pl.Boolean)
            parts = [before.filter(~touched)]
            bucket = store.take(b)
            if bucket is not None:
                parts.append(_changed_bucket(*bucket, shard_names, is_new, orphans, before.filter(touched),
                                             max_norm, thr, tile, device))
            frame = pl.concat(parts)
            if frame.height:
                yield frame.sort(["cluster", "uid"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
