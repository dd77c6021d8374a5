"""k-means helpers: row validation, the stable uid hash, the bounded uniform
sample, spherical k-means and nearest-centroid assignment."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbprune_assets.core.method.kmeans import (
    exact_distances,
    exact_labels,
    l2_normalize_checked,
    nearest_centroid,
    spherical_kmeans,
    uid_hash,
)
from dbprune_assets.core.method.sample import UniformSample


def bounded_uniform_sample(chunks, size: int, seed: int) -> np.ndarray:
    """The sample's embeddings after offering ``chunks`` ((uids, emb[, name]) each) in order."""
    s = UniformSample(size, seed)
    for item in chunks:
        s.add(*item)
    return s.embeddings

# ---------------------------------------------------------------------------
# l2_normalize_checked
# ---------------------------------------------------------------------------


def test_l2_normalize_returns_unit_float32():
    x = np.array([[3.0, 4.0], [0.0, 2.0]], dtype=np.float16)
    y = l2_normalize_checked(x, "shard 00000")
    assert y.dtype == np.float32 and y.flags.c_contiguous
    np.testing.assert_allclose(y, [[0.6, 0.8], [0.0, 1.0]], rtol=1e-6)


def test_l2_normalize_rejects_nan_naming_shard_and_row():
    x = np.ones((4, 3), dtype=np.float32)
    x[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"shard 00007.*NaN/inf.*row 2 \(uid u2\)"):
        l2_normalize_checked(x, "shard 00007", uids=["u0", "u1", "u2", "u3"])
    x[2, 1] = np.inf
    with pytest.raises(ValueError, match="NaN/inf"):
        l2_normalize_checked(x, "shard 00007")


def test_l2_normalize_rejects_zero_norm():
    x = np.ones((3, 3), dtype=np.float16)
    x[1] = 0
    with pytest.raises(ValueError, match=r"shard a.*zero norm.*row 1"):
        l2_normalize_checked(x, "shard a")


# ---------------------------------------------------------------------------
# uid_hash
# ---------------------------------------------------------------------------

_M = (1 << 64) - 1


def _fmix(h: int) -> int:
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & _M
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & _M
    return h ^ (h >> 33)


def _ref_hash(uid: str, seed: int) -> int:
    """The documented definition, scalar Python."""
    b = uid.encode("utf-8").rstrip(b"\0")
    h = _fmix((seed & _M) ^ 0x9E3779B97F4A7C15)
    for i in range(0, len(b), 8):
        h = _fmix(h ^ int.from_bytes(b[i : i + 8].ljust(8, b"\0"), "little"))
    return _fmix(h ^ len(b))


def test_uid_hash_pinned_values():
    # pinned: the random baseline and the k-means sample depend on these never changing
    got = uid_hash(["", "a", "0123456789abcdef0123456789abcdef", "é-key/42"], 0)
    assert got.dtype == np.uint64
    assert [int(v) for v in got] == [0x6393D51C06C618DC, 0x3164847B12F70B65, 0xC1CC1E0CC1139647, 0xA6AED9158E3921D7]
    assert int(uid_hash(["a"], 1)[0]) == 0x644EB670DF2C8FA3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(min_size=0, max_size=40).filter(lambda s: "\0" not in s), min_size=1, max_size=20), st.integers(-(2**63), 2**64 - 1))
def test_uid_hash_matches_definition_and_batching(uids, seed):
    got = uid_hash(uids, seed)
    assert [int(v) for v in got] == [_ref_hash(u, seed) for u in uids]
    # independent of batch composition and of the array type
    np.testing.assert_array_equal(uid_hash(uids, seed, batch=1), got)
    np.testing.assert_array_equal(uid_hash(np.array(uids, dtype=object), seed), got)


def test_uid_hash_seed_changes_and_bits_uniform():
    uids = [f"{i:032x}" for i in range(20000)]
    a, b = uid_hash(uids, 0), uid_hash(uids, 1)
    assert (a != b).mean() > 0.999
    assert len(np.unique(a)) == len(uids)
    top = (a >> np.uint64(63)).astype(float).mean()
    assert 0.48 < top < 0.52


# ---------------------------------------------------------------------------
# bounded uniform sample
# ---------------------------------------------------------------------------


def _pool(n=600, d=8, seed=0):
    rng = np.random.default_rng(seed)
    uids = np.array([f"{x:032x}" for x in rng.integers(0, 2**62, n)])
    emb = rng.normal(size=(n, d)).astype(np.float16)
    return uids, emb


