"""The strategy registry: the built-ins in table order, and a toy strategy
registered here only (one Strategy subclass, one register call) that decide,
the quotas and the settings accept like a built-in."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from dbprune_assets.core.settings import STRATEGIES, SettingsError, build_settings
from dbprune_assets.core.strategies import Strategy, decide, get, names, register, strategy_quotas, unregister
from dbprune_assets.core.strategies.base import scalar
from dbprune_assets.core.strategies.registry import BUILTIN_NAMES
from dbprune_assets_tests.test_strategies import ASSIGN, DUPLICATES, SAMPLES, SCORES, write_tables

BUILTIN = ("dbp", "ssp", "random", "clip_score", "semdedup", "full", "datacomp_image", "negclip", "balanced_kmeans")
TOY = "every_other"


class EveryOther(Strategy):
    """Keep the 1st, 3rd, 5th, ... candidate in (shard, row) order."""

    def select(self, con: Any, M: int | None, quotas: np.ndarray | None, seed: int) -> int:
        con.execute(
            """
            CREATE TEMP TABLE sel AS SELECT shard, row FROM candidates
            QUALIFY row_number() OVER (ORDER BY shard, row) % 2 = 1
            """
        )
        return scalar(con, "SELECT count(*) FROM candidates")


@pytest.fixture()
def toy() -> Iterator[Strategy]:
    strategy = register(EveryOther(TOY, "every other candidate, in (shard, row) order",
                                   needs=("candidates", "duplicates")))
    try:
        yield strategy
    finally:
        unregister(TOY)


def test_builtin_order() -> None:
    assert names() == BUILTIN == BUILTIN_NAMES == STRATEGIES
    assert [get(n).name for n in names()] == list(BUILTIN)
    assert [n for n in names() if get(n).sized] == ["dbp", "ssp", "random", "clip_score", "datacomp_image",
                                                     "negclip", "balanced_kmeans"]
    assert [n for n in names() if get(n).may_fall_short] == ["datacomp_image"]
    assert [n for n in names() if get(n).quota_based] == ["dbp", "ssp"]
    assert all(get(n).description for n in names())


def test_toy_strategy_decides(toy: Strategy, tmp_path: Path) -> None:
    tables = write_tables(tmp_path, SAMPLES, DUPLICATES, SCORES, ASSIGN)
    out = tables / "decisions" / f"{TOY}.parquet"
    summary = decide(TOY, tables, 3, None, 0, out, tmp_path / ".tmp", memory_limit="256MB", threads=1)
    # candidates in (shard, row) order: u06 u02 u00 u08 | u10 u13 u15 u16 u19; every other one is kept
    rows = pq.read_table(out).to_pylist()
    assert [(r["shard"], r["uid"], r["keep"], r["reason"]) for r in rows] == [
        ("s0", "u06", True, "kept"),
        ("s0", "u01", False, "corrupt"),
        ("s0", "u02", False, "pruned"),
        ("s0", "u03", False, "duplicate"),
        ("s0", "u04", False, "corrupt"),
        ("s0", "u05", False, "low_clip_score"),
        ("s0", "u00", True, "kept"),
        ("s0", "u07", False, "corrupt"),
        ("s0", "u08", False, "pruned"),
        ("s0", "u09", False, "low_clip_score"),
        ("s1", "u10", True, "kept"),
        ("s1", "u11", False, "corrupt"),
        ("s1", "u12", False, "duplicate"),
        ("s1", "u13", False, "pruned"),
        ("s1", "u14", False, "corrupt"),
        ("s1", "u15", True, "kept"),
        ("s1", "u16", False, "pruned"),
        ("s1", "u17", False, "duplicate"),
        ("s1", "u18", False, "low_clip_score"),
        ("s1", "u19", True, "kept"),
    ]
    assert {r["strategy"] for r in rows} == {TOY}
    assert summary.M is None and summary.kept == 5 and summary.eligible == 9  # not sized: M is ignored
    assert summary.reasons == {"corrupt": 5, "duplicate": 3, "low_clip_score": 3, "pruned": 4, "kept": 5}
    assert summary.per_cluster_kept is None and summary.quotas is None
    clusters = pl.DataFrame({"cluster": [0, 1], "size": [4, 5], "quota": [2, 3], "lower_bound": [1, 1]})
    assert strategy_quotas(TOY, clusters) == (None, 5)


def test_toy_needs_its_tables(toy: Strategy, tmp_path: Path) -> None:
    tables = write_tables(tmp_path, SAMPLES, DUPLICATES, SCORES, ASSIGN)
    for f in (tables / "candidates").glob("*.parquet"):
        f.unlink()
    with pytest.raises(ValueError, match=f"strategy '{TOY}' needs the candidates table"):
        decide(TOY, tables, None, None, 0, tables / "decisions" / "x.parquet", tmp_path / ".tmp", threads=1)


def test_settings_accept_a_registered_strategy(toy: Strategy) -> None:
    s = build_settings({"selection": {"strategies": ["dbp", TOY]}}, profile="sample")
    assert s.selection.strategies == ("dbp", TOY)
    assert build_settings({}, profile="sample").selection.strategies == BUILTIN  # the default stays the built-ins
    with pytest.raises(SettingsError) as e:
        build_settings({"selection": {"strategies": ["nope"]}}, profile="sample")
    assert f"allowed: {', '.join(BUILTIN)}, {TOY}" in str(e.value)


def test_unregistered_names_are_rejected() -> None:
    assert TOY not in names()  # the fixture's teardown left the registry as it was
    with pytest.raises(SettingsError) as e:
        build_settings({"selection": {"strategies": [TOY]}}, profile="sample")
    assert f"unknown strategy ['{TOY}']; allowed: {', '.join(BUILTIN)}" in str(e.value)
    with pytest.raises(ValueError, match=f"unknown strategy '{TOY}'; allowed: {', '.join(BUILTIN)}$"):
        get(TOY)


def test_compare_orders_by_the_registry(toy: Strategy) -> None:
    from dbprune_assets.core.models.compare_stats import strategy_key

    assert sorted(["zeta", TOY, "full", "dbp", "alpha"], key=strategy_key) == ["dbp", "full", TOY, "alpha", "zeta"]


def test_register_refuses_bad_strategies(toy: Strategy) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register(EveryOther(TOY, "again"))
    with pytest.raises(ValueError, match="lower-case"):
        register(EveryOther("Every-Other", "bad name"))
    with pytest.raises(ValueError, match="needs \\['clusters'\\]"):
        register(EveryOther("needs_clusters", "unknown table", needs=("clusters",)))
    with pytest.raises(ValueError, match="so it is sized"):
        register(EveryOther("quota_unsized", "quotas without M", quota_based=True))
    with pytest.raises(ValueError, match="built-in"):
        unregister("dbp")
    assert names() == (*BUILTIN, TOY)
