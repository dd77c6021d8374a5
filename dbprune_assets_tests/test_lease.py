"""A run's lease and its supervisor (``cluster/lease.py``, ``cluster/execution.py``):
the liveness signal of a cluster run that a busy run cannot starve, and the
fence that keeps a run from executing twice at once.

* the lease table by hand: taken once, renewed while live, refused once
  revoked, expired or ended;
* the supervisor stops its run's process when the lease is revoked, when it
  cannot renew for ``SELF_FENCE * ttl`` (before the lease expires), and on
  SIGTERM (SIGINT first); a supervisor killed with SIGKILL takes its run's
  process with it;
* a commit marker is refused to an execution whose lease is gone;
* a run executed by the worker's task in a daemonic process (Celery's pool
  process) can start processes of its own (the DataLoader's decode workers).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import dagster as dg
import pytest

from dbprune_assets.cluster import launcher
from dbprune_assets.cluster.execution import Supervisor
from dbprune_assets.core.running.lease import ENV_LEASE, SELF_FENCE, LeaseLost, Leases, check_held, lease_env

if TYPE_CHECKING:
    from dbprune_assets.defs.common import Session


@pytest.fixture()
def leases(tmp_path: Path) -> Leases:
    store = Leases(f"sqlite:///{tmp_path / 'leases.db'}")
    yield store
    store.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone too
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------------------
# the lease table
# ---------------------------------------------------------------------------
def test_a_lease_is_taken_once_renewed_while_live_and_refused_once_revoked(leases: Leases) -> None:
    assert leases.take("r1", "w1", 30) is True
    assert leases.take("r1", "w2", 30) is False  # a second delivery of the same run
    assert leases.renew("r1", "w1", 30) is True
    assert leases.renew("r1", "w2", 30) is False  # not its holder
    state = leases.states(["r1", "nope"])
    assert list(state) == ["r1"]
    assert state["r1"].live and state["r1"].holder == "w1" and 20 < state["r1"].seconds_left <= 30  # the 30 s lease, less the time since taken
    assert leases.held("r1", "w1") and not leases.held("r1", "w2")
    leases.revoke("r1")
    assert leases.renew("r1", "w1", 30) is False
    after = leases.states(["r1"])["r1"]
    assert after.revoked and not after.live and not leases.held("r1", "w1")


def test_an_unrenewed_lease_expires_and_cannot_be_renewed_afterwards(leases: Leases) -> None:
    assert leases.take("r2", "w1", 0.3)
    time.sleep(0.5)
    state = leases.states(["r2"])["r2"]
    assert not state.live and not state.ended and not state.revoked and state.seconds_left < 0
    assert leases.renew("r2", "w1", 30) is False
    assert leases.take("r2", "w2", 30) is False  # an expired lease is not taken over: the run is given up


def test_an_ended_lease_is_no_longer_live(leases: Leases) -> None:
    assert leases.take("r3", "w1", 30)
    leases.end("r3", "w1")
    state = leases.states(["r3"])["r3"]
    assert state.ended and not state.live and leases.renew("r3", "w1", 30) is False


def test_two_stores_on_one_database_create_the_table_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    a, b = Leases(url), Leases(url)
    assert a.take("r", "w", 5) and not b.take("r", "x", 5)
    a.close()
    b.close()


# ---------------------------------------------------------------------------
# the supervisor
# ---------------------------------------------------------------------------
SLEEPER = [sys.executable, "-c", "import sys, time; sys.stdin.read(); time.sleep(120)"]


def _supervise_in_thread(sup: Supervisor, argv: list[str]) -> tuple[threading.Thread, dict]:
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("outcome", sup.run(argv, "", dict(os.environ),
                                                                                poll_s=0.05)))
    thread.start()
    deadline = time.monotonic() + 10
    while sup.proc is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return thread, out


def test_a_revoked_lease_stops_the_run_at_the_next_renewal(leases: Leases) -> None:
    assert leases.take("r", "w", 2.0)
    sup = Supervisor(leases, "r", "w", 2.0)
    thread, out = _supervise_in_thread(sup, SLEEPER)
    pid = sup.proc.pid
    time.sleep(0.5)
    assert _alive(pid)
    leases.revoke("r")  # what dbprune run does before it submits the range again
    thread.join(10)
    assert not thread.is_alive() and not _alive(pid)
    assert out["outcome"].returncode == -signal.SIGKILL
    assert "revoked" in out["outcome"].stopped


class _Unreachable(Leases):
    """A lease store whose database stops answering after ``ok`` renewals."""

    def __init__(self, url: str, ok: int) -> None:
        super().__init__(url)
        self.ok = ok

    def renew(self, run_id: str, holder: str, ttl: float) -> bool:
        self.ok -= 1
        if self.ok < 0:
            raise ConnectionError("could not connect to server")
        return super().renew(run_id, holder, ttl)


def test_a_supervisor_that_cannot_renew_stops_its_run_before_the_lease_expires(tmp_path: Path) -> None:
    store = _Unreachable(f"sqlite:///{tmp_path / 'leases.db'}", ok=2)
    ttl = 2.0
    assert store.take("r", "w", ttl)
    sup = Supervisor(store, "r", "w", ttl)
    thread, out = _supervise_in_thread(sup, SLEEPER)
    thread.join(15)
    assert not thread.is_alive() and "could not be renewed" in out["outcome"].stopped
    # it stopped on its own clock before the database's lease ran out: no second execution can overlap
    assert Leases.states(store, ["r"])["r"].seconds_left > -0.5
    assert ttl * SELF_FENCE < ttl
    store.close()


def _script_supervisor(tmp_path: Path, ttl: float) -> subprocess.Popen:
    """A supervisor in a process of its own, its run's process a sleeper that writes its pid."""
    code = textwrap.dedent(f"""
        import os, sys
        from dbprune_assets.cluster.execution import Supervisor
        from dbprune_assets.core.running.lease import Leases
        leases = Leases("sqlite:///{tmp_path / 'leases.db'}")
        leases.take("r", "w", {ttl})
        child = [sys.executable, "-c", "import os, signal, sys, time; sys.stdin.read(); "
                 "open({str(tmp_path / 'pid')!r}, 'w').write(str(os.getpid())); "
                 "signal.signal(signal.SIGINT, lambda *a: sys.exit(7)); time.sleep(120)"]
        print(Supervisor(leases, "r", "w", {ttl}).run(child, "", dict(os.environ), poll_s=0.05).returncode,
              flush=True)
    """)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])


