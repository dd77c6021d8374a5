"""The embedded instance's storage (``cluster/sqlite_events.py``): Dagster's
SQLite storage whose event log keeps one engine per database file.  It must
store and read exactly what Dagster's own does, in the same files, so a home
written before keeps its runs and a home written now opens without it."""

import warnings
from pathlib import Path

import dagster as dg
import pytest
import yaml

from dbprune_assets import cluster
from dbprune_assets.core.store.layout import Layout

warnings.filterwarnings("ignore", category=dg.BetaWarning)

SHARDS = dg.DynamicPartitionsDefinition(name="shards")


@dg.asset(partitions_def=SHARDS, backfill_policy=dg.BackfillPolicy.single_run(),
          check_specs=[dg.AssetCheckSpec("rows_ok", asset="per_shard")])
def per_shard(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    for key in context.partition_keys:
        context.add_asset_metadata({"rows": int(key[-2:])}, partition_key=key)
    return dg.MaterializeResult(metadata={"partitions": len(context.partition_keys)},
                                check_results=[dg.AssetCheckResult(check_name="rows_ok", passed=True)])


def materialise(instance: dg.DagsterInstance, keys: list[str]) -> dg.ExecuteInProcessResult:
    job = dg.Definitions(assets=[per_shard]).resolve_implicit_global_asset_job_def()
    return job.execute_in_process(instance=instance, tags={"dagster/asset_partition_range_start": keys[0],
                                                           "dagster/asset_partition_range_end": keys[-1]})


def history(instance: dg.DagsterInstance) -> list[tuple[str, str | None, object]]:
    """(run id, partition, rows) of every materialisation of ``per_shard``, oldest first."""
    records = instance.fetch_materializations(dg.AssetKey("per_shard"), limit=1000, ascending=True).records
    return [(r.run_id, r.partition_key, r.asset_materialization.metadata["rows"].value)  # type: ignore[union-attr]
            for r in records]


def instance_at(home: Path, yaml_text: str) -> dg.DagsterInstance:
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml_text)
    return dg.DagsterInstance.from_config(str(home))


def test_the_embedded_yaml_names_dbprunes_sqlite_storage_in_the_home(tmp_path: Path) -> None:
    # env {}: no DBPRUNE_SQLITE_STORAGE, so the default (cached)
    home = tmp_path / "a home with spaces: and a colon"
    text = cluster.instance_yaml({}, dagster_home=str(home))
    assert yaml.safe_load(text) == {"telemetry": {"enabled": False}, "storage": {"custom": {
        "module": "dbprune_assets.cluster.sqlite_events", "class": "DbpruneSqliteStorage",
        "config": {"base_dir": str(home)}}}}
    # a cluster instance is PostgreSQL's, home or not
    pg = {cluster.ENV_POSTGRES: "postgresql://u@h/db"}
    assert cluster.instance_yaml(pg, dagster_home=str(home)) == cluster.instance_yaml(pg)


