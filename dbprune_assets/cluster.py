"""Many machines: the Dagster instance on PostgreSQL, runs on Celery workers.

Two environment variables switch it on (README "Many machines"):

* ``DBPRUNE_POSTGRES_URL`` (``postgresql://user:password@host:5432/db``) puts
  the instance's run, event-log and schedule storage on PostgreSQL
  (dagster-postgres) instead of SQLite under ``$DBPRUNE_HOME/dagster``;
* ``DBPRUNE_BROKER`` (``redis://host:6379/0``) makes ``dbprune run`` submit
  its runs to Celery workers (``dbprune worker`` on each machine) instead of
  executing them in process.  It needs the first: a worker on another machine
  records its run in the same instance.

Both are written into ``$DBPRUNE_HOME/dagster/dagster.yaml`` as ``env:``
references (:func:`instance_yaml`), so the file holds no password and is the
same on every machine; ``dbprune ui`` and ``dbprune daemon`` serve that
instance.

**Whole runs are Celery tasks** (the ``CeleryRunLauncher`` model, not the
``celery_executor``): a dbprune step is already a single-run backfill over a
partition range, and the runner already cuts a group into many runs
(``partitions.per_run``), so a run is the natural unit to spread.  With the
executor, every run would still need a coordinating process that stays alive
for the whole run and sends its one or two steps to the broker: more moving
parts, no more parallelism.  :class:`DbpruneRunLauncher` (a
``CeleryRunLauncher``) sends each run to queue ``gpu`` (assets declaring ``Facts(gpu=True)``) or
``cpu`` by its assets; the worker task (:func:`_execute_run_task`) records the
worker's name, host and pid in the run's tags, then executes the run in the
worker's pool process with the in-process executor (the definitions, torch
and the model stay loaded between runs).  Neither Celery model honours Dagster
pools: GPU exclusivity comes from the queue and each worker's concurrency
(one run at a time by default).

**Faults.** Celery acknowledges a run's task only when it ends
(``task_acks_late``), so a busy worker never holds a second run it has not
started.  ``dbprune run`` watches its runs: when the worker of a started run
stops answering Celery's ping for ``DBPRUNE_WORKER_LOST_S`` seconds (killed,
out of memory, machine down) or its task ended without the run recording its
end, the run is marked failed and a new run for the same partition range is
submitted (at most ``DBPRUNE_RUN_RETRIES`` times).  A task the broker
redelivers later finds its run ended and does nothing.  Partitions are
written atomically with commit markers (``defs/common.py``), so a retry or
the next ``dbprune run`` redoes exactly what is missing.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

if TYPE_CHECKING:  # pragma: no cover
    from dbprune_assets.core.store.layout import Layout

ENV_POSTGRES = "DBPRUNE_POSTGRES_URL"
ENV_BROKER = "DBPRUNE_BROKER"
#: the Celery result backend (where ``dbprune run`` reads task states); default: the broker, when it is Redis
ENV_BACKEND = "DBPRUNE_CELERY_BACKEND"
#: how often a run whose worker was lost is submitted again (default 2)
ENV_RETRIES = "DBPRUNE_RUN_RETRIES"
#: seconds a worker may miss Celery's pings before its runs count as lost (default 30)
ENV_LOST_AFTER = "DBPRUNE_WORKER_LOST_S"

GPU, CPU = "gpu", "cpu"
QUEUES = (GPU, CPU)

QUEUE_TAG = "dagster-celery/queue"  # dagster-celery's own tag: the Celery queue of a run
TASK_ID_TAG = "dagster-celery/task_id"
WORKER_TAG = "dbprune/worker"  # Celery node name of the worker that executes the run (name@host)
WORKER_HOST_TAG = "dbprune/worker_host"  # that machine's host name
WORKER_PID_TAG = "dbprune/worker_pid"
HOME_TAG = "dbprune/home"
SUBMITTER_TAG = "dbprune/submitter"  # <host>-<pid> of the dbprune run that submitted it
GROUP_TAG = "dbprune/group"
ATTEMPT_TAG = "dbprune/attempt"
LOST_TAG = "dbprune/lost"  # why dbprune run gave the run up (its worker was lost)
K8S_TAG = "dagster-k8s/config"  # read by dagster-k8s (deploy/k8s), ignored by Celery

EXECUTE_TASK = "dbprune.execute_run"

#: what a GPU run asks of Kubernetes (deploy/k8s/values.yaml): one GPU on a GPU node
K8S_GPU_CONFIG = {
    "container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}, "requests": {"nvidia.com/gpu": "1"}}},
    "pod_spec_config": {
        "node_selector": {"dbprune/gpu": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
}


class ClusterError(RuntimeError):
    """A cluster setting that cannot work, or a server that cannot be reached:
    the message names the variable, the URL (password masked) and what to check."""


# ---------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------
def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (user info and ``password=`` parameters)."""
    masked = re.sub(r"(://[^/@:]*):[^/@]*@", r"\1:***@", url)
    return re.sub(r"(?i)([?&;]password=)[^&;]*", r"\1***", masked)


