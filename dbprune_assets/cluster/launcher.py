"""A run's trip through Celery: the app, the run launcher that sends a run to
a queue, the worker's task that executes it, and the code pointer a worker
rebuilds the run's job from.

This is the only module of ``dbprune_assets`` that imports Dagster's private
modules (``dagster._…``): a custom run launcher and its worker task need
them (``ExecuteRunArgs``, ``pack_value``, the run-executing body of
``dagster api execute_run``, code pointers).  They were checked against
:data:`DAGSTER_CHECKED`; ``dbprune_assets_tests/test_dagster_private.py``
imports each of them and names the one a newer Dagster moved.  Every import
of Dagster, Celery and dagster-celery sits inside a function: importing this
module stays cheap.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

from dbprune_assets.cluster.instance import ENV_BROKER, ENV_POSTGRES, LAUNCHER_MODULE, backend_url
from dbprune_assets.cluster.tags import (CPU, EXECUTE_TASK, QUEUE_TAG, QUEUES, TASK_ID_TAG, WORKER_HOST_TAG,
                                         WORKER_PID_TAG, WORKER_TAG, queue_for)

#: the Dagster release whose private modules this one's imports were checked against
#: (dagster-celery 0.29.27 alongside)
DAGSTER_CHECKED = "1.13.27"


def make_app(broker: str, backend: str | None):
    """The Celery app of the submitter and of every worker, with the task that executes a run."""
    from celery import Celery
    from kombu import Exchange, Queue

    app = Celery("dbprune", broker=broker, backend=backend, set_as_current=False)
    app.conf.update(
        task_queues=[Queue(q, Exchange(q, type="direct"), routing_key=q) for q in QUEUES],
        task_default_queue=CPU,
        task_acks_late=True,  # a busy worker holds no run it has not started; a redelivered run that ended is skipped
        task_reject_on_worker_lost=False,  # a lost pool process fails its task: dbprune run sees it and retries the run
        worker_prefetch_multiplier=1,
        task_track_started=True,
        result_extended=True,
        result_expires=7 * 24 * 3600,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    app.task(bind=True, name=EXECUTE_TASK)(execute_run_task)
    return app


def execute_run_task(task: Any, execute_run_args_packed: Any) -> int:
    """A worker's pool process: supervise one run (``ExecuteRunArgs``), executed
    in a process of its own (:mod:`~dbprune_assets.cluster.execution`) while
    this one holds the run's lease.  The run's tags first record which
    worker, host and pid supervise it.  A run that already ended or started
    elsewhere (a task the broker delivered again) is left alone: its lease
    can be taken once."""
    import dagster as dg
    from dagster._core.events import EngineEventData
    from dagster._grpc.types import ExecuteRunArgs
    from dagster._serdes import unpack_value

    from dbprune_assets.cluster.execution import Supervisor
    from dbprune_assets.core.running.lease import Leases, lease_env

    args = unpack_value(execute_run_args_packed, as_type=ExecuteRunArgs)
    with dg.DagsterInstance.from_ref(args.instance_ref) as instance:
        run = instance.get_run_by_id(args.run_id)
        if run is None:
            raise RuntimeError(f"run {args.run_id} is not in the Dagster instance this worker reaches; "
                               f"check that {ENV_POSTGRES} is the same on every machine")
        if run.status not in (dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING):
            return 0  # delivered again after it ran, failed or was given up: nothing to do
        node, host, pid = str(task.request.hostname), socket.gethostname(), os.getpid()
        holder = f"{node}/{host}/{pid}/{uuid.uuid4().hex[:8]}"
        url, ttl = lease_url(instance), lease_seconds(run.tags)
        leases = Leases(url)
        try:
            if not leases.take(run.run_id, holder, ttl):
                return 0  # another delivery of the task holds (or held) it
            instance.add_run_tags(run.run_id, {WORKER_TAG: node, WORKER_HOST_TAG: host, WORKER_PID_TAG: str(pid)})
            instance.report_engine_event(
                f"dbprune worker {node} (host {host}, pid {pid}) executes the run in a process of its own, "
                f"holding its lease ({ttl:.0f}s)", run, EngineEventData({"worker": node, "host": host, "pid": str(pid)}))
            outcome = Supervisor(leases, run.run_id, holder, ttl).run(
                run_process_argv(), json.dumps(execute_run_args_packed), {**os.environ, **lease_env(run.run_id, holder, url)})
        finally:
            leases.close()
        return _after_run(instance, run.run_id, node, outcome)


def _after_run(instance: Any, run_id: str, node: str, outcome: Any) -> int:
    """The run's process ended: when the run did not record its end (the
    process was killed), record it failed, tagged so that ``dbprune run``
    submits the range again."""
    from dbprune_assets.cluster.tags import DIED_TAG, run_note

    run = instance.get_run_by_id(run_id)
    if outcome.stopped is None and run is not None and not run.is_finished:
        why = f"its process on worker {node} {outcome.words()} before the run recorded its end"
        instance.add_run_tags(run_id, {DIED_TAG: run_note(run_id, why)})
        instance.report_run_failed(run, message=why)
    return outcome.returncode


def lease_url(instance: Any) -> str:
    """Where the instance's run leases live: its PostgreSQL database, else a
    SQLite file in its folder (one machine)."""
    from dbprune_assets.cluster.instance import with_psycopg2

    url = os.environ.get(ENV_POSTGRES, "").strip()
    if url:
        return with_psycopg2(url)
    return f"sqlite:///{Path(instance.root_directory) / 'leases.db'}"


def lease_seconds(tags: Any) -> float:
    """The lease of a run: its ``dbprune/lease_s`` tag (``dbprune run``'s
    ``DBPRUNE_WORKER_LOST_S``), else this worker's, else 30 s."""
    from dbprune_assets.cluster.instance import ENV_LOST_AFTER
    from dbprune_assets.cluster.tags import LEASE_TAG

    for value in (tags.get(LEASE_TAG), os.environ.get(ENV_LOST_AFTER)):
        try:
            return max(1.0, float(value))
        except (TypeError, ValueError):
            continue
    return 30.0