def _child_pid(tmp_path: Path, timeout_s: float = 30) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = (tmp_path / "pid").read_text() if (tmp_path / "pid").exists() else ""
        if text:
            return int(text)
        time.sleep(0.05)
    raise AssertionError("the run's process did not start")


def test_a_supervisor_killed_with_sigkill_takes_its_run_with_it(tmp_path: Path) -> None:
    sup = _script_supervisor(tmp_path, ttl=30)
    child = _child_pid(tmp_path)
    sup.kill()
    sup.wait(10)
    assert _wait_gone(child), "the run's process outlived its supervisor"


def test_sigterm_interrupts_the_run_first(tmp_path: Path) -> None:
    sup = _script_supervisor(tmp_path, ttl=30)
    child = _child_pid(tmp_path)
    sup.send_signal(signal.SIGTERM)
    out, _ = sup.communicate(timeout=30)
    assert out.strip() == "7"  # the run's process got SIGINT and ended by itself
    assert not _alive(child)


# ---------------------------------------------------------------------------
# the commit fence
# ---------------------------------------------------------------------------
def test_a_commit_is_refused_once_the_lease_is_gone(leases: Leases, monkeypatch: pytest.MonkeyPatch) -> None:
    check_held("embeddings 00000")  # outside a cluster run: nothing to check
    assert leases.take("r", "w", 30)
    monkeypatch.setenv(ENV_LEASE, lease_env("r", "w", leases.url)[ENV_LEASE])
    check_held("embeddings 00000")
    leases.revoke("r")
    with pytest.raises(LeaseLost, match="run r no longer holds its lease .*embeddings 00000 is not committed"):
        check_held("embeddings 00000")