def _secret_free(text: str, url: str) -> str:
    """``text`` (an error message) with the password of ``url`` masked wherever it appears."""
    from urllib.parse import unquote, urlsplit

    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    text = text.replace(url, mask_url(url))
    for secret in {password, unquote(password) if password else None}:
        if secret:
            text = text.replace(secret, "***")
    return text


def enabled(env: Mapping[str, str] | None = None) -> bool:
    """Runs go to Celery workers (``DBPRUNE_BROKER`` is set)."""
    return bool((os.environ if env is None else env).get(ENV_BROKER, "").strip())


def backend_url(env: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if env is None else env
    broker = env.get(ENV_BROKER, "").strip()
    return env.get(ENV_BACKEND, "").strip() or (broker if broker.startswith(("redis://", "rediss://")) else None)


def check_config(env: Mapping[str, str] | None = None) -> None:
    """Refuse settings that cannot work, before anything connects."""
    env = os.environ if env is None else env
    pg, broker = env.get(ENV_POSTGRES, "").strip(), env.get(ENV_BROKER, "").strip()
    if pg:
        scheme = pg.split("://", 1)[0] if "://" in pg else ""
        if scheme not in ("postgresql", PG_SCHEME):
            hint = (" (write postgresql://, the scheme SQLAlchemy knows)" if scheme == "postgres" else
                    " (dbprune uses the psycopg2 driver: postgresql:// or postgresql+psycopg2://)"
                    if scheme.startswith("postgresql+") else "")
            raise ClusterError(f"{ENV_POSTGRES}={mask_url(pg)} is not a PostgreSQL URL{hint}; set it to "
                               "postgresql://user:password@host:5432/database or unset it for the embedded SQLite instance")
    if broker:
        scheme = broker.split("://", 1)[0] if "://" in broker else ""
        if scheme not in ("redis", "rediss", "amqp", "amqps", "pyamqp"):
            raise ClusterError(f"{ENV_BROKER}={mask_url(broker)} is not a Celery broker URL; set it to "
                               "redis://host:6379/0 (or amqp://user:password@host:5672//) or unset it to run in this process")
        if not pg:
            raise ClusterError(f"{ENV_BROKER} is set but {ENV_POSTGRES} is not: workers on other machines record their "
                               "runs in the Dagster instance, which must then be on PostgreSQL; set "
                               f"{ENV_POSTGRES}=postgresql://user:password@host:5432/database, or unset {ENV_BROKER} "
                               "to run in this process")
        if backend_url(env) is None:
            raise ClusterError(f"{ENV_BROKER}={mask_url(broker)} is not Redis, so dbprune has no shared place to read "
                               f"task states from; set {ENV_BACKEND} to a Celery result backend every machine "
                               "reaches (redis://host:6379/1, or db+postgresql://…)")


def instance_config(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The instance's ``dagster.yaml`` as a dict: storage on PostgreSQL with
    ``DBPRUNE_POSTGRES_URL``, the Celery run launcher with ``DBPRUNE_BROKER``
    (as ``env:`` references, resolved by each process that loads it)."""
    env = os.environ if env is None else env
    check_config(env)
    cfg: dict[str, Any] = {"telemetry": {"enabled": False}}
    if env.get(ENV_POSTGRES, "").strip():
        cfg["storage"] = {"postgres": {"postgres_url": {"env": ENV_POSTGRES}}}
    if enabled(env):
        launcher: dict[str, Any] = {"broker": {"env": ENV_BROKER}}
        if env.get(ENV_BACKEND, "").strip():
            launcher["backend"] = {"env": ENV_BACKEND}
        cfg["run_launcher"] = {"module": __name__, "class": "DbpruneRunLauncher", "config": launcher}
    return cfg


#: the embedded default's dagster.yaml, byte for byte what dbprune always wrote
EMBEDDED_YAML = "telemetry:\n  enabled: false\n"


def instance_yaml(env: Mapping[str, str] | None = None) -> str:
    cfg = instance_config(env)
    if list(cfg) == ["telemetry"]:
        return EMBEDDED_YAML
    import yaml

    return ("# written by dbprune from DBPRUNE_POSTGRES_URL and DBPRUNE_BROKER (rewritten by every command\n"
            "# that opens the instance: change those variables, not this file)\n"
            + yaml.safe_dump(cfg, sort_keys=False))


#: the driver dagster-postgres ships with (psycopg2-binary); SQLAlchemy 2.1 maps a bare
#: ``postgresql://`` to psycopg 3, which is not installed
PG_SCHEME = "postgresql+psycopg2"


def with_psycopg2(url: str) -> str:
    """``url`` with the psycopg2 driver named (``postgresql://`` -> ``postgresql+psycopg2://``)."""
    return PG_SCHEME + url[len("postgresql"):] if url.startswith("postgresql://") else url


def use_psycopg2(env: Any = None) -> None:
    """Name the psycopg2 driver in ``$DBPRUNE_POSTGRES_URL`` of this process
    (and so of the webserver, daemon and pool processes it starts), which
    the instance's ``dagster.yaml`` reads."""
    env = os.environ if env is None else env
    url = env.get(ENV_POSTGRES, "").strip()
    if url:
        env[ENV_POSTGRES] = with_psycopg2(url)


def check_reachable(env: Mapping[str, str] | None = None, timeout_s: float = 5.0, broker: bool = True) -> None:
    """Connect to the database (and the broker) once: one clear error
    naming the URL and what to check, instead of a failure half-way.
    Without ``env``, this process's environment (its PostgreSQL URL then
    names the psycopg2 driver: :func:`use_psycopg2`)."""
    own = env is None
    env = os.environ if env is None else env
    if own:
        check_config(env)
    pg = env.get(ENV_POSTGRES, "").strip()
    if pg:
        _check_postgres(pg, timeout_s)
    if broker and enabled(env):
        _check_broker(env[ENV_BROKER].strip(), timeout_s)
        backend = backend_url(env)
        if backend and backend != env[ENV_BROKER].strip() and backend.startswith(("redis://", "rediss://")):
            _check_broker(backend, timeout_s, what=f"Celery result backend ({ENV_BACKEND})")
    if own:
        use_psycopg2()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0].strip().rstrip(".") if text else type(err).__name__


def _check_postgres(url: str, timeout_s: float) -> None:
    import psycopg2

    dsn = url.replace(f"{PG_SCHEME}://", "postgresql://", 1)  # libpq's own URI form
    try:
        psycopg2.connect(dsn, connect_timeout=max(1, int(timeout_s))).close()
    except psycopg2.Error as e:
        raise ClusterError(
            f"the Dagster database at {mask_url(url)} ({ENV_POSTGRES}) cannot be reached: "
            f"{_secret_free(_first_line(e), url)}. Check that PostgreSQL runs on that host and port and accepts "
            "connections from this machine (listen_addresses, pg_hba.conf, firewall), that the database exists "
            "and that the user and password are right; no run was started") from None


def _check_broker(url: str, timeout_s: float, what: str = f"Celery broker ({ENV_BROKER})") -> None:
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=timeout_s) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=timeout_s)
    except Exception as e:  # kombu raises the transport's own errors (OperationalError, ConnectionError, …)
        raise ClusterError(
            f"the {what} at {mask_url(url)} cannot be reached: {_secret_free(_first_line(e), url)}. Check that "
            "Redis (or RabbitMQ) runs on that host and port and accepts connections from this machine "
            "(bind address, protected-mode, firewall; `redis-cli -u URL ping`) and that the password is right; "
            "no run was started") from None


