"""Decision history (core/store/history.py): provenance carried on unchanged
rows, the per-run counts and the quota moves, on hand-made tables."""

from __future__ import annotations

from pathlib import Path

import duckdb
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbprune_assets.core.store.history import Provenance, provenance_sql, quota_moves, run_changes

WHO = Provenance("run-2", "semdedup aa dbp bb", "2026-12-06T12:00:00+00:00")


def _decisions(path: Path, rows: list[tuple], run: str | None = "run-1") -> Path:
    frame = pl.DataFrame(rows, schema={"shard": pl.Utf8, "uid": pl.Utf8, "keep": pl.Boolean, "reason": pl.Utf8},
                         orient="row")
    if run is not None:
        frame = frame.with_columns(run_id=pl.lit(run), fit_id=pl.lit("semdedup 00 dbp 11"))
    frame.write_parquet(path)
    return path


def test_run_changes_counts_added_removed_and_redecided(tmp_path: Path) -> None:
    before = _decisions(tmp_path / "before.parquet", [
        ("s0", "a", True, "kept"), ("s0", "b", False, "pruned"), ("s0", "c", True, "kept"),
        ("s1", "d", False, "duplicate"),  # s1 leaves the pool
        ("s0", "e", False, "corrupt"), ("s0", "e", True, "kept"),  # a uid twice in a shard: one key, kept
    ])
    after = _decisions(tmp_path / "after.parquet", [
        ("s0", "a", False, "pruned"),  # re-decided: kept -> pruned
        ("s0", "b", True, "kept"),  # re-decided: pruned -> kept
        ("s0", "c", True, "kept"),  # as before
        ("s0", "e", False, "corrupt"), ("s0", "e", True, "kept"),
        ("s2", "f", True, "kept"), ("s2", "g", False, "low_clip_score"),  # s2 joins
    ])
    con = duckdb.connect()
    assert run_changes(con, after, before) == {"samples": 6, "kept": 4, "added": 2, "removed": 1, "redecided": 2,
                                               "newly_kept": 1, "newly_pruned": 1}
    # the first run: every key is new
    assert run_changes(con, before, None) == {"samples": 5, "kept": 3, "added": 5, "removed": 0, "redecided": 0,
                                              "newly_kept": 3, "newly_pruned": 0}


def _grouped_changes(con: duckdb.DuckDBPyConnection, new: Path, previous: Path) -> dict[str, int]:
    """run_changes' counts as it first computed them: every row grouped by (shard, uid), kept if any row is."""
    keyed = "SELECT shard, uid, bool_or(keep) AS k FROM read_parquet(?) GROUP BY ALL"
    row = con.execute(f"""
        WITH n AS ({keyed}), p AS ({keyed})
        SELECT count(n.uid), count(*) FILTER (WHERE n.k), count(*) FILTER (WHERE p.uid IS NULL AND p.shard IS NULL),
               count(*) FILTER (WHERE n.uid IS NULL AND n.shard IS NULL),
               count(*) FILTER (WHERE n.k <> p.k), count(*) FILTER (WHERE n.k AND NOT p.k),
               count(*) FILTER (WHERE p.k AND NOT n.k)
        FROM n FULL JOIN p ON p.shard IS NOT DISTINCT FROM n.shard AND p.uid IS NOT DISTINCT FROM n.uid""",
                      [str(new), str(previous)]).fetchone()
    return dict(zip(("samples", "kept", "added", "removed", "redecided", "newly_kept", "newly_pruned"), row))


#: one key's rows: a decision for its first row, then how many corrupt repeats
_KEY_ROWS = st.tuples(st.sampled_from([("kept", True), ("pruned", False), ("duplicate", False), ("corrupt", False),
                                       None]), st.integers(0, 2))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_KEY_ROWS, _KEY_ROWS), min_size=1, max_size=12), st.booleans())
def test_run_changes_equal_grouping_every_row(tmp_path_factory: pytest.TempPathFactory,
                                              keys: list[tuple[tuple, tuple]], null_uid: bool) -> None:
    """Only corrupt rows repeat a key (the first row of a uid repeated in a
    shard may be anything): counting the other rows as they are gives the
    counts of grouping every row, for keys in one run, the other or both."""
    tmp = tmp_path_factory.mktemp("changes")
    files = []
    for side in (0, 1):
        rows = []
        for i, key in enumerate(keys):
            first, repeats = key[side]
            uid = None if null_uid and i == 0 else f"u{i}"
            if first is not None:  # None: the key is not in this file
                rows.append(("s0", uid, first[1], first[0]))
                rows += [("s0", uid, False, "corrupt")] * repeats
        files.append(_decisions(tmp / f"{side}.parquet", rows))
    con = duckdb.connect()
    assert run_changes(con, files[1], files[0]) == _grouped_changes(con, files[1], files[0])