def test_uniform_sample_is_smallest_hashes_and_order_independent():
    uids, emb = _pool()
    size, seed = 50, 3
    h = uid_hash(uids, seed)
    expect = np.lexsort((uids, h))[:size]
    # chunks in several orders / cuts
    cuts = [(0, 100), (100, 350), (350, 600)]
    res = []
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        res.append(bounded_uniform_sample(((uids[a:b], emb[a:b]) for a, b in (cuts[i] for i in order)), size, seed))
    one = bounded_uniform_sample([(uids, emb)], size, seed)
    for r in res + [one]:
        np.testing.assert_array_equal(r, emb[expect])
        assert r.dtype == np.float16


def test_uniform_sample_lazy_loader_reads_only_candidates():
    uids, emb = _pool(1000)
    calls = []

    def loader(a, b):
        def f(idx):
            assert np.all(np.diff(idx) > 0) and idx.dtype == np.int64
            calls.append(len(idx))
            return emb[a:b][idx]

        return f

    s = UniformSample(20, 0)
    for a in range(0, 1000, 100):
        s.add(uids[a : a + 100], loader(a, a + 100), name=f"shard {a}")
    assert len(s) == 20 and calls[0] == 20
    assert sum(calls[1:]) < 9 * 100 / 2  # later shards contribute only rows that beat the current sample
    expect = np.lexsort((uids, uid_hash(uids, 0)))[:20]
    np.testing.assert_array_equal(s.embeddings, emb[expect])
    np.testing.assert_array_equal(s.uids, uids[expect])


@settings(max_examples=30, deadline=None)
@given(size=st.integers(1, 80), cuts=st.lists(st.integers(0, 300), max_size=6), seed=st.integers(0, 2**31),
       ask=st.lists(st.integers(0, 10**6), max_size=30))
def test_uniform_sample_by_reference_is_the_sample_by_value(size: int, cuts: list[int], seed: int, ask: list[int]):
    """add_refs keeps the same rows in the same order as add; rows(idx) reads
    only the rows asked for (one read per chunk, row numbers ascending) and
    keeps no reader of a chunk that has no row left in the sample."""
    uids, emb = _pool(300)
    bounds = [0, *sorted(cuts), 300]
    by_value, by_ref = UniformSample(size, seed), UniformSample(size, seed)
    reads: list[tuple[int, int]] = []

    def reader(lo: int):
        def read(numbers: np.ndarray) -> np.ndarray:
            assert numbers.dtype == np.int64 and (np.diff(numbers) > 0).all()
            reads.append((lo, len(numbers)))
            return emb[numbers]  # row numbers are the pool's here

        return read

    for a, b in zip(bounds[:-1], bounds[1:]):
        by_value.add(uids[a:b], emb[a:b], name=f"shard {a}")
        by_ref.add_refs(uids[a:b], np.arange(a, b), reader(a), name=f"shard {a}")
    assert not reads  # nothing read while offering
    assert by_ref.seen == by_value.seen == 300 and len(by_ref) == len(by_value)
    np.testing.assert_array_equal(by_ref.uids, by_value.uids)
    idx = np.unique(np.array(ask, dtype=np.int64) % len(by_value))
    np.testing.assert_array_equal(by_ref.rows(idx), by_value.embeddings[idx])
    assert sum(n for _, n in reads) == len(idx) and len({lo for lo, _ in reads}) == len(reads)
    np.testing.assert_array_equal(by_ref.embeddings, by_value.embeddings)
    live = {lo for lo, hi in zip(bounds[:-1], bounds[1:]) if np.isin(by_value.uids, uids[lo:hi]).any()}
    assert len(by_ref._readers) == len(live)


def test_uniform_sample_by_reference_checks_the_rows_it_reads():
    uids, emb = _pool(40)
    emb = emb.astype(np.float32)
    emb[7] = np.nan
    s = UniformSample(40, 0)
    s.add_refs(uids, np.arange(40), lambda numbers: emb[numbers], name="shard 00007")
    with pytest.raises(ValueError, match="shard 00007"):
        s.rows(np.arange(40))
    with pytest.raises(ValueError, match="not both"):
        s.add(uids, emb)