def queue_for(assets: list[str] | set[str] | frozenset[str]) -> str:
    """``gpu`` for a run of any asset that declares ``Facts(gpu=True)`` (the
    encoder, whose ``bootstrap`` trains a CLIP, embeddings, training and
    evaluation), else ``cpu``."""
    from dbprune_assets.definitions import asset_nodes

    nodes = asset_nodes()
    return GPU if any(nodes[a].facts.gpu for a in assets if a in nodes) else CPU


# ---------------------------------------------------------------------------
# Celery: the app, the worker's task, the run launcher
# ---------------------------------------------------------------------------
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
    app.task(bind=True, name=EXECUTE_TASK)(_execute_run_task)
    return app


def _execute_run_task(task: Any, execute_run_args_packed: Any) -> int:
    """A worker's pool process: execute one run (``ExecuteRunArgs``) in this
    process, first recording in its tags which worker, host and pid run it.
    A run that already ended or started elsewhere (a task the broker
    delivered again) is left alone."""
    import dagster as dg
    from dagster._cli.api import _execute_run_command_body
    from dagster._core.events import EngineEventData
    from dagster._grpc.types import ExecuteRunArgs
    from dagster._serdes import unpack_value

    args = unpack_value(execute_run_args_packed, as_type=ExecuteRunArgs)
    with dg.DagsterInstance.from_ref(args.instance_ref) as instance:
        run = instance.get_run_by_id(args.run_id)
        if run is None:
            raise RuntimeError(f"run {args.run_id} is not in the Dagster instance this worker reaches; "
                               f"check that {ENV_POSTGRES} is the same on every machine")
        if run.status not in (dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING):
            return 0  # delivered again after it ran, failed or was given up: nothing to do
        node, host, pid = str(task.request.hostname), socket.gethostname(), os.getpid()
        instance.add_run_tags(run.run_id, {WORKER_TAG: node, WORKER_HOST_TAG: host, WORKER_PID_TAG: str(pid)})
        instance.report_engine_event(
            f"dbprune worker {node} (host {host}, pid {pid}) executes the run",
            run, EngineEventData({"worker": node, "host": host, "pid": str(pid)}),
        )
        return _execute_run_command_body(run_id=run.run_id, instance=instance, write_stream_fn=lambda _e: None,
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

    DbpruneRunLauncher.__module__ = __name__
    return DbpruneRunLauncher


_LAUNCHER: Any = None


def launcher_class():
    global _LAUNCHER
    if _LAUNCHER is None:
        _LAUNCHER = _launcher_class()
    return _LAUNCHER


def __getattr__(name: str) -> Any:  # `dagster.yaml` names dbprune_assets.cluster.DbpruneRunLauncher
    if name == "DbpruneRunLauncher":  # built on first use: importing this module stays cheap
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

    here = ModuleCodePointer(__name__, "reconstruct_defs", working_directory=str(Path(__file__).resolve().parents[1]))
    pointer = CustomPointer(here, [], [["home", home], ["pool", pool]])
    return ReconstructableJob(repository=ReconstructableRepository(pointer), job_name=job.name)


# ---------------------------------------------------------------------------
# dbprune run against a cluster: submit, watch, retry
# ---------------------------------------------------------------------------
Echo = Callable[[str], None]


@dataclass
class _Attempt:
    start: str | None
    end: str | None
    number: int
    run_id: str
    root_run_id: str
    lost_since: float | None = None
    ended_since: float | None = None


@dataclass
class ClusterFailure:
    """A failed run as ``runner._failure_message`` reads it (``run_id``,
    ``all_events``): the step failure (or why the run was given up), with
    the step key naming the partition range and the worker."""

    run_id: str
    all_events: list[Any] = field(default_factory=list)


def _int_env(name: str, default: int) -> int:
    try:
        return max(0, int(os.environ.get(name, default)))
    except ValueError:
        raise ClusterError(f"{name}={os.environ[name]!r} is not a whole number") from None


def _float_env(name: str, default: float) -> float:
    try:
        return max(1.0, float(os.environ.get(name, default)))
    except ValueError:
        raise ClusterError(f"{name}={os.environ[name]!r} is not a number of seconds") from None


def _where(start: str | None, end: str | None) -> str:
    from dbprune_assets.core.settings import STRATEGIES

    if start is None:
        return "unpartitioned"
    kind = "strategy" if start in STRATEGIES else "shard"
    return f"{kind} {start}" if start == end else f"{kind}s {start}…{end}"


def _worker_words(run: Any) -> str:
    node = run.tags.get(WORKER_TAG)
    if not node:
        return "no worker had started it"
    return f"worker {node} (host {run.tags.get(WORKER_HOST_TAG, '?')}, pid {run.tags.get(WORKER_PID_TAG, '?')})"


_reaped_homes: set[str] = set()
_queues_seen: set[str] = set()


def run_ranges(job: Any, instance: Any, group: list[str], ranges: list[tuple[str | None, str | None]],
               log_level: str | None, *, layout: Any, echo: Echo = print,
               poll_s: float = 0.5) -> tuple[list[str], ClusterFailure | None]:
    """The cluster's ``runner._run_ranges``: one run per partition range of the
    group's assets, all submitted at once through the instance's Celery run
    launcher, then watched until each ends; a run whose worker is lost is
    submitted again.  (run ids, the first failed run or None)."""
    import dagster as dg

    from dbprune_assets.core.store.atomic import process_tmp_name

    launcher = instance.run_launcher
    if not isinstance(launcher, launcher_class()):
        raise ClusterError(f"{ENV_BROKER} is set but the instance at {layout.dagster_home} has no Celery run launcher "
                           f"({type(launcher).__name__}); it is configured by dbprune from {ENV_BROKER}: "
                           "open the instance with runner.dagster_instance")
    retries = _int_env(ENV_RETRIES, 2)
    lost_after = _float_env(ENV_LOST_AFTER, 30.0)
    queue = queue_for(group)
    home = str(layout.home)
    if home not in _reaped_homes:
        _reaped_homes.add(home)
        _cancel_orphans(instance, launcher, home, echo)
    if queue not in _queues_seen:
        _queues_seen.add(queue)
        if not _queue_served(launcher.celery, queue):
            echo(f"  no live worker serves queue '{queue}' yet: the runs wait in it until one starts "
                 f"(dbprune worker --queue {queue})")

    origin = reconstructable_job(job, home, str(layout.pool)).get_python_origin()
    run_config = {**console_config(log_level), "execution": {"config": {"in_process": {}}}}
    submitter = process_tmp_name()

    def submit(start: str | None, end: str | None, number: int, parent: _Attempt | None) -> _Attempt:
        tags = {"dbprune/cli": "run", HOME_TAG: home, SUBMITTER_TAG: submitter, QUEUE_TAG: queue,
                GROUP_TAG: ",".join(group), ATTEMPT_TAG: str(number)}
        if queue == GPU:
            import json

            tags[K8S_TAG] = json.dumps(K8S_GPU_CONFIG)
        if start is not None:
            tags.update({RANGE_START_TAG: start, RANGE_END_TAG: str(end)})
        if parent is not None:
            tags.update({"dagster/parent_run_id": parent.run_id, "dagster/root_run_id": parent.root_run_id,
                         "dagster/retry_number": str(number - 1)})
        def create_and_launch() -> Any:
            run = instance.create_run_for_job(
                job_def=job, run_config=run_config, tags=tags,
                asset_selection=frozenset(dg.AssetKey(a) for a in group), job_code_origin=origin,
                parent_run_id=parent.run_id if parent else None, root_run_id=parent.root_run_id if parent else None)
            try:
                instance.launch_run(run.run_id, workspace=None)  # type: ignore[arg-type]  # Celery's launcher needs none
            except BaseException:
                half_launched.append(run.run_id)  # canceled once the database answers: a new run replaces it
                raise
            return run

        run = _db(create_and_launch, echo)
        _cancel_half_launched()
        return _Attempt(start, end, number, run.run_id, parent.root_run_id if parent else run.run_id)

    half_launched: list[str] = []

    def _cancel_half_launched() -> None:
        """Cancel the runs whose launch the database cut off half-way (a worker
        that receives one of them leaves it alone)."""
        while half_launched:
            run = _db(lambda: instance.get_run_by_id(half_launched[0]), echo)
            if run is not None and not run.is_finished:
                _db(lambda: instance.report_run_canceled(run, message="its launch was cut off by the database; "
                                                                      "dbprune run submitted the range again"), echo)
            half_launched.pop(0)

    run_ids: list[str] = []
    active: dict[str, _Attempt] = {}
    for start, end in ranges:
        att = submit(start, end, 1, None)
        active[att.run_id] = att
        run_ids.append(att.run_id)

    failures: list[ClusterFailure] = []
    last_check = 0.0
    try:
        while active:
            time.sleep(poll_s)
            runs = {r.run_id: r for r in _db(lambda: instance.get_runs(dg.RunsFilter(run_ids=list(active))), echo)}
            now = time.monotonic()
            check = now - last_check >= 2.0
            alive: set[str] | None = None
            if check:
                last_check = now
                nodes = {r.tags[WORKER_TAG] for r in runs.values() if not r.is_finished and r.tags.get(WORKER_TAG)}
                if nodes:
                    alive = _alive_workers(launcher.celery, nodes)
            for run_id, att in list(active.items()):
                run = runs.get(run_id)
                if run is None:
                    continue
                if run.status == dg.DagsterRunStatus.SUCCESS:
                    del active[run_id]
                    continue
                if run.is_finished:  # failed or canceled by its worker, the UI, or us
                    del active[run_id]
                    casualty = _db_casualty(instance, run) if att.number <= retries else None
                    if casualty is None:
                        failures.append(_failure_of(instance, run, att))
                        continue
                    lost = casualty
                    _db(lambda: instance.add_run_tags(run_id, {LOST_TAG: lost}), echo)
                else:
                    lost = _lost_reason(launcher, run, att, alive, now, lost_after, check)
                    if lost is None:
                        continue
                    _db(lambda: instance.add_run_tags(run_id, {LOST_TAG: lost}), echo)
                    _db(lambda: instance.report_run_failed(run, message=f"given up by dbprune run: {lost}"), echo)
                    del active[run_id]
                where = _where(att.start, att.end)
                if att.number <= retries:
                    new = submit(att.start, att.end, att.number + 1, att)
                    active[new.run_id] = new
                    run_ids.append(new.run_id)
                    echo(f"  ↻ {where}: {lost}; submitted again as run {new.run_id} "
                         f"(attempt {new.number} of {retries + 1})")
                else:
                    failures.append(_lost_failure(run, att, lost, retries))
    except KeyboardInterrupt:
        canceled = 0
        for run_id in active:
            run = instance.get_run_by_id(run_id)
            if run is not None and not run.is_finished:
                try:
                    launcher.terminate(run_id)  # revokes its task; a started one's pool process is stopped
                except Exception:  # noqa: BLE001 - the broker may be gone too; the run is marked canceled anyway
                    pass
                instance.report_run_canceled(run, message="dbprune run was interrupted")
                canceled += 1
        echo(f"  interrupted: {canceled} run(s) canceled on the workers")
        raise
    return run_ids, (failures[0] if failures else None)


def _db(fn: Callable[[], Any], echo: Echo, patience_s: float = 120.0) -> Any:
    """``fn()``, retried while the database is unreachable (a restart), up to ``patience_s``."""
    import sqlalchemy.exc

    try:
        from dagster_postgres.utils import DagsterPostgresException
    except ImportError:  # pragma: no cover - dagster-postgres is a dependency
        DagsterPostgresException = sqlalchemy.exc.OperationalError  # type: ignore[misc,assignment]  # noqa: N806
    deadline = time.monotonic() + patience_s
    said = False
    while True:
        try:
            return fn()
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, DagsterPostgresException) as e:
            if time.monotonic() > deadline:
                url = os.environ.get(ENV_POSTGRES, "")
                raise ClusterError(f"the Dagster database at {mask_url(url)} has been unreachable for "
                                   f"{patience_s:.0f}s ({_secret_free(_first_line(e), url)}); the runs may still "
                                   "be running on the workers: start dbprune run again once PostgreSQL is back, it "
                                   "redoes what is not committed") from None
            if not said:
                echo("  the Dagster database does not answer (restarting?); waiting for it …")
                said = True
            time.sleep(2.0)


