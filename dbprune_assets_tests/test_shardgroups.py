"""Shard groups (the partitions of the per-shard assets) and run batches."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dbprune_assets.core.pool import shardgroups as sg
from dbprune_assets.runner import batched_ranges, contiguous_ranges
from dbprune_assets.core.settings import STRATEGIES


def test_group_size_keeps_at_most_ten_thousand_partitions():
    assert [sg.group_size(n) for n in (0, 1, 10_000, 10_001, 100_000, 230_000)] == [1, 1, 1, 2, 10, 23]
    assert sg.group_size(5, 3) == 3


def test_auto_groups_small_shards_of_big_pools_to_ten_thousand_rows_a_partition():
    # 10,000-row shards (DataComp, img2dataset's default) and pools of <= 256 shards: a partition per shard
    assert sg.group_size(10_000, "auto", 10_000) == 1 and sg.group_size(12_800, "auto", 10_000) == 2  # the cap
    assert sg.group_size(256, "auto", 10) == 1
    # past 256 shards: the least power of two reaching 10,000 rows (1,000 rows -> 10 -> 16; 100 -> 100 -> 128)
    assert sg.group_size(257, "auto", 1_000) == 16
    assert sg.group_size(10_000, "auto", 1_000) == 16 and sg.group_size(1_000, "auto", 100) == 128
    assert sg.group_size(1_000, "auto", 9_999) == 2 and sg.group_size(1_000, "auto", 0) == 16_384
    # an estimate that drifts as the pool grows keeps the grouping (95 and 110 rows both give 128)
    assert sg.group_size(3_000, "auto", 95) == sg.group_size(3_300, "auto", 110) == 128
    # the 10,000-partition cap still applies, and an explicit setting wins
    assert sg.group_size(230_000, "auto", 5_000) == 23 and sg.group_size(1_000, 3, 10) == 3
    assert sg.group_size(1_000, "auto", None) == 1  # row counts unknown: no grouping by rows


def test_typical_rows_is_the_median_of_shards_spread_over_the_pool(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dbprune_assets.core.store.layout import typical_shard_rows

    assert sg.typical_rows([]) is None and sg.typical_rows([3, 1, 2]) == 2.0 and sg.typical_rows([1, 4]) == 2.5
    assert sg.spread_sample(list("abcdefghij"), 4) == ["a", "d", "g", "j"] and sg.spread_sample(["a"], 4) == ["a"]
    shards = [f"{i:05d}" for i in range(40)]
    for i, shard in enumerate(shards):
        pq.write_table(pa.table({"uid": [str(j) for j in range(100 + i % 3)]}), tmp_path / f"{shard}.parquet")
    (tmp_path / "00020.parquet").write_bytes(b"not parquet")  # damaged: left out of the estimate
    assert typical_shard_rows(tmp_path, shards) == 101.0
    assert typical_shard_rows(tmp_path, []) is None


def test_a_pool_of_many_small_shards_registers_shard_groups(tmp_path):
    """300 shards of 40 rows: groups of 256 shards (10,240 rows), named by their first and last shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dbprune_assets.core.store.layout import Layout
    from dbprune_assets.defs.ingest import partition_changes

    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(300):
        pq.write_table(pa.table({"uid": [f"{i}-{j}" for j in range(40)]}), pool / f"{i:05d}.parquet")
    layout = Layout.from_env(home=tmp_path / "home", pool=pool)
    added, removed, vanished = partition_changes([], layout, "auto")
    assert added == ["00000..00255", "00256..00299"] and removed == vanished == []
    assert partition_changes(added, layout, "auto")[:2] == ([], [])  # stable while the pool is
    assert len(partition_changes(added, layout, 1)[0]) == 300  # an explicit 1: a partition per shard


def test_big_runs_log_their_planned_partitions_as_one_subset(monkeypatch):
    from dbprune_assets import cluster

    monkeypatch.delenv(cluster.PLANNED_SUBSET_ENV, raising=False)
    import os

    with cluster.planned_events(cluster.PLANNED_SUBSET_FROM):
        assert cluster.PLANNED_SUBSET_ENV not in os.environ  # small runs: Dagster's per-partition events
    with cluster.planned_events(cluster.PLANNED_SUBSET_FROM + 1):
        assert os.environ[cluster.PLANNED_SUBSET_ENV] == "1"
    assert cluster.PLANNED_SUBSET_ENV not in os.environ
    monkeypatch.setenv(cluster.PLANNED_SUBSET_ENV, "0")  # the user's own choice is kept
    with cluster.planned_events(5_000):
        assert os.environ[cluster.PLANNED_SUBSET_ENV] == "0"
    assert os.environ[cluster.PLANNED_SUBSET_ENV] == "0"


