"""Why a run on the cluster did not succeed, as ``dbprune run`` tells it: its
worker was lost, its database connection broke, or a step failed; each
named by the partition range and the worker (``runner._failure_message``
reads a :class:`ClusterFailure` as it reads an in-process run's result)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from dbprune_assets.cluster.instance import first_line
from dbprune_assets.cluster.tags import (DIED_TAG, GROUP_TAG, LOST_TAG, TASK_ID_TAG, WORKER_HOST_TAG, WORKER_PID_TAG,
                                         WORKER_TAG, own_note)


@dataclass
class Attempt:
    """One submission of a partition range (``start``…``end``; None: unpartitioned):
    its run, its number (1 the first) and since when its worker or task looks gone."""

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


def where(start: str | None, end: str | None) -> str:
    """The partition range in words (``shards 00002…00003``, ``strategy dbp``, ``unpartitioned``)."""
    from dbprune_assets.core.strategies.registry import names

    if start is None:
        return "unpartitioned"
    kind = "strategy" if start in names() else "shard"
    return f"{kind} {start}" if start == end else f"{kind}s {start}…{end}"


def worker_words(run: Any) -> str:
    node = run.tags.get(WORKER_TAG)
    if not node:
        return "no worker had started it"
    return f"worker {node} (host {run.tags.get(WORKER_HOST_TAG, '?')}, pid {run.tags.get(WORKER_PID_TAG, '?')})"


def lost_reason(launcher: Any, run: Any, att: Attempt, lease: Any, now: float, check: bool) -> str | None:
    """Why an unfinished run will not finish (its lease expired: its worker is
    gone or cut off; or its task ended without the run recording its end),
    else None.  ``lease``: the run's :class:`~dbprune_assets.core.running.lease.LeaseState`
    (None: not taken yet, the run waits in its queue)."""
    if lease is not None and not lease.live and not lease.revoked:
        if not lease.ended:
            return (f"{worker_words(run)} stopped renewing the run's lease {-lease.seconds_left:.0f}s ago "
                    "(killed, out of memory, its machine is down or cut off)")
        att.ended_since = att.ended_since if att.ended_since is not None else now
        if now - att.ended_since >= 10.0:  # the run's own end event would have arrived by now
            return (f"its process on {worker_words(run)} ended but the run did not record its end "
                    "(the database was unreachable)")
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
                detail = f": {first_line(result.result) if isinstance(result.result, BaseException) else result.result}"
            return (f"its Celery task on {worker_words(run)} ended ({state}{detail}) but the run did not record "
                    "its end (the worker's pool process died, or the database was unreachable)")
    return None


def _failure_events(instance: Any, run_id: str) -> list[Any] | None:
    """The run's step failure, run failure and engine events; None when the database cannot say."""
    import dagster as dg

    kinds = {dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.RUN_FAILURE, dg.DagsterEventType.ENGINE_EVENT}
    try:
        records = instance.all_logs(run_id, of_type=kinds)
    except Exception:  # noqa: BLE001 - the database may be gone
        return None
    return [r.dagster_event for r in records if r.dagster_event is not None]


def failure_of(instance: Any, run: Any, att: Attempt) -> ClusterFailure:
    """The failed run's step failure, its step key naming the range and worker."""
    import dagster as dg

    place = f"{where(att.start, att.end)}, {worker_words(run)}"
    events = _failure_events(instance, run.run_id) or []  # no events: say what is known
    for event in events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            err = event.step_failure_data.error
            while err.cause is not None and "dagster" in (err.cls_name or "").lower():
                err = err.cause
            return ClusterFailure(run.run_id, [_event(f"{event.step_key}: {place}", err.cls_name, err.message)])
    # no step failed: the run itself did (its code did not load, the database went away, …); the
    # innermost error of its last event with one says why
    err = run_error(events)
    if err is not None:
        message = err.message.strip().splitlines()[0] if err.message.strip() else str(err.cls_name)
    else:
        message = next((e.message for e in events if e.event_type == dg.DagsterEventType.RUN_FAILURE and e.message),
                       None) or own_note(run, LOST_TAG) or f"the run ended {run.status.value}"
    return ClusterFailure(run.run_id, [_event(f"{run.tags.get(GROUP_TAG, '?')}: {place}", None, message)])


def run_error(events: list[Any]) -> Any:
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


def casualty(instance: Any, run: Any) -> str | None:
    """Why ``run`` failed for no fault of its work, so that its range is
    submitted again: its process was killed (its worker says so) or its
    database connection broke (no step failed); else None."""
    if run.status.value != "FAILURE" or own_note(run, LOST_TAG):
        return None
    return own_note(run, DIED_TAG) or db_casualty(instance, run)


def db_casualty(instance: Any, run: Any) -> str | None:
    """Why ``run`` failed when its database connection broke (no step failed), else None."""
    if run.status.value != "FAILURE" or own_note(run, LOST_TAG):
        return None
    events = _failure_events(instance, run.run_id)
    if events is None or any(e.is_step_failure for e in events):
        return None
    err = run_error(events)
    if err is None or not any(name in (err.cls_name or "") for name in DB_ERRORS):
        return None
    return f"it failed on the database connection ({err.message.strip().splitlines()[0] if err.message else err.cls_name})"


def lost_failure(run: Any, att: Attempt, lost: str, retries: int) -> ClusterFailure:
    """A run given up after its last attempt: ``lost`` says why."""
    return ClusterFailure(run.run_id, [_event(f"{run.tags.get(GROUP_TAG, '?')}: {where(att.start, att.end)}", None,
                                              f"{lost}; given up after {retries + 1} attempt(s)")])


def _event(step_key: str, cls_name: str | None, message: str) -> Any:
    error = SimpleNamespace(cause=None, cls_name=cls_name, message=message)
    return SimpleNamespace(is_step_failure=True, step_key=step_key, step_failure_data=SimpleNamespace(error=error))
