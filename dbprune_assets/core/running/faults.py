"""Fault injection for the crash-safety tests: ``DBPRUNE_FAULT`` kills the
process with SIGKILL at a named point, the way a power cut or the OOM killer
would (no ``finally`` block, no atexit handler runs).

``DBPRUNE_FAULT`` is a comma-separated list of ``KIND:GLOB``; the process dies
at the first point of that kind whose name matches the glob (``fnmatch``):

* ``rename:GLOB`` — in ``atomic.atomic_path``, after the temp file or folder
  was written and just before it is renamed onto the target path ``GLOB``
  (commit markers are ``*/state/<asset>/<partition>.json``, so
  ``rename:*/state/centroids/all.json`` is "outputs in place, marker not");
* ``swap:GLOB`` — when a folder replaces an older one: after the old folder
  was moved aside and before the new one is moved in;
* ``catalog:GLOB`` — in ``catalog.refresh_catalog``, inside the transaction
  that recreates the views of the catalog file ``GLOB``, before its commit.

Unset (always, outside the tests), a point costs one environment lookup.
"""

from __future__ import annotations

import os
import signal
from fnmatch import fnmatchcase

ENV = "DBPRUNE_FAULT"


def crash_point(kind: str, name: str | os.PathLike[str]) -> None:
    """SIGKILL this process when ``DBPRUNE_FAULT`` names this point."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for item in spec.split(","):
        k, _, pattern = item.strip().partition(":")
        if k == kind and fnmatchcase(str(name), pattern):
            os.kill(os.getpid(), signal.SIGKILL)
