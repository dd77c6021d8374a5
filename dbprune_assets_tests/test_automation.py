"""Shards processed as they land (issue 20, item 3): the pool sensor registers
and ingests them, Dagster's declarative automation (``defs/automation.py``)
carries them through to decisions, evaluated here tick by tick in process
as the daemon would, with each requested run executed before the next tick."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from dbprune_assets.core.settings import STRATEGIES, PoolSettings
from dbprune_assets.core.store.layout import list_pool_shards

from .faultkit import decisions_digest, tick_pool_sensor
from .test_refit import Home, _move

pytestmark = pytest.mark.slow


def _defs() -> dg.Definitions:
    from dbprune_assets.definitions import defs

    return defs


def _run_requested(instance: dg.DagsterInstance, requested: dict[dg.AssetKey, list[str | None]]) -> None:
    """Materialise what a tick requested, parents first: a partitioned asset's
    partitions as one range per run (single-run backfills, as the daemon's)."""
    from dbprune_assets.definitions import asset_nodes

    defs = _defs()
    graph = defs.resolve_asset_graph()
    job = defs.resolve_implicit_global_asset_job_def()
    for key in map(dg.AssetKey, asset_nodes()):  # topological order
        parts = requested.get(key)
        if not parts:
            continue
        tags: dict[str, str] = {}
        if parts != [None]:
            order = graph.get(key).partitions_def.get_partition_keys(dynamic_partitions_store=instance)
            chosen = sorted(parts, key=order.index)
            assert chosen == order[order.index(chosen[0]):order.index(chosen[-1]) + 1], (key, chosen)  # contiguous
            tags = {"dagster/asset_partition_range_start": chosen[0], "dagster/asset_partition_range_end": chosen[-1]}
        out = job.execute_in_process(instance=instance, asset_selection=[key], tags=tags, raise_on_error=False)
        assert out.success, (key, parts)


def _automate(instance: dg.DagsterInstance, sensor: dict[str, Any], ticks: int = 12) -> list[dict[str, list[str]]]:
    """Automation ticks until one requests nothing; what each tick requested.
    ``sensor`` keeps the cursor from one call to the next, as the sensor does."""
    from dbprune_assets.defs.automation import AUTOMATED

    defs, seen = _defs(), []
    for _ in range(ticks):
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=AUTOMATED,
                                                   cursor=sensor.get("cursor"))
        sensor["cursor"] = result.cursor
        requested = {}
        for key in AUTOMATED.resolve(defs.resolve_asset_graph()):
            parts = result.get_requested_partitions(key)
            if parts:
                requested[key] = [p for p in parts]
        if not requested:
            return seen
        seen.append({k.to_user_string(): sorted(p or "all" for p in v) for k, v in requested.items()})
        _run_requested(instance, requested)
    raise AssertionError(f"automation still requesting after {ticks} ticks: {seen[-3:]}")


@pytest.fixture(scope="module")
def landed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A pruned pool of three shards; two shards dropped in at once, then one
    taken out, each carried through by the sensors alone."""
    from dbprune_assets.samplepool import write_datacomp_pool

    root = tmp_path_factory.mktemp("automation")
    mp = pytest.MonkeyPatch()
    pool, aside = root / "pool", root / "aside"
    write_datacomp_pool(pool, PoolSettings(shards=5, samples_per_shard=150, concepts=6, seed=1), models=("b32",))
    shards = list_pool_shards(pool)
    aside.mkdir()
    for stem in shards[3:]:
        _move(pool, aside, stem)
    home = Home(mp, root / "home", pool)
    home.run()
    from dbprune_assets.runner import dagster_instance

    instance = dagster_instance(home.layout)
    sensor: dict[str, Any] = {}
    out: dict[str, Any] = {"shards": shards, "home": home, "first": _automate(instance, sensor),
                           "idle": _automate(instance, sensor)}
    for stem in shards[3:]:  # a burst: two shards at once
        _move(aside, pool, stem)
    out["tick_add"] = tick_pool_sensor(instance)
    out["tick_manifest"] = tick_pool_sensor(instance)
    out["added"] = _automate(instance, sensor)
    out["digest_added"] = decisions_digest(home.layout.home)
    out["rerun_added"] = home.run()[1]  # dbprune run after the automation: nothing left to do
    _move(pool, aside, shards[0])  # a shard leaves
    out["tick_remove"] = tick_pool_sensor(instance)
    out["removed"] = _automate(instance, sensor)
    out["digest_removed"] = decisions_digest(home.layout.home)
    out["rerun_removed"] = home.run()[1]
    yield out
    instance.dispose()
    mp.undo()
    shutil.rmtree(root, ignore_errors=True)


def test_nothing_is_requested_after_dbprune_run_or_while_nothing_changes(landed: dict[str, Any]) -> None:
    assert landed["first"] == [] and landed["idle"] == []


def test_a_burst_of_shards_is_carried_to_new_decisions_in_one_pool_wide_pass(landed: dict[str, Any]) -> None:
    new = landed["shards"][3:]
    assert [r.partition_key for r in landed["tick_add"]] == new  # the pool sensor ingests them
    assert [list(map(str, r.asset_selection or [])) for r in landed["tick_manifest"]] == [['AssetKey([\'pool_manifest\'])']]
    ticks = landed["added"]
    # the new shards' per-shard steps first, against the fits in force; no other shard's
    assert ticks and ticks[0] == {"embeddings": sorted(new), "dedup_assignments": sorted(new)}, ticks
    assert not any("embeddings" in t or "dedup_assignments" in t for t in ticks[1:]), ticks
    assert all(ticks.count(t) == 1 for t in ticks)
    for pool_wide in ("dedup_centroids", "semantic_dedup", "candidates", "centroids", "cluster_complexity"):
        assert sum(pool_wide in t for t in ticks) == 1, (pool_wide, ticks)  # once for the burst
    assert sum("pruned_subset" in t for t in ticks) == 1
    digest, rows = landed["digest_added"]
    assert rows == len(STRATEGIES) * 5 * 150  # every strategy decided every sample of the five shards
    assert not landed["rerun_added"]  # dbprune run afterwards finds everything up to date


def test_a_shard_taken_out_is_decided_away_in_one_pass(landed: dict[str, Any]) -> None:
    assert [list(map(str, r.asset_selection or [])) for r in landed["tick_remove"]] == [['AssetKey([\'pool_manifest\'])']]
    ticks = landed["removed"]
    assert ticks and not any("embeddings" in t for t in ticks)
    assert sum("pruned_subset" in t for t in ticks) == 1
    assert landed["digest_removed"][1] == len(STRATEGIES) * 4 * 150
    # dbprune run afterwards finds everything up to date: the automation did what it would have done (whose
    # decisions equal a fresh home's with the same fits: test_refit.py)
    assert not landed["rerun_removed"]


def _decided_shards(home: Path) -> dict[str, set[str]]:
    """The shards each strategy's decisions cover, from the files (no catalog: the daemon may be refreshing it)."""
    import polars as pl

    out = {}
    for f in sorted((home / "tables" / "decisions").glob("*.parquet")):
        try:
            out[f.stem] = set(pl.read_parquet(f, columns=["shard"])["shard"].unique())
        except Exception:  # noqa: BLE001 - being replaced this very moment: read again next time
            pass
    return out


