"""The long-running Dagster processes behind ``dbprune ui`` and ``dbprune daemon``.

**One daemon per instance.** Dagster supports a single daemon per instance
(a second one logs "multiple daemon processes running at once, which is not
supported" and both tick the same sensors and backfills).  ``dbprune ui``
runs ``dagster dev``, which starts a daemon of its own; ``dbprune daemon`` is
for a UI served by a bare webserver.  Whether a daemon already serves an
instance is read from the instance itself, so it holds across machines (a
PostgreSQL instance): Dagster's public ``DagsterInstance.get_daemon_heartbeats()``,
a daemon whose newest heartbeat is under :data:`DAEMON_ALIVE_S` old runs.
A daemon writes one every 30 s per daemon type and leaves them behind when it
stops, so ours are wiped when it stops (:func:`forget_daemon`); only a killed
daemon's heartbeats linger, and count as running until they are that old.

**Stopping.** :func:`supervise` runs a command in its own process group and
forwards SIGTERM, SIGINT and SIGHUP to the whole group, which shuts down
(``dagster dev`` tells its webserver and daemon to stop; they and the code
servers get the signal too).  It returns when no process of the group is
left.  Processes whose parent exited before them are adopted by the
supervisor (Linux: ``PR_SET_CHILD_SUBREAPER``) and reaped by it, so a
finished process is never mistaken for a live one; where PID 1 does not reap
(a container without an init) the old check waited for the whole grace
period, then killed processes that were already gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

#: seconds a supervised group gets to stop after a forwarded signal, before SIGKILL
STOP_GRACE_S = 15.0

#: environment variable that overrides :data:`STOP_GRACE_S` (seconds, > 0)
ENV_STOP_GRACE = "DBPRUNE_STOP_GRACE_S"

#: a daemon whose newest heartbeat is younger than this runs (Dagster writes one
#: every 30 s per daemon type; this leaves room for a busy daemon to skip two)
DAEMON_ALIVE_S = 90.0

#: Linux prctl option: orphaned descendants are re-parented to this process
PR_SET_CHILD_SUBREAPER = 36

#: the signals a supervisor forwards to its group
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


# ---------------------------------------------------------------------------
# one daemon per instance


@dataclass(frozen=True)
class DaemonSeen:
    """A daemon that serves an instance: how old its newest heartbeat is."""

    age_s: float
    daemon_id: str


def running_daemon(instance: Any, now: float | None = None, alive_s: float = DAEMON_ALIVE_S) -> DaemonSeen | None:
    """The daemon serving ``instance`` (a ``DagsterInstance``): the writer of its
    newest heartbeat when that is under ``alive_s`` old; ``None`` when none is."""
    beats = list(instance.get_daemon_heartbeats().values())
    if not beats:
        return None
    newest = max(beats, key=lambda b: b.timestamp)
    age = max(0.0, (time.time() if now is None else now) - newest.timestamp)
    return DaemonSeen(age, newest.daemon_id or "?") if age < alive_s else None


def daemon_refusal(seen: DaemonSeen, dagster_home: Path) -> str:
    """The one line ``dbprune daemon`` exits with when a daemon already runs."""
    return (f"a Dagster daemon already runs for the instance {dagster_home} (heartbeat {seen.age_s:.0f}s ago; "
            "from `dbprune ui`, which starts one, or another `dbprune daemon`), and Dagster supports one per "
            "instance: keep that one (`dbprune ui` alone is enough on one machine; `dbprune daemon` is for a UI "
            "served by a bare webserver, `python -m dbprune_assets.cluster webserver` or deploy/), or stop it "
            f"first (a killed daemon counts as running until its last heartbeat is {DAEMON_ALIVE_S:.0f}s old)")


def ui_alone_line(seen: DaemonSeen, dagster_home: Path) -> str:
    """What ``dbprune ui`` says when it starts without a daemon of its own."""
    return (f"dbprune: a Dagster daemon already runs for {dagster_home} (heartbeat {seen.age_s:.0f}s ago, from "
            "another `dbprune ui` or a `dbprune daemon`): serving the UI without a second daemon; sensors, "
            "schedules and UI backfills run on that one")


def forget_daemon(instance: Any) -> None:
    """After our daemon stopped: wipe the instance's daemon heartbeats, so the
    next ``dbprune daemon`` or ``dbprune ui`` does not take it for a running one."""
    instance.wipe_daemon_heartbeats()


#: what makes the Dagster commands below serve the code location (``-m`` names it after the module)
LOCATION_ARGS: tuple[str, ...] = ("-m", "dbprune_assets.definitions")


#: ``dagster dev`` warns at each start that ``dg dev`` supersedes it; ``dg dev`` needs a dg project
#: layout and runs ``dagster dev`` itself, and users type ``dbprune ui``: the line only puzzles them
QUIET_DEV = "ignore:Function `dev_command` is superseded:FutureWarning"


def ui_argv(host: str, port: int, with_daemon: bool, location: Sequence[str] = LOCATION_ARGS) -> list[str]:
    """``dagster dev`` (webserver and daemon), or the webserver alone, serving ``location``."""
    where = [*location, "-h", host, "-p", str(port)]
    if with_daemon:
        return [sys.executable, "-W", QUIET_DEV, "-m", "dagster", "dev", *where]
    return [str(Path(sys.executable).with_name("dagster-webserver")), *where]


def port_taken(host: str, port: int) -> str | None:
    """Why the webserver could not listen on ``host:port`` (another process
    listens there), or None.  Checked before ``dagster dev`` starts: it goes
    on serving its daemon when its webserver cannot bind, so the UI's address
    would answer with whatever holds the port."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the webserver binds: TIME_WAIT is no obstacle
        try:
            sock.bind((host, port))
        except OSError as e:
            return e.strerror or str(e)
    return None


