"""Shard groups: the partitions of the per-shard assets.

Dagster advises at most ~100k partitions per asset and its UI slows well
before; LAION-2B at 10k samples per shard is 230k shards.  So a pool's shards
map to partitions in contiguous groups.  With ``auto`` (:func:`group_size`)
each shard is its own partition (the key is the shard's name) unless the pool
has more than :data:`MAX_PARTITIONS` shards, or more than
:data:`GROUP_FROM_SHARDS` shards of fewer than :data:`MIN_ROWS_PER_PARTITION`
rows: Dagster's bookkeeping costs tens of milliseconds per partition and
asset, whatever the partition holds, which dwarfs the compute of a shard of a
few hundred rows (docs/design.md, "Scale").  Then each partition is a run of
``size`` consecutive shards (in sorted order) named ``<first>..<last>``, so a
user finds a shard's partition by its name (the one whose range holds it;
:func:`partition_of`).  A key means every pool shard in
its inclusive range, so a shard inserted inside a range joins that group and
appended shards form new groups at the end; the per-shard files and commit
markers do not depend on the grouping, so changing it redoes nothing.
"""

from __future__ import annotations

import bisect
import math
from typing import Literal, Sequence

#: the most partitions ``auto`` grouping gives a pool (docs/design.md, "Scale")
MAX_PARTITIONS = 10_000
#: ``auto`` groups small shards only in pools of more shards than this (below it
#: the per-partition cost is minutes at most, and a partition per shard reads best)
GROUP_FROM_SHARDS = 256
#: ``auto``'s least rows per partition when it groups small shards (DataComp's and
#: img2dataset's default shards hold 10,000 samples: one shard per partition)
MIN_ROWS_PER_PARTITION = 10_000
SEP = ".."

GroupSize = int | Literal["auto"]


def group_size(n_shards: int, setting: GroupSize = "auto", rows_per_shard: float | None = None) -> int:
    """Shards per partition: ``setting``, or for ``auto`` the larger of

    * the least size that keeps the pool at most :data:`MAX_PARTITIONS` partitions;
    * in a pool of more than :data:`GROUP_FROM_SHARDS` shards of (typically)
      ``rows_per_shard`` rows, the least power of two that gives a partition at
      least :data:`MIN_ROWS_PER_PARTITION` rows: a power of two so that a drift
      of the estimate as the pool grows rarely changes the grouping.

    1 for pools of standard 10k-sample shards and for pools of at most
    :data:`GROUP_FROM_SHARDS` shards."""
    if setting != "auto":
        return int(setting)
    size = max(1, math.ceil(n_shards / MAX_PARTITIONS))
    if rows_per_shard is not None and n_shards > GROUP_FROM_SHARDS and rows_per_shard < MIN_ROWS_PER_PARTITION:
        by_rows = 1 << max(0, math.ceil(math.log2(MIN_ROWS_PER_PARTITION / max(rows_per_shard, 1.0))))
        size = max(size, by_rows)
    return size


def typical_rows(row_counts: Sequence[int]) -> float | None:
    """The median of some shards' row counts (None without any): the
    ``rows_per_shard`` of :func:`group_size`."""
    if not row_counts:
        return None
    ordered = sorted(row_counts)
    mid = len(ordered) // 2
    return float(ordered[mid]) if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def spread_sample(items: Sequence[str], n: int) -> list[str]:
    """Up to ``n`` of ``items`` evenly spread from first to last (all when fewer)."""
    if len(items) <= n:
        return list(items)
    step = (len(items) - 1) / (n - 1)
    return [items[round(i * step)] for i in range(n)]


def partition_keys(shards: Sequence[str], size: int) -> list[str]:
    """The partition keys of the sorted ``shards`` in groups of ``size``."""
    shards = sorted(shards)
    if size <= 1:
        return list(shards)
    return [f"{chunk[0]}{SEP}{chunk[-1]}" if len(chunk) > 1 else chunk[0]
            for chunk in (shards[i : i + size] for i in range(0, len(shards), size))]


def bounds(key: str) -> tuple[str, str]:
    """The inclusive shard range of a partition key."""
    first, sep, last = key.partition(SEP)
    return (first, last) if sep else (key, key)


def shards_of(keys: Sequence[str], shards: Sequence[str]) -> list[str]:
    """The shards (of the sorted pool listing ``shards``) in the partitions ``keys``, in order, each once."""
    out: list[str] = []
    seen: set[str] = set()
    for key in keys:
        lo, hi = bounds(key)
        for shard in shards[bisect.bisect_left(shards, lo) : bisect.bisect_right(shards, hi)]:
            if shard not in seen:
                seen.add(shard)
                out.append(shard)
    return out


def partition_of(shard: str, keys: Sequence[str]) -> str | None:
    """The key (of the sorted partition ``keys``) whose range holds ``shard``."""
    i = bisect.bisect_right([bounds(k)[0] for k in keys], shard) - 1
    if i >= 0 and bounds(keys[i])[0] <= shard <= bounds(keys[i])[1]:
        return keys[i]
    return None
