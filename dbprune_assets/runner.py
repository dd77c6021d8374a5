"""``dbprune run``: materialise the asset graph in dependency order.

Assets are grouped by partitioning in dependency order (ingest shards, then the
global manifest and encoder, then embeddings per shard, …).  Each group is one
Dagster run over all of its out-of-date partitions (a partition range, which the
assets' single-run backfill policy turns into one step that loads the model
once), launched in this process against the persistent instance at
``$DBPRUNE_HOME/dagster`` so ``dbprune ui`` shows every run.  A partition is
up to date when its commit marker's fingerprint matches the current settings
and upstream versions (``defs/common.py``; parents and partitioning are read
from the Dagster definitions); ``--force`` redoes everything selected.

What a person sees: a line per group (``▶`` when it starts, ``✓``/``✗`` when it
ends) with a live bar of its partitions on a terminal; Dagster's own log lines
go to each run's log in the instance (``dbprune ui``), and to the console only
with ``dbprune run -v``.  A failure prints one line naming the step, with an
OS error explained (file, cause, what to do; ``core/running/oserrors.py``); the full
trace stays in the run's log.  The whole run holds the home's one-writer lock
(``core/running/homelock.py``), and each group first checks that the home's volume has
at least ``oserrors.MIN_FREE_BYTES`` free.

Every run it launches carries the origin of the code location the UI serves
(``codelocation.py``), so the UI can re-execute it like a run of its own.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from dbprune_assets import cluster
from dbprune_assets.refits import after_assignments
from dbprune_assets.upstream import refusal, stale_inputs
from dbprune_assets.cluster.instance import console_config, dagster_instance
from dbprune_assets.cluster.tags import RANGE_END_TAG, RANGE_START_TAG  # noqa: F401 (re-exported)
from dbprune_assets.codelocation import give_ui_origin
from dbprune_assets.orphans import PROCESS_TAG, fail_orphaned_runs
from dbprune_assets.core.store.layout import UNPARTITIONED, Layout
from dbprune_assets.core.running.progress import bars_enabled
from dbprune_assets.core.settings import PipelineSettings
from dbprune_assets.core.strategies import registry

Echo = Callable[[str], None]


@dataclass
class GroupResult:
    assets: list[str]
    partitions: list[str]
    skipped: list[str]
    seconds: float
    run_ids: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)  # the group's assets that ran (stale, or reading one that was)


@dataclass
class RunReport:
    groups: list[GroupResult]
    seconds: float
    ok: bool = True
    failure: str | None = None
    #: strategies whose trained models predate their current subset (e.g. after
    #: ``--select '*pruned_subset'``): a comparison of them is not current
    stale_models: list[str] = field(default_factory=list)
    #: the pool holds no images: no models are trained
    metadata_only: bool = False


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


def ingest_first(ordered: list[str], nodes: Mapping[str, Any]) -> list[str]:
    """``ordered`` (topological) with the ingest assets (``Facts.ingest``: they
    read the pool itself) moved to the front, so the pool's size is known (and
    explicit cluster counts are checked against it) before any expensive step.
    That keeps it topological: ingest assets have no parents but ingest assets."""
    ingest = {k for k in ordered if nodes[k].facts.ingest}
    assert all(nodes[p].facts.ingest for k in ingest for p in nodes[k].parents)
    return [k for k in ordered if k in ingest] + [k for k in ordered if k not in ingest]


def _k_refused(layout: Layout, settings: PipelineSettings, shards: list[str]) -> str | None:
    """Why the pool cannot be pruned with these settings: no usable sample at
    all, or explicit cluster counts above it (see
    :func:`~.core.settings.check_k`), checked once the pool is ingested and
    before the encoder, embeddings or k-means run; None when it can."""
    from dbprune_assets.core.settings import SettingsError, check_k
    from dbprune_assets.core.store.state import ingested_ok, nothing_usable

    n_ok = ingested_ok(layout, shards)
    if n_ok is None:
        return None
    if n_ok == 0:
        return nothing_usable(layout, shards)
    try:
        check_k(settings, n_ok)
    except SettingsError as e:
        return str(e)
    return None


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


def batched_ranges(all_keys: list[str], wanted: list[str], per_run: int) -> list[tuple[str, str]]:
    """:func:`contiguous_ranges` of ``wanted``, each cut into runs of at most
    ``per_run`` partitions (so that a cluster spreads them over its workers)."""
    index = {k: i for i, k in enumerate(all_keys)}
    out: list[tuple[str, str]] = []
    for start, end in contiguous_ranges(all_keys, wanted):
        i, j = index[start], index[end]
        out += [(all_keys[a], all_keys[min(a + per_run, j + 1) - 1]) for a in range(i, j + 1, per_run)]
    return out


class GroupBar:
    """A live bar of one group's work: the (asset, partition) pairs committed so
    far, read from the commit markers while the run executes.  Only on a
    terminal (or with ``DBPRUNE_PROGRESS=1``), on stderr."""

    def __init__(self, layout: Layout, assets: list[str], partitions: list[str], label: str, every: float = 1.0):
        self.layout, self.every = layout, every
        self.pending = [(a, p) for a in assets for p in partitions]
        self.bar: Any = None
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        if bars_enabled():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(self.pending), desc=label, unit="partition", file=sys.stderr,
                            dynamic_ncols=True, leave=False, disable=False)
            self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self.stop.wait(self.every):
            left = [(a, p) for a, p in self.pending if not self.layout.state(a, p).exists()]
            self.bar.update(len(self.pending) - len(left))
            self.pending = left

    def __enter__(self) -> "GroupBar":
        if self.thread is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
            self.bar.close()


def run_pipeline(layout: Layout, settings: PipelineSettings, select: str | None = None, force: bool = False,
                 echo: Echo = print, log_level: str | None = None) -> RunReport:
    """Materialise the selected assets group by group (see the module docstring);
    ``log_level``: show Dagster's log lines from that level on the console.
    Raises ``homelock.HomeBusy`` when another process writes the home."""
    from dbprune_assets.core.running.console import quiet_libraries
    from dbprune_assets.core.running.homelock import home_lock

    with home_lock(layout.lock_file), quiet_libraries(layout.home, verbose=log_level is not None):
        return _run_pipeline(layout, settings, select, force, echo, log_level)


@dataclass
class _Pipeline:
    """What every group of one ``dbprune run`` shares."""

    layout: Layout
    settings: PipelineSettings
    force: bool
    echo: Echo
    log_level: str | None
    instance: Any  # dg.DagsterInstance
    nodes: Mapping[str, Any]  # asset -> defs.common.Node
    job: Any  # the definitions' implicit asset job
    strategies: list[str]  # the configured ones, in the registry's order
    repository: str  # the definitions' repository name (the runs' origin, as the UI serves them)
    forced: set[str] = field(default_factory=set)  # assets to redo although up to date (a refit: refits.py)
    selected: set[str] = field(default_factory=set)  # the run's assets (upstream.py: what they read)


@dataclass
class _GroupPlan:
    """A group's partitions (all of them, the stale ones to redo, the rest
    skipped) and the assets of the group that run."""

    kind: str | None  # the group's partitioning
    registered: list[str]  # the shard partitions' keys, in Dagster's order
    shards: list[str]
    all_parts: list[str]
    stale: list[str]
    stale_keys: list[str]  # the partition keys of the stale ones (shard groups: a group's key)
    stale_by: dict[str, list[str]]  # each asset's own out-of-date partitions
    to_run: list[str]
    skipped: list[str]
    label: str
    versions: Any  # defs.common.Versions


def _run_pipeline(layout: Layout, settings: PipelineSettings, select: str | None, force: bool,
                  echo: Echo, log_level: str | None) -> RunReport:
    t0 = time.monotonic()
    defs, graph, nodes, instance = _open(layout, settings, echo)
    ordered = _choose_assets(graph, nodes, select, layout, echo)
    if select is not None and not ordered and _selects_any(graph, select):  # only stages this pool cannot run
        from dbprune_assets.core.pool.poolkind import NEEDS_IMAGES

        return RunReport([], time.monotonic() - t0, ok=False, failure=NEEDS_IMAGES, metadata_only=True)
    groups = plan_groups(ordered, {k: set(nodes[k].parents) for k in ordered},
                         {k: nodes[k].partitioning for k in ordered})
    strategies, left_out = registry.runnable(settings.selection.strategies, layout, settings)
    for name, why in left_out.items():
        echo(f"– strategy {name}: left out: {why}")
    pipeline = _Pipeline(layout, settings, force, echo, log_level, instance, nodes,
                         defs.resolve_implicit_global_asset_job_def(), strategies, defs.get_repository_def().name,
                         selected=set(ordered))
    results: list[GroupResult] = []
    metadata_only = _metadata_only(layout)
    i, refitted = 0, set[str]()
    while i < len(groups):
        result, failure = _run_group(pipeline, groups[i])
        results.append(result)
        if failure is not None:
            return RunReport(results, time.monotonic() - t0, ok=False, failure=failure, metadata_only=metadata_only)
        back = after_assignments(pipeline, groups, i, refitted) if result.partitions else None
        i = i + 1 if back is None else back
    return RunReport(results, time.monotonic() - t0, stale_models=_stale_models(pipeline), metadata_only=metadata_only)


def _metadata_only(layout: Layout) -> bool:
    """No shard of the pool has images (a tar): no model can be trained."""
    from dbprune_assets.core.store.layout import list_pool_shards

    return not any(layout.shard_tar(s).exists() for s in list_pool_shards(layout.pool))


def _stale_models(pipeline: _Pipeline) -> list[str]:
    """The configured strategies that have trained models whose subset has
    changed since they were trained (their marker no longer matches)."""
    from dbprune_assets.core.store.state import read_state
    from dbprune_assets.defs.common import Versions

    versions = Versions(pipeline.layout, pipeline.settings, [], pipeline.nodes, pipeline.strategies)
    return [s for s in pipeline.strategies
            if read_state(pipeline.layout, "trained_model", s) is not None and not versions.is_fresh("trained_model", s)]


def _open(layout: Layout, settings: PipelineSettings, echo: Echo) -> tuple[Any, Any, dict[str, Any], Any]:
    """The definitions, their asset graph and nodes, and the home's instance,
    made ready: stale temporary files removed, runs of dead processes marked
    failed, the shard partitions synchronised with the pool."""
    from dbprune_assets.core.store.atomic import clean_stale_tmp
    from dbprune_assets.defs.common import DbpruneResource, graph_nodes
    from dbprune_assets.defs.ingest import sync_shard_partitions
    from dbprune_assets.definitions import build_defs

    defs = build_defs(DbpruneResource(home=str(layout.home), pool=str(layout.pool)))
    graph = defs.resolve_asset_graph()
    nodes = graph_nodes(graph)
    instance = dagster_instance(layout)
    for tmp_base in layout.tmp_bases():
        clean_stale_tmp(tmp_base)  # half-written files of killed processes
    for run_id in fail_orphaned_runs(instance, defs.get_repository_def().name):
        echo(f"run {run_id} was left unfinished by a process that no longer runs; marked it failed")
    added, removed = sync_shard_partitions(instance, layout, nodes, settings.partitions.shards_per_partition)
    if added or removed:
        echo(f"pool: {len(added)} shard(s) added, {len(removed)} removed")
    return defs, graph, nodes, instance


def _selects_any(graph: Any, select: str) -> bool:
    import dagster as dg

    return bool(dg.AssetSelection.from_coercible(select.split(",")).resolve(graph))


def _choose_assets(graph: Any, nodes: Mapping[str, Any], select: str | None, layout: Layout, echo: Echo) -> list[str]:
    """The selected assets, ingest first, then topological; a metadata-only
    pool leaves out the assets that need images (selected or not), saying so."""
    import dagster as dg

    from dbprune_assets.core.pool.poolkind import NEEDS_IMAGES, is_metadata_only
    from dbprune_assets.core.store.layout import list_pool_shards

    from dbprune_assets.core.settings import SettingsError

    try:
        selection = dg.AssetSelection.from_coercible(select.split(",")) if select else dg.AssetSelection.all()
        keys = {k.to_user_string() for k in selection.resolve(graph)}
    except dg.DagsterError as err:  # a name that is no asset: say which ones are
        raise SettingsError(f"--select {select!r}: {str(err).split('. ')[0]}; the assets are {', '.join(nodes)} "
                            "(a * before or after a name adds its ancestors or descendants)") from None
    ordered = ingest_first([k for k in nodes if k in keys], nodes)
    skipped_stages = [k for k in ordered if nodes[k].facts.needs_images]
    if skipped_stages and is_metadata_only(layout.pool, list_pool_shards(layout.pool)):
        ordered = [k for k in ordered if not nodes[k].facts.needs_images]
        echo(f"– {', '.join(skipped_stages)}: skipped: {NEEDS_IMAGES}")
    return ordered


def _plan_group(pipeline: _Pipeline, group: list[str]) -> _GroupPlan:
    """Which of the group's partitions are out of date, and which of its assets run."""
    from dbprune_assets.defs.common import Versions, registered_shards

    registered = list(pipeline.instance.get_dynamic_partitions("shards"))  # Dagster's order: ranges follow it
    shards = registered_shards(sorted(registered), pipeline.layout.pool)
    versions = Versions(pipeline.layout, pipeline.settings, shards, pipeline.nodes, pipeline.strategies)
    kind = pipeline.nodes[group[0]].partitioning
    all_parts = versions.keys(kind)  # strategies: the configured ones, in the registry's order
    stale_by = {a: [p for p in all_parts if pipeline.force or a in pipeline.forced or not versions.is_fresh(a, p)]
                for a in group}
    stale = [p for p in all_parts if any(p in stale_by[a] for a in group)]
    # the stale assets and, after them, those of the group that read them (a
    # group's assets share a partitioning; an up-to-date encoder beside a stale
    # pool_manifest is not retrained)
    to_run: list[str] = []
    for a in group:  # topological order
        if stale_by[a] or any(p in to_run for p in pipeline.nodes[a].parents):
            to_run.append(a)
    stale_keys = stale
    if kind == "shard" and stale and len(registered) != len(shards):  # shard groups: a group runs whole
        of = {sh: key for key in registered for sh in registered_shards([key], pipeline.layout.pool)}
        stale_keys = list(dict.fromkeys(of[sh] for sh in stale if sh in of))
        stale = registered_shards(sorted(stale_keys), pipeline.layout.pool)
    skipped = [p for p in all_parts if p not in stale]
    return _GroupPlan(kind, registered, shards, all_parts, stale, stale_keys, stale_by, to_run, skipped,
                      label=", ".join(to_run or group), versions=versions)


