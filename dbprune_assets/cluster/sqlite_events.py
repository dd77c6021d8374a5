"""The embedded SQLite instance's storage, with Dagster's event log writing
through one SQLAlchemy engine per database file instead of a new one per event.

Dagster's ``SqliteEventLogStorage`` builds an engine for every connection it
opens, and ``store_event`` opens two to four of them for each asset event (the
run's database, the cross-run index, a table check), then disposes of them.
That work is most of what Dagster's bookkeeping costs per partition: a
per-shard step over many partitions stores one materialisation per partition
(``benchmarks/bench_dagster_floor.py``: 6.6–7.0 against 11.7–11.9 ms per
no-op partition).  :class:`CachedSqliteEventLogStorage` keeps each database's engine
(``NullPool``: still one SQLite connection per use, opened and closed as
before, so nothing is shared across threads or forks; only the engine and its
compiled statements are kept) for the few databases most recently used, and
remembers the index tables it found.  Everything else is Dagster's.

:class:`DbpruneSqliteStorage` is Dagster's ``DagsterSqliteStorage`` (the
default storage of an instance without one configured: the same files under
the same folder) with that event log; ``dagster.yaml`` names it
(:func:`~dbprune_assets.cluster.instance.instance_yaml`).

Like ``cluster/launcher.py``, this module imports Dagster's private modules:
``dbprune_assets_tests/test_dagster_private.py`` imports each name and says
which one a newer Dagster moved (checked against
:data:`~dbprune_assets.cluster.launcher.DAGSTER_CHECKED`).  Only Dagster loads it,
from ``dagster.yaml``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from typing import Any, Iterator

from dagster._core.storage.event_log.sqlite.sqlite_event_log import (INDEX_SHARD_NAME, SQLITE_BUSY_TIMEOUT_SECONDS,
                                                                     SqliteEventLogStorage)
from dagster._core.storage.sqlite_storage import DagsterSqliteStorage
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

#: engines kept per process: the index and the databases of the runs in hand (a webserver
#: reading many runs' logs opens one engine per run beyond these, as Dagster always did)
KEPT_ENGINES = 8


class MovedInstanceError(RuntimeError):
    """A ``dagster.yaml`` naming another folder's storage: its home was moved or copied."""


def _moved(yaml_dir: str, base_dir: str) -> MovedInstanceError:
    return MovedInstanceError(
        f"the Dagster instance in {yaml_dir} names its storage folder as {base_dir}: the dbprune home was moved or "
        "copied since dbprune last wrote its dagster.yaml. Run `dbprune run`, `dbprune ui` or `dbprune daemon` with "
        "DBPRUNE_HOME set to where the home is now: each writes dagster.yaml again before it opens the instance")


class CachedSqliteEventLogStorage(SqliteEventLogStorage):
    """Dagster's SQLite event log, keeping the engines of the
    :data:`KEPT_ENGINES` databases used last (see the module docstring)."""

    def __init__(self, base_dir: str, inst_data: Any = None, instance_dir: str | None = None) -> None:
        #: the folder of the dagster.yaml naming this storage (DbpruneSqliteStorage's base_dir)
        self._instance_dir = instance_dir
        self._engines: OrderedDict[str, Any] = OrderedDict()
        self._found_tables: set[str] = set()
        # held while a connection is in use, as Dagster's own lock is: SQLite and threads
        self._engine_lock = threading.RLock()
        super().__init__(base_dir, inst_data)  # a new index database is indexed here, through index_connection

    def register_instance(self, instance: Any) -> None:
        root = instance.root_directory  # the folder of the dagster.yaml Dagster read
        if (self._instance_dir is not None and root is not None
                and os.path.realpath(root) != os.path.realpath(self._instance_dir)):  # a copied home
            raise _moved(root, self._instance_dir)
        super().register_instance(instance)

    def run_connection(self, run_id: str | None = None) -> Any:
        return self._connection(run_id)  # type: ignore[arg-type]  # Dagster's signature

    def index_connection(self) -> Any:
        return self._connection(INDEX_SHARD_NAME)

    def has_table(self, table_name: str) -> bool:
        """Whether the index database has ``table_name`` (a table once found stays:
        Dagster's migrations add tables, and wiping an instance empties them)."""
        if table_name in self._found_tables:
            return True
        with self.index_connection() as conn:
            found = bool(conn.dialect.has_table(conn, table_name))
        if found:
            self._found_tables.add(table_name)
        return found

    @contextlib.contextmanager
    def _connection(self, shard: str) -> Iterator[Any]:
        with self._engine_lock:
            engine = self._engines.get(shard)
            if engine is None:
                # the first use of a database in this process: Dagster's own path creates its tables.  It
                # is left before this use begins, so that a connection opened inside this one (has_table
                # inside an index transaction) never waits on Dagster's lock, which is not reentrant
                with super().run_connection(shard) if shard != INDEX_SHARD_NAME else super().index_connection():
                    pass
                engine = create_engine(self.conn_string_for_shard(shard), poolclass=NullPool,
                                       connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS})
                self._keep(shard, engine)
            else:
                self._engines.move_to_end(shard)
            with engine.connect() as conn, conn.begin():
                yield conn

    def _keep(self, shard: str, engine: Any) -> None:
        self._engines[shard] = engine
        while len(self._engines) > KEPT_ENGINES:
            _, old = self._engines.popitem(last=False)
            old.dispose()

    def dispose(self) -> None:
        with self._engine_lock:
            while self._engines:
                self._engines.popitem()[1].dispose()
        super().dispose()


class DbpruneSqliteStorage(DagsterSqliteStorage):
    """Dagster's default SQLite storage (runs, event log, schedules under
    ``base_dir``) with :class:`CachedSqliteEventLogStorage` as its event log.

    ``base_dir`` is the folder of the ``dagster.yaml`` naming it, an absolute
    path (a storage cannot learn where its ``dagster.yaml`` lies).  So a home
    moved or copied is refused (a move before anything is written) until a
    dbprune command writes the file again: a stale path would open the other
    home's instance, or create an empty one where the home used to be."""

    def __init__(self, base_dir: str, inst_data: Any = None) -> None:
        super().__init__(base_dir, inst_data)
        self._cached_events = CachedSqliteEventLogStorage(os.path.join(base_dir, "history", "runs", ""),
                                                          instance_dir=base_dir)

    @classmethod
    def from_config_value(cls, inst_data: Any, config_value: Any) -> "DbpruneSqliteStorage":
        base_dir = config_value["base_dir"]
        if not os.path.isfile(os.path.join(base_dir, "dagster.yaml")):  # moved: nothing there to open
            raise _moved("a folder holding a dagster.yaml", base_dir)
        return cls.from_local(inst_data=inst_data, **config_value)

    @property
    def event_log_storage(self) -> Any:
        return self._cached_events

    def register_instance(self, instance: Any) -> None:
        super().register_instance(instance)
        if not self._cached_events.has_instance:
            self._cached_events.register_instance(instance)