def ended_line(what: str, rc: int) -> str:
    """What ``dbprune ui`` or ``dbprune daemon`` says when its servers ended by themselves (not stopped)."""
    return (f"dbprune: {what} ended by itself (exit status {rc}), not stopped: the lines above say why "
            "(a port in use, a module that failed to import, …)")


def daemon_argv(location: Sequence[str] = LOCATION_ARGS) -> list[str]:
    """``dagster-daemon run`` serving ``location``."""
    return [str(Path(sys.executable).with_name("dagster-daemon")), "run", *location]


# ---------------------------------------------------------------------------
# supervising a process group


def stop_grace_s() -> float:
    """The grace period a supervised group gets: ``$DBPRUNE_STOP_GRACE_S``, else
    :data:`STOP_GRACE_S`."""
    raw = os.environ.get(ENV_STOP_GRACE, "").strip()
    if not raw:
        return STOP_GRACE_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise SystemExit(f"{ENV_STOP_GRACE}={raw!r}: give the seconds the servers get to stop "
                         f"before they are killed, a number > 0 (default {STOP_GRACE_S:g})")
    return value


def supervise(argv: Sequence[str], grace_s: float | None = None) -> int:
    """Run ``argv`` in its own process group and forward SIGTERM, SIGINT and
    SIGHUP to that whole group; return when no process of the group is left
    (SIGKILL to what remains ``grace_s`` after a signal, or after the leader
    exited, saying so on stderr).  0 when stopped by a signal, else the
    leader's exit status.  ``grace_s`` defaults to :func:`stop_grace_s`.

    The group starts with those signals at their defaults, also when this
    process ignores some: a shell's ``&`` ignores SIGINT, and ``dagster dev``
    answers SIGTERM with its SIGINT handler, so inheriting the ignored SIGINT
    made it deaf to the stop signal (killed after the grace).  A SIGINT or
    SIGHUP this process was started ignoring (``&``, ``nohup``) it goes on
    ignoring: it is not forwarded."""
    grace_s = stop_grace_s() if grace_s is None else grace_s
    name = Path(argv[0]).name
    adopted = _become_subreaper()
    stop_at: list[float] = []
    stop_signal: list[int] = []
    signalled: set[int] = set()  # the group's processes the stop signal reached
    group: list[int] = []  # the group's id, once started

    def forward(signum: int, _frame: object) -> None:
        if not stop_at:
            stop_at.append(time.monotonic() + grace_s)
            stop_signal.append(signum)
        if group:
            signalled.update(group_members(group[0]) or ())
            _signal_group(group[0], signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}  # a handler: exec resets it to the default
    ignored = [sig for sig, was in previous.items() if was is signal.SIG_IGN and sig != signal.SIGTERM]
    for sig in ignored:
        signal.signal(sig, _ignore)  # ignored here, yet not by the group
    try:
        proc = subprocess.Popen(list(argv), start_new_session=True)
        group.append(proc.pid)
        for sig in ignored:
            signal.signal(sig, signal.SIG_IGN)
        if stop_at:  # the signal came while it started
            _signal_group(proc.pid, stop_signal[0])
        while True:
            try:
                rc = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if stop_at:  # a process started after the signal (a code server starting up) gets it too
                    _signal_late(proc.pid, stop_signal[0], signalled)
                if stop_at and time.monotonic() > stop_at[0]:
                    _kill_group(proc.pid, name, grace_s)
                    stop_at[0] = float("inf")  # once
        _stop_group(proc.pid, name, grace_s, adopted)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if stop_at else (rc if rc >= 0 else 128 - rc)


