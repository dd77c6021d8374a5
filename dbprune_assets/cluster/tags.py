"""The names a cluster run carries: its Celery queue and the run tags that
``dbprune run``, the run launcher and the worker's task write and read."""

from __future__ import annotations

from typing import Any

GPU, CPU = "gpu", "cpu"
QUEUES = (GPU, CPU)

#: the Celery task (of :func:`~dbprune_assets.cluster.launcher.make_app`) that executes a run
EXECUTE_TASK = "dbprune.execute_run"

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
DIED_TAG = "dbprune/died"  # why its worker recorded the run failed (its process was killed): submitted again
LEASE_TAG = "dbprune/lease_s"  # the seconds a run's lease lasts without renewal (cluster.lease)
K8S_TAG = "dagster-k8s/config"  # read by dagster-k8s (deploy/k8s), ignored by Celery

def run_note(run_id: str, why: str) -> str:
    """The value of a run's :data:`LOST_TAG` or :data:`DIED_TAG`: ``why``,
    after the run's id.  Dagster copies a run's tags onto its re-executions
    (the UI's Re-execute): there the id says whose note it is, and
    :func:`own_note` does not take it for the new run's."""
    return f"run {run_id[:8]}: {why}"


def own_note(run: Any, tag: str) -> str | None:
    """The run's own note under ``tag`` (:func:`run_note`), or None: none, or one copied from a parent run."""
    value = run.tags.get(tag)
    prefix = f"run {run.run_id[:8]}: "
    return value[len(prefix):] if value and value.startswith(prefix) else None


#: Dagster's documented run tags for a partition-range run (the single-run
#: backfill policy turns it into one step over the range)
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"

#: what a GPU run asks of Kubernetes (deploy/k8s/values.yaml): one GPU on a GPU node
K8S_GPU_CONFIG = {
    "container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}, "requests": {"nvidia.com/gpu": "1"}}},
    "pod_spec_config": {
        "node_selector": {"dbprune/gpu": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
}


def queue_for(assets: list[str] | set[str] | frozenset[str]) -> str:
    """``gpu`` for a run of any asset that declares ``Facts(gpu=True)`` (the
    encoder, whose ``bootstrap`` trains a CLIP, embeddings, training and
    evaluation), else ``cpu``."""
    from dbprune_assets.definitions import asset_nodes

    nodes = asset_nodes()
    return GPU if any(nodes[a].facts.gpu for a in assets if a in nodes) else CPU