def test_uniform_sample_small_pool_and_bad_rows():
    uids, emb = _pool(10)
    assert bounded_uniform_sample([(uids, emb)], 100, 0).shape == (10, 8)
    bad = emb.astype(np.float32)
    bad[:] = np.nan
    with pytest.raises(ValueError, match="shard 00003.*NaN"):
        bounded_uniform_sample([(uids, bad, "shard 00003")], 5, 0)
    with pytest.raises(ValueError, match="empty"):
        UniformSample(3, 0).embeddings


# ---------------------------------------------------------------------------
# spherical k-means
# ---------------------------------------------------------------------------


def _blobs(n_per=100, k=5, d=16, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = np.repeat(centers, n_per, axis=0) + noise * rng.normal(size=(k * n_per, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16), centers


def test_spherical_kmeans_recovers_blobs_and_is_deterministic():
    x, centers = _blobs()
    c1 = spherical_kmeans(x, 5, niter=20, seed=1, use_gpu=False)
    c2 = spherical_kmeans(x, 5, niter=20, seed=1, use_gpu=False)
    assert c1.dtype == np.float32 and c1.shape == (5, 16)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_allclose(np.linalg.norm(c1, axis=1), 1, atol=1e-6)
    best = (centers @ c1.T).max(axis=1)
    assert (best > 0.99).all()


def test_spherical_kmeans_subsamples_deterministically():
    x, _ = _blobs(n_per=200, k=3)
    a = spherical_kmeans(x, 3, niter=5, seed=0, use_gpu=False, max_points_per_centroid=50)
    b = spherical_kmeans(x, 3, niter=5, seed=0, use_gpu=False, max_points_per_centroid=50)
    np.testing.assert_array_equal(a, b)


def test_spherical_kmeans_errors():
    x, _ = _blobs(n_per=2, k=3)
    with pytest.raises(ValueError, match=r"k=7 exceeds the 6 samples.*lower dbp.k / semdedup.dedup_k"):
        spherical_kmeans(x, 7, niter=2, seed=0, use_gpu=False)
    with pytest.raises(ValueError, match="k=0"):
        spherical_kmeans(x, 0, niter=2, seed=0, use_gpu=False)
    bad = x.astype(np.float32)
    bad[4, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN/inf.*row 4"):
        spherical_kmeans(bad, 2, niter=2, seed=0, use_gpu=False)
    bad[4] = 0
    with pytest.raises(ValueError, match="zero norm"):
        spherical_kmeans(bad, 2, niter=2, seed=0, use_gpu=False)


# ---------------------------------------------------------------------------
# nearest centroid
# ---------------------------------------------------------------------------


def test_nearest_centroid_matches_bruteforce_any_chunk():
    x, _ = _blobs(n_per=40, k=4, noise=0.5)
    rng = np.random.default_rng(1)
    c = rng.normal(size=(7, 16)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    xn = x.astype(np.float32) / np.linalg.norm(x.astype(np.float32), axis=1, keepdims=True)
    s = xn @ c.T
    ref_c, ref_d = s.argmax(1), 1 - s.max(1)
    outs = [nearest_centroid(x, c, chunk=ch, use_gpu=False) for ch in (1, 7, 10_000)]
    for cl, dist in outs:
        assert cl.dtype == np.int32 and dist.dtype == np.float32
        np.testing.assert_array_equal(cl, ref_c)
        np.testing.assert_allclose(dist, ref_d, atol=2e-6)
    for cl, dist in outs[1:]:
        np.testing.assert_array_equal(cl, outs[0][0])
        np.testing.assert_array_equal(dist, outs[0][1])


def test_stored_distance_is_exact_whatever_searched():
    """The distance stored is 1 - x·c of the chosen cluster in float64, rounded
    once: a search on another device (here: a float32 matmul, as a GPU or bf16
    kernel would differ in its last bits) yields bit-identical distances."""
    x, _ = _blobs(n_per=50, k=4, noise=0.5)
    rng = np.random.default_rng(2)
    c = rng.normal(size=(6, 16)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    cl, dist = nearest_centroid(x.astype(np.float16), c, use_gpu=False)
    xn = l2_normalize_checked(x.astype(np.float16), "x")
    exact = (1.0 - np.einsum("ij,ij->i", xn.astype(np.float64), c[cl].astype(np.float64))).astype(np.float32)
    np.testing.assert_array_equal(dist, exact)
    other = (xn @ c.T).argmax(1)  # another kernel's choice of the same clusters
    np.testing.assert_array_equal(exact_distances(xn, c, other), dist)


def test_nearest_centroid_ties_lowest_id():
    # x exactly between two orthogonal centroids: equal scores, lowest id wins
    x = np.array([[1.0, 1.0, 0.0]] * 3, dtype=np.float32)
    for c in ([[0, 1, 0], [1, 0, 0], [0, 0, 1]], [[0, 0, 1], [1, 0, 0], [0, 1, 0]]):
        cl, dist = nearest_centroid(x, np.array(c, dtype=np.float32), use_gpu=False)
        expect = 0 if c[0] != [0, 0, 1] else 1
        assert (cl == expect).all()
        np.testing.assert_allclose(dist, 1 - 1 / np.sqrt(2), rtol=1e-6)
    # duplicated centroids: the first copy
    c = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0], [1, 0, 0], [1, 0, 0]], dtype=np.float32)
    cl, dist = nearest_centroid(np.array([[1, 0.1, 0]], dtype=np.float32), c, use_gpu=False)
    assert cl[0] == 1


def test_nearest_centroid_rejects_bad_rows():
    x = np.ones((5, 3), dtype=np.float16)
    x[3] = 0
    c = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match=r"shard 9: 1 of 2 embedding rows have zero norm \(first: row 3\)"):
        nearest_centroid(x, c, chunk=2, use_gpu=False, what="shard 9")


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.lists(st.integers(0, 30), min_size=1, max_size=25).filter(lambda c: sum(c) > 0),
       st.integers(0, 3))