def _ignore(_signum: int, _frame: object) -> None:
    """An ignoring handler (not ``SIG_IGN``, which a child would inherit)."""


def _signal_late(pgid: int, signum: int, signalled: set[int]) -> None:
    """Send ``signum`` to each process of group ``pgid`` not in ``signalled``
    (started after the stop signal: it would run on to the grace's end) and add it."""
    for pid in group_members(pgid) or ():
        if pid not in signalled:
            signalled.add(pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)


def _kill_group(pgid: int, name: str, grace_s: float) -> None:
    """SIGKILL what is left of group ``pgid`` ``grace_s`` after it was asked to
    stop, and say so on stderr."""
    members = group_members(pgid)
    count = f"{len(members)} process(es)" if members is not None else "processes"
    which = "".join(f"\n  {pid}: {_command_line(pid)}" for pid in members or ())
    print(f"dbprune: {count} of {name} still running {grace_s:g} s after the stop signal; killed them "
          f"(${ENV_STOP_GRACE} gives them longer){which}", file=sys.stderr, flush=True)
    _signal_group(pgid, signal.SIGKILL)


def _command_line(pid: int, width: int = 160) -> str:
    """A process's command line from ``/proc`` (shortened), or ``?``."""
    try:
        words = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    line = " ".join(w.decode(errors="replace") for w in words if w)
    return line if len(line) <= width else line[:width - 1] + "…"


def _stop_group(pgid: int, name: str, grace_s: float, adopted: bool) -> None:
    """After the group's leader exited: SIGTERM what it left, wait up to
    ``grace_s`` for it to exit (reaping what we adopted), then SIGKILL the rest."""
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while True:
        if adopted:
            _reap_group(pgid)
        if not group_alive(pgid) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if group_alive(pgid):
        _kill_group(pgid, name, grace_s)
    if adopted:
        time.sleep(0.05)
        _reap_group(pgid)


def _become_subreaper() -> bool:
    """Linux: make this process the parent of its descendants whose parent
    exits first, so it can reap them; False where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _reap_group(pgid: int) -> None:
    """Reap every exited child of ours in process group ``pgid``."""
    while True:
        try:
            pid, _ = os.waitpid(-pgid, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def group_members(pgid: int) -> list[int] | None:
    """The live (not exited) processes of group ``pgid``, from ``/proc``; ``None``
    where there is no ``/proc`` to read."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return None
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # state, ppid, pgrp, …
        if len(fields) > 2 and fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` has a process that has not exited (an
    exited one waiting to be reaped does not count)."""
    members = group_members(pgid)
    return bool(members) if members is not None else _signal_group(pgid, 0)


def _signal_group(pgid: int, signum: int) -> bool:
    """Send ``signum`` to process group ``pgid``; False when it has no process left."""
    try:
        os.killpg(pgid, signum)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def forget_stopped_daemon(dagster_home: Path) -> None:
    """Wipe the heartbeats of the daemon that just stopped (a warning line when
    the instance cannot be opened now), so the next one is not refused."""
    import dagster as dg

    try:
        instance = dg.DagsterInstance.from_config(str(dagster_home))
        try:
            forget_daemon(instance)
        finally:
            instance.dispose()
    except Exception as e:  # the database may be gone by now: the heartbeats then age out
        print(f"dbprune: warning: the stopped daemon's heartbeats were not cleared ({type(e).__name__}: {e}); "
              f"a new daemon is refused until they are {DAEMON_ALIVE_S:.0f}s old", file=sys.stderr)
