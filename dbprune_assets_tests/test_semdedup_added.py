"""SemDeDup after shards were added or removed
(``core/method/semdedup_added.py``): the frames equal a full pass over the
changed pool, duplicates, targets, similarities and per-bucket grouping, also
with exact ties, old members that turn duplicate through a new one, and
members whose target left."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from dbprune_assets.core.method.semdedup import DedupShard, semdedup_pool
from dbprune_assets.core.method.semdedup_added import DedupBasis, changes_since, merge_cluster, semdedup_added


def _pool(seed: int, shards: int = 6, rows: int = 40, k: int = 4, d: int = 16) -> dict[str, DedupShard]:
    """Shards of float16 unit rows around ``k`` directions, with exact copies
    and near copies planted across shards, and distances from a few values
    (ties in the farthest-first order, broken by uid)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    base: list[np.ndarray] = []
    out = {}
    for s in range(shards):
        cl = rng.integers(0, k, rows)
        x = centres[cl] + rng.normal(scale=0.6, size=(rows, d))
        for r in range(rows):  # copies of earlier rows: exact (ties), or nearly
            if base and rng.random() < 0.3:
                src = base[rng.integers(len(base))]
                x[r] = src + (rng.normal(scale=0.01, size=d) if rng.random() < 0.5 else 0.0)
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
        base.extend(x.astype(np.float64))
        c = (x.astype(np.float64) @ (centres / np.linalg.norm(centres, axis=1, keepdims=True)).T).argmax(axis=1)
        dist = rng.choice(np.asarray([0.1, 0.2, 0.3], np.float32), rows)
        uids = np.asarray([f"{seed:02d}{s:02d}{r:04d}" + "0" * 24 for r in range(rows)], dtype=object)
        out[f"{s:05d}"] = DedupShard(f"{s:05d}", uids, x, c.astype(np.int64), dist)
    return out


def _frames(shards: dict[str, DedupShard], names: list[str], k: int, eps: float, tmp: Path, **kw) -> list[pl.DataFrame]:
    sizes = sum(np.bincount(shards[n].cluster, minlength=k) for n in names)
    return [f for f in semdedup_pool(names, shards.__getitem__, k, eps, 8, tmp, cluster_sizes=sizes, **kw) if f.height]


def _only_clusters(s: DedupShard, keep: set[int]) -> DedupShard:
    m = np.isin(s.cluster, list(keep))
    return DedupShard(s.name, s.uids[m], s.emb[m], s.cluster[m], s.distance[m])


def _changed(pool: dict[str, DedupShard], before_names: list[str], after_names: list[str], k: int, eps: float,
             tmp_path: Path, **kw) -> tuple[pl.DataFrame, list[pl.DataFrame], list[pl.DataFrame]]:
    """(the previous table, the full pass's frames over ``after_names``, semdedup_added's)."""
    before = pl.concat(_frames(pool, before_names, k, eps, tmp_path, **kw))
    previous = tmp_path / "previous.parquet"
    before.write_parquet(previous)
    full = _frames(pool, after_names, k, eps, tmp_path, **kw)
    sizes = sum(np.bincount(pool[n].cluster, minlength=k) for n in after_names)
    added = [n for n in after_names if n not in before_names]
    removed = [n for n in before_names if n not in after_names]
    got = [f for f in semdedup_added(after_names, added, removed, pool.__getitem__, previous, k, eps, 8, tmp_path,
                                     cluster_sizes=sizes, **kw) if f.height]
    assert not list(tmp_path.glob("semdedup-added.*"))  # scratch removed
    return before, full, got


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("memory_rows", [None, 0])  # buckets in memory, or all on disk
@pytest.mark.parametrize("reach", ["all", "some"])  # the added rows reach every cluster, or clusters 0 and 2
def test_added_shards_give_the_full_pass_frames(tmp_path: Path, seed: int, memory_rows: int | None, reach: str) -> None:
    k, eps = 4, 0.05
    pool = _pool(seed)
    names = sorted(pool)
    old, added = names[:4], names[4:]
    if reach == "some":  # clusters 1 and 3 gain nothing: their rows come from the previous table
        pool.update({n: _only_clusters(pool[n], {0, 2}) for n in added})
    before, full, got = _changed(pool, old, names, k, eps, tmp_path, bucket_rows=60, memory_rows=memory_rows)
    assert [f.height for f in got] == [f.height for f in full]  # the same groups, so the same parquet row groups
    assert pl.concat(got).equals(pl.concat(full))
    merged = pl.concat(full)
    # the case the shortcut is about: old members that turned duplicate through a new one
    old_uids = set(np.concatenate([pool[n].uids for n in old]).tolist())
    assert merged.filter(pl.col("uid").is_in(list(old_uids - set(before["uid"].to_list())))).height > 0
    if reach == "some":
        assert set(merged.filter(pl.col("cluster").is_in([1, 3]))["uid"]) == \
            set(before.filter(pl.col("cluster").is_in([1, 3]))["uid"]) != set()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("change", ["removed", "added and removed"])