def _run_group(pipeline: _Pipeline, group: list[str]) -> tuple[GroupResult, str | None]:
    """One group: up to date, refused before it starts (cluster counts the
    pool cannot hold, too little free space), or run; (its result, why the
    pipeline stops or None)."""
    from dbprune_assets.core.running.oserrors import MIN_FREE_BYTES, NotEnoughSpace, require_free_space

    g0 = time.monotonic()
    plan = _plan_group(pipeline, group)
    # a group current with inputs that are not (a setting of a parent changed) is refused as well:
    # "up to date" would say its outputs match the settings and pool now
    reading, parts = (plan.to_run, plan.stale) if plan.stale else (group, plan.all_parts)
    if stale := stale_inputs(plan.versions, pipeline.nodes, reading, parts, pipeline.selected):
        return _not_started(pipeline, group, plan, refusal(reading, stale, pipeline.nodes), g0)
    if not plan.stale:
        pipeline.echo(f"✓ {plan.label}: up to date ({len(plan.all_parts)} partition(s))")
        return GroupResult(group, [], plan.skipped, 0.0), None
    scope = f"{len(plan.stale)} of {len(plan.all_parts)} partitions" if plan.kind else "unpartitioned"
    if not all(pipeline.nodes[a].facts.ingest for a in group) and (
            refused := _k_refused(pipeline.layout, pipeline.settings, plan.shards)):
        return _not_started(pipeline, group, plan, refused, g0)
    pipeline.echo(f"▶ {plan.label} [{scope}] …")
    try:
        require_free_space(pipeline.layout.home, MIN_FREE_BYTES, plan.label)
    except NotEnoughSpace as e:
        return _not_started(pipeline, group, plan, str(e), g0)
    return _execute_group(pipeline, group, plan, g0)


