"""Runs of ``dbprune run`` whose process died: each in-process run carries
its process (``PROCESS_TAG``: host and pid), so the next ``dbprune run`` on
this host marks failed those of processes that no longer live."""

from __future__ import annotations

from dbprune_assets.codelocation import give_ui_origin

PROCESS_TAG = "dbprune/process"  # <host>-<pid> of the `dbprune run` that executes the run


def fail_orphaned_runs(instance, repository: str | None = None) -> list[str]:
    """Mark failed the runs of `dbprune run` processes of this host that died
    (SIGKILL, OOM, power cut) while the run was in progress, so the UI does not
    show them running forever (and, given ``repository``, can re-execute them).
    Nothing waits on such a run: `dbprune run` executes in process, without a
    queue or concurrency slots."""
    import dagster as dg

    from dbprune_assets.core.store.atomic import pid_alive, process_tmp_name

    host = process_tmp_name().rsplit("-", 1)[0]
    unfinished = [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]
    failed = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=unfinished, tags={"dbprune/cli": "run"})):
        owner_host, _, pid = run.tags.get(PROCESS_TAG, "").rpartition("-")
        if owner_host == host and pid.isdigit() and not pid_alive(int(pid)):
            instance.report_run_failed(run, message=f"the dbprune run process {run.tags[PROCESS_TAG]} died "
                                                    "(killed) before the run finished; `dbprune run` redoes its unfinished partitions")
            failed.append(run.run_id)
    if repository is not None:
        give_ui_origin(instance, failed, repository)
    return failed
