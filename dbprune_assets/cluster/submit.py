"""``dbprune run`` against a cluster: submit a group's runs, watch them, retry.

:func:`run_ranges` is the cluster's ``runner._run_ranges``: one run per
partition range, all submitted at once through the instance's Celery run
launcher (:class:`GroupRuns`), then watched every ``poll_s`` until each ends.
A run whose lease was not renewed for ``DBPRUNE_WORKER_LOST_S`` seconds
(``core/running/lease.py``), whose process was killed, whose task ended
without the run recording its end, or that failed on its database
connection has its lease revoked, is marked failed and submitted again (at most
``DBPRUNE_RUN_RETRIES`` times); a database restart is waited out
(:func:`_db`); Ctrl-C cancels the runs on the workers.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from dbprune_assets.cluster.failures import (Attempt, ClusterFailure, casualty, failure_of, lost_failure, lost_reason,
                                             where)
from dbprune_assets.cluster.instance import (ENV_BROKER, ENV_LOST_AFTER, ENV_POSTGRES, ENV_RETRIES, ClusterError,
                                             console_config, first_line, mask_url, secret_free)
from dbprune_assets.cluster.launcher import launcher_class, lease_url, reconstructable_job
from dbprune_assets.core.running.lease import Leases
from dbprune_assets.cluster.tags import (ATTEMPT_TAG, GPU, GROUP_TAG, HOME_TAG, K8S_GPU_CONFIG, K8S_TAG, LEASE_TAG,
                                         LOST_TAG, QUEUE_TAG, RANGE_END_TAG, RANGE_START_TAG, SUBMITTER_TAG,
                                         queue_for, run_note)

Echo = Callable[[str], None]
Range = tuple[str | None, str | None]

_reaped_homes: set[str] = set()
_queues_seen: set[str] = set()


def run_ranges(job: Any, instance: Any, group: list[str], ranges: list[Range],
               log_level: str | None, *, layout: Any, echo: Echo = print,
               poll_s: float = 0.5) -> tuple[list[str], ClusterFailure | None]:
    """The cluster's ``runner._run_ranges``: one run per partition range of the
    group's assets, all submitted at once through the instance's Celery run
    launcher, then watched until each ends; a run whose worker is lost is
    submitted again.  (run ids, the first failed run or None)."""
    runs = GroupRuns(job, instance, group, log_level, layout=layout, echo=echo)
    for start, end in ranges:
        runs.submit(start, end, 1, None)
    try:
        while runs.active:
            time.sleep(poll_s)
            runs.watch_round()
    except KeyboardInterrupt:
        runs.cancel_active()
        raise
    return runs.run_ids, (runs.failures[0] if runs.failures else None)


class GroupRuns:
    """The runs of one group's assets on the cluster: every attempt submitted
    (``run_ids``), those not ended yet (``active``) and the failures."""

    def __init__(self, job: Any, instance: Any, group: list[str], log_level: str | None, *, layout: Any,
                 echo: Echo) -> None:
        from dbprune_assets.core.store.atomic import process_tmp_name

        self.job, self.instance, self.group, self.echo = job, instance, group, echo
        self.launcher = _celery_launcher(instance, layout)
        self.retries = _int_env(ENV_RETRIES, 2)
        self.lost_after = _float_env(ENV_LOST_AFTER, 30.0)
        self.leases = _db(lambda: Leases(lease_url(instance)), echo)
        self.queue = queue_for(group)
        self.home = str(layout.home)
        _first_sight(instance, self.launcher, self.leases, self.home, self.queue, echo)
        self.origin = reconstructable_job(job, self.home, str(layout.pool)).get_python_origin()
        self.run_config = {**console_config(log_level), "execution": {"config": {"in_process": {}}}}
        self.submitter = process_tmp_name()
        self.run_ids: list[str] = []
        self.active: dict[str, Attempt] = {}
        self.failures: list[ClusterFailure] = []
        self.half_launched: list[str] = []  # runs whose launch the database cut off half-way
        self.last_check = 0.0

    # -- submit ---------------------------------------------------------------
    def submit(self, start: str | None, end: str | None, number: int, parent: Attempt | None) -> Attempt:
        """Create and launch the run of a range (attempt ``number``, retrying
        ``parent``); it joins the active runs."""
        tags = self._tags(start, end, number, parent)
        run = _db(lambda: self._create_and_launch(tags, parent), self.echo)
        self._cancel_half_launched()
        att = Attempt(start, end, number, run.run_id, parent.root_run_id if parent else run.run_id)
        self.active[att.run_id] = att
        self.run_ids.append(att.run_id)
        return att

    def _tags(self, start: str | None, end: str | None, number: int, parent: Attempt | None) -> dict[str, str]:
        tags = {"dbprune/cli": "run", HOME_TAG: self.home, SUBMITTER_TAG: self.submitter, QUEUE_TAG: self.queue,
                GROUP_TAG: ",".join(self.group), ATTEMPT_TAG: str(number), LEASE_TAG: f"{self.lost_after:g}"}
        if self.queue == GPU:
            import json

            tags[K8S_TAG] = json.dumps(K8S_GPU_CONFIG)
        if start is not None:
            tags.update({RANGE_START_TAG: start, RANGE_END_TAG: str(end)})
        if parent is not None:
            tags.update({"dagster/parent_run_id": parent.run_id, "dagster/root_run_id": parent.root_run_id,
                         "dagster/retry_number": str(number - 1)})
        return tags

    def _create_and_launch(self, tags: dict[str, str], parent: Attempt | None) -> Any:
        import dagster as dg

        run = self.instance.create_run_for_job(
            job_def=self.job, run_config=self.run_config, tags=tags,
            asset_selection=frozenset(dg.AssetKey(a) for a in self.group), job_code_origin=self.origin,
            parent_run_id=parent.run_id if parent else None, root_run_id=parent.root_run_id if parent else None)
        try:
            self.instance.launch_run(run.run_id, workspace=None)  # type: ignore[arg-type]  # Celery's launcher needs none
        except BaseException:
            self.half_launched.append(run.run_id)  # canceled once the database answers: a new run replaces it
            raise
        return run

    def _cancel_half_launched(self) -> None:
        """Cancel the runs whose launch the database cut off half-way (a worker
        that receives one of them leaves it alone)."""
        while self.half_launched:
            run = _db(lambda: self.instance.get_run_by_id(self.half_launched[0]), self.echo)
            if run is not None and not run.is_finished:
                _db(lambda: self.instance.report_run_canceled(run, message="its launch was cut off by the database; "
                                                                           "dbprune run submitted the range again"),
                    self.echo)
            self.half_launched.pop(0)

    # -- watch ----------------------------------------------------------------
    def watch_round(self) -> None:
        """One look at the active runs: those that ended leave them (a failure
        is kept), those that will not end are submitted again or given up."""
        import dagster as dg

        ids = list(self.active)
        runs = {r.run_id: r for r in _db(lambda: self.instance.get_runs(dg.RunsFilter(run_ids=ids)), self.echo)}
        leases = _db(lambda: self.leases.states(ids), self.echo)
        now = time.monotonic()
        check = now - self.last_check >= 2.0  # the Celery backend is asked every 2 s
        if check:
            self.last_check = now
        for run_id, att in list(self.active.items()):
            run = runs.get(run_id)
            if run is None:
                continue
            lost = self._why_lost(run, att, leases.get(run_id), now, check)
            if lost is not None:
                self._retry_or_give_up(run, att, lost)

    def _why_lost(self, run: Any, att: Attempt, lease: Any, now: float, check: bool) -> str | None:
        """Why an active run is to be submitted again (its lease is then
        revoked, so that whatever still executes it commits nothing, and it is
        tagged, marked failed if need be, and no longer active); None when it
        succeeded, failed for good (kept as a failure) or still runs."""
        import dagster as dg

        run_id = run.run_id
        if run.status == dg.DagsterRunStatus.SUCCESS:
            del self.active[run_id]
            return None
        if run.is_finished:  # failed or canceled by its worker, the UI, or us
            del self.active[run_id]
            why = casualty(self.instance, run) if att.number <= self.retries else None
            if why is None:
                self.failures.append(failure_of(self.instance, run, att))
                return None
            _db(lambda: self.instance.add_run_tags(run_id, {LOST_TAG: run_note(run_id, why)}), self.echo)
            return why
        lost = lost_reason(self.launcher, run, att, lease, now, check)
        if lost is None:
            return None
        self._give_up(run, lost)
        del self.active[run_id]
        return lost

    def _give_up(self, run: Any, lost: str) -> None:
        """Make sure the execution of ``run`` is over before its range is
        submitted again: revoke its lease (its supervisor kills it at the next
        renewal, and it can commit nothing), revoke its Celery task, then
        record it failed."""
        _db(lambda: self.leases.revoke(run.run_id), self.echo)
        try:
            self.launcher.terminate(run.run_id)
        except Exception:  # noqa: BLE001 - its worker or the broker may be gone: the lease fences it
            pass
        _db(lambda: self.instance.add_run_tags(run.run_id, {LOST_TAG: run_note(run.run_id, lost)}), self.echo)
        _db(lambda: self.instance.report_run_failed(run, message=f"given up by dbprune run: {lost}"), self.echo)

    def _retry_or_give_up(self, run: Any, att: Attempt, lost: str) -> None:
        if att.number <= self.retries:
            new = self.submit(att.start, att.end, att.number + 1, att)
            self.echo(f"  ↻ {where(att.start, att.end)}: {lost}; submitted again as run {new.run_id} "
                      f"(attempt {new.number} of {self.retries + 1})")
        else:
            self.failures.append(lost_failure(run, att, lost, self.retries))

    # -- interrupted ----------------------------------------------------------
    def cancel_active(self) -> None:
        """Ctrl-C: cancel the runs not ended yet, on the workers and in the instance."""
        canceled = 0
        for run_id in self.active:
            run = self.instance.get_run_by_id(run_id)
            if run is not None and not run.is_finished:
                try:
                    self.leases.revoke(run_id)  # its supervisor stops it at the next renewal
                    self.launcher.terminate(run_id)  # revokes its task; a started one's supervisor stops it
                except Exception:  # noqa: BLE001 - the broker may be gone too; the run is marked canceled anyway
                    pass
                self.instance.report_run_canceled(run, message="dbprune run was interrupted")
                canceled += 1
        self.echo(f"  interrupted: {canceled} run(s) canceled on the workers")


def _celery_launcher(instance: Any, layout: Any) -> Any:
    launcher = instance.run_launcher
    if not isinstance(launcher, launcher_class()):
        raise ClusterError(f"{ENV_BROKER} is set but the instance at {layout.dagster_home} has no Celery run launcher "
                           f"({type(launcher).__name__}); it is configured by dbprune from {ENV_BROKER}: "
                           "open the instance with runner.dagster_instance")
    return launcher


def _first_sight(instance: Any, launcher: Any, leases: Leases, home: str, queue: str, echo: Echo) -> None:
    """Once per process: cancel the runs an earlier ``dbprune run`` of this
    home left, and say when no live worker serves ``queue``."""
    if home not in _reaped_homes:
        _reaped_homes.add(home)
        _cancel_orphans(instance, launcher, leases, home, echo)
    if queue not in _queues_seen:
        _queues_seen.add(queue)
        if not _queue_served(launcher.celery, queue):
            echo(f"  no live worker serves queue '{queue}' yet: the runs wait in it until one starts "
                 f"(dbprune worker --queue {queue})")


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
                                   f"{patience_s:.0f}s ({secret_free(first_line(e), url)}); the runs may still "
                                   "be running on the workers: start dbprune run again once PostgreSQL is back, it "
                                   "redoes what is not committed") from None
            if not said:
                echo("  the Dagster database does not answer (restarting?); waiting for it …")
                said = True
            time.sleep(2.0)


def alive_workers(app: Any, nodes: set[str], timeout_s: float = 1.0) -> set[str]:
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


def _cancel_orphans(instance: Any, launcher: Any, leases: Leases, home: str, echo: Echo) -> None:
    """Cancel the unfinished runs an earlier ``dbprune run`` of this home left
    (it was killed): this process holds the home's lock, so no submitter
    waits on them, and their partitions are redone with the current settings."""
    import dagster as dg

    unfinished = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
                  dg.DagsterRunStatus.STARTED]
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=unfinished, tags={HOME_TAG: home})):
        leases.revoke(run.run_id)
        try:
            launcher.terminate(run.run_id)
        except Exception:  # noqa: BLE001 - a worker that is gone needs no revoke
            pass
        instance.report_run_canceled(run, message="left unfinished by a dbprune run that no longer runs; "
                                                  "dbprune run redoes its partitions")
        echo(f"run {run.run_id} ({run.tags.get(GROUP_TAG, '?')}) was left unfinished by a dbprune run that no "
             "longer runs; canceled it")