def _not_started(pipeline: _Pipeline, group: list[str], plan: _GroupPlan, why: str,
                 g0: float) -> tuple[GroupResult, str]:
    pipeline.echo(f"✗ {plan.label} not started: {why}")
    return GroupResult(group, [], plan.skipped, time.monotonic() - g0), why


def _execute_group(pipeline: _Pipeline, group: list[str], plan: _GroupPlan,
                   g0: float) -> tuple[GroupResult, str | None]:
    """Run the group's stale partitions, one run per range of at most
    ``partitions.per_run`` (in process, or on the cluster's workers)."""
    from dbprune_assets.core.store.state import clear_state

    # an out-of-date partition is redone from scratch: drop its commit markers
    # first, so a crash half-way through (even of a --force re-run) leaves it out
    # of date.  A partition that runs only because a parent in this run is redone
    # keeps its marker: if the parent comes out the same, the step finds it
    # current and keeps its output (Session.unchanged); if not, it is stale anyway
    for a in plan.to_run:
        for p in plan.stale_by[a]:
            clear_state(pipeline.layout, a, p)
    per_run = pipeline.settings.partitions.per_run
    ranges = [(None, None)] if plan.kind is None else batched_ranges(
        plan.registered if plan.kind == "shard" else list(registry.names()), plan.stale_keys, per_run)
    with GroupBar(pipeline.layout, plan.to_run, plan.stale, plan.label), \
            cluster.planned_events(min(len(plan.stale_keys), per_run) if plan.kind else 1):
        if cluster.enabled():
            run_ids, failed = cluster.run_ranges(pipeline.job, pipeline.instance, plan.to_run, ranges,
                                                 pipeline.log_level, layout=pipeline.layout, echo=pipeline.echo)
            give_ui_origin(pipeline.instance, run_ids, pipeline.repository)  # they have ended
        else:
            run_ids, failed = _run_ranges(pipeline.job, pipeline.instance, plan.to_run, ranges, pipeline.log_level,
                                          pipeline.repository)
    if failed is not None:
        msg = _failure_message(failed, pipeline.layout)
        pipeline.echo(f"✗ {plan.label} failed (run {failed.run_id}): {msg}")
        return GroupResult(group, plan.stale, plan.skipped, time.monotonic() - g0, run_ids, plan.to_run), msg
    dt = time.monotonic() - g0
    pipeline.echo(f"✓ {plan.label}: {len(plan.stale) if plan.kind else 1} partition(s) in {dt:.1f}s")
    if "raw_metadata" in plan.to_run:
        from dbprune_assets.core.pool.reingest import reread_line

        if line := reread_line(pipeline.layout, plan.stale):
            pipeline.echo(line)
    return GroupResult(group, plan.stale, plan.skipped, dt, run_ids, plan.to_run), None