def _alive_workers(app: Any, nodes: set[str], timeout_s: float = 1.0) -> set[str]:
    """Those of the worker ``nodes`` that answer Celery's ping (at once when all do)."""
    try:
        replies = app.control.ping(destination=sorted(nodes), timeout=timeout_s, limit=len(nodes)) or []
    except Exception:  # noqa: BLE001 - broker hiccup: no verdict this round
        return set()
    return {name for reply in replies for name in reply}


def _queue_served(app: Any, queue: str, timeout_s: float = 1.0) -> bool:
    try:
        active = app.control.inspect(timeout=timeout_s).active_queues() or {}
    except Exception:  # noqa: BLE001
        return False
    return any(q.get("name") == queue for queues in active.values() for q in queues)


def _lost_reason(launcher: Any, run: Any, att: _Attempt, alive: set[str] | None, now: float,
                 lost_after: float, check: bool) -> str | None:
    """Why an unfinished run will not finish (its worker is gone, or its task
    ended without the run recording its end), else None."""
    node = run.tags.get(WORKER_TAG)
    if node and alive is not None and check:
        if node in alive:
            att.lost_since = None
        else:
            att.lost_since = att.lost_since if att.lost_since is not None else now
    if node and att.lost_since is not None and now - att.lost_since >= lost_after:
        return (f"{_worker_words(run)} stopped answering for {now - att.lost_since:.0f}s while running it "
                "(killed, out of memory, or its machine is down)")
    if not check or TASK_ID_TAG not in run.tags:
        return None
    try:
        result = launcher.celery.AsyncResult(run.tags[TASK_ID_TAG])
        state = result.state
    except Exception:  # noqa: BLE001 - backend hiccup: ask again next round
        return None
    if state in ("SUCCESS", "FAILURE", "REVOKED"):
        att.ended_since = att.ended_since if att.ended_since is not None else now
        if now - att.ended_since >= 10.0:  # the run's own end event would have arrived by now
            detail = ""
            if state == "FAILURE":
                detail = f": {_first_line(result.result) if isinstance(result.result, BaseException) else result.result}"
            return (f"its Celery task on {_worker_words(run)} ended ({state}{detail}) but the run did not record "
                    "its end (the worker's pool process died, or the database was unreachable)")
    return None


