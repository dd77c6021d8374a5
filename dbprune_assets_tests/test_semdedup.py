"""SemDeDup: the tiled per-cluster rule against the full-matrix reference, the
tie and non-transitivity rules by hand, and the streaming pool driver."""

from __future__ import annotations

import tempfile

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbprune_assets.core.method.semdedup import DUPLICATE_COLUMNS, DedupShard, semdedup_pool
from dbprune_assets.core.method.semdedup_buckets import plan_buckets
from dbprune_assets.core.method.semdedup_kernel import semdedup_bruteforce, semdedup_cluster

EPS = 0.07


def _cluster(n, d=32, seed=0, spread=0.35):
    """One synthetic cluster with planted exact and near duplicates and tied distances."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=d)
    c /= np.linalg.norm(c)
    x = c + spread * rng.normal(size=(n, d))
    if n >= 30:
        x[n // 4 : n // 4 + 6] = x[3]  # 7 exact copies
        x[n // 2 : n // 2 + 4] = x[5] + 1e-3 * rng.normal(size=(4, d))  # near copies
        x[n - 3 :] = x[n - 4]  # copies at the end too
    else:
        x[-1] = x[0]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x = x.astype(np.float16)
    dist = (1 - x.astype(np.float32) @ c.astype(np.float32)).astype(np.float32)
    dist[: n // 5] = dist[0]  # a block of tied distances: order by uid
    dist = np.round(dist, 3).astype(np.float32)  # more ties
    ids = np.array([f"{u:08x}" for u in rng.permutation(n)])
    return x, dist, ids


def _same(a, b):
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("n", [2, 3, 37, 150])
def test_tiled_equals_bruteforce_for_any_tile(n):
    x, dist, ids = _cluster(n, seed=n)
    ref = semdedup_bruteforce(x, dist, ids, EPS)
    if n > 20:
        assert ref[0].sum() >= 5  # the planted duplicates are found
    for tile in sorted({1, 7, max(1, n - 1), n, n + 5, 4096}):
        _same(semdedup_cluster(x, dist, ids, EPS, tile=tile), ref)


def test_loose_eps_many_duplicates_float32_input():
    x, dist, ids = _cluster(120, seed=7, spread=0.08)
    for eps in (0.02, 0.3):
        ref = semdedup_bruteforce(x, dist, ids, eps)
        _same(semdedup_cluster(x, dist, ids, eps, tile=16), ref)
    # float32 input: still the same decisions as the float64 reference
    x32 = x.astype(np.float32)
    ref = semdedup_bruteforce(x32, dist, ids, 0.3)
    got = semdedup_cluster(x32, dist, ids, 0.3, tile=16)
    np.testing.assert_array_equal(got[0], ref[0])


def test_hand_example_farther_member_survives():
    # c is farthest (0.9), then a (0.5), then b (0.2); a == b, c orthogonal
    emb = np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float16)  # a, b, c
    dist = np.array([0.5, 0.2, 0.9], dtype=np.float32)
    ids = np.array(["a", "b", "c"])
    dup, of, sim = semdedup_cluster(emb, dist, ids, EPS, tile=2)
    assert dup.tolist() == [False, True, False]
    assert of.tolist() == [-1, 0, -1]  # b is a duplicate of a (the farther one)
    assert sim[0] == 0.0 and sim[1] == 1.0 and sim[2] == -np.inf  # c comes first: no predecessor


def test_equal_distance_ties_by_uid():
    emb = np.array([[0, 1], [0, 1], [0, 1]], dtype=np.float16)
    dist = np.array([0.3, 0.3, 0.3], dtype=np.float32)
    ids = np.array(["u2", "u0", "u1"])
    dup, of, _ = semdedup_cluster(emb, dist, ids, EPS)
    # order u0, u1, u2: u0 survives; u1 and u2 both point at u0 (first of the equal maxima)
    assert dup.tolist() == [True, False, True]
    assert of.tolist() == [1, -1, 1]


def test_rule_is_pairwise_not_transitive():
    # angles 0, t, 2t with cos t = 0.95 > 0.93 > cos 2t = 0.805
    t = np.arccos(0.95)
    emb = np.array([[np.cos(k * t), np.sin(k * t)] for k in range(3)], dtype=np.float16)
    dist = np.array([0.3, 0.2, 0.1], dtype=np.float32)  # farthest first: 0, 1, 2
    dup, of, sim = semdedup_cluster(emb, dist, np.array(["a", "b", "c"]), EPS)
    assert dup.tolist() == [False, True, True]
    assert of.tolist() == [-1, 0, 1]  # c is a duplicate of b although b itself is one
    assert abs(sim[2] - 0.95) < 2e-3


def test_small_and_bad_inputs():
    for n in (0, 1):
        dup, of, sim = semdedup_cluster(np.ones((n, 4), np.float16), np.zeros(n, np.float32), np.array(["x"] * n), EPS)
        assert len(dup) == n and not dup.any() and (of == -1).all()
    emb = np.ones((3, 4), np.float16)
    emb[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"cluster 12.*NaN/inf.*row 1"):
        semdedup_cluster(emb, np.zeros(3, np.float32), np.array(["a", "b", "c"]), EPS, what="dedup cluster 12")
    with pytest.raises(ValueError, match="eps"):
        semdedup_cluster(np.ones((3, 4), np.float16), np.zeros(3, np.float32), np.array(["a", "b", "c"]), 1.5)


# ---------------------------------------------------------------------------
# the pool driver
# ---------------------------------------------------------------------------


def _pool(k=5, n=400, d=24, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    x[50:60] = x[10]  # duplicates that will land in other shards
    x[200:203] = x[399] + 1e-3 * rng.normal(size=(3, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x = x.astype(np.float16)
    cluster = rng.integers(0, k, n).astype(np.int32)
    cluster[50:60] = cluster[10]
    cluster[200:203] = cluster[399]
    dist = np.round(rng.uniform(0, 1, n), 2).astype(np.float32)  # many ties
    uids = np.array([f"{u:032x}" for u in rng.permutation(10 * n)[:n]])
    cuts = [0, 90, 250, 251, 400]
    shards = {
        f"{i:05d}": DedupShard(f"{i:05d}", uids[a:b], x[a:b], cluster[a:b], dist[a:b])
        for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))
    }
    return shards, (x, cluster, dist, uids)


def _expected(k, x, cluster, dist, uids, eps=EPS):
    rows = []
    for c in range(k):
        m = np.flatnonzero(cluster == c)
        dup, of, sim = semdedup_bruteforce(x[m], dist[m], uids[m], eps)
        for j in np.flatnonzero(dup):
            rows.append((uids[m[j]], c, uids[m[of[j]]], float(sim[j])))
    return sorted(rows)


def _got(frames):
    df = pl.concat(frames) if frames else pl.DataFrame()
    return sorted(zip(df["uid"], df["cluster"], df["duplicate_of"], df["similarity"])) if len(df) else []


def test_pool_matches_per_cluster_reference_and_is_order_independent(tmp_path):
    k = 5
    shards, (x, cluster, dist, uids) = _pool(k)
    expect = _expected(k, x, cluster, dist, uids, eps=0.5)
    assert len(expect) > 20
    names = sorted(shards)
    a = list(semdedup_pool(names, shards.__getitem__, k, 0.5, tile=16, tmp_dir=tmp_path, bucket_rows=60))
    assert _got(a) == expect
    assert all(tuple(f.columns) == DUPLICATE_COLUMNS for f in a)
    # shard column names the right shard
    df = pl.concat(a)
    where = {u: s for s in names for u in shards[s].uids}
    assert all(where[u] == s for u, s in zip(df["uid"], df["shard"]))
    assert all(where[u] == s for u, s in zip(df["duplicate_of"], df["duplicate_of_shard"]))
    # reversed shard order, one big bucket, known sizes: identical frames
    sizes = np.bincount(cluster, minlength=k)
    b = list(semdedup_pool(names[::-1], shards.__getitem__, k, 0.5, tile=1000, tmp_dir=tmp_path, cluster_sizes=sizes))
    assert pl.concat(a).equals(pl.concat(b))
    assert list(tmp_path.iterdir()) == []  # scratch buckets removed


def test_pool_default_eps_planted_duplicates(tmp_path):
    k = 3
    shards, (x, cluster, dist, uids) = _pool(k, seed=1)
    got = _got(list(semdedup_pool(sorted(shards), shards.__getitem__, k, EPS, tile=8, tmp_dir=tmp_path)))
    assert got == _expected(k, x, cluster, dist, uids)
    assert len(got) >= 12  # 10 copies of row 10 (9 flagged + ...) and the near copies of row 399


def test_pool_errors(tmp_path):
    k = 4
    shards, (x, cluster, *_rest) = _pool(k)
    names = sorted(shards)
    stale = np.bincount(cluster, minlength=k)
    stale[0] -= 1
    with pytest.raises(ValueError, match="cluster_sizes"):
        list(semdedup_pool(names, shards.__getitem__, k, EPS, 8, tmp_path, cluster_sizes=stale))
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        list(semdedup_pool(names, shards.__getitem__, 2, EPS, 8, tmp_path))
    bad = dict(shards)
    e = bad["00001"].emb.copy()
    e[7] = 0
    bad["00001"] = DedupShard("00001", bad["00001"].uids, e, bad["00001"].cluster, bad["00001"].distance)
    with pytest.raises(ValueError, match=r"shard 00001.*zero norm.*row 7"):
        list(semdedup_pool(names, bad.__getitem__, k, EPS, 8, tmp_path))


def test_plan_buckets():
    assert plan_buckets(np.array([3, 3, 3, 10, 0, 1]), 6).tolist() == [0, 0, 1, 2, 3, 3]


# ---------------------------------------------------------------------------
# pass 2: buckets regrouped in memory or on disk, small clusters packed
# ---------------------------------------------------------------------------


def _mixed_pool(seed=0, d=16):
    """Three big clusters, many small ones (sizes 1..6), empty ones; exact and near
    copies inside and across clusters, tied distances, uids of varied length and
    non-ASCII (both uid decoders)."""
    rng = np.random.default_rng(seed)
    big = [90, 70, 40]
    small = rng.integers(1, 7, 60).tolist()
    sizes = np.array(big[:1] + small[:25] + [0, 0] + big[1:2] + small[25:] + [0] + big[2:], dtype=np.int64)
    k = len(sizes)
    cluster = np.repeat(np.arange(k), sizes).astype(np.int32)
    n = len(cluster)
    centre = rng.normal(size=(k, d))
    x = centre[cluster] + 0.3 * rng.normal(size=(n, d))
    members = [np.flatnonzero(cluster == c) for c in range(k)]
    for m in members:
        if len(m) >= 2:
            x[m[-1]] = x[m[0]]  # an exact copy in every cluster of >= 2
        if len(m) >= 4:
            x[m[2]] = x[m[1]] + 1e-3 * rng.normal(size=d)  # a near copy
    a, b = members[1], members[2]  # two neighbouring small clusters (packed together)
    x[b[0]] = x[a[0]]  # an exact copy in the other cluster: must not be compared
    big_m = members[0]
    copies = np.concatenate([big_m[5:6], big_m[10:20]])
    x[copies] = x[big_m[5]]  # 11 identical rows
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x = x.astype(np.float16)
    dist = np.round(rng.uniform(0, 1, n), 1).astype(np.float32)  # many tied distances
    dist[b[0]] = 0.0  # last of its cluster: flagged (similarity |x|^2) if it leaked into cluster 1's product
    dist[big_m[5:20]] = dist[big_m[5]]  # the copies tie on distance too: ordered by uid
    uids = np.array([f"{'é' if i % 7 == 0 else ''}u{i * 7919 % 100003}" for i in rng.permutation(n)])
    copy_uids = uids[copies]
    perm = rng.permutation(n)  # rows of a cluster spread over the shards
    x, cluster, dist, uids = x[perm], cluster[perm], dist[perm], uids[perm]
    cuts = [0, 101, 102, 250, n]
    shards = {
        f"{i:05d}": DedupShard(f"{i:05d}", uids[a:b], x[a:b], cluster[a:b], dist[a:b])
        for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))
    }
    return shards, k, (x, cluster, dist, uids), copy_uids


def _via_semdedup_cluster(k, x, cluster, dist, uids, eps, tile):
    """Reference through the per-cluster function (as the pool used to call it)."""
    rows = []
    for c in range(k):
        m = np.flatnonzero(cluster == c)
        dup, of, sim = semdedup_cluster(x[m], dist[m], uids[m], eps, tile=tile)
        rows += [(uids[m[j]], c, uids[m[of[j]]], float(sim[j])) for j in np.flatnonzero(dup)]
    return sorted(rows)


@pytest.mark.parametrize("eps", [EPS, 0.3])
def test_memory_disk_packed_and_unpacked_paths_agree(tmp_path, monkeypatch, eps):
    import dbprune_assets.core.method.semdedup as sd
    import dbprune_assets.core.method.semdedup_kernel as kernel

    shards, k, (x, cluster, dist, uids), copy_uids = _mixed_pool()
    names = sorted(shards)
    expect = _expected(k, x, cluster, dist, uids, eps=eps)
    assert len(expect) > (40 if eps == EPS else 100)
    assert _via_semdedup_cluster(k, x, cluster, dist, uids, eps, tile=8) == expect
    frames = []
    for memory_rows in (0, 150, 10**9):  # all on disk, the first bucket(s) in memory, all in memory
        for pack, max_tile, tile in ((1, 512, 4096), (10**6, 512, 4096), (10**6, 8, 4096), (10**6, 512, 16), (5, 3, 7)):
            monkeypatch.setattr(sd, "_PACK_ROWS", pack)
            monkeypatch.setattr(kernel, "_MAX_TILE", max_tile)
            got = list(
                semdedup_pool(names, shards.__getitem__, k, eps, tile, tmp_path, bucket_rows=120, memory_rows=memory_rows)
            )
            assert _got(got) == expect, (memory_rows, pack, max_tile, tile)
            frames.append(pl.concat(got))
    assert all(f.equals(frames[0]) for f in frames[1:])  # the same frames, row for row
    # the 11 identical rows (tied distances): all but the smallest uid point at it, with similarity |x|^2
    keep = min(copy_uids)
    df = frames[0].filter(pl.col("uid").is_in(list(copy_uids)) & (pl.col("uid") != keep))
    row = x[uids == keep][0].astype(np.float64)
    assert sorted(df["uid"]) == sorted(set(copy_uids) - {keep})
    assert set(df["duplicate_of"]) == {keep} and set(df["similarity"]) == {np.float32(row @ row)}
    # (keep itself may duplicate a farther member, never one of its copies: they all come after it)
    assert not frames[0].filter((pl.col("uid") == keep) & pl.col("duplicate_of").is_in(list(copy_uids))).height
    assert list(tmp_path.iterdir()) == []


def test_packed_clusters_hand_example(tmp_path, monkeypatch):
    import dbprune_assets.core.method.semdedup as sd

    monkeypatch.setattr(sd, "_PACK_ROWS", 100)  # all three clusters in one product
    # cluster 0: a, b identical; cluster 1: c identical to a, e orthogonal; cluster 2: f alone, identical to a
    emb = np.array([[1, 0], [1, 0], [1, 0], [0, 1], [1, 0]], dtype=np.float16)
    uids = np.array(["a", "b", "c", "e", "f"])
    cluster = np.array([0, 0, 1, 1, 2], dtype=np.int32)
    dist = np.array([0.2, 0.4, 0.9, 0.1, 0.5], dtype=np.float32)  # b before a (farther)
    shard = DedupShard("s", uids, emb, cluster, dist)
    df = pl.concat(list(semdedup_pool(["s"], lambda _: shard, 3, EPS, 64, tmp_path)))
    assert df.rows() == [("a", "s", 0, "b", "s", 1.0)]  # only a; c and f match a but sit in other clusters


def test_work_units():
    from dbprune_assets.core.method.semdedup import _work_units

    sizes = np.array([1, 3, 2, 10, 1, 2, 2])
    ends = np.cumsum(sizes)
    units = _work_units(ends - sizes, ends, 5)
    # (0,1) alone: skipped; 3 + 2 rows packed; 10 rows alone; (16,17) skipped; 2 + 2 packed
    assert units == [(1, 6, True), (6, 16, False), (17, 21, True)]
    assert _work_units(ends - sizes, ends, 1) == [(1, 4, False), (4, 6, False), (6, 16, False), (17, 19, False), (19, 21, False)]


def testdecode_uids():
    from dbprune_assets.core.method.semdedup_buckets import decode_uids

    raw = "ab".encode() + "é".encode() + b"xyz"
    assert decode_uids(raw, np.array([2, 2, 3], np.int32)).tolist() == ["ab", "é", "xyz"]
    assert decode_uids("éab".encode(), np.array([2, 2], np.int32)).tolist() == ["é", "ab"]  # same byte length
    assert decode_uids(b"", np.zeros(0, np.int32)).tolist() == []


def test_pool_nan_distance_names_the_cluster(tmp_path):
    emb = np.array([[1, 0], [0, 1], [1, -1]], dtype=np.float16)  # b . c = -1: no duplicate
    uids = np.array(["a", "b", "c"])
    cluster = np.array([0, 1, 1], dtype=np.int32)
    dist = np.array([np.nan, 0.1, 0.2], dtype=np.float32)
    shard = DedupShard("s", uids, emb, cluster, dist)
    # alone in cluster 0: nothing to compare, no error (as before)
    assert list(semdedup_pool(["s"], lambda _: shard, 2, EPS, 8, tmp_path)) == []
    bad = DedupShard("s", uids, emb, cluster, np.array([0.1, np.nan, 0.2], dtype=np.float32))
    with pytest.raises(ValueError, match=r"dedup cluster 1: distances to the centroid hold NaN/inf"):
        list(semdedup_pool(["s"], lambda _: bad, 2, EPS, 8, tmp_path))


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_pool_any_grouping_equals_bruteforce(data):
    """Property: whatever the bucket size, memory share, packing, tiles and
    shard cuts, the pool gives the full-matrix reference (ties everywhere:
    entries in {-1, -.5, 0, .5, 1}, three distance values)."""
    import dbprune_assets.core.method.semdedup as sd
    import dbprune_assets.core.method.semdedup_kernel as kernel

    n = data.draw(st.integers(1, 40))
    d = data.draw(st.integers(2, 6))
    k = data.draw(st.integers(1, 12))
    vals = st.sampled_from([-1.0, -0.5, 0.0, 0.5, 1.0])
    x = np.array(data.draw(st.lists(st.lists(vals, min_size=d, max_size=d), min_size=n, max_size=n)), dtype=np.float16)
    x[~x.any(axis=1), 0] = 1  # no zero rows
    cluster = np.array(data.draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n)), dtype=np.int32)
    dist = np.array(data.draw(st.lists(st.sampled_from([0.0, 0.1, 0.5]), min_size=n, max_size=n)), dtype=np.float32)
    uids = np.array([f"u{i}" for i in data.draw(st.permutations(range(n)))])
    eps = data.draw(st.sampled_from([0.07, 0.3, 0.6]))
    cuts = sorted({0, n, *data.draw(st.lists(st.integers(0, n), max_size=3))})
    shards = {
        f"{i:05d}": DedupShard(f"{i:05d}", uids[a:b], x[a:b], cluster[a:b], dist[a:b])
        for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))
    }
    with pytest.MonkeyPatch.context() as mp, tempfile.TemporaryDirectory() as tmp:
        mp.setattr(sd, "_PACK_ROWS", data.draw(st.integers(1, 64)))
        mp.setattr(kernel, "_MAX_TILE", data.draw(st.integers(1, 64)))
        got = list(
            semdedup_pool(
                sorted(shards), shards.__getitem__, k, eps, data.draw(st.integers(1, 64)), tmp,
                bucket_rows=data.draw(st.integers(1, 50)), memory_rows=data.draw(st.integers(0, 50)),
            )
        )
    assert _got(got) == _expected(k, x, cluster, dist, uids, eps=eps)
