"""Helpers for tests that start ``dbprune ui`` or ``dbprune daemon`` as a user
does: the console script, a free port, waiting for the UI, stopping a process
group (SIGTERM, then SIGKILL) whatever the test's outcome."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def dbprune_exe() -> str:
    return shutil.which("dbprune") or str(Path(sys.executable).parent / "dbprune")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_ui(port: int, log: Path, timeout_s: float = 120) -> None:
    """Until the webserver on ``port`` answers (its log in the failure message)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the UI did not come up in {timeout_s:.0f}s:\n{log.read_text()[-3000:]}")


def stop_group(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM to ``proc``'s process group (it was started in a session of its
    own), SIGKILL when it has not exited in ``timeout_s``."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