def _failure_of(instance: Any, run: Any, att: _Attempt) -> ClusterFailure:
    """The failed run's step failure, its step key naming the range and worker."""
    from dagster._core.events import DagsterEventType

    where = f"{_where(att.start, att.end)}, {_worker_words(run)}"
    try:
        records = instance.all_logs(run.run_id, of_type={DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE,
                                                         DagsterEventType.ENGINE_EVENT})
    except Exception:  # noqa: BLE001 - the database may be gone: say what is known
        records = []
    events = [r.dagster_event for r in records if r.dagster_event is not None]
    for event in events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            err = event.step_failure_data.error
            while err.cause is not None and "dagster" in (err.cls_name or "").lower():
                err = err.cause
            return ClusterFailure(run.run_id, [_event(f"{event.step_key}: {where}", err.cls_name, err.message)])
    # no step failed: the run itself did (its code did not load, the database went away, …); the
    # innermost error of its last event with one says why
    err = _run_error(events)
    if err is not None:
        message = err.message.strip().splitlines()[0] if err.message.strip() else str(err.cls_name)
    else:
        message = next((e.message for e in events if e.event_type == DagsterEventType.RUN_FAILURE and e.message),
                       None) or run.tags.get(LOST_TAG) or f"the run ended {run.status.value}"
    return ClusterFailure(run.run_id, [_event(f"{run.tags.get(GROUP_TAG, '?')}: {where}", None, message)])


