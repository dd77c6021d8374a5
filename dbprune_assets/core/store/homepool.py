"""Which pool a home was built on.

A home's tables, fits and decisions are those of one pool.  Pointed at
another pool, a run drops every shard the home holds that the new pool
lacks: the pool sensor and ``dbprune run`` make the partitions equal the pool
folder.  When that pool is the default ``$DBPRUNE_HOME/pool`` because
``DBPRUNE_POOL`` was forgotten, the run even generates the sample pool there
first, so one missing variable empties a pruned home.

So the home remembers its pool (``$DBPRUNE_HOME/pool.json``, written by
every run, ``dbprune ui`` and ``dbprune daemon``), and :func:`check_home_pool`
refuses a different pool before anything is read or written, naming the
remembered one.  A pool that moved (the remembered folder is gone, and
``DBPRUNE_POOL`` names the new place) is followed, with a line saying so.
Deleting ``pool.json`` repoints a home on purpose.
"""

from __future__ import annotations

import json
from pathlib import Path

from dbprune_assets.core.store.atomic import write_bytes
from dbprune_assets.core.store.layout import Layout


class HomePoolError(ValueError):
    """The run's pool is not the one the home was built on."""


def record_file(layout: Layout) -> Path:
    """``$DBPRUNE_HOME/pool.json``: the pool the home was last run on."""
    return layout.home / "pool.json"


def remembered_pool(layout: Layout) -> Path | None:
    """The pool the home was last run on; None for a new home (or one older than the record)."""
    try:
        return Path(json.loads(record_file(layout).read_text())["pool"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_home_pool(layout: Layout, pool_from_env: bool) -> str | None:
    """Refuse (:class:`HomePoolError`) a pool other than the home's own, unless
    that one is gone and ``DBPRUNE_POOL`` (``pool_from_env``) names where it
    is now; returns the line to print when the home follows a moved pool."""
    before = remembered_pool(layout)
    if before is None or before == layout.pool:
        return None
    now = f"DBPRUNE_POOL={layout.pool}" if pool_from_env else \
        f"{layout.pool} (the default $DBPRUNE_HOME/pool: DBPRUNE_POOL is not set)"
    repoint = (f"to repoint this home on purpose (its shards the new pool lacks are dropped), delete "
               f"{record_file(layout)}")
    if before.is_dir():
        raise HomePoolError(f"the home {layout.home} holds the results of the pool {before}, but this run's pool is "
                            f"{now}: running would drop that pool's shards from the home. Set DBPRUNE_POOL={before}, "
                            f"or use another DBPRUNE_HOME for this pool; {repoint}")
    if not pool_from_env:
        raise HomePoolError(f"the home {layout.home} was built on the pool {before}, which is not there now, and "
                            "DBPRUNE_POOL is not set (the default would generate the sample pool and drop every shard "
                            f"of this home): set DBPRUNE_POOL to where that pool is now; {repoint}")
    return f"the pool {before} this home was built on is gone; the home now follows {layout.pool}"


def remember_pool(layout: Layout) -> None:
    """Record ``layout.pool`` as the home's pool (after :func:`check_home_pool`
    passed); a pool folder that does not exist (yet) is not recorded."""
    if layout.pool.is_dir() and remembered_pool(layout) != layout.pool:
        layout.home.mkdir(parents=True, exist_ok=True)
        write_bytes(record_file(layout), (json.dumps({"pool": str(layout.pool)}) + "\n").encode(), layout.tmp)
