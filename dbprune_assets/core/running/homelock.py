"""One writer per home: the lock ``$DBPRUNE_HOME/.lock``.

``dbprune run`` (and ``dbprune sample-pool`` writing into the home) holds an
exclusive ``flock`` on the lock file for as long as it writes.  The kernel
releases the lock when the holder's process ends in any way (exit, crash,
SIGKILL, OOM), so a dead holder's lock is simply taken by the next run; the
file itself is never removed (removing a lock file races with its next holder).
While held, the file names its holder (host, pid, start time, command) so a
second run can say who is writing and how to wait for it.

Readers never take it: ``dbprune sql`` reads the catalog with DuckDB's own
shared lock, and ``dbprune ui`` only reads the home (runs launched from the UI
are Dagster runs of their own; see the README, "One writer per home").

The lock is re-entrant within a process (``dbprune run`` takes it in the
command and again in ``run_pipeline`` for callers that use the API directly).
The descriptor is not inherited by programs the holder starts (``os.open``
makes it non-inheritable), so a training subprocess left running never keeps a
dead run's home locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

#: seconds between two tries while waiting for the holder
POLL_S = 0.5
#: how long a run waits, whatever ``wait_s``, when the holder's process is dead
#: but a process it forked (a data-loader worker) still holds the lock while it exits
ORPHAN_GRACE_S = 15.0

_held: dict[Path, tuple[int, int]] = {}  # resolved lock path -> (fd, depth) in this process


class HomeBusy(RuntimeError):
    """Another process holds the home's lock (for longer than we were asked to wait)."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: str  # ISO 8601, UTC
    command: str

    @classmethod
    def this_process(cls) -> "Holder":
        return cls(host=socket.gethostname(), pid=os.getpid(),
                   started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   command=" ".join(["dbprune", *sys.argv[1:]]) if sys.argv else "dbprune")

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, started {self.started} ({self.command})"


def read_holder(path: Path) -> Holder | None:
    """Who holds (or last held) the lock at ``path``, from its content."""
    try:
        data = json.loads(Path(path).read_text() or "{}")
        return Holder(host=str(data["host"]), pid=int(data["pid"]), started=str(data["started"]),
                      command=str(data.get("command", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def holder_died(holder: Holder | None) -> bool:
    """The recorded holder is a process of this host that no longer runs."""
    from dbprune_assets.core.store.atomic import pid_alive

    return holder is not None and holder.host == socket.gethostname() and not pid_alive(holder.pid)


def busy_message(path: Path, holder: Holder | None, waited_s: float) -> str:
    home = Path(path).parent
    who = holder.describe() if holder is not None else "a process that did not record itself"
    text = f"another dbprune run is writing to {home}: {who}"
    if holder is not None and holder_died(holder):
        text += (f"; pid {holder.pid} no longer runs but a process it started still holds {path} "
                 f"(`fuser -v {path}` lists it)")
    if waited_s >= 1:
        text += f"; still held after waiting {waited_s:.0f}s"
    return text + ("; wait for it with `dbprune run --wait SECONDS` (`--wait inf`: as long as it takes), "
                   "or use another DBPRUNE_HOME")


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextlib.contextmanager
def home_lock(path: Path, wait_s: float = 0.0, on_wait: Callable[[Holder | None], None] | None = None) -> Iterator[Holder]:
    """Hold the exclusive lock at ``path`` for the ``with`` block.

    When another process holds it: wait up to ``wait_s`` seconds (``inf``:
    without limit; ``on_wait`` is told once, with the holder) and raise
    :class:`HomeBusy` naming the holder if it is still held.  Yields this
    process's :class:`Holder` record.
    """
    key = Path(path).resolve()
    if key in _held:  # re-entrant within this process
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
        try:
            yield read_holder(key) or Holder.this_process()
        finally:
            _held[key] = (fd, _held[key][1] - 1)
        return
    key.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        t0 = time.monotonic()
        told = False
        while not _try_lock(fd):
            waited = time.monotonic() - t0
            holder = read_holder(key)
            if waited >= max(wait_s, ORPHAN_GRACE_S if holder_died(holder) else 0.0):
                raise HomeBusy(busy_message(key, holder, waited))
            if not told and on_wait is not None:
                on_wait(holder)
                told = True
            time.sleep(POLL_S)
        me = Holder.this_process()
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me.__dict__) + "\n").encode(), 0)
        os.fsync(fd)
        _held[key] = (fd, 1)
        try:
            yield me
        finally:
            del _held[key]
            os.ftruncate(fd, 0)  # no holder: a reader of the file sees nobody
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
