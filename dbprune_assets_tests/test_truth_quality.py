"""What a strategy keeps against a ground truth (core/strategies/truth.py):
every metric on a hand-made truth, the errors, and the verdicts."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl
import pytest

from dbprune_assets.core.strategies.truth import (METRICS, find_ground_truth, measure, read_truth, truth_markdown,
                                                  truth_verdicts)


def _truth(path: Path) -> Path:
    # concepts: c0 (variability 0.0) u0-u3, c1 (0.5) u4-u6, c2 (1.0) u7-u9; groups g0 = u0-u2, g1 = u4-u5;
    # mismatched: u3, u9; one more row in a shard no decision names
    rows = [("u0", 0, 0.0, 0, False), ("u1", 0, 0.0, 0, False), ("u2", 0, 0.0, 0, False), ("u3", 0, 0.0, -1, True),
            ("u4", 1, 0.5, 1, False), ("u5", 1, 0.5, 1, False), ("u6", 1, 0.5, -1, False),
            ("u7", 2, 1.0, -1, False), ("u8", 2, 1.0, -1, False), ("u9", 2, 1.0, -1, True)]
    frame = pl.DataFrame({
        "uid": [r[0] for r in rows] + ["gone"], "shard": ["s0"] * len(rows) + ["s9"],
        "concept": [r[1] for r in rows] + [0], "variability": [r[2] for r in rows] + [0.0],
        "dup_group": [r[3] for r in rows] + [-1], "mismatched": [r[4] for r in rows] + [False],
    }, schema_overrides={"concept": pl.Int32, "dup_group": pl.Int32})
    frame.write_parquet(path)
    return path


def _decisions(path: Path, kept: set[str]) -> Path:
    uids = [f"u{i}" for i in range(10)]
    pl.DataFrame({"strategy": ["x"] * 10, "uid": uids, "shard": ["s0"] * 10, "keep": [u in kept for u in uids],
                  "reason": ["kept" if u in kept else "pruned" for u in uids]}).write_parquet(path)
    return path


def test_every_metric_by_hand(tmp_path: Path) -> None:
    truth = _truth(tmp_path / "truth.parquet")
    dec = _decisions(tmp_path / "dec.parquet", {"u0", "u1", "u3", "u4", "u7", "u8"})
    got = measure("x", dec, truth, tmp_path / "tmp")
    # g0 keeps 2 of 3 (1 redundant copy kept), g1 keeps 1 of 2 (none): 1 of the 2 + 1 redundant copies
    assert got.values["duplicates_kept"] == pytest.approx(1 / 3)
    assert got.values["mismatches_kept"] == pytest.approx(1 / 2)  # u3 kept, u9 not
    # kept per concept: c0 3, c1 1, c2 2 (of 6); 3 concepts: a fifth is ceil(3 / 5) = 1 concept
    assert got.values["concepts_covered"] == 3
    assert got.values["concepts_covered_10"] == 0
    assert got.values["budget_most_varied"] == pytest.approx(2 / 6)
    assert got.values["budget_least_varied"] == pytest.approx(3 / 6)
    p = [3 / 6, 1 / 6, 2 / 6]
    assert got.values["concept_entropy"] == pytest.approx(-sum(q * math.log(q) for q in p))
    assert (got.matched, got.unmatched) == (10, 1)
    assert [r["metric"] for r in got.rows()] == list(METRICS)


def test_nothing_kept_and_no_planted_defects(tmp_path: Path) -> None:
    truth = tmp_path / "t.parquet"
    pl.DataFrame({"uid": ["a", "b"], "shard": ["s", "s"], "concept": [0, 1], "variability": [0.0, 1.0],
                  "dup_group": [None, None], "mismatched": [False, False]},
                 schema_overrides={"dup_group": pl.Int32}).write_parquet(truth)
    dec = tmp_path / "d.parquet"
    pl.DataFrame({"strategy": ["x"] * 2, "uid": ["a", "b"], "shard": ["s", "s"], "keep": [False, False],
                  "reason": ["pruned"] * 2}).write_parquet(dec)
    got = measure("x", dec, truth, tmp_path / "tmp").values
    assert math.isnan(got["duplicates_kept"]) and math.isnan(got["mismatches_kept"])
    assert got["concepts_covered"] == 0 and math.isnan(got["concept_entropy"])


def test_errors_name_the_file_and_what_is_wrong(tmp_path: Path) -> None:
    dec = _decisions(tmp_path / "dec.parquet", {"u0"})
    bad = tmp_path / "bad.parquet"
    pl.DataFrame({"uid": ["u0"], "shard": ["s0"]}).write_parquet(bad)
    with pytest.raises(ValueError, match="lacks the column.*concept"):
        measure("x", dec, bad, tmp_path / "tmp")
    other = tmp_path / "other.parquet"
    pl.read_parquet(_truth(tmp_path / "t.parquet")).with_columns(pl.lit("zz").alias("shard")).write_parquet(other)
    with pytest.raises(ValueError, match="describes another pool"):
        measure("x", dec, other, tmp_path / "tmp")


def test_where_the_ground_truth_comes_from(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    assert find_ground_truth(pool, None) is None
    (pool / "ground_truth.parquet").write_bytes(b"x")
    assert find_ground_truth(pool, None) == pool / "ground_truth.parquet"
    mine = _truth(tmp_path / "mine.parquet")
    assert find_ground_truth(pool, str(mine)) == mine  # the setting wins
    with pytest.raises(FileNotFoundError, match="strategies.ground_truth"):
        find_ground_truth(pool, str(tmp_path / "missing.parquet"))


def test_table_and_verdicts_say_what_differs(tmp_path: Path) -> None:
    tables = tmp_path / "tables"
    (tables / "truth_quality").mkdir(parents=True)
    values = {"dbp": {"duplicates_kept": 0.0, "budget_most_varied": 0.3, "concept_entropy": 2.6},
              "random": {"duplicates_kept": 0.25, "budget_most_varied": 0.14, "concept_entropy": 2.5},
              "full": {"duplicates_kept": 1.0, "budget_most_varied": 0.19, "concept_entropy": 2.55}}
    for s, v in values.items():
        pl.DataFrame({"strategy": [s] * len(v), "metric": list(v), "value": list(v.values())}).write_parquet(
            tables / "truth_quality" / f"{s}.parquet")
    found = read_truth(tables, ["random", "dbp", "full", "ssp"])
    assert list(found) == ["random", "dbp", "full"]  # the order asked, the strategies with a file
    lines = truth_verdicts(found)
    assert "planted duplicate copies kept (best first): dbp 0.000, random 0.250, full 1.000" in lines
    assert any(line.startswith("DBP's mechanism: dbp spends 30.0%") and "random 14.0% (more than random)" in line
               for line in lines)
    assert any("SemDeDup: the strategies after it keep 0.0% to 25.0%" in line for line in lines)
    md = truth_markdown(found)
    assert "| dbp | 0.000 | n/a |" in md and "truth_quality" in md