def _run_ranges(job: Any, instance: Any, group: list[str], ranges: list[tuple[str | None, str | None]],
                log_level: str | None, repository: str) -> tuple[list[str], Any]:
    """One run per partition range (``(None, None)``: unpartitioned) of the
    group's assets, in process, each given the UI's origin however it ends
    (:func:`give_ui_origin`); (run ids, the failed run's result or None)."""
    import uuid

    import dagster as dg

    from dbprune_assets.core.store.atomic import process_tmp_name

    run_ids = []
    for start, end in ranges:
        tags = {"dbprune/cli": "run", PROCESS_TAG: process_tmp_name()}
        if start is not None:
            tags.update({RANGE_START_TAG: start, RANGE_END_TAG: str(end)})
        run_id = str(uuid.uuid4())  # as Dagster makes them; known before the run, for its origin
        try:
            result = job.execute_in_process(run_config=console_config(log_level), instance=instance,
                                            asset_selection=[dg.AssetKey(a) for a in group], tags=tags,
                                            raise_on_error=False, run_id=run_id)
        finally:  # an interrupted run too: the UI re-executes it
            give_ui_origin(instance, [run_id], repository)
        run_ids.append(result.run_id)
        if not result.success:
            return run_ids, result
    return run_ids, None


def _failure_message(result, layout: Layout) -> str:  # ExecuteInProcessResult
    """One line: the failed step and its error (an OS error explained), with a
    hint when the home's volume is (nearly) full, the usual cause of errors
    that do not say so (``iostream error`` of a training subprocess)."""
    from dbprune_assets.core.running.oserrors import MIN_FREE_BYTES, explain_text, free_bytes, human_bytes

    text = "the run failed; open it in `dbprune ui` for the logs"
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            err = event.step_failure_data.error
            while err.cause is not None and "dagster" in (err.cls_name or "").lower():
                err = err.cause
            # dbprune's own errors say what happened: without Dagster's "module.Class: " before it
            message = re.sub(r"^dbprune_assets\.[\w.]+: ", "", err.message.strip())
            text = f"[{event.step_key}] {explain_text(message, layout.home) or message}"
            break
    free = free_bytes(layout.home)
    if free < MIN_FREE_BYTES and "free space" not in text and "disk is full" not in text:
        text += f" (the volume of {layout.home} has only {human_bytes(free)} free: a full disk is the likely cause)"
    return text + " — the full trace is in the run's log (dbprune ui, or re-run with -v)"


__all__ = ["run_pipeline", "plan_groups", "contiguous_ranges", "dagster_instance", "RunReport", "UNPARTITIONED"]
