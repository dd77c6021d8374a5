"""DBP math: d_intra, d_inter, complexity, softmax, M, lower bounds, the quota
QP (against a general solver and an exhaustive integer search), and the
hardest-first selection in numpy and in DuckDB."""

from __future__ import annotations

import itertools
import math

import numpy as np
import polars as pl
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from dbprune_assets.core.method.dbp import (
    cluster_partial_sums,
    cluster_table,
    complexity,
    d_inter,
    d_intra,
    lower_bounds,
    quota_relaxation,
    select_hardest,
    softmax_probabilities,
    solve_quotas,
    ssp_probabilities,
    target_size,
)
from dbprune_assets.core.store.duck import connect, create_view
from dbprune_assets.core.strategies import select_by_quota, strategy_quotas

# ---------------------------------------------------------------------------
# per-cluster statistics
# ---------------------------------------------------------------------------


def test_partial_sums_and_d_intra_by_hand():
    # shard A: cluster 0 gets 0.1, 0.3; cluster 2 gets 0.2
    # shard B: cluster 2 gets 0.4, 0.6; clusters 1 and 3 stay empty
    ca, sa = cluster_partial_sums(np.array([0, 2, 0]), np.array([0.1, 0.2, 0.3], np.float32), 4)
    cb, sb = cluster_partial_sums(np.array([2, 2]), np.array([0.4, 0.6], np.float32), 4)
    count, total = ca + cb, sa + sb
    assert count.tolist() == [2, 0, 3, 0]
    np.testing.assert_allclose(total, [0.4, 0.0, 1.2, 0.0], atol=1e-7)
    di = d_intra(total, count)
    # d_intra = [0.4 / 2, NaN, 1.2 / 3, NaN] = [0.2, NaN, 0.4, NaN]
    np.testing.assert_allclose(di[[0, 2]], [0.2, 0.4], atol=1e-7)
    assert np.isnan(di[[1, 3]]).all()
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        cluster_partial_sums(np.array([4]), np.array([0.1]), 4)


def test_d_inter_2d_by_hand():
    # c0 = (1, 0), c1 = (0, 1), c2 = (-1, 0)
    # distances 1 - c.c': d(0,1) = 1, d(0,2) = 2, d(1,2) = 1
    c = np.array([[1, 0], [0, 1], [-1, 0]], dtype=np.float32)
    np.testing.assert_allclose(d_inter(c, 1), [1.0, 1.0, 1.0])  # nearest other
    np.testing.assert_allclose(d_inter(c, 2), [1.5, 1.0, 1.5])  # (1+2)/2, (1+1)/2, (2+1)/2
    np.testing.assert_allclose(d_inter(c, 20), [1.5, 1.0, 1.5])  # l capped at k-1 = 2


def test_d_inter_3d_by_hand():
    # c0 = (1, 0, 0), c1 = (0.6, 0.8, 0), c2 = (0, 0, 1)
    # c0.c1 = 0.6 -> d = 0.4; c0.c2 = 0 -> d = 1; c1.c2 = 0 -> d = 1
    c = np.array([[1, 0, 0], [0.6, 0.8, 0], [0, 0, 1]], dtype=np.float64)
    np.testing.assert_allclose(d_inter(c, 1), [0.4, 0.4, 1.0])
    np.testing.assert_allclose(d_inter(c, 2), [0.7, 0.7, 1.0])
    np.testing.assert_allclose(d_inter(c, 1, block=1), [0.4, 0.4, 1.0])


def test_d_inter_single_cluster_and_errors():
    assert d_inter(np.array([[0.0, 1.0]]), 20).tolist() == [0.0]
    with pytest.raises(ValueError, match="dbp.l"):
        d_inter(np.eye(3), 0)
    with pytest.raises(ValueError, match="NaN"):
        d_inter(np.array([[np.nan, 1.0], [1.0, 0.0]]), 1)