def _busy(dagster_home: Path) -> bool:
    """Whether the instance has a run queued or going, or a backfill going."""
    instance = dg.DagsterInstance.from_config(str(dagster_home))
    try:
        going = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
                 dg.DagsterRunStatus.STARTED]
        return bool(instance.get_runs_count(dg.RunsFilter(statuses=going))) or any(
            getattr(b.status, "value", b.status) == "REQUESTED" for b in instance.get_backfills())
    finally:
        instance.dispose()


@pytest.mark.daemon
def test_a_shard_dropped_in_while_the_daemon_runs_is_decided_without_a_command(tmp_path: Path) -> None:
    """A real ``dbprune daemon`` (sensors every 2 s) beside a pruned pool: a
    shard moved into the pool folder reaches every strategy's decisions with no
    command typed, and ``dbprune run`` afterwards finds nothing to do.  Bounded
    at 300 s; measured 131 s from the drop to the decisions on a 2-core machine
    (two levels of the chain span shards, each a backfill: the backfill daemon
    wakes every 30 s).  ``pytest -m daemon`` runs it; the README's ``pytest``
    skips it (the ``daemon`` marker), the tick-by-tick tests above run always."""
    import os
    import subprocess
    import time

    from dbprune_assets.samplepool import write_datacomp_pool

    from .test_daemon import _wait_for_heartbeat
    from .uiproc import dbprune_exe, stop_group

    mp = pytest.MonkeyPatch()
    pool, aside = tmp_path / "pool", tmp_path / "aside"
    write_datacomp_pool(pool, PoolSettings(shards=3, samples_per_shard=150, concepts=6, seed=2), models=("b32",))
    new = list_pool_shards(pool)[2]
    aside.mkdir()
    _move(pool, aside, new)
    home = Home(mp, tmp_path / "home", pool, drift={"min_samples": 10**6})  # kept fits: one pass (no refit)
    home.run()
    env = {**os.environ, "DBPRUNE_HOME": str(home.layout.home), "DBPRUNE_POOL": str(pool),
           "DAGSTER_HOME": str(home.layout.home / "dagster"), "DBPRUNE_SENSOR_INTERVAL_S": "2"}
    log = tmp_path / "daemon.log"
    with log.open("w") as out:
        daemon = subprocess.Popen([dbprune_exe(), "daemon"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_heartbeat(home.layout.home / "dagster", log)
        t0 = time.monotonic()
        _move(aside, pool, new)
        deadline = t0 + 300
        while time.monotonic() < deadline:
            decided = _decided_shards(home.layout.home)
            if len(decided) == len(STRATEGIES) and all(new in shards for shards in decided.values()):
                break
            assert daemon.poll() is None, log.read_text()[-3000:]
            time.sleep(2)
        else:
            raise AssertionError(f"the new shard was not decided in 300 s:\n{log.read_text()[-3000:]}")
        print(f"decided {time.monotonic() - t0:.0f} s after the shard was dropped in")
        while _busy(home.layout.home / "dagster") and time.monotonic() < deadline:
            time.sleep(2)  # the last runs end (their checks, the catalog)
    finally:
        stop_group(daemon)
        mp.undo()
    _, ran = home.run()  # nothing left for dbprune run: the daemon's runs brought every asset up to date
    assert not ran, ran