def _run_error(events: list[Any]) -> Any:
    """The innermost error of the last event that carries one (an engine
    event, or the run's failure), or None."""
    errors = [getattr(e.event_specific_data, "error", None) for e in events if e.event_specific_data is not None]
    errors = [err for err in errors if err is not None]
    if not errors:
        return None
    err = errors[-1]
    while err.cause is not None:
        err = err.cause
    return err


#: errors of the database connection: a run that failed with one of them (and no step
#: failure) is a casualty of the instance, not of its work, and is submitted again
DB_ERRORS = ("OperationalError", "InterfaceError", "DagsterPostgresException")


def _db_casualty(instance: Any, run: Any) -> str | None:
    """Why ``run`` failed when its database connection broke (no step failed), else None."""
    from dagster._core.events import DagsterEventType

    if run.status.value != "FAILURE" or run.tags.get(LOST_TAG):
        return None
    try:
        records = instance.all_logs(run.run_id, of_type={DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE,
                                                         DagsterEventType.ENGINE_EVENT})
    except Exception:  # noqa: BLE001
        return None
    events = [r.dagster_event for r in records if r.dagster_event is not None]
    if any(e.is_step_failure for e in events):
        return None
    err = _run_error(events)
    if err is None or not any(name in (err.cls_name or "") for name in DB_ERRORS):
        return None
    return f"it failed on the database connection ({err.message.strip().splitlines()[0] if err.message else err.cls_name})"


