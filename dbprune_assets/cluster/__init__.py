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
``cpu`` by its assets; the worker task (``launcher.execute_run_task``) takes the
run's lease, records the worker's name, host and pid in the run's tags, and
executes the run in a process of its own (``execution.py``), which may start
processes in turn (the DataLoader's decode workers, the trainer's: Celery's
pool processes are daemonic and could not).  Neither Celery model honours
Dagster pools: GPU exclusivity comes from the queue and each worker's
concurrency (one run at a time by default).

**Faults.** Celery acknowledges a run's task only when it ends
(``task_acks_late``), so a busy worker never holds a second run it has not
started.  A started run's liveness is its lease (``lease.py``), renewed by
the task's process, which does nothing else while the run executes, so a
run that keeps every core busy does not starve it (Celery's ping, answered
by the worker's main process, could be).  ``dbprune run`` watches its runs:
when a run's lease has not been renewed for ``DBPRUNE_WORKER_LOST_S``
seconds (killed, out of memory, machine down or cut off), its process was
killed, or its task ended without the run recording its end, the lease is
revoked, the run marked failed and a new run for the same partition range
submitted (at most ``DBPRUNE_RUN_RETRIES`` times).  A run never executes
twice at once: a supervisor that cannot renew stops its run before the
lease can expire, one whose renewal is refused stops it at once, and a
partition's commit marker is written only while its run holds the lease.
A task the broker redelivers later finds the lease taken and does nothing.
Partitions are written atomically with commit markers (``defs/common.py``),
so a retry or the next ``dbprune run`` redoes exactly what is missing.

**The package**, one job a module (imports point down this list):

* ``tags.py``: the Celery queues and the run tags; ``queue_for`` (from the assets' facts);
* ``instance.py``: the home's Dagster instance (``dagster_instance``, ``instance_yaml``),
  the checks of the URLs (``check_config``, ``check_reachable``, ``mask_url``), and the
  run config and planned events that single-machine runs use too;
* ``launcher.py``: the Celery app, :class:`DbpruneRunLauncher`, the worker's task and
  the code pointer a worker rebuilds a run's job from; the only module that imports
  Dagster's private modules;
* ``lease.py``: a run's lease (liveness and fence), in the instance's database;
* ``execution.py``: the supervisor that executes a run in a process of its own and keeps its lease;
* ``failures.py``: why a run did not succeed (worker lost, database gone, a step failed);
* ``submit.py``: ``dbprune run`` against a cluster: submit, watch, retry (``run_ranges``);
* ``worker.py``: ``dbprune worker``; ``webserver.py``: ``python -m dbprune_assets.cluster webserver``.

Their public names are importable from here.  Importing this package is cheap
(Dagster, Celery and torch are imported inside the functions that use them);
``DbpruneRunLauncher``, which ``dagster.yaml`` names as
``dbprune_assets.cluster.DbpruneRunLauncher``, is built on first use.
"""

from __future__ import annotations

from typing import Any

from dbprune_assets.cluster.failures import ClusterFailure
from dbprune_assets.cluster.instance import (EMBEDDED_YAML, ENV_BACKEND, ENV_BROKER, ENV_LOST_AFTER, ENV_POSTGRES,
                                             ENV_RETRIES, ENV_SQLITE, LAUNCHER_MODULE, PG_SCHEME, PLANNED_SUBSET_ENV,
                                             PLANNED_SUBSET_FROM, ClusterError, backend_url, check_broker,
                                             check_config, check_reachable, console_config, dagster_instance, enabled,
                                             instance_config, instance_yaml, mask_url, planned_events, use_psycopg2,
                                             with_psycopg2)
from dbprune_assets.cluster.launcher import (DAGSTER_CHECKED, launcher_class, make_app, reconstruct_defs,
                                             reconstructable_job)
from dbprune_assets.cluster.submit import run_ranges
from dbprune_assets.cluster.tags import (ATTEMPT_TAG, CPU, EXECUTE_TASK, GPU, GROUP_TAG, HOME_TAG, K8S_GPU_CONFIG,
                                         K8S_TAG, LOST_TAG, QUEUE_TAG, QUEUES, RANGE_END_TAG, RANGE_START_TAG,
                                         SUBMITTER_TAG, TASK_ID_TAG, WORKER_HOST_TAG, WORKER_PID_TAG, WORKER_TAG,
                                         queue_for)
from dbprune_assets.cluster.webserver import main
from dbprune_assets.cluster.worker import default_queues, run_worker, worker_argv


def __getattr__(name: str) -> Any:  # `dagster.yaml` names dbprune_assets.cluster.DbpruneRunLauncher
    if name == "DbpruneRunLauncher":  # built on first use: importing this package stays cheap
        return launcher_class()
    raise AttributeError(name)


__all__ = [
    "ATTEMPT_TAG", "CPU", "DAGSTER_CHECKED", "EMBEDDED_YAML", "ENV_BACKEND", "ENV_BROKER", "ENV_LOST_AFTER",
    "ENV_POSTGRES", "ENV_RETRIES", "ENV_SQLITE", "EXECUTE_TASK", "GPU", "GROUP_TAG", "HOME_TAG", "K8S_GPU_CONFIG", "K8S_TAG",
    "LAUNCHER_MODULE", "LOST_TAG", "PG_SCHEME", "PLANNED_SUBSET_ENV", "PLANNED_SUBSET_FROM", "QUEUES", "QUEUE_TAG",
    "RANGE_END_TAG", "RANGE_START_TAG", "SUBMITTER_TAG", "TASK_ID_TAG", "WORKER_HOST_TAG", "WORKER_PID_TAG",
    "WORKER_TAG", "ClusterError", "ClusterFailure", "backend_url", "check_broker", "check_config",
    "check_reachable", "console_config", "dagster_instance", "default_queues", "enabled", "instance_config",
    "instance_yaml", "launcher_class", "main", "make_app", "mask_url", "planned_events", "queue_for",
    "reconstruct_defs", "reconstructable_job", "run_ranges", "run_worker", "use_psycopg2", "with_psycopg2",
    "worker_argv",
]