def test_every_shard_of_a_100k_pool_is_in_exactly_one_partition():
    shards = [f"{i:06d}" for i in range(100_000)]
    size = sg.group_size(len(shards))
    keys = sg.partition_keys(shards, size)
    assert len(keys) == 10_000 <= 20_000 and keys[0] == "000000..000009" and keys[-1] == "099990..099999"
    covered = sg.shards_of(keys, shards)
    assert covered == shards  # each once, in order
    assert sg.partition_of("012345", keys) == "012340..012349"  # a user finds a shard's partition by its name
    assert sg.shards_of(["012340..012349"], shards) == [f"{i:06d}" for i in range(12_340, 12_350)]


def test_ungrouped_keys_are_the_shards_and_a_last_group_of_one_is_named_as_its_shard():
    shards = ["a", "b", "c", "d", "e"]
    assert sg.partition_keys(shards, 1) == shards
    assert sg.partition_keys(shards, 2) == ["a..b", "c..d", "e"]
    assert sg.bounds("a..b") == ("a", "b") and sg.bounds("e") == ("e", "e")
    # a shard inserted inside a range joins that group; one after the last is in none yet
    assert sg.shards_of(["a..b"], ["a", "aa", "b", "c"]) == ["a", "aa", "b"]
    assert sg.partition_of("f", ["a..b", "c..d", "e"]) is None


@given(st.lists(st.text("0123456789", min_size=1, max_size=4), unique=True, max_size=60), st.integers(1, 7))
def test_grouping_partitions_the_pool(shards: list[str], size: int):
    shards = sorted(shards)
    keys = sg.partition_keys(shards, size)
    assert sg.shards_of(keys, shards) == shards
    assert len(keys) == -(-len(shards) // size)
    for sh in shards:
        key = sg.partition_of(sh, keys)
        assert key is not None and sh in sg.shards_of([key], shards)


def test_runs_are_batched_within_contiguous_ranges():
    keys = [f"{i:02d}" for i in range(10)]
    wanted = ["00", "01", "02", "03", "04", "06", "07", "09"]
    assert contiguous_ranges(keys, wanted) == [("00", "04"), ("06", "07"), ("09", "09")]
    assert batched_ranges(keys, wanted, 2) == [("00", "01"), ("02", "03"), ("04", "04"), ("06", "07"), ("09", "09")]
    assert batched_ranges(keys, wanted, 1000) == contiguous_ranges(keys, wanted)


@given(st.sets(st.integers(0, 40)), st.integers(1, 9))
def test_batches_cover_the_wanted_partitions_once(wanted: set[int], per_run: int):
    keys = [f"{i:03d}" for i in range(41)]
    runs = batched_ranges(keys, [keys[i] for i in sorted(wanted)], per_run)
    covered = [k for a, b in runs for k in keys[keys.index(a) : keys.index(b) + 1]]
    assert covered == [keys[i] for i in sorted(wanted)]
    assert all(keys.index(b) - keys.index(a) < per_run for a, b in runs)


@pytest.mark.slow
def test_grouped_partitions_give_the_same_decisions(tmp_path):
    """The generated DataComp pool (5 shards) run with one shard per partition and
    with groups of two, in runs of at most two partitions: the same decisions,
    and the grouped home's partitions are the group keys."""
    import hashlib

    import dagster as dg

    from dbprune_assets.core.store.catalog import query
    from dbprune_assets.core.store.layout import Layout, list_pool_shards
    from dbprune_assets.core.settings import PoolSettings
    from dbprune_assets.samplepool import write_datacomp_pool

    from .conftest import run_cli

    pool = tmp_path / "pool"
    write_datacomp_pool(pool, PoolSettings(shards=5, samples_per_shard=40, concepts=4, seed=1), models=("b32",))
    digests = {}
    for name, extra in (("one", ""), ("grouped", "partitions:\n  shards_per_partition: 2\n  per_run: 2\n")):
        config = tmp_path / f"{name}.yaml"
        config.write_text("embeddings:\n  model: b32\n" + extra)
        home = tmp_path / name
        r = run_cli("run", "--config", str(config), env={"DBPRUNE_HOME": str(home), "DBPRUNE_POOL": str(pool),
                                                         "DBPRUNE_PROGRESS": "0"})
        assert r.returncode == 0, r.stdout + r.stderr
        rows = query(Layout(home, pool), "SELECT strategy, uid, keep, reason FROM decisions ORDER BY ALL").to_pylist()
        digests[name] = hashlib.sha256(repr(rows).encode()).hexdigest()
        assert len(rows) == len(STRATEGIES) * 200
    assert digests["one"] == digests["grouped"]
    shards = list_pool_shards(pool)
    instance = dg.DagsterInstance.from_config(str(tmp_path / "grouped" / "dagster"))
    assert sorted(instance.get_dynamic_partitions("shards")) == [
        f"{shards[0]}..{shards[1]}", f"{shards[2]}..{shards[3]}", shards[4]]
    runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/asset_partition_range_start": f"{shards[0]}..{shards[1]}"}))
    assert runs  # the per-shard groups ran in batches starting at the first group