def test_complexity_empty_cluster_gets_mean_of_others():
    # C = [1*0.5, 2*NaN, 3*0.1] -> [0.5, mean(0.5, 0.3) = 0.4, 0.3]
    np.testing.assert_allclose(complexity(np.array([1.0, 2.0, 3.0]), np.array([0.5, np.nan, 0.1])), [0.5, 0.4, 0.3])
    with pytest.raises(ValueError, match="every cluster empty"):
        complexity(np.ones(2), np.array([np.nan, np.nan]))


def test_softmax_by_hand_and_stable():
    # C / tau = [0, ln 3] -> P = [1/4, 3/4]
    np.testing.assert_allclose(softmax_probabilities(np.array([0.0, 0.1 * math.log(3)]), 0.1), [0.25, 0.75])
    p = softmax_probabilities(np.array([1000.0, 1000.0, -1000.0]), 1e-3)
    np.testing.assert_allclose(p, [0.5, 0.5, 0.0])
    assert np.isfinite(p).all()
    with pytest.raises(ValueError, match="tau"):
        softmax_probabilities(np.ones(2), 0.0)
    np.testing.assert_allclose(ssp_probabilities(4), [0.25] * 4)


def test_target_size():
    assert target_size(10, keep_fraction=0.3) == 3
    assert target_size(100, keep_fraction=0.29) == 29  # float 0.29 * 100 = 28.999...
    assert target_size(10, keep_fraction=1.0) == 10
    assert target_size(10, target_size=7) == 7
    for f in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"keep_fraction.*\(0, 1\]"):
            target_size(10, keep_fraction=f)
    with pytest.raises(ValueError, match=r"target_size=11 exceeds the 10 candidates"):
        target_size(10, target_size=11)
    with pytest.raises(ValueError, match="exactly one"):
        target_size(10)
    with pytest.raises(ValueError, match="exactly one"):
        target_size(10, keep_fraction=0.5, target_size=3)


def test_lower_bounds_by_hand():
    sizes = np.array([0, 1, 2, 10, 100])
    # r = 0: m = 1 -> max(0, min(1, size - 1))
    assert lower_bounds(sizes, 100, 5, 0.0).tolist() == [0, 0, 1, 1, 1]
    # r = 0.5: m = floor(0.5 * 100 / 5) = 10
    assert lower_bounds(sizes, 100, 5, 0.5).tolist() == [0, 0, 1, 9, 10]


# ---------------------------------------------------------------------------
# quotas
# ---------------------------------------------------------------------------


def test_quotas_by_hand():
    big = np.array([100, 100, 100])
    z = np.zeros(3, np.int64)
    # no bound active: N = M P
    assert solve_quotas(np.array([0.5, 0.3, 0.2]), big, 10, z).tolist() == [5, 3, 2]
    # cap on cluster 0: N0 = 3, then 2 + lam + 1 + lam = 7 -> lam = 2 -> [3, 4, 3]
    assert solve_quotas(np.array([0.7, 0.2, 0.1]), np.array([3, 100, 100]), 10, z).tolist() == [3, 4, 3]
    # equal remainders 1/3: the lowest cluster id gets the extra one
    assert solve_quotas(np.full(3, 1 / 3), big, 10, z).tolist() == [4, 3, 3]
    # lower bounds active: 9.8 + lam + 1 + 1 = 10 -> lam = -1.8 -> [8, 1, 1]
    N, lam = quota_relaxation(np.array([0.98, 0.01, 0.01]), big, 10, np.ones(3, np.int64))
    np.testing.assert_allclose(N, [8, 1, 1])
    assert abs(lam + 1.8) < 1e-9
    assert solve_quotas(np.array([0.98, 0.01, 0.01]), big, 10, np.ones(3, np.int64)).tolist() == [8, 1, 1]
    # empty cluster: quota 0 whatever its probability
    assert solve_quotas(np.array([0.6, 0.2, 0.2]), np.array([0, 5, 5]), 4, z).tolist() == [0, 2, 2]