def test_removed_shards_give_the_full_pass_frames(tmp_path: Path, seed: int, change: str) -> None:
    k, eps = 4, 0.05
    pool = _pool(seed)
    names = sorted(pool)
    # shard 0 holds the earliest rows: the targets of many later copies
    before_names, after_names = (names[:5], names[1:5]) if change == "removed" else (names[:5], names[1:])
    before, full, got = _changed(pool, before_names, after_names, k, eps, tmp_path, bucket_rows=60)
    assert [f.height for f in got] == [f.height for f in full]
    assert pl.concat(got).equals(pl.concat(full))
    orphaned = before.filter((pl.col("duplicate_of_shard") == names[0]) & (pl.col("shard") != names[0]))
    assert orphaned.height > 0  # members whose target left were scored again
    assert set(pl.concat(full)["shard"].to_list()).isdisjoint({names[0]})


def test_an_old_duplicate_keeps_the_earlier_target_on_an_exact_tie_and_takes_a_closer_new_one() -> None:
    # positions 0..3 in farthest-first order; rows are float16 unit vectors
    e = np.eye(4, dtype=np.float16)
    rows = np.stack([e[0], e[0], e[0], e[1]]).astype(np.float16)
    keys = np.asarray(["a\ts", "b\ts", "c\ts", "d\ts"])
    new = np.asarray([False, True, False, False])
    # c (old) duplicated a (old, position 0) at 1.0; new b at position 1 ties it: the earlier, a, stays
    previous = {"c\ts": ("a\ts", 1.0)}
    best = np.asarray([-np.inf, 1.0, 1.0, -np.inf])
    first = np.asarray([4, 0, 1, 4])
    out = merge_cluster(rows, new, keys, previous, best, first, 0.9)
    assert out == [(1, 0, 1.0), (2, 0, 1.0)]
    # an old duplicate at 0.95 on record; a new member ahead at 1.0 takes over
    rows2 = np.stack([e[0], e[0], (e[0] * 0.95 + e[1] * 0.3122)]).astype(np.float16)
    s_old = float(rows2[0].astype(np.float64) @ rows2[2].astype(np.float64))
    out = merge_cluster(rows2, np.asarray([False, True, False]), keys[:3], {"c\ts": ("a\ts", s_old)},
                        np.asarray([-np.inf, 1.0, s_old + 0.01]), np.asarray([3, 0, 1]), 0.9)
    assert out == [(1, 0, 1.0), (2, 1, s_old + 0.01)]


def test_a_pass_builds_on_the_last_only_when_nothing_but_shards_came_and_went() -> None:
    prev = DedupBasis(0.07, 10, "fit1", {"a": ("v1", 100), "b": ("v2", 90)})
    grown = DedupBasis(0.07, 10, "fit1", {"a": ("v1", 100), "b": ("v2", 90), "c": ("v3", 80)})
    assert changes_since(prev, grown) == (["c"], [])
    assert changes_since(prev, DedupBasis(0.07, 10, "fit1", {"a": ("v1", 100), "c": ("v3", 80)})) == (["c"], ["b"])
    assert changes_since(None, grown) is None
    assert changes_since(prev, prev) is None  # nothing changed: a forced pass recomputes
    assert changes_since(prev, DedupBasis(0.07, 10, "fit2", grown.shards)) is None  # refit
    assert changes_since(prev, DedupBasis(0.05, 10, "fit1", grown.shards)) is None  # eps
    assert changes_since(prev, DedupBasis(0.07, 10, "fit1", {**grown.shards, "b": ("v2", 89)})) is None  # a row superseded
    assert changes_since(prev, DedupBasis(0.07, 10, "fit1", {**grown.shards, "a": ("v9", 100)})) is None  # re-assigned


def test_the_basis_round_trips_and_a_damaged_file_reads_as_none(tmp_path: Path) -> None:
    basis = DedupBasis(0.07, 10, "fit1", {"a": ("v1", 100)})
    path = tmp_path / "basis.json"
    path.write_text(basis.to_json())
    assert DedupBasis.read(path) == basis
    path.write_text("{not json")
    assert DedupBasis.read(path) is None
    assert DedupBasis.read(tmp_path / "absent.json") is None
