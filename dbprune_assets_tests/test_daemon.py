"""One Dagster daemon per instance (issue 18, item 15): ``dbprune ui`` runs one
(``dagster dev``), so a ``dbprune daemon`` beside it, or a second ``dbprune
daemon``, refuses with one line saying so and what to do; ``dbprune ui``
beside a running daemon serves the UI without a daemon of its own; a daemon
that stopped is not taken for a running one."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pytest

from dbprune_assets.servers import DAEMON_ALIVE_S, group_members, running_daemon

from .uiproc import dbprune_exe, free_port, stop_group, wait_for_ui


class _Beats:
    """An instance holding the given daemon heartbeats (timestamp, daemon id)."""

    def __init__(self, *beats: tuple[float, str]) -> None:
        self.beats = {f"TYPE{i}": SimpleNamespace(timestamp=t, daemon_id=d) for i, (t, d) in enumerate(beats)}

    def get_daemon_heartbeats(self) -> dict:
        return self.beats


def test_a_recent_heartbeat_is_a_running_daemon():
    now = 1_000_000.0
    assert running_daemon(_Beats(), now=now) is None
    seen = running_daemon(_Beats((now - 400, "old"), (now - 12, "new")), now=now)
    assert seen is not None and seen.daemon_id == "new" and seen.age_s == pytest.approx(12)
    assert running_daemon(_Beats((now - DAEMON_ALIVE_S - 1, "gone")), now=now) is None


def _heartbeats(dagster_home: Path) -> dict:
    instance = dg.DagsterInstance.from_config(str(dagster_home))
    try:
        return dict(instance.get_daemon_heartbeats())
    finally:
        instance.dispose()


def _wait_for_heartbeat(dagster_home: Path, log: Path, timeout_s: float = 120) -> None:
    """Until the daemon has written a heartbeat; the instance is opened here only
    once the daemon says it runs (two processes creating a fresh SQLite
    instance at once can collide)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if "Instance is configured with the following daemons" in log.read_text() and _heartbeats(dagster_home):
            return
        time.sleep(0.5)
    raise AssertionError(f"no daemon heartbeat in {timeout_s:.0f}s:\n{log.read_text()[-3000:]}")


def _tree(pid: int) -> dict[int, str]:
    """``pid`` and its descendants, with their command lines (from /proc)."""
    parent_of, cmd = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmd[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            parent_of[int(entry.name)] = int(stat[stat.rfind(")") + 2:].split()[1])
    tree, grew = {pid}, True
    while grew:
        more = {p for p, pp in parent_of.items() if pp in tree} - tree
        tree |= more
        grew = bool(more)
    return {p: cmd[p] for p in tree if p in cmd}


def _daemons_under(pid: int) -> list[int]:
    """The Dagster daemon processes in ``pid``'s tree."""
    return [p for p, c in _tree(pid).items() if "dagster._daemon" in c or "dagster-daemon" in c]


def test_a_second_daemon_refuses_and_the_ui_runs_beside_the_first(tmp_path: Path):
    """A real ``dbprune daemon`` on a fresh home; once it has a heartbeat a
    second one exits 75 at once with the explanation, ``dbprune ui`` serves the
    UI with no daemon of its own, and after both stop the heartbeats are gone
    (a restarted daemon is not refused)."""
    home = tmp_path / "home"
    env = {**os.environ, "DBPRUNE_HOME": str(home), "DBPRUNE_POOL": "", "DAGSTER_HOME": ""}
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        log = (tmp_path / f"{name}.log").open("w")
        procs.append(subprocess.Popen([dbprune_exe(), *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True))
        log.close()
        return procs[-1]

    try:
        daemon = start("daemon", "daemon")
        _wait_for_heartbeat(home / "dagster", tmp_path / "daemon.log")
        port = free_port()
        ui = start("ui", "ui", "--port", str(port))  # comes up while the second daemon is refused

        second = start("second", "daemon")
        with contextlib.suppress(subprocess.TimeoutExpired):  # one that runs instead is stopped below
            second.wait(timeout=30)
        assert second.returncode == 75, (tmp_path / "second.log").read_text()[-2000:]  # refused at once
        (line,) = (tmp_path / "second.log").read_text().strip().splitlines()
        assert line.startswith("dbprune: error: a Dagster daemon already runs for the instance")
        assert "`dbprune ui`" in line and "`dbprune daemon`" in line and "stop it" in line

        wait_for_ui(port, tmp_path / "ui.log")
        said = (tmp_path / "ui.log").read_text()
        assert "serving the UI without a second daemon" in said
        assert _daemons_under(ui.pid) == []  # the webserver alone
        assert daemon.poll() is None
        (dagster_daemon,) = _daemons_under(daemon.pid)

        for proc in (ui, daemon):  # SIGTERM, as a service manager stops them
            os.killpg(proc.pid, signal.SIGTERM)
        assert ui.wait(timeout=30) == 0 and daemon.wait(timeout=30) == 0
        assert _heartbeats(home / "dagster") == {}  # a stopped daemon is not taken for a running one
        assert group_members(dagster_daemon) == []  # the daemon and its code server are gone
    finally:
        for proc in procs:
            stop_group(proc)