def run_process_argv() -> list[str]:
    """The command of a run's process, with the worker's Python: it reads the
    packed ``ExecuteRunArgs`` on stdin and executes the run
    (:func:`execute_packed_run`)."""
    return [sys.executable, "-c", "import sys; from dbprune_assets.cluster.launcher import execute_packed_run; "
                                  "sys.exit(execute_packed_run(sys.stdin.read()))"]


def execute_packed_run(execute_run_args_json: str) -> int:
    """A run's process (:func:`run_process_argv`): execute
    the run whose packed ``ExecuteRunArgs`` are ``execute_run_args_json`` in
    this process, with its job's executor; the exit status."""
    import dagster as dg
    from dagster._cli.api import _execute_run_command_body
    from dagster._grpc.types import ExecuteRunArgs
    from dagster._serdes import unpack_value

    args = unpack_value(json.loads(execute_run_args_json), as_type=ExecuteRunArgs)
    with dg.DagsterInstance.from_ref(args.instance_ref) as instance:
        return _execute_run_command_body(run_id=args.run_id, instance=instance, write_stream_fn=lambda _e: None,
                                         set_exit_code_on_failure=True)


def _launcher_class():
    from dagster import Field, Noneable, StringSource
    from dagster._core.events import EngineEventData
    from dagster._core.launcher import RunLauncher
    from dagster._grpc.types import ExecuteRunArgs
    from dagster._serdes import pack_value
    from dagster_celery.launcher import CeleryRunLauncher

    class DbpruneRunLauncher(CeleryRunLauncher):
        """``CeleryRunLauncher`` for dbprune: a run goes to queue ``gpu`` or
        ``cpu`` by its assets (or its ``dagster-celery/queue`` tag), as a task
        of :func:`make_app`'s app, whose result backend defaults to the broker."""

        def __init__(self, broker: str, backend: str | None = None, default_queue: str = CPU,
                     inst_data: Any = None) -> None:
            self._inst_data = inst_data
            self.broker = broker
            self.backend = backend or backend_url({ENV_BROKER: broker})
            self.include: list[str] = []
            self.config_source: dict[str, Any] = {}
            self.default_queue = default_queue
            self.celery = make_app(self.broker, self.backend)
            RunLauncher.__init__(self)

        @classmethod
        def config_type(cls):
            return {
                "broker": Field(StringSource, description="Celery broker URL (DBPRUNE_BROKER)"),
                "backend": Field(Noneable(StringSource), is_required=False, default_value=None,
                                 description="Celery result backend (default: the broker, when it is Redis)"),
                "default_queue": Field(StringSource, is_required=False, default_value=CPU),
            }

        @classmethod
        def from_config_value(cls, inst_data, config_value):
            return cls(inst_data=inst_data, **config_value)

        def launch_run(self, context) -> None:
            run = context.dagster_run
            queue = run.tags.get(QUEUE_TAG) or (
                queue_for({k.to_user_string() for k in run.asset_selection}) if run.asset_selection else self.default_queue)
            args = ExecuteRunArgs(job_origin=run.job_code_origin, run_id=run.run_id,
                                  instance_ref=self._instance.get_ref(), set_exit_code_on_failure=True)
            self._instance.report_engine_event(f"Sending the run to Celery queue {queue}", run, cls=self.__class__)
            result = self.celery.send_task(EXECUTE_TASK, args=[pack_value(args)], queue=queue)
            self._instance.add_run_tags(run.run_id, {TASK_ID_TAG: result.task_id, QUEUE_TAG: queue})
            self._instance.report_engine_event(
                "Celery task sent to the broker", run,
                EngineEventData({"Run ID": run.run_id, "Celery Task ID": result.task_id, "Celery Queue": queue}),
                cls=self.__class__,
            )

        @property
        def supports_resume_run(self) -> bool:
            return False

    DbpruneRunLauncher.__module__ = LAUNCHER_MODULE  # where dagster.yaml names it
    return DbpruneRunLauncher