def test_quota_errors_name_the_setting():
    P = np.full(3, 1 / 3)
    with pytest.raises(ValueError, match=r"lower bounds sum to 6 > M=5.*dbp.r"):
        solve_quotas(P, np.array([10, 10, 10]), 5, np.array([2, 2, 2]))
    with pytest.raises(ValueError, match=r"M=31 exceeds the 30 candidates.*keep_fraction"):
        solve_quotas(P, np.array([10, 10, 10]), 31, np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="exceeds its size"):
        solve_quotas(P, np.array([1, 10, 10]), 5, np.array([2, 0, 0]))


def test_relaxation_matches_general_qp_solver():
    from scipy.optimize import minimize

    rng = np.random.default_rng(0)
    for trial in range(12):
        k = int(rng.integers(2, 9))
        sizes = rng.integers(0, 30, k)
        M = int(rng.integers(0, sizes.sum() + 1))
        P = rng.dirichlet(np.full(k, 0.3))
        lb = lower_bounds(sizes, M, k, float(rng.choice([0.0, 0.5, 1.0])))
        if lb.sum() > M:
            continue
        a = M * P
        res = minimize(
            lambda n: 0.5 * np.sum((n - a) ** 2),
            x0=np.clip(np.full(k, M / k), lb, sizes),
            jac=lambda n: n - a,
            bounds=list(zip(lb, sizes)),
            constraints=[{"type": "eq", "fun": lambda n: n.sum() - M, "jac": lambda n: np.ones(k)}],
            method="SLSQP",
            options={"ftol": 1e-12, "maxiter": 500},
        )
        assert res.success, res.message
        N, _ = quota_relaxation(P, sizes, M, lb)
        np.testing.assert_allclose(N, res.x, atol=1e-5)


def _best_integer(P, sizes, M, lb):
    a = M * P
    best = math.inf
    for n in itertools.product(*(range(lo, hi + 1) for lo, hi in zip(lb, sizes))):
        if sum(n) == M:
            best = min(best, float(np.sum((np.array(n) - a) ** 2)))
    return best


def test_integer_quotas_optimal_by_exhaustive_search():
    rng = np.random.default_rng(1)
    checked = 0
    while checked < 25:
        k = int(rng.integers(1, 5))
        sizes = rng.integers(0, 7, k)
        M = int(rng.integers(0, sizes.sum() + 1))
        P = rng.dirichlet(np.ones(k))
        lb = lower_bounds(sizes, M, k, float(rng.choice([0.0, 0.8])))
        if lb.sum() > M:
            continue
        N = solve_quotas(P, sizes, M, lb)
        obj = float(np.sum((N - M * P) ** 2))
        assert obj <= _best_integer(P, sizes, M, lb) + 1e-9
        checked += 1


@st.composite
def _quota_case(draw):
    k = draw(st.integers(1, 12))
    sizes = np.array(draw(st.lists(st.integers(0, 60), min_size=k, max_size=k)), dtype=np.int64)
    w = np.array(draw(st.lists(st.floats(0.0, 10.0), min_size=k, max_size=k)))
    assume(w.sum() > 0)
    P = w / w.sum()
    M = draw(st.integers(0, int(sizes.sum())))
    r = draw(st.sampled_from([0.0, 0.25, 1.0]))
    lb = lower_bounds(sizes, M, k, r)
    assume(lb.sum() <= M)
    return P, sizes, M, lb


@settings(max_examples=150, deadline=None)
@given(_quota_case())
# P_4 exceeds P_3 by less than an ulp of M·P + λ: the float remainders tie, the exact ones do not
@example((np.array([0, 0, 0, 0, 1.95221938e-162, 0, 1.0]), np.array([0, 0, 0, 2, 2, 0, 0]), 3,
          np.array([0, 0, 0, 1, 1, 0, 0])))
