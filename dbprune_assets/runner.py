"""``dbprune run``: materialise the asset graph in dependency order.

Assets are grouped by partitioning in dependency order (ingest shards, then the
global manifest and encoder, then embeddings per shard, …).  Each group is one
Dagster run over all of its out-of-date partitions (a partition range, which the
assets' single-run backfill policy turns into one step that loads the model
once), launched in this process against the persistent instance at
``$DBPRUNE_HOME/dagster`` so ``dbprune ui`` shows every run.  A partition is
up to date when its commit marker's fingerprint matches the current settings
and upstream versions (``defs/common.py``); ``--force`` redoes everything
selected.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from .core.layout import UNPARTITIONED, Layout
from .core.settings import STRATEGIES, PipelineSettings

Echo = Callable[[str], None]


@dataclass
class GroupResult:
    assets: list[str]
    partitions: list[str]
    skipped: list[str]
    seconds: float
    run_ids: list[str] = field(default_factory=list)


@dataclass
class RunReport:
    groups: list[GroupResult]
    seconds: float
    ok: bool = True
    failure: str | None = None


def dagster_instance(layout: Layout):  # -> dg.DagsterInstance
    import dagster as dg

    layout.dagster_home.mkdir(parents=True, exist_ok=True)
    cfg = layout.dagster_home / "dagster.yaml"
    if not cfg.exists():
        from .core.atomic import write_bytes

        write_bytes(cfg, b"telemetry:\n  enabled: false\n", layout.tmp)  # atomic: a kill never leaves half of it
    # this home's instance, whatever $DAGSTER_HOME says (`dbprune ui` exports it for dagster dev)
    return dg.DagsterInstance.from_config(str(layout.dagster_home))


def plan_groups(keys: list[str], parents: dict[str, set[str]], partitioning: dict[str, str | None]) -> list[list[str]]:
    """Order ``keys`` into groups of equal partitioning, each after its inputs."""
    remaining = list(keys)  # already topologically sorted
    done: set[str] = set()
    groups: list[list[str]] = []
    while remaining:
        ready = [k for k in remaining if all(p in done or p not in remaining for p in parents[k])]
        kind = partitioning[ready[0]]
        group: list[str] = []
        changed = True
        while changed:
            changed = False
            for k in remaining:
                if k in group or partitioning[k] != kind:
                    continue
                if all(p in done or p in group or p not in remaining for p in parents[k]):
                    group.append(k)
                    changed = True
        groups.append(group)
        done.update(group)
        remaining = [k for k in remaining if k not in done]
    return groups


def contiguous_ranges(all_keys: list[str], wanted: list[str]) -> list[tuple[str, str]]:
    """Split ``wanted`` into maximal runs that are contiguous in ``all_keys``."""
    wanted_set = set(wanted)
    ranges: list[tuple[str, str]] = []
    start = prev = None
    for k in all_keys:
        if k in wanted_set:
            if start is None:
                start = k
            prev = k
        elif start is not None:
            ranges.append((start, prev))  # type: ignore[arg-type]
            start = prev = None
    if start is not None:
        ranges.append((start, prev))  # type: ignore[arg-type]
    return ranges


def run_pipeline(layout: Layout, settings: PipelineSettings, select: str | None = None, force: bool = False,
                 echo: Echo = print, log_level: str = "INFO") -> RunReport:
    import dagster as dg
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

    from .defs.common import GRAPH, DbpruneResource, Versions
    from .defs.ingest import sync_shard_partitions
    from .definitions import build_defs

    defs = build_defs(DbpruneResource(home=str(layout.home), pool=str(layout.pool)))

    from .core.atomic import clean_stale_tmp, process_tmp_name
    from .core.state import clear_state

    t0 = time.monotonic()
    instance = dagster_instance(layout)
    clean_stale_tmp(layout.tmp_base)  # half-written files of killed processes
    for run_id in fail_orphaned_runs(instance):
        echo(f"run {run_id} was left unfinished by a process that no longer runs; marked it failed")
    added, removed = sync_shard_partitions(instance, layout)
    if added or removed:
        echo(f"pool: {len(added)} shard(s) added, {len(removed)} removed")

    graph = defs.resolve_asset_graph()
    selection = dg.AssetSelection.from_coercible(select.split(",")) if select else dg.AssetSelection.all()
    keys = {k.to_user_string() for k in selection.resolve(graph)}
    ordered = [k.to_user_string() for k in graph.toposorted_asset_keys if k.to_user_string() in keys]
    unknown = [k for k in ordered if k not in GRAPH]
    if unknown:
        raise RuntimeError(f"assets {unknown} have no versioning entry in defs/common.py GRAPH")
    parents = {k: set(GRAPH[k].parents) for k in ordered}
    partitioning = {k: GRAPH[k].partitioning for k in ordered}
    groups = plan_groups(ordered, parents, partitioning)

    job = defs.resolve_implicit_global_asset_job_def()
    strategies = [s for s in STRATEGIES if s in settings.selection.strategies]
    results: list[GroupResult] = []
    for group in groups:
        g0 = time.monotonic()
        shards = sorted(instance.get_dynamic_partitions("shards"))
        versions = Versions(layout, settings, shards, strategies)
        kind = partitioning[group[0]]
        all_parts = versions.keys(kind)  # strategies: the configured ones, in STRATEGIES order
        stale = [p for p in all_parts if force or any(not versions.is_fresh(a, p) for a in group)]
        skipped = [p for p in all_parts if p not in stale]
        label = ", ".join(group)
        if not stale:
            echo(f"✓ {label}: up to date ({len(all_parts)} partition(s))")
            results.append(GroupResult(group, [], skipped, 0.0))
            continue
        scope = f"{len(stale)} of {len(all_parts)} partitions" if kind else "unpartitioned"
        echo(f"▶ {label} [{scope}] …")
        run_ids = []
        asset_keys = [dg.AssetKey(a) for a in group]
        ranges = [(None, None)] if kind is None else contiguous_ranges(
            shards if kind == "shard" else list(STRATEGIES), stale)
        # a partition is redone from scratch: drop its commit markers first, so a
        # crash half-way through (even of a --force re-run) leaves it out of date
        for a in group:
            for p in stale:
                clear_state(layout, a, p)
        for start, end in ranges:
            tags = {"dbprune/cli": "run", PROCESS_TAG: process_tmp_name()}
            if start is not None:
                tags[ASSET_PARTITION_RANGE_START_TAG] = start
                tags[ASSET_PARTITION_RANGE_END_TAG] = end
            result = job.execute_in_process(
                run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
                instance=instance, asset_selection=asset_keys, tags=tags, raise_on_error=False,
            )
            run_ids.append(result.run_id)
            if not result.success:
                msg = _failure_message(result)
                echo(f"✗ {label} failed (run {result.run_id}): {msg}")
                results.append(GroupResult(group, stale, skipped, time.monotonic() - g0, run_ids))
                return RunReport(results, time.monotonic() - t0, ok=False, failure=msg)
        dt = time.monotonic() - g0
        echo(f"✓ {label}: {len(stale) if kind else 1} partition(s) in {dt:.1f}s")
        results.append(GroupResult(group, stale, skipped, dt, run_ids))
    return RunReport(results, time.monotonic() - t0)


PROCESS_TAG = "dbprune/process"  # <host>-<pid> of the `dbprune run` that executes the run


def fail_orphaned_runs(instance) -> list[str]:
    """Mark failed the runs of `dbprune run` processes of this host that died
    (SIGKILL, OOM, power cut) while the run was in progress, so the UI does not
    show them running forever.  Nothing waits on such a run: `dbprune run`
    executes in process, without a queue or concurrency slots."""
    import dagster as dg

    from .core.atomic import pid_alive, process_tmp_name

    host = process_tmp_name().rsplit("-", 1)[0]
    unfinished = [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]
    failed = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=unfinished, tags={"dbprune/cli": "run"})):
        owner_host, _, pid = run.tags.get(PROCESS_TAG, "").rpartition("-")
        if owner_host == host and pid.isdigit() and not pid_alive(int(pid)):
            instance.report_run_failed(run, message=f"the dbprune run process {run.tags[PROCESS_TAG]} died "
                                                    "(killed) before the run finished; `dbprune run` redoes its unfinished partitions")
            failed.append(run.run_id)
    return failed


def _failure_message(result) -> str:  # ExecuteInProcessResult
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            err = event.step_failure_data.error
            while err.cause is not None and "dagster" in (err.cls_name or "").lower():
                err = err.cause
            return f"[{event.step_key}] {err.message.strip()}"
    return "the run failed; open it in `dbprune ui` for the logs"


__all__ = ["run_pipeline", "plan_groups", "contiguous_ranges", "dagster_instance", "RunReport", "UNPARTITIONED"]
