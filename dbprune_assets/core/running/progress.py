"""Progress bars for loops a person waits on (shards, clusters, samples).

One wrapper around tqdm so every long loop looks the same: a bar on stderr
that appears only after ``delay`` seconds (short loops print nothing), with
the unit named.  Inside a Dagster step stderr lands in the step's compute log;
``dbprune run`` draws its own bar per group on the console.
``DBPRUNE_PROGRESS=0`` turns every bar off (``1`` forces them on, e.g. in a
log file that is not a terminal).
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def bars_enabled() -> bool:
    flag = os.environ.get("DBPRUNE_PROGRESS", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        return True
    return sys.stderr.isatty()


def progress(iterable: Iterable[T], *, desc: str, unit: str = "it", total: int | None = None,
             delay: float = 2.0) -> Iterator[T]:
    """Iterate ``iterable`` with a bar ``desc`` counting ``unit``s (shown after ``delay`` s)."""
    if not bars_enabled():
        yield from iterable
        return
    from tqdm.auto import tqdm

    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    yield from tqdm(iterable, desc=desc, unit=unit, total=total, delay=delay, file=sys.stderr,
                    dynamic_ncols=True, leave=False, disable=False)  # explicit: TQDM_DISABLE is for libraries
