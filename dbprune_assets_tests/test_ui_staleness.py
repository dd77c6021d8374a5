"""One notion of staleness, whoever launched the run (issue 18, item 12): after
materialisations launched from the UI (through Dagster's GraphQL API, the
code location the UI serves loaded in process), the staleness the UI shows
(``staleStatus``) is ``dbprune run``'s plan, partition by partition.  An
output that comes out the same keeps its data version, so what reads it stays
up to date for both; one that changes makes its readers stale for both."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

from dbprune_assets.codelocation import CODE_LOCATION
from dbprune_assets.core.store.layout import Layout
from dbprune_assets.defs.common import DbpruneResource, Session, stage, strategy_partitions

from .test_ui import graphql, range_tags
from .test_ui_reexecute import tiny_home, ui_graphql, ui_instance

#: in-process runs inside the GraphQL server's event loop leave it this warning
ASYNC_WARNING = "ignore:coroutine 'BaseEventLoop.shutdown_asyncgens' was never awaited:RuntimeWarning"

LAUNCH = """mutation LaunchPipelineExecution($executionParams: ExecutionParams!) {
  launchPipelineExecution(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on PythonError { message stack }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""

Plan = dict[str, dict[str, bool]]  # asset -> partition -> stale

# ---------------------------------------------------------------------------
# the mechanism, on two toy stages: a step over several partitions, then one


#: what each partition of ``toy_source`` holds (its data version)
CONTENT: dict[str, str] = {}


@stage(group="toy", kinds={"python"}, partitions=strategy_partitions)
def toy_source(context: dg.AssetExecutionContext, s: Session) -> dg.MaterializeResult:
    """A partitioned stage whose data version is its content."""
    for strategy in context.partition_keys:
        s.commit("toy_source", strategy, {}, data_version=CONTENT[strategy], metadata={"content": CONTENT[strategy]})
    return dg.MaterializeResult(metadata={"step": len(context.partition_keys)})


@stage(group="toy", kinds={"python"}, partitions=strategy_partitions, deps=[toy_source])
def toy_reader(context: dg.AssetExecutionContext, s: Session) -> dg.MaterializeResult:
    """Reads the same partition of ``toy_source``."""
    for strategy in context.partition_keys:
        s.commit("toy_reader", strategy, {})
    return dg.MaterializeResult()


TOY_DEFS = dg.Definitions(assets=[toy_source, toy_reader], resources={"dbprune": DbpruneResource()})
TOY = ["dbp", "ssp", "random"]


def toy_stale(tmp_path: Path, instance: dg.DagsterInstance) -> tuple[list[str], list[str]]:
    """The partitions of ``toy_reader`` stale for ``dbprune run`` (its markers'
    fingerprints) and for the UI (``staleStatusByPartition``)."""
    from dbprune_assets.core.settings import build_settings
    from dbprune_assets.defs.common import Versions, graph_nodes

    layout = Layout.from_env(tmp_path / "home", tmp_path / "home" / "pool")
    versions = Versions(layout, build_settings({}), [], graph_nodes(TOY_DEFS.resolve_asset_graph()), TOY)
    with graphql(instance, __name__, "TOY_DEFS") as run:
        data = run('{ assetNodeOrError(assetKey: {path: ["toy_reader"]}) { ... on AssetNode { '
                   f"staleStatusByPartition(partitions: {json.dumps(TOY)}) }} }} }}")
    ui = [p for p, st in zip(TOY, data["assetNodeOrError"]["staleStatusByPartition"]) if st != "FRESH"]
    return [p for p in TOY if not versions.is_fresh("toy_reader", p)], ui


def test_each_partition_of_a_step_reports_its_marker_version(tmp_path: Path) -> None:
    instance = dg.DagsterInstance.local_temp(str(tmp_path))
    home = tmp_path / "home"
    resources = {"dbprune": DbpruneResource(home=str(home), pool=str(home / "pool"))}

    def materialize(selection: list[Any], keys: list[str]) -> None:
        tags = range_tags(keys) if len(keys) > 1 else {"dagster/partition": keys[0]}
        assert dg.materialize([toy_source, toy_reader], selection=selection, instance=instance, tags=tags,
                              resources=resources).success

    CONTENT.update(dbp="a", ssp="b", random="c")
    materialize([toy_source, toy_reader], TOY)
    assert toy_stale(tmp_path, instance) == ([], [])
    materialize([toy_source], ["ssp"])  # the same content: nothing to redo
    assert toy_stale(tmp_path, instance) == ([], [])
    CONTENT["ssp"] = "b2"  # new content in one partition of a step over three: its reader alone is stale
    materialize([toy_source], TOY)
    assert toy_stale(tmp_path, instance) == (["ssp"], ["ssp"])
    materialize([toy_reader], ["ssp"])
    CONTENT["random"] = "c2"  # and of a step over one partition
    materialize([toy_source], ["random"])
    assert toy_stale(tmp_path, instance) == (["random"], ["random"])
    with graphql(instance, __name__, "TOY_DEFS") as run:  # each partition shows its own metadata still
        from .test_ui import partition_metadata

        meta = partition_metadata(run, "toy_source", TOY)
    assert {p: m["content"] for p, m in meta.items()} == {"dbp": "a", "ssp": "b2", "random": "c2"}
    assert meta["dbp"]["step"] == 3 and meta["random"]["step"] == 1


# ---------------------------------------------------------------------------
# the real graph


def runner_plan(layout: Layout) -> Plan:
    """What ``dbprune run`` would redo now: each asset's partitions, stale or
    not, as its planner decides (``runner._plan_group``, without ``--force``)."""
    from dbprune_assets import runner
    from dbprune_assets.defs.common import current_settings

    settings = current_settings(layout)
    defs, _graph, nodes, instance = runner._open(layout, settings, lambda _line: None)
    strategies = [s for s in runner.registry.names() if s in settings.selection.strategies]
    pipeline = runner._Pipeline(layout, settings, False, lambda _line: None, None, instance, nodes,
                                defs.resolve_implicit_global_asset_job_def(), strategies, "__repository__")
    plan: Plan = {}
    for asset in nodes:
        group = runner._plan_group(pipeline, [asset])
        plan[asset] = {p: p in group.stale_by[asset] for p in group.all_parts}
    return plan


def ui_plan(run: Any, plan: Plan) -> Plan:
    """The UI's staleness of the same partitions: stale unless ``FRESH`` (a
    never materialised partition is ``MISSING`` there, to be run here)."""
    out: Plan = {}
    for asset, parts in plan.items():
        node = '{ assetNodeOrError(assetKey: {path: ["%s"]}) { ... on AssetNode { %s } } }'
        if list(parts) == ["all"]:
            status = [run(node % (asset, "staleStatus"))["assetNodeOrError"]["staleStatus"]]
        else:
            field = f"staleStatusByPartition(partitions: {json.dumps(list(parts))})"
            status = run(node % (asset, field))["assetNodeOrError"]["staleStatusByPartition"]
        out[asset] = {p: s != "FRESH" for p, s in zip(parts, status)}
    return out


def launch(run: Any, assets: list[str], tags: dict[str, str] | None = None) -> None:
    """Materialise ``assets`` as the UI's "Materialize" does (in this process)."""
    params = {"selector": {"repositoryLocationName": CODE_LOCATION, "repositoryName": "__repository__",
                           "pipelineName": "__ASSET_JOB", "assetSelection": [{"path": [a]} for a in assets]},
              "runConfigData": {"execution": {"config": {"in_process": {}}}},
              "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]},
              "mode": "default"}
    launched = run(LAUNCH, {"executionParams": params})["launchPipelineExecution"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    assert launched["run"]["status"] == "SUCCESS", launched


def stale(plan: Plan) -> dict[str, list[str]]:
    return {a: [p for p, s in parts.items() if s] for a, parts in plan.items() if any(parts.values())}


def agree(layout: Layout, run: Any) -> dict[str, list[str]]:
    """The UI's staleness equals ``dbprune run``'s plan; what is stale."""
    plan = runner_plan(layout)
    assert stale(ui_plan(run, plan)) == stale(plan)
    return stale(plan)


@pytest.mark.slow
@pytest.mark.filterwarnings(ASYNC_WARNING)
def test_the_ui_and_dbprune_run_agree_on_what_is_stale(home: Path) -> None:
    from dbprune_assets.defs.common import current_settings
    from dbprune_assets.runner import run_pipeline

    layout, settings = tiny_home(home)
    assert run_pipeline(layout, settings, select="*pruned_subset", echo=lambda _l: None).ok
    unbuilt = {a: list(settings.selection.strategies) for a in ("trained_model", "eval_scores")} | {
        "comparison": ["all"]}
    instance = ui_instance(layout)
    with ui_graphql(instance) as run:
        assert agree(layout, run) == unbuilt
        # one shard's embeddings again, then both shards in one step (a backfill):
        # the same output, the same data versions, nothing downstream stale
        launch(run, ["embeddings"], {"dagster/partition": "00000"})
        assert agree(layout, run) == unbuilt
        launch(run, ["embeddings"], {"dagster/asset_partition_range_start": "00000",
                                     "dagster/asset_partition_range_end": "00001"})
        assert agree(layout, run) == unbuilt
        launch(run, ["pruned_subset"], {"dagster/asset_partition_range_start": "dbp",
                                        "dagster/asset_partition_range_end": "random"})
        assert agree(layout, run) == unbuilt
        # another CLIP filter: candidates change, and what reads them is stale for both
        config = yaml.safe_load(layout.config_file.read_text())
        config["clip_filter"]["fraction"] = 0.7
        layout.config_file.write_text(yaml.safe_dump(config))
        launch(run, ["candidates"])
        now_stale = agree(layout, run)
        assert {"centroids", "cluster_assignments"} <= set(now_stale) and "candidates" not in now_stale
        # dbprune run redoes them; the UI then shows them up to date
        assert run_pipeline(layout, current_settings(layout), select="*pruned_subset", echo=lambda _l: None).ok
        assert agree(layout, run) == unbuilt