def _lost_failure(run: Any, att: _Attempt, lost: str, retries: int) -> ClusterFailure:
    where = _where(att.start, att.end)
    return ClusterFailure(run.run_id, [_event(f"{run.tags.get(GROUP_TAG, '?')}: {where}", None,
                                              f"{lost}; given up after {retries + 1} attempt(s)")])


def _event(step_key: str, cls_name: str | None, message: str) -> Any:
    error = SimpleNamespace(cause=None, cls_name=cls_name, message=message)
    return SimpleNamespace(is_step_failure=True, step_key=step_key, step_failure_data=SimpleNamespace(error=error))


def _cancel_orphans(instance: Any, launcher: Any, home: str, echo: Echo) -> None:
    """Cancel the unfinished runs an earlier ``dbprune run`` of this home left
    (it was killed): this process holds the home's lock, so no submitter
    waits on them, and their partitions are redone with the current settings."""
    import dagster as dg

    unfinished = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
                  dg.DagsterRunStatus.STARTED]
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=unfinished, tags={HOME_TAG: home})):
        try:
            launcher.terminate(run.run_id)
        except Exception:  # noqa: BLE001 - a worker that is gone needs no revoke
            pass
        instance.report_run_canceled(run, message="left unfinished by a dbprune run that no longer runs; "
                                                  "dbprune run redoes its partitions")
        echo(f"run {run.run_id} ({run.tags.get(GROUP_TAG, '?')}) was left unfinished by a dbprune run that no "
             "longer runs; canceled it")


