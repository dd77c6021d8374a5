"""Shard groups (the partitions of the per-shard assets) and run batches."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dbprune_assets.core import shardgroups as sg
from dbprune_assets.runner import batched_ranges, contiguous_ranges


def test_group_size_keeps_at_most_ten_thousand_partitions():
    assert [sg.group_size(n) for n in (0, 1, 10_000, 10_001, 100_000, 230_000)] == [1, 1, 1, 2, 10, 23]
    assert sg.group_size(5, 3) == 3


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

    from dbprune_assets.core.catalog import query
    from dbprune_assets.core.layout import Layout, list_pool_shards
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
        assert len(rows) == 6 * 200
    assert digests["one"] == digests["grouped"]
    shards = list_pool_shards(pool)
    instance = dg.DagsterInstance.from_config(str(tmp_path / "grouped" / "dagster"))
    assert sorted(instance.get_dynamic_partitions("shards")) == [
        f"{shards[0]}..{shards[1]}", f"{shards[2]}..{shards[3]}", shards[4]]
    runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/asset_partition_range_start": f"{shards[0]}..{shards[1]}"}))
    assert runs  # the per-shard groups ran in batches starting at the first group
