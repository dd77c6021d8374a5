"""Shards in parallel inside a step (``compute.parallel_shards``,
``core/running/parallel.py``): results in shard order with a bounded number
in work, the first error raised and nothing left running, and the same
outputs as one shard at a time, byte for byte, on the sample pool and a
DataComp-format pool."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbprune_assets.core.running.parallel import ordered_map, resolve_parallel, shard_threads
from dbprune_assets.core.settings import STRATEGIES

from . import faultkit as fk
from .conftest import run_cli, write_config


# ---------------------------------------------------------------------------
# ordered_map
# ---------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(items=st.lists(st.integers(0, 1000), max_size=30), parallel=st.integers(1, 6))
def test_results_come_in_item_order_with_at_most_parallel_in_work(items: list[int], parallel: int) -> None:
    lock = threading.Lock()
    state = {"now": 0, "most": 0}

    def work(x: int) -> int:
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.001 * (x % 3))  # finish out of order
        with lock:
            state["now"] -= 1
        return x * 2

    assert list(ordered_map(work, items, parallel)) == [(x, 2 * x) for x in items]
    assert state["most"] <= max(1, parallel)


def test_one_at_a_time_runs_in_the_calling_thread() -> None:
    main = threading.get_ident()
    assert [t for _, t in ordered_map(lambda _: threading.get_ident(), range(3), 1)] == [main] * 3


def test_the_first_error_in_item_order_is_raised_and_nothing_is_left_running() -> None:
    started: list[int] = []
    running = threading.Event()

    def work(x: int) -> int:
        started.append(x)
        if x == 1:
            raise ValueError("shard 00001: bad row")
        if x == 0:
            running.set()
            time.sleep(0.2)
        return x

    got = []
    with pytest.raises(ValueError, match="shard 00001"):
        for item, _ in ordered_map(work, range(100), 3):
            got.append(item)
    assert got == [0]
    assert len(started) <= 5  # later shards were not started (cancelled)
    assert not [t for t in threading.enumerate() if t.name.startswith("dbprune-shard")]


def test_a_consumer_that_stops_early_leaves_no_thread() -> None:
    gen = ordered_map(lambda x: x, range(50), 4)
    assert next(gen) == (0, 0)
    gen.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("dbprune-shard")]


@pytest.mark.parametrize(("setting", "shards", "cores", "want"), [
    ("auto", 10, 16, 10), ("auto", 100, 16, 16), ("auto", 0, 4, 1), (3, 100, 16, 3), (8, 2, 16, 2), (1, 5, 2, 1)])
def test_parallel_is_the_setting_or_the_cores_never_more_than_the_shards(setting, shards, cores, want) -> None:
    assert resolve_parallel(setting, shards, cores=cores) == want


@pytest.mark.parametrize(("threads", "parallel", "cores", "want"), [
    (0, 1, 16, 0), (4, 1, 16, 4), (0, 4, 16, 4), (0, 16, 16, 1), (6, 4, 16, 1), (8, 2, 16, 4), (0, 3, 2, 1)])
def test_threads_are_shared_among_the_shards_in_work(threads, parallel, cores, want) -> None:
    assert shard_threads(threads, parallel, cores=cores) == want


def test_parallel_shards_is_a_setting_with_auto_default() -> None:
    from dbprune_assets.core.settings import build_settings

    assert build_settings({}).compute.parallel_shards == "auto"
    assert build_settings({"compute": {"parallel_shards": 3}}).compute.parallel_shards == 3


# ---------------------------------------------------------------------------
# the same outputs as one at a time
# ---------------------------------------------------------------------------
def _tables_digest(home: Path) -> dict[str, str]:
    """sha256 of each per-shard table file the parallel steps write."""
    out = {}
    for table in ("samples", "problems", "dedup_assignments", "cluster_assignments", "cluster_sums"):
        for f in sorted((home / "tables" / table).glob("*.parquet")):
            out[f"{table}/{f.name}"] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _run(tmp_path: Path, pool: Path, name: str, config: Path) -> tuple[tuple[str, int], dict[str, str]]:
    home = tmp_path / name
    r = run_cli("run", "--config", str(config), "--select", "*pruned_subset",
                env={**fk.env_for(home, pool), "DBPRUNE_PROGRESS": "0"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return fk.decisions_digest(home), _tables_digest(home)


@pytest.mark.slow
def test_parallel_equals_one_at_a_time_on_the_sample_pool(tmp_path: Path, tmp_path_factory) -> None:
    pool = fk.write_pool(tmp_path / "pool", shards=4, samples_per_shard=40)
    enc = fk.shared_encoder(tmp_path_factory)
    one = _run(tmp_path, pool, "one", fk.config_with_encoder(tmp_path / "1.yaml", enc,
                                                               compute={"parallel_shards": 1}))
    four = _run(tmp_path, pool, "four", fk.config_with_encoder(tmp_path / "4.yaml", enc,
                                                                 compute={"parallel_shards": 4}))
    assert one[0][1] > 0 and len(one[1]) >= 4 * 3
    assert four == one


@pytest.mark.slow
def test_parallel_equals_one_at_a_time_on_a_datacomp_pool(tmp_path: Path) -> None:
    from dbprune_assets.core.settings import PoolSettings
    from dbprune_assets.samplepool import write_datacomp_pool

    pool = tmp_path / "pool"
    write_datacomp_pool(pool, PoolSettings(shards=5, samples_per_shard=120, concepts=6, seed=3), models=("b32",))
    base = {"embeddings": {"source": "datacomp", "model": "b32"}, "dbp": {"k": 4, "l": 2, "niter": 10},
            "semdedup": {"dedup_k": 4, "niter": 10}}
    one = _run(tmp_path, pool, "one", write_config(tmp_path / "1.yaml", **base, compute={"parallel_shards": 1}))
    many = _run(tmp_path, pool, "many", write_config(tmp_path / "3.yaml", **base, compute={"parallel_shards": 3}))
    assert one[0][1] == 600 * len(STRATEGIES)  # every sample, once per strategy
    assert many == one