def test_dbprunes_instance_uses_the_cached_event_log_unless_told_plain(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from dbprune_assets.cluster.sqlite_events import CachedSqliteEventLogStorage

    monkeypatch.delenv(cluster.ENV_SQLITE, raising=False)
    layout = Layout(tmp_path / "home", tmp_path / "pool")
    keys = ["s00", "s01"]
    with cluster.dagster_instance(layout) as instance:
        assert isinstance(instance.event_log_storage, CachedSqliteEventLogStorage)
        assert (layout.dagster_home / "history" / "runs").is_dir()  # Dagster's own folders
        instance.add_dynamic_partitions("shards", keys)
        assert materialise(instance, keys[:1]).success
    monkeypatch.setenv(cluster.ENV_SQLITE, "plain")  # the way back, should a Dagster release break the first
    with cluster.dagster_instance(layout) as instance:
        assert (layout.dagster_home / "dagster.yaml").read_text() == cluster.EMBEDDED_YAML
        assert not isinstance(instance.event_log_storage, CachedSqliteEventLogStorage)
        assert materialise(instance, keys[1:]).success
        assert sorted(p for _, p, _ in history(instance)) == keys
    monkeypatch.setenv(cluster.ENV_SQLITE, "fast")
    with pytest.raises(cluster.ClusterError, match="DBPRUNE_SQLITE_STORAGE='fast'.*cached, plain"):
        cluster.dagster_instance(layout)


def test_it_stores_and_reads_what_dagsters_own_storage_does_in_the_same_files(tmp_path: Path) -> None:
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    keys = [f"s{i:02d}" for i in range(12)]
    results = {}
    for home, text in ((plain, cluster.EMBEDDED_YAML), (cached, cluster.instance_yaml({}, dagster_home=str(cached)))):
        with instance_at(home, text) as instance:
            instance.add_dynamic_partitions("shards", keys)
            assert materialise(instance, keys[:5]).success
            assert materialise(instance, keys[5:]).success
            found = history(instance)
            check = instance.event_log_storage.get_latest_asset_check_execution_by_key(
                [dg.AssetCheckKey(dg.AssetKey("per_shard"), "rows_ok")])
            results[home.name] = ([(p, rows) for _, p, rows in found], len({run for run, _, _ in found}),
                                  sorted(instance.get_materialized_partitions(dg.AssetKey("per_shard"))), len(check))
        assert sorted(p.name for p in (home / "history").iterdir()) == ["runs", "runs.db"]
    assert results["cached"] == results["plain"]
    assert sorted(results["plain"][0]) == [(k, int(k[-2:])) for k in keys] and results["plain"][1] == 2


def test_a_home_written_by_either_storage_opens_with_the_other(tmp_path: Path) -> None:
    home = tmp_path / "home"
    keys = [f"s{i:02d}" for i in range(4)]
    with instance_at(home, cluster.EMBEDDED_YAML) as instance:  # a home of an earlier dbprune
        instance.add_dynamic_partitions("shards", keys)
        assert materialise(instance, keys[:2]).success
    with instance_at(home, cluster.instance_yaml({}, dagster_home=str(home))) as instance:
        assert sorted(p for _, p, _ in history(instance)) == keys[:2]
        assert materialise(instance, keys[2:]).success
        assert len(instance.get_runs()) == 2
    with instance_at(home, cluster.EMBEDDED_YAML) as instance:
        assert sorted(p for _, p, _ in history(instance)) == keys
        assert len(instance.get_runs()) == 2


def test_engines_are_kept_for_the_last_databases_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dbprune_assets.cluster import sqlite_events

    monkeypatch.setattr(sqlite_events, "KEPT_ENGINES", 3)
    home = tmp_path / "home"
    keys = ["s00"]
    with instance_at(home, cluster.instance_yaml({}, dagster_home=str(home))) as instance:
        instance.add_dynamic_partitions("shards", keys)
        runs = [materialise(instance, keys).run_id for _ in range(5)]
        storage = instance.event_log_storage
        assert len(storage._engines) == 3  # the index and the last two runs' databases
        # every run's log still reads, through a kept engine or a new one
        for run_id in runs:
            events = instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
            assert [e.dagster_event.event_specific_data.materialization.partition for e in events] == keys
        assert len(storage._engines) == 3


def test_a_table_is_looked_up_once_and_a_missing_one_every_time(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with instance_at(home, cluster.instance_yaml({}, dagster_home=str(home))) as instance:
        storage = instance.event_log_storage
        assert storage.has_table("asset_event_tags") and "asset_event_tags" in storage._found_tables
        assert not storage.has_table("no_such_table") and "no_such_table" not in storage._found_tables


def test_a_moved_or_copied_home_is_refused_until_dbprune_writes_its_yaml(tmp_path: Path) -> None:
    """The yaml names its folder by absolute path: a stale one would open another
    home's runs, or create an empty instance where the home used to be."""
    import shutil

    from dbprune_assets.cluster.sqlite_events import MovedInstanceError

    keys = ["s00"]
    first = Layout(tmp_path / "first", tmp_path / "pool")
    with cluster.dagster_instance(first) as instance:
        instance.add_dynamic_partitions("shards", keys)
        assert materialise(instance, keys).success
    copied = Layout(tmp_path / "copied", tmp_path / "pool")
    shutil.copytree(first.home, copied.home)
    with pytest.raises(MovedInstanceError, match="moved or copied.*dbprune run"):
        dg.DagsterInstance.from_config(str(copied.dagster_home))  # as a Dagster process opens it
    moved = Layout(tmp_path / "moved", tmp_path / "pool")
    first.home.rename(moved.home)
    with pytest.raises(MovedInstanceError, match=str(first.dagster_home)):
        dg.DagsterInstance.from_config(str(moved.dagster_home))
    assert not first.home.exists()  # nothing created where the home used to be
    for layout in (moved, copied):  # what dbprune run, ui and daemon do first
        with cluster.dagster_instance(layout) as instance:
            assert [p for _, p, _ in history(instance)] == keys and len(instance.get_runs()) == 1


def test_a_connection_opened_inside_the_first_one_does_not_wait_forever(tmp_path: Path) -> None:
    """``store_event`` checks a table (a second index connection) inside its index
    transaction; in a fresh process that may be the index's first use, which goes
    through Dagster's own, non-reentrant lock."""
    import threading

    from dbprune_assets.cluster.sqlite_events import CachedSqliteEventLogStorage

    CachedSqliteEventLogStorage(str(tmp_path / "runs"))  # creates the index database
    storage = CachedSqliteEventLogStorage(str(tmp_path / "runs"))  # as a new process opens it: no engine yet
    assert not storage._engines
    found: list[bool] = []

    def nested() -> None:
        with storage.index_connection():
            found.append(storage.has_table("asset_event_tags"))
        with storage.run_connection("a-run") as conn, storage.run_connection("a-run"):
            found.append(conn is not None)

    worker = threading.Thread(target=nested, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "a nested connection waited on a lock its own thread holds"
    assert found == [True, True]
