"""What a selected asset would read that is out of date and not selected.

``dbprune run --select pruned_subset`` after a shard left the pool would read
quotas computed over the old pool and the assignments of the new one (a quota
above its cluster's size, or silently mixed decisions).  Before a group
starts, :func:`stale_inputs` lists the parents of its assets that this run
does not select and that are out of date: made, but their inputs or
settings changed since; :func:`refusal` says so and what to select instead.
Only parents count: a current parent is a consistent snapshot even when
something further up is stale.  A parent never made does not count either:
as in Dagster, a step may not need it (precomputed embeddings and the
encoder), and one that does says so itself.
"""

from __future__ import annotations

from typing import Any, Collection, Mapping, Sequence

from dbprune_assets.core.store.layout import UNPARTITIONED


def stale_inputs(versions: Any, nodes: Mapping[str, Any], assets: Sequence[str], partitions: Sequence[str],
                 selected: Collection[str]) -> dict[str, list[str]]:
    """``{parent: its partitions made and out of date}`` over the parents of
    ``assets`` (which run ``partitions``) that are not in ``selected``.  A
    parent partitioned as its child counts over the child's ``partitions``;
    any other, over all its partitions (the child reads them all)."""
    out: dict[str, list[str]] = {}
    for asset in assets:
        for parent in nodes[asset].parents:
            if parent in selected or parent in out or parent not in nodes:
                continue
            kind = nodes[parent].partitioning
            keys = partitions if kind is not None and kind == nodes[asset].partitioning else versions.keys(kind)
            stale = [k for k in keys if versions.data_version(parent, k) is not None
                     and not versions.is_fresh(parent, k)]
            if stale:
                out[parent] = stale
    return out


def refusal(assets: Sequence[str], stale: Mapping[str, Sequence[str]], nodes: Mapping[str, Any]) -> str:
    """The line ``dbprune run`` prints when it will not start ``assets``
    because of their ``stale`` parents (:func:`stale_inputs`), with the
    selection that brings those parents up to date first."""
    def one(parent: str) -> str:
        parts = stale[parent]
        where = "" if list(parts) == [UNPARTITIONED] else f" ({len(parts)} partition(s), e.g. {parts[0]})"
        return f"{parent}{where} is out of date"

    readers = [a for a in assets if set(nodes[a].parents) & set(stale)]
    return (f"{', '.join(readers)} would read inputs that do not match the pool and settings now: "
            f"{'; '.join(one(p) for p in stale)}. Select them too (dbprune run --select "
            f"'{','.join('*' + a for a in readers)}'), or run without --select")
