"""OS errors a person can act on: the file, the cause and what to do.

``explain(err)`` turns an ``OSError`` (disk full, read-only or unwritable
folder, a rename across file systems, too many open files) into one line;
``explain_text`` does the same for the text of an error that crossed a process
or a Dagster run (``"OSError: [Errno 28] No space left on device: '/x'"``).
``require_free_space`` fails a long step early, with the numbers, when the
space it predictably needs is not there.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

#: the least free space `dbprune run` asks for before any step (bytes)
MIN_FREE_BYTES = 64 * 2**20


class NotEnoughSpace(OSError):
    """A step's predictable need exceeds the free space of its volume."""

    def __str__(self) -> str:  # the message alone, also where it crosses a Dagster run
        return str(self.strerror)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (what ``statvfs`` can look at)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: Path) -> int:
    """Free bytes (for this user) on the volume that holds ``path``."""
    return shutil.disk_usage(existing_ancestor(path)).free


def require_free_space(path: Path, need: int, what: str) -> None:
    """Raise :class:`NotEnoughSpace` when the volume of ``path`` has less than
    ``need`` bytes free for ``what`` (a few words: "the dbp subset export")."""
    free = free_bytes(path)
    if free < need:
        raise NotEnoughSpace(
            errno.ENOSPC,
            f"not enough free space for {what}: it needs about {human_bytes(need)}, the volume of {path} has "
            f"{human_bytes(free)} free; free space there or point DBPRUNE_HOME at a larger volume, then re-run "
            "(finished partitions are kept)",
        )


_ADVICE = {
    errno.ENOSPC: "the disk is full ({free} free on its volume); free space there or point DBPRUNE_HOME at a "
                  "larger volume, then re-run (finished partitions are kept)",
    errno.EDQUOT: "your disk quota is used up ({free} free on its volume); free space or raise the quota, "
                  "then re-run (finished partitions are kept)",
    errno.EROFS: "the file system is read-only; dbprune writes everything under DBPRUNE_HOME, so remount it "
                 "read-write or set DBPRUNE_HOME to a writable folder (dbprune sql only reads)",
    errno.EACCES: "permission denied for user {user}; make it writable for you (chown/chmod) or set "
                  "DBPRUNE_HOME to a folder you own",
    errno.EPERM: "operation not permitted for user {user}; make it writable for you (chown/chmod) or set "
                 "DBPRUNE_HOME to a folder you own",
    errno.EXDEV: "a rename across two file systems; dbprune keeps each temp file on its target's file system, "
                 "so a folder was moved or mounted while the run wrote it: re-run",
    errno.EMFILE: "too many open files; raise the limit (`ulimit -n 65536`) or lower compute.workers",
    errno.ENFILE: "the system's open-file table is full; close other programs or raise fs.file-max",
}


def _user() -> str:
    try:
        import getpass

        return getpass.getuser()
    except Exception:  # no user name for this uid (containers)
        return str(os.getuid())


def describe(code: int | None, path: str | None, strerror: str, default_path: Path | None = None) -> str | None:
    """One line for OS error ``code`` at ``path`` (None: "a file under
    ``default_path``"), or None when there is no advice for it."""
    advice = _ADVICE.get(code or -1)
    if advice is None:
        return None
    where = Path(path) if path else default_path
    label = path or (f"a file under {default_path}" if default_path is not None else "a file")
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = human_bytes(free_bytes(where)) if where is not None else None
        advice = advice.replace("{free}", free) if free else advice.replace(" ({free} free on its volume)", "")
    return f"{label}: {strerror} ({errno.errorcode.get(code or 0, code)}): " + advice.format(user=_user())


def explain(err: BaseException, default_path: Path | None = None) -> str | None:
    """One line for an ``OSError`` (``default_path``: where it happened when the
    error names no file, e.g. a write that filled the disk), else None."""
    if isinstance(err, NotEnoughSpace):
        return str(err.strerror)
    if not isinstance(err, OSError) or err.errno is None:
        return None
    path = None if err.filename is None else os.fsdecode(err.filename)
    line = describe(err.errno, path, err.strerror or str(err), default_path)
    if line is not None and err.filename2 is not None:
        line = line.replace(": ", f" -> {os.fsdecode(err.filename2)}: ", 1)
    return line


_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\] ([^:\n]+)(?:: '([^'\n]+)')?")


def explain_text(text: str, default_path: Path | None = None) -> str | None:
    """:func:`explain` for the text of an error (``[Errno N] strerror: 'path'``)."""
    m = _ERRNO_TEXT.search(text)
    if m is None:
        return None
    return describe(int(m.group(1)), m.group(3), m.group(2).strip(), default_path)
