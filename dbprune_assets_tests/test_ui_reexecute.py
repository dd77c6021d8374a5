"""The UI's "Re-execute" on the runs ``dbprune run`` launched (issue 18, item
11): through Dagster's GraphQL API, with the code location the UI serves
loaded in process, as the button's mutation ``LaunchPipelineReexecution`` does
it, from failure and all steps; the re-executed runs then run and succeed."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import dagster as dg
import pytest
import yaml

from dbprune_assets.codelocation import CODE_LOCATION, CODE_MODULE, ui_workspace_yaml, workspace_args
from dbprune_assets.core.settings import build_settings
from dbprune_assets.core.store.layout import Layout

from .conftest import TINY

REEXECUTE = """mutation LaunchPipelineReexecution($reexecutionParams: ReexecutionParams) {
  launchPipelineReexecution(reexecutionParams: $reexecutionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId status parentRunId rootRunId } }
    ... on PythonError { message stack }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""


def ui_instance(layout: Layout) -> dg.DagsterInstance:
    """The home's instance as the UI opens it, except that a submitted run is
    executed at once, in this process (the UI hands it to its daemon)."""
    from dagster._core.instance.ref import InstanceRef

    ref = InstanceRef.from_dir(str(layout.dagster_home), overrides={
        "run_coordinator": {"module": "dagster._core.run_coordinator", "class": "DefaultRunCoordinator"},
        "run_launcher": {"module": "dagster._core.launcher.sync_in_memory_run_launcher",
                         "class": "SyncInMemoryRunLauncher"}})
    return dg.DagsterInstance.from_ref(ref)


@contextmanager
def ui_graphql(instance: dg.DagsterInstance) -> Iterator[Any]:
    """GraphQL against the UI's schema with the code location the UI serves
    (module :data:`CODE_MODULE` as location :data:`CODE_LOCATION`) loaded in process."""
    from dagster._core.remote_origin import InProcessCodeLocationOrigin
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
    from dagster_graphql.test.utils import execute_dagster_graphql

    origin = InProcessCodeLocationOrigin(LoadableTargetOrigin(module_name=CODE_MODULE), location_name=CODE_LOCATION)
    with WorkspaceProcessContext(instance, InProcessWorkspaceLoadTarget(origin)) as process:
        def run(query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
            result = execute_dagster_graphql(process.create_request_context(), query, variables=variables)
            assert not result.errors, result.errors
            return result.data

        yield run


def tiny_home(home: Path) -> tuple[Layout, Any]:
    from dbprune_assets.samplepool import write_sample_pool

    layout = Layout.from_env()
    assert layout.home == home
    settings = build_settings(TINY)
    layout.home.mkdir(parents=True)
    layout.config_file.write_text(settings.to_yaml())
    write_sample_pool(layout.pool, settings.pool, tmp_root=layout.tmp)
    return layout, settings


def reexecute(run: Any, parent_run_id: str, strategy: str) -> dict[str, Any]:
    data = run(REEXECUTE, {"reexecutionParams": {"parentRunId": parent_run_id, "strategy": strategy,
                                                 "useParentRunTags": True}})
    return data["launchPipelineReexecution"]


def test_runs_of_dbprune_run_re_execute_from_the_ui(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dbprune_assets.core.pool import reingest
    from dbprune_assets.runner import run_pipeline

    layout, settings = tiny_home(home)
    said: list[str] = []
    with monkeypatch.context() as m:  # a failed run: ingest breaks at its first write
        m.setattr(reingest, "write_parquet", lambda *a, **k: (_ for _ in ()).throw(OSError("disk on fire")))
        failed = run_pipeline(layout, settings, select="raw_metadata", echo=said.append)
    assert not failed.ok and "disk on fire" in (failed.failure or "")
    succeeded = run_pipeline(layout, settings, select="raw_metadata", echo=said.append)
    assert succeeded.ok, said
    failed_run, ok_run = failed.groups[0].run_ids[-1], succeeded.groups[0].run_ids[-1]

    instance = ui_instance(layout)
    with ui_graphql(instance) as run:
        for parent, strategy in ((failed_run, "FROM_FAILURE"), (ok_run, "ALL_STEPS")):
            launched = reexecute(run, parent, strategy)
            assert launched["__typename"] == "LaunchRunSuccess", launched  # not a PythonError (CheckError)
            child = instance.get_run_by_id(launched["run"]["runId"])
            assert child is not None and child.parent_run_id == parent
            assert child.status == dg.DagsterRunStatus.SUCCESS, (strategy, child.status)
            assert child.remote_job_origin.location_name == CODE_LOCATION
            assert child.tags.get("dagster/asset_partition_range_start") == "00000"  # the same partitions
    # the CLI's runs are listed under the UI's code location like its own
    parent = instance.get_run_by_id(ok_run)
    assert parent.remote_job_origin.location_name == CODE_LOCATION
    assert instance.get_run_ids(dg.RunsFilter(tags={".dagster/repository": f"__repository__@{CODE_LOCATION}"})) != []


def served_locations(argv: list[str]) -> set[str]:
    """The code locations a ``dagster dev`` / ``dagster-webserver`` /
    ``dagster-daemon run`` command line serves, named as Dagster names them."""
    from dagster._core.remote_origin import ManagedGrpcPythonEnvCodeLocationOrigin
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
    from dagster._core.workspace.load import location_origins_from_yaml_paths

    if "-w" in argv:
        return {o.location_name for o in location_origins_from_yaml_paths([argv[argv.index("-w") + 1]])}
    last_m = len(argv) - 1 - argv[::-1].index("-m")  # `python -m dagster dev -m MODULE`: the last one
    module = argv[last_m + 1]
    return {ManagedGrpcPythonEnvCodeLocationOrigin(LoadableTargetOrigin(module_name=module)).location_name}


def test_the_workspace_files_serve_the_location_the_runs_name(tmp_path: Path) -> None:
    """``workspace.yaml`` (plain ``dagster dev``) and :func:`workspace_args`
    serve the code location that ``dbprune run``'s runs name as their origin."""
    root = Path(__file__).resolve().parents[1]
    assert served_locations(["-w", str(root / "workspace.yaml")]) == {CODE_LOCATION}
    assert yaml.safe_load((root / "workspace.yaml").read_text()) == yaml.safe_load(ui_workspace_yaml())
    layout = Layout.from_env(tmp_path / "home", tmp_path / "pool")
    assert served_locations(workspace_args(layout)) == {CODE_LOCATION}
    assert workspace_args(layout) == ["-w", str(layout.dagster_home / "workspace.yaml")]  # again: the same file


def test_dbprune_ui_and_daemon_serve_the_location_the_runs_name(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from dbprune_assets import cli, servers

    argvs: list[list[str]] = []
    monkeypatch.setenv("DAGSTER_HOME", "")  # restored afterwards: the commands set it
    monkeypatch.setattr(servers, "supervise", lambda argv, *a, **k: argvs.append(list(argv)) or 0)
    monkeypatch.setattr(servers, "running_daemon", lambda _instance: None)
    assert cli.cmd_ui(argparse.Namespace(host="127.0.0.1", port=3999)) == 0
    assert cli.cmd_daemon(argparse.Namespace()) == 0
    assert [served_locations(a) for a in argvs] == [{CODE_LOCATION}] * 2
