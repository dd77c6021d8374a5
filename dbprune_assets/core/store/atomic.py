"""Atomic writes: every output is written to a temp file under
``$DBPRUNE_HOME/.tmp/`` and renamed into place, so a crash never leaves a half
file that a later step reads.  ``os.replace`` is atomic only within one file
system: when a target's folder is on another volume than the temp folder (say
``tables/`` is a mount or a symlink to another disk), the temp file goes to
``.tmp/<host>-<pid>/`` at the top of the target's volume inside the path
(``tables/.tmp/…``), never across volumes (``EXDEV``).

Each process writes its temp files in its own folder, ``.tmp/<host>-<pid>/``
(``Layout.tmp``), so whatever a killed process leaves behind is recognisable:
``clean_stale_tmp`` removes the folders of processes of this host that no
longer run, and never touches those of live ones (parallel steps and runs).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

from dbprune_assets.core.running.faults import crash_point


def _tmp_root(target: Path, tmp_root: Path | None) -> Path:
    """The temp folder for ``target``: ``tmp_root`` (default ``target``'s
    folder's ``.tmp``) when it is on the target's file system, else
    :func:`same_volume_tmp`."""
    root = tmp_root if tmp_root is not None else target.parent / ".tmp"
    root.mkdir(parents=True, exist_ok=True)
    if os.stat(root).st_dev != os.stat(target.parent).st_dev:
        return same_volume_tmp(target.parent, root.name)
    return root


def same_volume_tmp(folder: Path, name: str) -> Path:
    """``<top>/.tmp/<name>``, where ``<top>`` is the highest folder of ``folder``'s
    path on ``folder``'s file system (``$DBPRUNE_HOME/tables`` when ``tables``
    is another volume), so a rename from it onto a file of ``folder`` stays
    within one file system; ``folder/.tmp/<name>`` when ``<top>`` is not writable."""
    dev = os.stat(folder).st_dev
    top = Path(folder)
    while top.parent != top and os.stat(top.parent).st_dev == dev:
        top = top.parent
    fallback = Path(folder) / ".tmp" / name
    try:
        (top / ".tmp" / name).mkdir(parents=True, exist_ok=True)
        return top / ".tmp" / name
    except OSError:
        fallback.mkdir(parents=True, exist_ok=True)  # its error (read-only, full) is the one to report
        return fallback


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], tmp_root: Path | None = None) -> Iterator[Path]:
    """Yield a temp path; on success rename it onto ``target`` (file or folder)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    root = _tmp_root(target, tmp_root)
    tmp = root / f"{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{''.join(target.suffixes[-1:])}"
    try:
        yield tmp
        if tmp.is_dir() and target.is_dir():
            # replace a folder: move the old one aside first, then swap
            old = root / f"{target.name}.old.{uuid.uuid4().hex[:8]}"
            crash_point("rename", target)
            os.replace(target, old)
            crash_point("swap", target)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            crash_point("rename", target)
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(target: Path, data: bytes, tmp_root: Path | None = None) -> None:
    with atomic_path(target, tmp_root) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_json(target: Path, obj: Any, tmp_root: Path | None = None) -> None:
    write_bytes(target, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode(), tmp_root)


def write_parquet(target: Path, table: Any, tmp_root: Path | None = None) -> None:
    """Write a polars DataFrame or pyarrow Table atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = table.to_arrow()
    with atomic_path(target, tmp_root) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def remove(target: Path) -> None:
    """Remove a file or folder if present (idempotent)."""
    if target.is_dir():
        shutil.rmtree(target, ignore_errors=True)
    else:
        target.unlink(missing_ok=True)


def scratch_dir(tmp_root: Path, prefix: str) -> tempfile.TemporaryDirectory[str]:
    """A private scratch folder under the temp root, removed on exit."""
    tmp_root.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=prefix, dir=tmp_root)


def process_tmp_name() -> str:
    """This process's temp folder name under ``$DBPRUNE_HOME/.tmp``: ``<host>-<pid>``."""
    host = re.sub(r"[^A-Za-z0-9._]", "_", socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_tmp(tmp_base: Path) -> list[Path]:
    """Remove the per-process temp folders under ``tmp_base`` whose process (on
    this host) no longer runs: the half-written files of a killed run.  Returns
    what was removed.  Folders of live processes and of other hosts are kept."""
    tmp_base = Path(tmp_base)
    if not tmp_base.is_dir():
        return []
    host = process_tmp_name().rsplit("-", 1)[0]
    removed = []
    for entry in tmp_base.iterdir():
        name_host, _, pid = entry.name.rpartition("-")
        if not entry.is_dir() or name_host != host or not pid.isdigit():
            continue
        if int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed
