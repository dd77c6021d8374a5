"""How a worker executes a run: in a process of its own, watched by a
supervisor that holds the run's lease.

The Celery task (``launcher.execute_run_task``) runs in one of the worker's
pool processes, which Celery makes daemonic: a run executed there could not
start the DataLoader's decode workers or the trainer's ("daemonic processes
are not allowed to have children").  So the task only supervises: it starts
the run's process (:func:`~dbprune_assets.cluster.launcher.run_process_argv`,
reading the packed ``ExecuteRunArgs`` on stdin) in a process group of its own, which
dies with it (``PR_SET_PDEATHSIG``), and while that process runs it does
nothing but renew the run's lease (:mod:`~dbprune_assets.core.running.lease`):

* renewal refused (``dbprune run`` revoked the lease, or it expired): the
  run's process group is killed at once;
* no renewal for ``SELF_FENCE * ttl`` seconds (database or network gone):
  the same, before the lease can expire and the range be submitted again;
* SIGTERM (Celery's revoke with ``terminate``, the worker's shutdown): the
  run's process gets SIGINT (Dagster records the run canceled), then SIGKILL
  after a grace period.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from dbprune_assets.core.running.lease import SELF_FENCE, Leases

#: seconds a run's process has to stop after SIGINT before it is killed
GRACE_S = 10.0


@dataclass
class Outcome:
    """How a run's process ended: its exit status (negative: the signal that
    ended it) and, when the supervisor stopped it, why."""

    returncode: int
    stopped: str | None = None

    def words(self) -> str:
        if self.returncode < 0:
            try:
                name = signal.Signals(-self.returncode).name
            except ValueError:
                name = f"signal {-self.returncode}"
            return f"was ended by {name}" + (" (killed, or out of memory)" if name == "SIGKILL" else "")
        return f"exited with status {self.returncode}"


def _die_with_parent() -> None:
    """In the run's process, before it executes: SIGKILL when the supervisor dies (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Supervisor:
    """Runs one command in its own process group and keeps the run's lease
    while it runs (:meth:`run`)."""

    def __init__(self, leases: Leases, run_id: str, holder: str, ttl: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.leases, self.run_id, self.holder, self.ttl, self.clock = leases, run_id, holder, ttl, clock
        self.every = max(0.2, ttl / 5)
        self.proc: subprocess.Popen | None = None
        self.stopped: str | None = None
        self._terminated = False

    def run(self, argv: list[str], stdin: str, env: dict[str, str], poll_s: float = 0.2) -> Outcome:
        """Start ``argv`` (``stdin`` written to it), renew the lease until it
        ends, stop it when the lease is lost or this process is terminated."""
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, env=env, start_new_session=True,
                                     preexec_fn=_die_with_parent, text=True)
        assert self.proc.stdin is not None
        self.proc.stdin.write(stdin)
        self.proc.stdin.close()
        previous = _on_sigterm(self._sigterm)
        try:
            self._watch(poll_s)
        finally:
            _on_sigterm(previous)
            if self.proc.poll() is None:  # an exception in this loop: the run does not outlive its supervisor
                self._kill()
            self.proc.wait()
        try:
            self.leases.end(self.run_id, self.holder)
        except Exception:  # noqa: BLE001 - the database is gone: the lease expires by itself
            pass
        return Outcome(self.proc.returncode, self.stopped)

    def _watch(self, poll_s: float) -> None:
        assert self.proc is not None
        last_ok = next_renewal = self.clock()
        while self.proc.poll() is None:
            now = self.clock()
            if self._terminated and self.stopped is None:
                self.stopped = "its worker was told to stop it (revoked, or the worker shuts down)"
                self._interrupt_then_kill()
                return
            if now >= next_renewal:
                next_renewal = now + self.every
                renewed = self._renew()
                if renewed:
                    last_ok = now
                elif renewed is False:
                    self.stopped = "its lease was revoked or expired (dbprune run gave it up)"
                    self._kill()
                    return
            if now - last_ok > SELF_FENCE * self.ttl:
                self.stopped = f"its lease could not be renewed for {now - last_ok:.0f}s (database unreachable)"
                self._kill()
                return
            time.sleep(poll_s)

    def _renew(self) -> bool | None:
        """True: renewed; False: refused; None: the database did not answer."""
        try:
            return self.leases.renew(self.run_id, self.holder, self.ttl)
        except Exception:  # noqa: BLE001 - a database restart; the fence above decides
            return None

    def _sigterm(self, signum: int, frame: Any) -> None:
        self._terminated = True

    def _interrupt_then_kill(self) -> None:
        assert self.proc is not None
        _signal_group(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(GRACE_S)
        except subprocess.TimeoutExpired:
            self._kill()

    def _kill(self) -> None:
        assert self.proc is not None
        _signal_group(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _on_sigterm(handler: Any) -> Any:
    """Install ``handler`` for SIGTERM where this thread may (the main one); the previous handler."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler if handler is not None else signal.SIG_DFL)
