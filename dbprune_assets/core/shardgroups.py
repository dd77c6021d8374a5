"""Shard groups: the partitions of the per-shard assets.

Dagster advises at most ~100k partitions per asset and its UI slows well
before; LAION-2B at 10k samples per shard is 230k shards.  So a pool's shards
map to partitions in contiguous groups: up to :data:`MAX_PARTITIONS` shards
each shard is its own partition (the key is the shard's name); above, each
partition is a run of ``size`` consecutive shards (in sorted order) named
``<first>..<last>``, so a user finds a shard's partition by its name (the one
whose range holds it; :func:`partition_of`).  A key means every pool shard in
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
SEP = ".."

GroupSize = int | Literal["auto"]


def group_size(n_shards: int, setting: GroupSize = "auto") -> int:
    """Shards per partition: ``setting``, or for ``auto`` the least size that
    keeps the pool at most :data:`MAX_PARTITIONS` partitions (1 up to that)."""
    if setting != "auto":
        return int(setting)
    return max(1, math.ceil(n_shards / MAX_PARTITIONS))


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