def test_unchanged_rows_keep_their_run_and_fit_changed_rows_take_this_one(tmp_path: Path) -> None:
    before = _decisions(tmp_path / "before.parquet", [("s0", "a", True, "kept"), ("s0", "b", False, "pruned"),
                                                      ("s0", "c", False, "duplicate")])
    con = duckdb.connect()
    con.execute("CREATE TABLE n AS SELECT * FROM (VALUES ('s0', 'a', true, 'kept', 0), ('s0', 'b', true, 'kept', 1),"
                " ('s0', 'c', false, 'low_clip_score', 2), ('s1', 'x', false, 'pruned', 0))"
                " t(shard, uid, keep, reason, _order)")
    query, params = provenance_sql("SELECT * FROM n", before)
    assert params == 2
    got = con.execute(f"SELECT * EXCLUDE (_order) FROM ({query}) ORDER BY shard, _order",
                      [WHO.run_id, WHO.fit_id]).fetchall()
    assert got == [
        ("s0", "a", True, "kept", "run-1", "semdedup 00 dbp 11"),  # same decision: the earlier run's
        ("s0", "b", True, "kept", "run-2", WHO.fit_id),  # re-decided
        ("s0", "c", False, "low_clip_score", "run-2", WHO.fit_id),  # same keep, another reason
        ("s1", "x", False, "pruned", "run-2", WHO.fit_id),  # new
    ]
    query, _ = provenance_sql("SELECT * FROM n", None)
    assert {r[5] for r in con.execute(query, [WHO.run_id, WHO.fit_id]).fetchall()} == {"run-2"}


def test_a_uid_repeated_in_a_shard_keeps_one_row_per_decision_and_its_earliest_run(tmp_path: Path) -> None:
    """The repeats of a uid in a shard are corrupt (duplicate_uid) but its first
    row: the previous file's corrupt rows are grouped (two runs' worth of the
    same decision give the earliest run), the others are one per (shard, uid),
    so no new row is doubled."""
    one = _decisions(tmp_path / "a.parquet", [("s0", "u", True, "kept"), ("s0", "u", False, "corrupt")])
    two = _decisions(tmp_path / "b.parquet", [("s0", "u", False, "corrupt"), ("s0", "v", False, "pruned")], run="run-0")
    pl.concat([pl.read_parquet(one), pl.read_parquet(two)]).write_parquet(tmp_path / "before.parquet")
    con = duckdb.connect()
    con.execute("CREATE TABLE n AS SELECT * FROM (VALUES ('s0', 'u', true, 'kept', 0), ('s0', 'u', false, 'corrupt', 1),"
                " ('s0', 'u', false, 'corrupt', 2), ('s0', 'v', false, 'pruned', 3)) t(shard, uid, keep, reason, _order)")
    query, _ = provenance_sql("SELECT * FROM n", tmp_path / "before.parquet")
    got = con.execute(f"SELECT * EXCLUDE (_order) FROM ({query}) ORDER BY _order", [WHO.run_id, WHO.fit_id]).fetchall()
    assert [r[4] for r in got] == ["run-1", "run-0", "run-0", "run-0"]
    assert len(got) == 4


def test_quota_moves_lists_the_clusters_whose_quota_or_kept_moved() -> None:
    before = pl.DataFrame({"strategy": ["dbp"] * 3, "cluster": [0, 1, 2], "quota": [5, 3, 2], "kept": [5, 3, 2]})
    after = pl.DataFrame({"strategy": ["dbp"] * 4, "cluster": [0, 1, 2, 3], "quota": [5, 4, 1, 2],
                          "kept": [5, 4, 1, 2]})
    moves = quota_moves(WHO, "dbp", before, after)
    assert moves.select("cluster", "quota_before", "quota", "move").rows() == [(1, 3, 4, 1), (2, 2, 1, -1),
                                                                              (3, None, 2, 2)]
    assert set(moves["run_id"]) == {"run-2"} and set(moves["strategy"]) == {"dbp"}
    first = quota_moves(WHO, "dbp", None, after)
    assert first["cluster"].to_list() == [0, 1, 2, 3] and first["quota_before"].null_count() == 4


@pytest.mark.parametrize("first", ["outside_a_run", "before_provenance", "run-1"])
def test_decide_carries_provenance_through_a_second_decision(tmp_path: Path, first: str) -> None:
    """decide(): rows decided outside a run (no provenance given) or written
    before provenance existed are stamped by the next run; rows of a run pass
    its id on while they are decided the same."""
    from dbprune_assets.core.strategies import decide
    from dbprune_assets_tests.test_strategies import ASSIGN, DUPLICATES, SAMPLES, SCORES, write_tables

    tables = write_tables(tmp_path, SAMPLES, DUPLICATES, SCORES, ASSIGN)  # the hand-made pool of test_strategies
    out = tmp_path / "decisions.parquet"
    decide("full", tables, None, None, 0, out, tmp_path / "tmp",
           provenance=Provenance("run-1", "f1", "t1") if first == "run-1" else None)
    if first == "before_provenance":
        pl.read_parquet(out).drop("run_id", "fit_id").write_parquet(out)
    second = decide("full", tables, None, None, 0, out, tmp_path / "tmp", provenance=WHO)
    frame = pl.read_parquet(out)
    assert frame.select("run_id", "fit_id").unique().rows() == (
        [("run-1", "f1")] if first == "run-1" else [("run-2", WHO.fit_id)])
    assert second.changes["added"] == second.changes["removed"] == second.changes["redecided"] == 0
    assert second.changes["samples"] == frame.select(pl.struct("shard", "uid").n_unique()).item()
