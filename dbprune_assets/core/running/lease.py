"""A run's lease: the liveness signal of a run on a cluster worker, and the
fence that keeps it from executing twice at once.

A worker's supervisor (:mod:`~dbprune_assets.cluster.execution`) takes the
lease of a run before it starts the run's process, renews it every
``ttl / 5`` seconds while that process runs and ends it when the process
ends.  The supervisor does nothing else, so a run that keeps every core busy
does not starve it (Celery's ping, answered by the worker's main process,
could be).  The lease lives in the instance's own database, and every time
is the database's clock, so machines whose clocks differ agree on it:

* ``dbprune run`` takes a started run for lost only when its lease has
  expired (no renewal for ``ttl`` seconds), and revokes it before it submits
  the range again;
* a supervisor that has not renewed for ``SELF_FENCE * ttl`` seconds (database
  or network gone) stops its run's process itself, before the lease can
  expire; one whose renewal is refused (revoked, or expired) stops it at once;
* a partition's commit marker is written only while the run holds its lease
  (:func:`check_held`, called by ``Session.commit``): whatever an execution
  given up still does, it commits nothing.

Only :func:`check_held` runs outside a worker; without ``DBPRUNE_LEASE`` in
the environment (every run that is not a cluster run) it does nothing.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

#: the environment variable a supervisor gives its run's process: ``<run id> <holder> <database url>``
ENV_LEASE = "DBPRUNE_LEASE"
#: the table, in the instance's database
TABLE = "dbprune_run_leases"
#: a supervisor that could not renew for this share of the lease stops its run
SELF_FENCE = 0.6

#: the database's clock in seconds since the epoch, by dialect
_NOW = {
    "postgresql": "extract(epoch from clock_timestamp())",
    "sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
}


class LeaseLost(RuntimeError):
    """The run no longer holds its lease: ``dbprune run`` gave it up (its worker
    looked gone) and may have submitted its range again."""


@dataclass(frozen=True)
class LeaseState:
    """A run's lease as the database sees it now."""

    run_id: str
    holder: str
    live: bool  # taken, not ended, not revoked and not expired
    ended: bool
    revoked: bool
    seconds_left: float


class Leases:
    """The lease table of one database (``postgresql://…`` or ``sqlite:///…``)."""

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        self.url = url
        self.engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        self.now = _NOW[self.engine.dialect.name]
        self._ensure_table()

    def _ensure_table(self) -> None:
        import sqlalchemy as sa

        ddl = (f"CREATE TABLE IF NOT EXISTS {TABLE} (run_id VARCHAR(255) PRIMARY KEY, holder VARCHAR(255) NOT NULL, "
               "taken_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION NOT NULL, "
               "ended INTEGER NOT NULL DEFAULT 0, revoked INTEGER NOT NULL DEFAULT 0)")
        try:
            with self.engine.begin() as con:
                con.execute(sa.text(ddl))
        except sa.exc.IntegrityError:  # two processes created it at once (PostgreSQL's pg_type race): it exists
            pass

    def _run(self, sql: str, **params: Any) -> Any:
        import sqlalchemy as sa

        with self.engine.begin() as con:
            return con.execute(sa.text(sql), params)

    def take(self, run_id: str, holder: str, ttl: float) -> bool:
        """Take the run's lease for ``ttl`` seconds; False when the run has had
        one (another delivery of its task took it, or it ran already)."""
        import sqlalchemy as sa

        try:
            self._run(f"INSERT INTO {TABLE} (run_id, holder, taken_at, expires_at) "
                      f"VALUES (:run_id, :holder, {self.now}, {self.now} + :ttl)", run_id=run_id, holder=holder, ttl=ttl)
        except sa.exc.IntegrityError:
            return False
        return True

    def renew(self, run_id: str, holder: str, ttl: float) -> bool:
        """Extend a live lease by ``ttl`` seconds from now; False when it is no
        longer held (expired, revoked or ended): its run must stop."""
        res = self._run(f"UPDATE {TABLE} SET expires_at = {self.now} + :ttl WHERE run_id = :run_id AND holder = :holder "
                        f"AND ended = 0 AND revoked = 0 AND expires_at > {self.now}", run_id=run_id, holder=holder, ttl=ttl)
        return res.rowcount == 1

    def end(self, run_id: str, holder: str) -> None:
        """The run's process ended: its lease is no longer live (it stays, so no second delivery takes it)."""
        self._run(f"UPDATE {TABLE} SET ended = 1, expires_at = {self.now} WHERE run_id = :run_id AND holder = :holder",
                  run_id=run_id, holder=holder)

    def revoke(self, run_id: str) -> None:
        """Take the lease away (``dbprune run`` gives the run up): the holder's next renewal is refused."""
        self._run(f"UPDATE {TABLE} SET revoked = 1 WHERE run_id = :run_id", run_id=run_id)

    def states(self, run_ids: list[str]) -> dict[str, LeaseState]:
        """The leases of those of ``run_ids`` that have one."""
        if not run_ids:
            return {}
        import sqlalchemy as sa

        sql = sa.text(f"SELECT run_id, holder, ended, revoked, expires_at - {self.now} FROM {TABLE} "
                      "WHERE run_id IN :ids").bindparams(sa.bindparam("ids", expanding=True))
        with self.engine.begin() as con:
            rows = con.execute(sql, {"ids": list(run_ids)}).fetchall()
        return {r[0]: LeaseState(r[0], r[1], bool(not r[2] and not r[3] and r[4] > 0), bool(r[2]), bool(r[3]),
                                 float(r[4])) for r in rows}

    def held(self, run_id: str, holder: str) -> bool:
        state = self.states([run_id]).get(run_id)
        return state is not None and state.holder == holder and state.live

    def close(self) -> None:
        self.engine.dispose()


def lease_env(run_id: str, holder: str, url: str) -> dict[str, str]:
    """What a supervisor puts in its run process's environment."""
    return {ENV_LEASE: f"{run_id} {holder} {url}"}


_checked: dict[str, Leases] = {}
_lock = threading.Lock()


def check_held(what: str) -> None:
    """Raise :class:`LeaseLost` when this process executes a cluster run that
    no longer holds its lease (``what``: the partition about to be committed);
    nothing outside a cluster run."""
    value = os.environ.get(ENV_LEASE, "").strip()
    if not value:
        return
    run_id, holder, url = value.split(" ", 2)
    with _lock:
        if url not in _checked:
            _checked[url] = Leases(url)
        leases = _checked[url]
    if not leases.held(run_id, holder):
        raise LeaseLost(f"run {run_id} no longer holds its lease ({holder}): dbprune run gave it up as lost and "
                        f"may have submitted it again, so {what} is not committed by this execution")