# ---------------------------------------------------------------------------
# dbprune worker
# ---------------------------------------------------------------------------
def default_queues() -> list[str]:
    """Both queues where torch sees a GPU, ``cpu`` otherwise (NVML's count:
    the worker process initialises no CUDA before it forks its pool)."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    return [GPU, CPU] if torch.cuda.is_available() else [CPU]


def worker_argv(queues: list[str], concurrency: int, name: str | None, loglevel: str = "INFO") -> list[str]:
    """The ``celery worker`` arguments of ``dbprune worker``."""
    node = name if name and "@" in name else f"{name or f'dbprune-{os.getpid()}'}@%h"
    return ["worker", "--queues", ",".join(queues), "--concurrency", str(concurrency), "--hostname", node,
            "--prefetch-multiplier", "1", "-O", "fair", "--loglevel", loglevel, "--without-gossip", "--without-mingle"]


def run_worker(queues: list[str] | None, concurrency: int = 1, name: str | None = None, loglevel: str = "INFO",
               echo: Echo = print) -> int:
    """``dbprune worker``: a Celery worker executing dbprune runs from ``queues``."""
    if not enabled():
        raise ClusterError(f"dbprune worker needs {ENV_BROKER} (redis://host:6379/0) and {ENV_POSTGRES} "
                           "(postgresql://user:password@host:5432/database), the same on every machine")
    check_config()
    check_reachable()
    bad = [q for q in queues or [] if q not in QUEUES]
    if bad:
        raise ClusterError(f"--queue {bad[0]}: dbprune has queues {', '.join(QUEUES)}")
    if concurrency < 1:
        raise ClusterError(f"--concurrency {concurrency}: at least 1 run at a time")
    chosen = list(dict.fromkeys(queues)) if queues else default_queues()
    # loaded once here, before the pool processes fork: a run pays no import
    import dbprune_assets.definitions  # noqa: F401

    if GPU in chosen:
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # no CUDA before the fork
        import open_clip  # noqa: F401
        import torch  # noqa: F401

    broker = os.environ[ENV_BROKER].strip()
    app = make_app(broker, backend_url())
    argv = worker_argv(chosen, concurrency, name, loglevel)
    echo(f"dbprune: worker {argv[argv.index('--hostname') + 1].replace('%h', socket.gethostname())} serves "
         f"queue(s) {', '.join(chosen)}, {concurrency} run(s) at a time; broker {mask_url(broker)}, "
         f"instance {mask_url(os.environ[ENV_POSTGRES])}")
    sys.stdout.flush()
    app.worker_main(argv)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m dbprune_assets.cluster webserver [ARGS]`` (deploy/docker-compose.yml):
    write this home's ``dagster.yaml`` (checking the database and broker),
    then become ``dagster-webserver -m dbprune_assets.definitions ARGS`` on
    that instance, the production webserver beside ``dbprune daemon``."""
    from dbprune_assets.core.store.layout import Layout

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "webserver":
        print("usage: python -m dbprune_assets.cluster webserver [dagster-webserver arguments]", file=sys.stderr)
        return 2
    layout = Layout.from_env()
    try:
        dagster_instance(layout).dispose()
    except ClusterError as e:
        print(f"dbprune: error: {e}", file=sys.stderr)
        return 2
    os.environ.update({"DAGSTER_HOME": str(layout.dagster_home), "DBPRUNE_HOME": str(layout.home),
                       "DBPRUNE_POOL": str(layout.pool)})
    exe = str(Path(sys.executable).with_name("dagster-webserver"))
    os.execv(exe, [exe, "-m", "dbprune_assets.definitions", *args[1:]])
    return 0  # pragma: no cover - execv does not return


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["ClusterError", "check_config", "check_reachable", "enabled", "instance_config", "instance_yaml",
           "mask_url", "queue_for", "run_ranges", "run_worker", "worker_argv", "make_app"]


#: Dagster's documented run tags for a partition-range run (the single-run
#: backfill policy turns it into one step over the range)
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"


def console_config(log_level: str | None) -> dict[str, Any]:
    """Run config of Dagster's console logger: its lines at ``log_level`` (``-v``),
    else none (every event still goes to the run's log in the instance)."""
    return {"loggers": {"console": {"config": {"log_level": log_level or "CRITICAL"}}}}


def dagster_instance(layout: Layout):  # -> dg.DagsterInstance
    import dagster as dg

    layout.dagster_home.mkdir(parents=True, exist_ok=True)
    cfg = layout.dagster_home / "dagster.yaml"
    text = instance_yaml()  # SQLite; PostgreSQL and Celery with DBPRUNE_POSTGRES_URL / DBPRUNE_BROKER
    if not cfg.exists() or cfg.read_text() != text:
        from dbprune_assets.core.store.atomic import write_bytes

        write_bytes(cfg, text.encode(), layout.tmp)  # atomic: a kill never leaves half of it
    check_reachable()  # database or broker down: one clear error before any run
    # this home's instance, whatever $DAGSTER_HOME says (`dbprune ui` exports it for dagster dev)
    return dg.DagsterInstance.from_config(str(layout.dagster_home))


#: Dagster's switch for one ``ASSET_MATERIALIZATION_PLANNED`` event per asset
#: holding the run's partition subset, instead of one event per partition
PLANNED_SUBSET_ENV = "DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS"
#: runs over more partitions than this log their planned partitions as one subset
PLANNED_SUBSET_FROM = 100


@contextlib.contextmanager
def planned_events(n_partitions: int) -> Iterator[None]:
    """While runs over ``n_partitions`` are created: above
    :data:`PLANNED_SUBSET_FROM`, Dagster logs each asset's planned partitions as
    one event rather than one per partition (measured: a third of the
    per-partition cost of a 300-partition step on SQLite).  The cost: partitions
    of a failed run show as missing, not failed, in the UI (the run itself shows
    failed, and ``dbprune run`` names the failed range); small runs keep
    Dagster's per-partition events.  A value the user set is left alone."""
    if n_partitions <= PLANNED_SUBSET_FROM or PLANNED_SUBSET_ENV in os.environ:
        yield
        return
    os.environ[PLANNED_SUBSET_ENV] = "1"
    try:
        yield
    finally:
        os.environ.pop(PLANNED_SUBSET_ENV, None)
