"""Selection strategies: exact decisions on a hand-made pool, reason
precedence, determinism, error cases, and a property test on random tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbprune_assets.core.store.duck import arrow_schema, connect
from dbprune_assets.core.strategies import (
    REASONS,
    decide,
    kept_per_cluster,
    quota_table,
    strategy_quotas,
)
from dbprune_assets.core.method.kmeans import uid_hash

# ---------------------------------------------------------------------------
# the hand-made pool: 2 shards x 10 rows
# ---------------------------------------------------------------------------
# (shard, row, uid, status).  s0 rows 0 and 6 carry uids u06 / u00 on purpose:
# their DBP distances tie, so "ties by uid" and "ties by row" disagree.
SAMPLES = [
    ("s0", 0, "u06", "ok"),
    ("s0", 1, "u01", "failed_download"),
    ("s0", 2, "u02", "ok"),
    ("s0", 3, "u03", "ok"),
    ("s0", 4, "u04", "undecodable"),
    ("s0", 5, "u05", "ok"),
    ("s0", 6, "u00", "ok"),
    ("s0", 7, "u07", "missing_in_tar"),
    ("s0", 8, "u08", "ok"),
    ("s0", 9, "u09", "ok"),
    ("s1", 0, "u10", "ok"),
    ("s1", 1, "u11", "empty_caption"),
    ("s1", 2, "u12", "ok"),
    ("s1", 3, "u13", "ok"),
    ("s1", 4, "u14", "truncated_tar"),
    ("s1", 5, "u15", "ok"),
    ("s1", 6, "u16", "ok"),
    ("s1", 7, "u17", "ok"),
    ("s1", 8, "u18", "ok"),
    ("s1", 9, "u19", "ok"),
]
CORRUPT = {"u01", "u04", "u07", "u11", "u14"}
# u04 is corrupt AND listed as a duplicate: corrupt wins
DUPLICATES = [("u03", "s0", "u02"), ("u12", "s1", "u10"), ("u17", "s1", "u16"), ("u04", "s0", "u02")]
SCORES = {
    "u00": 0.30, "u02": 0.25, "u03": 0.40, "u05": 0.10, "u06": 0.28, "u08": 0.28, "u09": 0.05,
    "u10": 0.35, "u12": 0.50, "u13": 0.22, "u15": 0.31, "u16": 0.28, "u17": 0.90, "u18": 0.15, "u19": 0.26,
}
LOW = {"u05", "u09", "u18"}  # dedup survivors below the CLIP threshold 0.2
# candidates (dedup survivors with score >= 0.2) and their DBP cluster / distance
ASSIGN = {
    "u00": (0, 0.5), "u06": (0, 0.5), "u02": (0, 0.3), "u13": (0, 0.1),
    "u10": (1, 0.4), "u15": (1, 0.4), "u08": (1, 0.2),
    "u16": (2, 0.7), "u19": (2, 0.6),
}
CANDIDATES = set(ASSIGN)
UID_LOC = {uid: (shard, row) for shard, row, uid, _ in SAMPLES}


def _write(tables: Path, table: str, name: str, columns: dict[str, list]) -> None:
    """``tables/<table>/<name>.parquet`` holding ``columns``, typed by the schema table."""
    schema = arrow_schema(table)
    pq.write_table(pa.table(columns, schema=pa.schema([schema.field(c) for c in columns])),
                   tables / table / f"{name}.parquet")


def write_tables(root: Path, samples, duplicates, scores: dict, assign: dict) -> Path:
    """Write the input tables in their contract schemas under ``root/tables``."""
    tables = root / "tables"
    shards = sorted({s for s, *_ in samples})
    for name in ("samples", "scores", "candidates", "assignments", "duplicates"):
        (tables / name).mkdir(parents=True, exist_ok=True)
    for shard in shards:
        rows = [r for r in samples if r[0] == shard]
        _write(tables, "samples", shard, {
            "uid": [r[2] for r in rows], "shard": [shard] * len(rows), "key": [f"{shard}_{r[1]:04d}" for r in rows],
            "row": [r[1] for r in rows], "caption": [f"caption {r[2]}" for r in rows], "width": [32] * len(rows),
            "height": [32] * len(rows), "status": [r[3] for r in rows],
        })
        sc = [r for r in rows if r[2] in scores]
        _write(tables, "scores", shard, {
            "uid": [r[2] for r in sc], "shard": [shard] * len(sc), "clip_score": [scores[r[2]] for r in sc]})
        ca = [r for r in rows if r[2] in assign]
        keys = {"uid": [r[2] for r in ca], "shard": [shard] * len(ca), "row": [r[1] for r in ca]}
        _write(tables, "candidates", shard, {**keys, "clip_score": [scores[r[2]] for r in ca]})
        _write(tables, "assignments", shard, {
            **keys, "cluster": [assign[r[2]][0] for r in ca], "distance": [assign[r[2]][1] for r in ca]})
    _write(tables, "duplicates", "all", {
        "uid": [d[0] for d in duplicates], "shard": [d[1] for d in duplicates],
        "duplicate_of": [d[2] for d in duplicates], "similarity": [0.99] * len(duplicates),
    })
    return tables


@pytest.fixture()
def pool(tmp_path: Path) -> Path:
    return write_tables(tmp_path, SAMPLES, DUPLICATES, SCORES, ASSIGN)


def run(tables: Path, strategy: str, M=None, quotas=None, seed=0, name=None):
    out = tables / "decisions" / f"{name or strategy}.parquet"
    summary = decide(strategy, tables, M, quotas, seed, out, tables.parent / ".tmp", memory_limit="256MB", threads=1)
    return summary, pq.read_table(out).to_pylist()


def expected_reason(uid: str, kept: set[str]) -> str:
    if uid in kept:
        return "kept"
    if uid in CORRUPT:
        return "corrupt"
    if uid in {d[0] for d in DUPLICATES}:
        return "duplicate"
    if uid not in CANDIDATES:
        return "low_clip_score"
    return "pruned"


def check_exact(rows: list[dict], strategy: str, kept: set[str]) -> None:
    # one row per samples row, in (shard, row) order, the exact columns
    assert [(r["shard"], r["uid"]) for r in rows] == [(s, u) for s, _, u, _ in SAMPLES]
    assert list(rows[0]) == ["strategy", "uid", "shard", "keep", "reason", "run_id", "fit_id"]
    assert {r["strategy"] for r in rows} == {strategy}
    assert {r["uid"] for r in rows if r["keep"]} == kept
    for r in rows:
        assert r["reason"] == expected_reason(r["uid"], kept), r


# ---------------------------------------------------------------------------
# exact decisions, hand-computed
# ---------------------------------------------------------------------------
def test_dbp_keeps_farthest_with_uid_ties(pool: Path) -> None:
    # cluster 0: u00 / u06 tie at 0.5 -> u00 (smaller uid, though a later row)
    summary, rows = run(pool, "dbp", 5, np.array([1, 2, 2]))
    check_exact(rows, "dbp", {"u00", "u10", "u15", "u16", "u19"})
    assert summary.reasons == {"corrupt": 5, "duplicate": 3, "low_clip_score": 3, "pruned": 4, "kept": 5}
    assert summary.rows == 20 and summary.kept == 5 and summary.eligible == 9 and summary.M == 5
    assert summary.per_cluster_kept.tolist() == [1, 2, 2]
    t = summary.quota_table().to_pylist()
    assert t == [
        {"strategy": "dbp", "cluster": 0, "quota": 1, "kept": 1},
        {"strategy": "dbp", "cluster": 1, "quota": 2, "kept": 2},
        {"strategy": "dbp", "cluster": 2, "quota": 2, "kept": 2},
    ]
    # the SQL recount from the written file agrees
    again = kept_per_cluster(summary.path, pool, 3, pool.parent / ".tmp")
    assert again.tolist() == [1, 2, 2]


def test_ssp_and_default_m(pool: Path) -> None:
    # cluster 1: u10 / u15 tie at 0.4 -> u10; M defaults to sum(quotas)
    summary, rows = run(pool, "ssp", None, [2, 1, 2])
    check_exact(rows, "ssp", {"u00", "u06", "u10", "u16", "u19"})
    assert summary.M == 5 and summary.per_cluster_kept.tolist() == [2, 1, 2]


def test_dbp_zero_quota_cluster(pool: Path) -> None:
    summary, rows = run(pool, "dbp", 4, np.array([4, 0, 0], dtype=np.int64))
    check_exact(rows, "dbp", {"u00", "u06", "u02", "u13"})
    assert summary.reasons["pruned"] == 5


def test_random_is_m_smallest_hash(pool: Path) -> None:
    cands = sorted(CANDIDATES)
    for seed in (0, 7):
        expect = {u for _, u in sorted(zip(uid_hash(np.array(cands, dtype=object), seed).tolist(), cands))[:4]}
        summary, rows = run(pool, "random", 4, seed=seed, name=f"random{seed}")
        check_exact(rows, "random", expect)
        assert summary.eligible == 9


def test_sql_uid_hash_is_kmeans_uid_hash(tmp_path: Path) -> None:
    uids = ["abc", "u00", "0123456789abcdef0123456789abcdef", "ünï", "", "x" * 40]
    con = connect(tmp_path / "db", "128MB", 1)
    for seed in (0, 3, -2):
        got = con.execute(
            "SELECT uid_hash(u, $2) FROM (SELECT unnest($1::VARCHAR[]) AS u, generate_subscripts($1::VARCHAR[], 1) AS i) ORDER BY i",
            [uids, seed],
        ).fetchall()
        assert [r[0] for r in got] == uid_hash(np.array(uids, dtype=object), seed).tolist()
    con.close()


def test_clip_score_top_m_ties_by_uid(pool: Path) -> None:
    # .35 u10, .31 u15, .30 u00, then u06 / u08 / u16 tie at .28 -> u06
    summary, rows = run(pool, "clip_score", 4)
    check_exact(rows, "clip_score", {"u10", "u15", "u00", "u06"})
    assert summary.eligible == 12  # dedup survivors, not only candidates


def test_clip_score_can_reach_below_the_candidate_threshold(pool: Path) -> None:
    # M = 11 of the 12 dedup survivors: everything but the lowest score (u09)
    survivors = {u for u in SCORES if u not in {"u03", "u12", "u17"}}
    _, rows = run(pool, "clip_score", 11)
    check_exact(rows, "clip_score", survivors - {"u09"})
    assert {r["uid"]: r["reason"] for r in rows}["u09"] == "low_clip_score"


def test_semdedup_and_full(pool: Path) -> None:
    s, rows = run(pool, "semdedup", M=123)  # M is ignored
    check_exact(rows, "semdedup", CANDIDATES)
    assert s.reasons == {"corrupt": 5, "duplicate": 3, "low_clip_score": 3, "pruned": 0, "kept": 9}
    s, rows = run(pool, "full")
    ok = {u for _, _, u, st_ in SAMPLES if st_ == "ok"}
    check_exact(rows, "full", ok)  # duplicates and low scores are kept too
    assert s.reasons == {"corrupt": 5, "duplicate": 0, "low_clip_score": 0, "pruned": 0, "kept": 15}
    assert s.per_cluster_kept is None


def test_full_needs_only_samples(tmp_path: Path) -> None:
    tables = write_tables(tmp_path, SAMPLES, DUPLICATES, SCORES, ASSIGN)
    for t in ("scores", "candidates", "assignments", "duplicates"):
        for f in (tables / t).glob("*.parquet"):
            f.unlink()
    s, rows = run(tables, "full")
    assert s.kept == 15 and len(rows) == 20


def test_deterministic_bytes(pool: Path) -> None:
    for strategy, M, q in (("dbp", 5, [1, 2, 2]), ("random", 4, None), ("clip_score", 6, None)):
        a, _ = run(pool, strategy, M, q, name=f"{strategy}_a")
        b, _ = run(pool, strategy, M, q, name=f"{strategy}_b")
        assert a.path.read_bytes() == b.path.read_bytes()


def test_rerun_replaces_and_leaves_no_temp(pool: Path) -> None:
    run(pool, "dbp", 5, [1, 2, 2])
    _, rows = run(pool, "dbp", 4, [4, 0, 0])
    assert sum(r["keep"] for r in rows) == 4
    assert list((pool.parent / ".tmp").iterdir()) == []
    assert [p.name for p in (pool / "decisions").iterdir()] == ["dbp.parquet"]


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "strategy, M, quotas, match",
    [
        ("random", 10, None, r"M = 10 .* 9 candidates"),
        ("clip_score", 13, None, r"M = 13 .* 12 dedup survivors"),
        ("dbp", 6, [1, 2, 2], r"quotas sum to 5, but M = 6"),
        ("ssp", 5, [5, 0, 0], r"quota of cluster 0 is 5, above the cluster's size 4"),
        ("dbp", 5, [1, 2, 1, 1], r"quota of cluster 3 is 1, above the cluster's size 0"),
        ("dbp", 5, [3, 2], r"cluster 2, but there are 2 quotas"),
        ("dbp", 5, [3, 3, -1], r"negative"),
        ("dbp", 5, None, r"needs per-cluster quotas"),
        ("random", None, None, r"needs the subset size M"),
        ("random", -1, None, r">= 0"),
        ("nope", 1, None, r"unknown strategy"),
    ],
)
def test_errors(pool: Path, strategy, M, quotas, match) -> None:
    out = pool / "decisions" / "x.parquet"
    with pytest.raises(ValueError, match=match):
        decide(strategy, pool, M, quotas, 0, out, pool.parent / ".tmp", threads=1)
    assert not out.exists()


def test_stale_tables_are_errors(tmp_path: Path) -> None:
    # a candidate that ingest now calls corrupt
    samples = [(s, r, u, "undecodable" if u == "u13" else st_) for s, r, u, st_ in SAMPLES]
    tables = write_tables(tmp_path / "a", samples, DUPLICATES, SCORES, ASSIGN)
    with pytest.raises(ValueError, match="status is not ok"):
        run(tables, "semdedup")
    # assignments missing one candidate
    tables = write_tables(tmp_path / "b", SAMPLES, DUPLICATES, SCORES, ASSIGN)
    t = pq.read_table(tables / "assignments" / "s1.parquet")
    pq.write_table(t.slice(1), tables / "assignments" / "s1.parquet")
    with pytest.raises(ValueError, match="do not cover the 9 candidates"):
        run(tables, "dbp", 5, [1, 2, 2])
    # no candidates table at all
    tables = write_tables(tmp_path / "c", SAMPLES, DUPLICATES, SCORES, ASSIGN)
    for f in (tables / "candidates").glob("*.parquet"):
        f.unlink()
    with pytest.raises(ValueError, match="needs the candidates table"):
        run(tables, "random", 1)


def test_input_checks_passed_once_are_not_run_again_on_the_same_tables(tmp_path: Path) -> None:
    """A pruned_subset step checks its copy of the input tables once for all
    its strategies (``checked``): the checks each strategy needs are recorded
    as they pass, and a check recorded is not run again."""
    tables = write_tables(tmp_path / "a", SAMPLES, DUPLICATES, SCORES, ASSIGN)
    checked: set[str] = set()
    decide("random", tables, 2, None, 0, tmp_path / "r.parquet", tmp_path / ".tmp", threads=1, checked=checked)
    assert checked == {"samples", "candidates"}
    decide("dbp", tables, 5, [1, 2, 2], 0, tmp_path / "d.parquet", tmp_path / ".tmp", threads=1, checked=checked)
    assert checked == {"samples", "candidates", "assignments"}
    # tables that fail a check: it raises when not yet passed, and is skipped when recorded
    t = pq.read_table(tables / "assignments" / "s1.parquet")
    pq.write_table(t.slice(1), tables / "assignments" / "s1.parquet")
    with pytest.raises(ValueError, match="do not cover the 9 candidates"):
        decide("dbp", tables, 5, [1, 2, 2], 0, tmp_path / "e.parquet", tmp_path / ".tmp", threads=1,
               checked={"samples", "candidates"})
    # recorded as passed (on these tables, by the caller's word): not run again
    decide("dbp", tables, 5, [1, 2, 2], 0, tmp_path / "f.parquet", tmp_path / ".tmp", threads=1, checked=set(checked))


def test_quota_table_from_mapping() -> None:
    t = quota_table("ssp", np.array([2, 0, 1]), {0: 2, 2: 1})
    assert t.schema.names == ["strategy", "cluster", "quota", "kept"]
    assert [str(f.type) for f in t.schema] == ["string", "int32", "int64", "int64"]
    assert t.column("kept").to_pylist() == [2, 0, 1]
    with pytest.raises(ValueError):
        quota_table("random", np.array([1]), [1])


# ---------------------------------------------------------------------------
# property: random tables
# ---------------------------------------------------------------------------
STATUSES = ["ok", "ok", "ok", "ok", "failed_download", "undecodable", "missing_in_tar", "empty_caption", "truncated_tar"]


@st.composite
def random_pool(draw):
    n = draw(st.integers(1, 40))
    k = draw(st.integers(1, 4))
    samples, dups, scores, assign = [], [], {}, {}
    for i in range(n):
        shard = f"s{draw(st.integers(0, 2))}"
        uid = f"{draw(st.integers(0, 10**6)):07d}_{i}"  # unique, random order vs rows
        status = draw(st.sampled_from(STATUSES))
        samples.append((shard, i, uid, status))  # rows unique per shard (global i)
        if status != "ok":
            continue
        scores[uid] = draw(st.sampled_from([0.1, 0.2, 0.3]))  # ties
        kind = draw(st.sampled_from(["dup", "low", "cand", "cand"]))
        if kind == "dup":
            dups.append((uid, shard, "x"))
        elif kind == "cand":
            assign[uid] = (draw(st.integers(0, k - 1)), draw(st.sampled_from([0.1, 0.25, 0.5])))
    return samples, dups, scores, assign, k, draw(st.integers(0, 2**31))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=random_pool(), frac=st.floats(0, 1))
def test_property_random_tables(tmp_path_factory, data, frac) -> None:
    samples, dups, scores, assign, k, seed = data
    root = tmp_path_factory.mktemp("prop")
    tables = write_tables(root, samples, dups, scores, assign)
    samples_sorted = sorted(samples, key=lambda r: (r[0], r[1]))
    dup_uids = {d[0] for d in dups}
    sizes = np.bincount([c for c, _ in assign.values()], minlength=k)
    rng = np.random.default_rng(seed)
    quotas = np.array([rng.integers(0, s + 1) for s in sizes], dtype=np.int64)
    n_surv = sum(1 for _, _, u, s in samples if s == "ok" and u not in dup_uids)
    sized = {
        "dbp": (int(quotas.sum()), quotas),
        "ssp": (int(quotas.sum()), quotas),
        "random": (int(frac * len(assign)), None),
        "clip_score": (int(frac * n_surv), None),
        "semdedup": (None, None),
        "full": (None, None),
    }
    for strategy, (M, q) in sized.items():
        s, rows = run(tables, strategy, M, q, seed=seed)
        assert [(r["shard"], r["uid"]) for r in rows] == [(a, u) for a, _, u, _ in samples_sorted]
        kept = {r["uid"] for r in rows if r["keep"]}
        if M is not None:
            assert s.kept == len(kept) == M
        for (shard, _, uid, status), r in zip(samples_sorted, rows):
            expect = (
                "kept" if uid in kept
                else "corrupt" if status != "ok"
                else "duplicate" if uid in dup_uids
                else "low_clip_score" if uid not in assign
                else "pruned"
            )
            assert r["reason"] == expect
        assert set(s.reasons) == set(REASONS) and sum(s.reasons.values()) == len(samples)
        if strategy in ("dbp", "ssp"):
            assert s.per_cluster_kept.tolist() == quotas.tolist()
            for c in range(k):
                members = sorted((-d, u) for u, (cc, d) in assign.items() if cc == c)
                assert {u for _, u in members[: quotas[c]]} == {u for u in kept if u in assign and assign[u][0] == c}
        elif strategy == "random":
            cands = sorted(assign)
            assert kept == {u for _, u in sorted(zip(uid_hash(np.array(cands, dtype=object), seed).tolist(), cands))[:M]}
        elif strategy == "clip_score":
            surv = sorted((-np.float32(scores[u]), u) for _, _, u, st_ in samples if st_ == "ok" and u not in dup_uids)
            assert kept == {u for _, u in surv[:M]}
        elif strategy == "semdedup":
            assert kept == set(assign)
        else:
            assert kept == {u for _, _, u, st_ in samples if st_ == "ok"}


def test_strategy_quotas_from_the_clusters_table() -> None:
    import polars as pl

    from dbprune_assets.core.method import dbp

    # rows out of cluster order on purpose: quotas come back indexed by cluster id
    clusters = pl.DataFrame({"cluster": [2, 0, 1], "size": [6, 10, 4], "quota": [3, 5, 1], "lower_bound": [1, 1, 1]})
    q, M = strategy_quotas("dbp", clusters)
    assert q.tolist() == [5, 1, 3] and M == 9
    q, M = strategy_quotas("ssp", clusters)
    expect = dbp.solve_quotas(dbp.ssp_probabilities(3), np.array([10, 4, 6]), 9, np.array([1, 1, 1]))
    assert q.tolist() == expect.tolist() and int(q.sum()) == M == 9
    for strategy in ("random", "clip_score", "semdedup", "full"):
        assert strategy_quotas(strategy, clusters) == (None, 9)