def test_uniform_sample_is_the_smallest_hashes_whatever_the_chunking(size: int, chunk_sizes: list[int], seed: int):
    """Chunks wait and merge together: the sample is still exactly the ``size``
    rows with the smallest (uid_hash, uid), each with its own embedding."""
    n = sum(chunk_sizes)
    uids = np.array([f"u{i}" for i in range(n)])
    emb = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32) + 1
    s = UniformSample(size, seed)
    start = 0
    for m in chunk_sizes:
        s.add(uids[start : start + m], emb[start : start + m])
        start += m
    h = uid_hash(uids, seed)
    want = np.lexsort((uids.astype("S"), h))[:size]
    assert s.uids.tolist() == uids[want].tolist() and s.seen == n
    np.testing.assert_array_equal(s.embeddings, emb[want])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(1, 40), m=st.integers(1, 6), seed=st.integers(0, 2**16),
       grid=st.booleans())
def test_cpu_shortlist_is_faiss_flat_search(n: int, k: int, m: int, seed: int, grid: bool):
    """The CPU's shortlist (numpy sgemm + m argmax passes) holds faiss'
    IndexFlatIP candidates: the same m best, best first, scores within the
    float32 bound; on coarse grid data (many exact ties) the lowest id comes
    first among equal scores, and the exact labels are faiss' labels."""
    import faiss

    from dbprune_assets.core.method.kmeans_exact import score_tolerance
    from dbprune_assets.core.method.kmeans_search import top_candidates

    rng = np.random.default_rng(seed)
    draw = (lambda *s: rng.integers(-2, 3, size=s).astype(np.float32)) if grid else (
        lambda *s: rng.normal(size=s).astype(np.float32))
    x, c = draw(n, 8), draw(k, 8)
    x[~np.abs(x).sum(1).astype(bool)] = 1.0
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    scores, ids = top_candidates(x, np.ascontiguousarray(c.T), m)
    index = faiss.IndexFlatIP(8)
    index.add(c)
    fs, fi = index.search(x, min(m, k))
    assert ids.shape == fi.shape and scores.dtype == np.float32 and ids.dtype == np.int64
    tol = score_tolerance(8) * max(1.0, float(np.linalg.norm(c, axis=1).max()))
    np.testing.assert_allclose(scores, fs, atol=tol)
    exact = x.astype(np.float64) @ c.T.astype(np.float64)
    np.testing.assert_array_equal(np.sort(exact, axis=1)[:, ::-1][:, : ids.shape[1]],
                                  np.take_along_axis(exact, ids, 1))  # the m best (grid: exact in float32)
    if grid:  # equal scores: ascending ids
        same = scores[:, 1:] == scores[:, :-1]
        assert (ids[:, 1:][same] > ids[:, :-1][same]).all()
    if k > 1 and m > 1:
        faiss_labels = exact_labels(x, c, fs, fi)
        np.testing.assert_array_equal(nearest_centroid(x, c, use_gpu=False)[0], faiss_labels)
