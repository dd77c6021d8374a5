"""Example images for the UI: a few removed duplicates beside the member they
duplicate, and the members of DBP's most and least complex clusters.

Returns labelled rows of original image bytes (``(label, [bytes, ...])``);
drawing them is the Dagster layer's job (``defs/plots.py``).  Only the wanted
samples' tars are read, and only the wanted members in them.
"""

from __future__ import annotations

from typing import Sequence

from dbprune_assets.core.store.duck import parquet_files
from dbprune_assets.core.store.layout import Layout
from dbprune_assets.core.pool.shards import iter_shard_images
from dbprune_assets.core.method.stages import query_tables

Row = tuple[str, list[bytes]]


def _images(layout: Layout, located: Sequence[tuple[str, str]]) -> dict[tuple[str, str], bytes]:
    """Image bytes of each (shard, key), reading each shard's tar once."""
    wanted: dict[str, set[str]] = {}
    for shard, key in located:
        wanted.setdefault(shard, set()).add(key)
    return {(shard, key): data for shard, keys in wanted.items()
            for key, data in iter_shard_images(layout.shard_tar(shard), keys)}


def duplicate_pairs(layout: Layout, pairs: Sequence[tuple[str, str, str, str]]) -> list[Row]:
    """One row per (uid, shard, duplicate_of, duplicate_of_shard) pair whose two
    images are found: the removed duplicate, then the member it duplicates."""
    if not pairs:
        return []
    shards = sorted({sh for _, sh, _, _ in pairs} | {osh for _, _, _, osh in pairs})
    uids = sorted({u for u, _, _, _ in pairs} | {o for _, _, o, _ in pairs})
    where = {uid: (shard, key) for uid, shard, key in query_tables(
        layout, "SELECT uid, shard, key FROM samples WHERE list_contains($uids, uid)", {"uids": uids},
        {"samples": [p for p in (layout.table("samples", sh) for sh in shards) if p.exists()]})}
    images = _images(layout, list(where.values()))
    rows = []
    for uid, _, other, _ in pairs:
        a, b = images.get(where.get(uid, ("", ""))), images.get(where.get(other, ("", "")))
        if a is not None and b is not None:
            rows.append((f"{uid[:8]} ≈ {other[:8]}", [a, b]))
    return rows


def cluster_members(layout: Layout, clusters: Sequence[int], per_cluster: int = 8) -> list[tuple[int, list[bytes]]]:
    """Up to ``per_cluster`` images of each DBP cluster, nearest to its centroid first."""
    if not clusters:
        return []
    found = query_tables(
        layout,
        """SELECT a.cluster, a.shard, s.key FROM (
               SELECT *, row_number() OVER (PARTITION BY cluster ORDER BY distance, uid) AS r
               FROM assignments WHERE list_contains($clusters, cluster)) a
           JOIN samples s USING (uid)
           WHERE r <= $n""",
        {"clusters": [int(c) for c in clusters], "n": per_cluster},
        {table: parquet_files(layout.table_dir(table)) for table in ("assignments", "samples")})
    images = _images(layout, [(shard, key) for _, shard, key in found])
    return [(c, [images[(shard, key)] for cc, shard, key in sorted(found, key=lambda r: r[2])
                 if cc == c and (shard, key) in images]) for c in clusters]