def test_quota_properties(case):
    P, sizes, M, lb = case
    N = solve_quotas(P, sizes, M, lb)
    assert N.dtype == np.int64
    assert int(N.sum()) == M  # exactly M
    assert (lb <= N).all() and (N <= sizes).all()
    cont, lam = quota_relaxation(P, sizes, M, lb)
    free = (cont > lb) & (cont < sizes)
    assert (np.abs(N[free] - M * P[free] - lam) < 1 + 1e-9).all()  # M P + lambda within rounding
    assert (np.abs(N - cont) < 1 + 1e-9).all()
    # monotone in P: among clusters with the same bounds, more probability never means a smaller quota
    for i in range(len(P)):
        for j in range(len(P)):
            if sizes[i] == sizes[j] and lb[i] == lb[j] and P[i] > P[j]:
                assert N[i] >= N[j]
    np.testing.assert_array_equal(solve_quotas(P, sizes, M, lb), N)  # deterministic


# ---------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------


def test_select_hardest_by_hand():
    cluster = np.array([0, 0, 0, 0, 1, 1])
    dist = np.array([0.5, 0.9, 0.9, 0.1, 0.2, 0.3], np.float32)
    uids = np.array(["d", "c", "b", "a", "e", "f"])
    # cluster 0 farthest first: (0.9, b), (0.9, c), (0.5, d), (0.1, a); cluster 1: f, e
    assert select_hardest(cluster, dist, uids, np.array([2, 1])).tolist() == [False, True, True, False, False, True]
    assert select_hardest(cluster, dist, uids, np.array([3, 0])).tolist() == [True, True, True, False, False, False]
    with pytest.raises(ValueError, match="quota 3 of cluster 1"):
        select_hardest(cluster, dist, uids, np.array([1, 3]))


def _assignments(n=3000, k=13, seed=0):
    rng = np.random.default_rng(seed)
    return pl.DataFrame(
        {
            "uid": [f"{u:032x}" for u in rng.integers(0, 2**62, n)],
            "shard": [f"{s:05d}" for s in rng.integers(0, 3, n)],
            "row": np.arange(n, dtype=np.int32),
            "cluster": rng.integers(0, k, n).astype(np.int32),
            "distance": np.round(rng.uniform(0, 1, n), 2).astype(np.float32),  # many ties
        }
    )


def test_sql_selection_equals_numpy(tmp_path):
    k = 13
    df = _assignments(k=k)
    for s, part in df.group_by("shard"):
        part.write_parquet(tmp_path / f"{s[0]}.parquet")
    sizes = np.bincount(df["cluster"].to_numpy(), minlength=k)
    quotas = solve_quotas(ssp_probabilities(k), sizes, 1000, lower_bounds(sizes, 1000, k, 0.0))
    keep = select_hardest(df["cluster"].to_numpy(), df["distance"].to_numpy(), df["uid"].to_numpy(), quotas)
    expect = set(df.filter(pl.Series(keep))["uid"])
    assert len(expect) == 1000
    con = connect(tmp_path / "db", "256MB", 1)
    create_view(con, "assign", sorted(tmp_path.glob("*.parquet")), "assignments")
    select_by_quota(con, quotas)
    got = con.execute("SELECT a.uid FROM sel JOIN assign a USING (shard, row)").fetchall()
    assert {u for (u,) in got} == expect and len(got) == 1000
    con.close()


def test_cluster_table_end_to_end():
    rng = np.random.default_rng(0)
    c = rng.normal(size=(6, 4))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    count = np.array([10, 0, 5, 20, 1, 8])
    sums = count * rng.uniform(0.1, 0.5, 6)
    M = target_size(int(count.sum()), keep_fraction=0.5)
    t = cluster_table(c, count, sums, l=20, tau=0.1, M=M, r=0.0)
    assert t.columns == ["cluster", "size", "d_intra", "d_inter", "complexity", "probability", "quota", "lower_bound"]
    assert t["quota"].sum() == M and (t["quota"] <= t["size"]).all()
    assert abs(t["probability"].sum() - 1) < 1e-12
    q, m = strategy_quotas("ssp", t)  # the SSP baseline: same solve, uniform P
    assert m == M and q.sum() == M and (q <= t["size"].to_numpy()).all()