_LAUNCHER: Any = None


def launcher_class():
    """``DbpruneRunLauncher``, built on first use (it subclasses dagster-celery's launcher)."""
    global _LAUNCHER
    if _LAUNCHER is None:
        _LAUNCHER = _launcher_class()
    return _LAUNCHER


def __getattr__(name: str) -> Any:  # dbprune_assets.cluster.launcher.DbpruneRunLauncher, built on first use
    if name == "DbpruneRunLauncher":
        return launcher_class()
    raise AttributeError(name)


_DEFS: dict[tuple[str, str], Any] = {}


def reconstruct_defs(home: str, pool: str):
    """The definitions bound to a home and pool, as a worker rebuilds them for
    a run (kept for the next run of the same home in this process)."""
    if (home, pool) not in _DEFS:
        from dbprune_assets.defs.common import DbpruneResource
        from dbprune_assets.definitions import build_defs

        _DEFS[(home, pool)] = build_defs(DbpruneResource(home=home, pool=pool))
    return _DEFS[(home, pool)]


def reconstructable_job(job: Any, home: str, pool: str):
    """``job`` (the asset job of :func:`reconstruct_defs`) as a worker finds it:
    through a code pointer carrying the home and pool."""
    from dagster._core.code_pointer import CustomPointer, ModuleCodePointer
    from dagster._core.definitions.reconstruct import ReconstructableJob, ReconstructableRepository

    # the working directory is the repository root (this file is dbprune_assets/cluster/launcher.py)
    here = ModuleCodePointer(__name__, "reconstruct_defs", working_directory=str(Path(__file__).resolve().parents[2]))
    pointer = CustomPointer(here, [], [["home", home], ["pool", pool]])
    return ReconstructableJob(repository=ReconstructableRepository(pointer), job_name=job.name)


def give_ui_origin(instance: Any, run_id: str, module_name: str, location_name: str, repository_name: str) -> bool:
    """Give run ``run_id`` (created by ``dbprune run`` with no code location:
    ``execute_in_process`` or a Celery submission) the origin of the code
    location the UI serves (``module_name`` as location ``location_name``), as
    ``dagster run migrate-repository`` does: Dagster's re-execution looks the
    parent run's job up there.  Also tags it with the repository label the UI
    filters runs by.  False when the run is not in the instance."""
    from dagster._core.remote_origin import (ManagedGrpcPythonEnvCodeLocationOrigin, RemoteJobOrigin,
                                             RemoteRepositoryOrigin)
    from dagster._core.storage.tags import REPOSITORY_LABEL_TAG
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

    run = instance.get_run_by_id(run_id)
    if run is None:
        return False
    location = ManagedGrpcPythonEnvCodeLocationOrigin(LoadableTargetOrigin(module_name=module_name), location_name)
    origin = RemoteJobOrigin(repository_origin=RemoteRepositoryOrigin(location, repository_name), job_name=run.job_name)
    # the tag first: its row in the tags table (which the UI's run filters read) is only
    # inserted for a tag the run body does not hold yet, and the origin's update writes it there
    instance.add_run_tags(run_id, {REPOSITORY_LABEL_TAG: origin.repository_origin.get_label()})
    instance.run_storage.replace_job_origin(instance.get_run_by_id(run_id), origin)
    return True