def test_session_commit_checks_the_lease(tmp_path: Path, leases: Leases, monkeypatch: pytest.MonkeyPatch) -> None:
    from dbprune_assets.defs.common import DbpruneResource, Session
    from dbprune_assets.definitions import asset_nodes

    from . import faultkit as fk
    from .conftest import write_config

    fk.write_pool(tmp_path / "pool", shards=1, samples_per_shard=8)
    resource = DbpruneResource(home=str(tmp_path / "home"), pool=str(tmp_path / "pool"),
                               config=str(write_config(tmp_path / "c.yaml")))
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        instance.add_dynamic_partitions("shards", ["00000"])
        session = Session(resource.layout(), resource.settings(), instance, asset_nodes())
        _commit_refused(session, leases, monkeypatch)


def _commit_refused(session: "Session", leases: Leases, monkeypatch: pytest.MonkeyPatch) -> None:
    from dbprune_assets.core.store.state import read_state

    assert leases.take("r", "w", 30)
    monkeypatch.setenv(ENV_LEASE, lease_env("r", "w", leases.url)[ENV_LEASE])
    leases.revoke("r")
    with pytest.raises(LeaseLost):
        session.commit("raw_metadata", "00000")
    assert read_state(session.layout, "raw_metadata", "00000") is None  # no marker written


# ---------------------------------------------------------------------------
# a run with processes of its own, executed from a daemonic process
# ---------------------------------------------------------------------------
@dg.op
def _starts_a_process() -> int:
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=os.getpid)  # what the DataLoader's decode workers do
    proc.start()
    proc.join()
    return proc.exitcode


@dg.job
def job_with_a_process() -> None:
    _starts_a_process()


def _task_in_a_daemon(home: str, run_id: str, queue: "multiprocessing.Queue") -> None:
    from dagster._grpc.types import ExecuteRunArgs
    from dagster._serdes import pack_value

    instance = dg.DagsterInstance.from_config(home)
    args = ExecuteRunArgs(job_origin=dg.reconstructable(job_with_a_process).get_python_origin(), run_id=run_id,
                          instance_ref=instance.get_ref(), set_exit_code_on_failure=True)
    task = SimpleNamespace(request=SimpleNamespace(hostname="w1@node-a"))
    queue.put(launcher.execute_run_task(task, pack_value(args)))


def test_a_run_of_the_worker_task_in_a_daemonic_process_may_start_processes(tmp_path: Path) -> None:
    home = tmp_path / "dagster"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    instance = dg.DagsterInstance.from_config(str(home))
    origin = dg.reconstructable(job_with_a_process).get_python_origin()
    run = instance.create_run_for_job(job_def=job_with_a_process, job_code_origin=origin,
                                      run_config={"execution": {"config": {"in_process": {}}}})
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    daemon = ctx.Process(target=_task_in_a_daemon, args=(str(home), run.run_id, queue), daemon=True)
    daemon.start()  # Celery's pool processes are daemonic
    code = queue.get(timeout=120)
    daemon.join(30)
    done = instance.get_run_by_id(run.run_id)
    assert (code, done.status) == (0, dg.DagsterRunStatus.SUCCESS), instance.all_logs(run.run_id)[-3:]


# ---------------------------------------------------------------------------
# dbprune run's verdict from the lease
# ---------------------------------------------------------------------------
def test_only_an_expired_lease_makes_a_started_run_lost() -> None:
    from dbprune_assets.cluster.failures import Attempt, lost_reason
    from dbprune_assets.core.running.lease import LeaseState

    run = SimpleNamespace(tags={"dbprune/worker": "w1@node-a", "dbprune/worker_host": "node-a",
                                "dbprune/worker_pid": "42"})
    att = Attempt("00000", "00000", 1, "r", "r")

    def verdict(live: bool, ended: bool = False, revoked: bool = False, left: float = 10.0, now: float = 0.0):
        return lost_reason(None, run, att, LeaseState("r", "h", live, ended, revoked, left), now, check=False)

    assert lost_reason(None, run, att, None, 0.0, check=False) is None  # not taken yet: waits in its queue
    assert verdict(live=True) is None  # renewed: running, however busy its machine
    assert verdict(live=False, revoked=True, left=-3) is None  # given up by us already
    assert verdict(live=False, left=-7.2) == ("worker w1@node-a (host node-a, pid 42) stopped renewing the run's lease "
                                              "7s ago (killed, out of memory, its machine is down or cut off)")
    assert verdict(live=False, ended=True, now=100.0) is None  # its process ended: its end event is on its way
    assert "ended but the run did not record its end" in verdict(live=False, ended=True, now=111.0)
