"""The Dagster instance of a home, on one machine or many: its ``dagster.yaml``
(SQLite under ``$DBPRUNE_HOME/dagster``, or PostgreSQL and the Celery run
launcher from ``DBPRUNE_POSTGRES_URL`` and ``DBPRUNE_BROKER``), the checks of
those URLs (one clear error, password masked, before anything runs), and the
run config and planned events every run of ``dbprune run`` uses."""

from __future__ import annotations

import contextlib
import os
import re
from typing import TYPE_CHECKING, Any, Iterator, Mapping

if TYPE_CHECKING:  # pragma: no cover
    from dbprune_assets.core.store.layout import Layout

ENV_POSTGRES = "DBPRUNE_POSTGRES_URL"
ENV_BROKER = "DBPRUNE_BROKER"
#: the Celery result backend (where ``dbprune run`` reads task states); default: the broker, when it is Redis
ENV_BACKEND = "DBPRUNE_CELERY_BACKEND"
#: how often a run whose worker was lost is submitted again (default 2)
ENV_RETRIES = "DBPRUNE_RUN_RETRIES"
#: seconds a run's lease lasts without renewal before its run counts as lost (default 30; ``core/running/lease.py``)
ENV_LOST_AFTER = "DBPRUNE_WORKER_LOST_S"
#: the embedded instance's storage: ``cached`` (default: ``cluster/sqlite_events.py``) or ``plain``
#: (Dagster's own SQLite storage, the same files), a way back should a Dagster release break the first
ENV_SQLITE = "DBPRUNE_SQLITE_STORAGE"
SQLITE_CHOICES = ("cached", "plain")

#: where ``dagster.yaml`` finds ``DbpruneRunLauncher``: the package, which builds
#: it on first use (``cluster/launcher.py``); the homes' existing files name it so
LAUNCHER_MODULE = "dbprune_assets.cluster"


class ClusterError(RuntimeError):
    """A cluster setting that cannot work, or a server that cannot be reached:
    the message names the variable, the URL (password masked) and what to check."""


# ---------------------------------------------------------------------------
# settings and their checks
# ---------------------------------------------------------------------------
def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (user info and ``password=`` parameters)."""
    masked = re.sub(r"(://[^/@:]*):[^/@]*@", r"\1:***@", url)
    return re.sub(r"(?i)([?&;]password=)[^&;]*", r"\1***", masked)


def secret_free(text: str, url: str) -> str:
    """``text`` (an error message) with the password of ``url`` masked wherever it appears."""
    from urllib.parse import unquote, urlsplit

    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    text = text.replace(url, mask_url(url))
    for secret in {password, unquote(password) if password else None}:
        if secret:
            text = text.replace(secret, "***")
    return text


def enabled(env: Mapping[str, str] | None = None) -> bool:
    """Runs go to Celery workers (``DBPRUNE_BROKER`` is set)."""
    return bool((os.environ if env is None else env).get(ENV_BROKER, "").strip())


def backend_url(env: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if env is None else env
    broker = env.get(ENV_BROKER, "").strip()
    return env.get(ENV_BACKEND, "").strip() or (broker if broker.startswith(("redis://", "rediss://")) else None)


def check_config(env: Mapping[str, str] | None = None) -> None:
    """Refuse settings that cannot work, before anything connects."""
    env = os.environ if env is None else env
    sqlite_storage(env)
    pg, broker = env.get(ENV_POSTGRES, "").strip(), env.get(ENV_BROKER, "").strip()
    if pg:
        scheme = pg.split("://", 1)[0] if "://" in pg else ""
        if scheme not in ("postgresql", PG_SCHEME):
            hint = (" (write postgresql://, the scheme SQLAlchemy knows)" if scheme == "postgres" else
                    " (dbprune uses the psycopg2 driver: postgresql:// or postgresql+psycopg2://)"
                    if scheme.startswith("postgresql+") else "")
            raise ClusterError(f"{ENV_POSTGRES}={mask_url(pg)} is not a PostgreSQL URL{hint}; set it to "
                               "postgresql://user:password@host:5432/database or unset it for the embedded SQLite instance")
    if broker:
        scheme = broker.split("://", 1)[0] if "://" in broker else ""
        if scheme not in ("redis", "rediss", "amqp", "amqps", "pyamqp"):
            raise ClusterError(f"{ENV_BROKER}={mask_url(broker)} is not a Celery broker URL; set it to "
                               "redis://host:6379/0 (or amqp://user:password@host:5672//) or unset it to run in this process")
        if not pg:
            raise ClusterError(f"{ENV_BROKER} is set but {ENV_POSTGRES} is not: workers on other machines record their "
                               "runs in the Dagster instance, which must then be on PostgreSQL; set "
                               f"{ENV_POSTGRES}=postgresql://user:password@host:5432/database, or unset {ENV_BROKER} "
                               "to run in this process")
        if backend_url(env) is None:
            raise ClusterError(f"{ENV_BROKER}={mask_url(broker)} is not Redis, so dbprune has no shared place to read "
                               f"task states from; set {ENV_BACKEND} to a Celery result backend every machine "
                               "reaches (redis://host:6379/1, or db+postgresql://…)")


def instance_config(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The instance's ``dagster.yaml`` as a dict: storage on PostgreSQL with
    ``DBPRUNE_POSTGRES_URL``, the Celery run launcher with ``DBPRUNE_BROKER``
    (as ``env:`` references, resolved by each process that loads it)."""
    env = os.environ if env is None else env
    check_config(env)
    cfg: dict[str, Any] = {"telemetry": {"enabled": False}}
    if env.get(ENV_POSTGRES, "").strip():
        cfg["storage"] = {"postgres": {"postgres_url": {"env": ENV_POSTGRES}}}
    if enabled(env):
        launcher: dict[str, Any] = {"broker": {"env": ENV_BROKER}}
        if env.get(ENV_BACKEND, "").strip():
            launcher["backend"] = {"env": ENV_BACKEND}
        cfg["run_launcher"] = {"module": LAUNCHER_MODULE, "class": "DbpruneRunLauncher", "config": launcher}
    return cfg


#: the embedded default's dagster.yaml without a storage block (Dagster's own SQLite storage)
EMBEDDED_YAML = "telemetry:\n  enabled: false\n"
#: where ``dagster.yaml`` finds the embedded instance's storage: Dagster's SQLite
#: storage whose event log keeps its engines (``cluster/sqlite_events.py``)
SQLITE_STORAGE = ("dbprune_assets.cluster.sqlite_events", "DbpruneSqliteStorage")


def sqlite_storage(env: Mapping[str, str]) -> str:
    """``$DBPRUNE_SQLITE_STORAGE``: ``cached`` (the default) or ``plain``; ClusterError for anything else."""
    value = env.get(ENV_SQLITE, "").strip().lower() or "cached"
    if value not in SQLITE_CHOICES:
        raise ClusterError(f"{ENV_SQLITE}={env.get(ENV_SQLITE)!r} is not one of {', '.join(SQLITE_CHOICES)}: unset it "
                           "(cached: Dagster's SQLite storage whose event log keeps its engines) or set plain "
                           "(Dagster's own; the same files, so a home opens with either)")
    return value


def instance_yaml(env: Mapping[str, str] | None = None, dagster_home: str | None = None) -> str:
    """The instance's ``dagster.yaml``.  Embedded (no PostgreSQL), with
    ``dagster_home``: Dagster's SQLite storage in that folder (the files an
    instance without a storage block uses) through
    :class:`~dbprune_assets.cluster.sqlite_events.DbpruneSqliteStorage`, unless
    ``$DBPRUNE_SQLITE_STORAGE`` is ``plain``."""
    env = os.environ if env is None else env
    cfg = instance_config(env)
    if list(cfg) == ["telemetry"]:
        if dagster_home is None or sqlite_storage(env) == "plain":
            return EMBEDDED_YAML
        import json

        module, cls = SQLITE_STORAGE
        # JSON strings are YAML: any folder name, quoted
        return (EMBEDDED_YAML + "storage:\n  custom:\n"
                f"    module: {module}\n    class: {cls}\n    config:\n"
                f"      base_dir: {json.dumps(os.path.abspath(dagster_home))}\n")
    import yaml

    return ("# written by dbprune from DBPRUNE_POSTGRES_URL and DBPRUNE_BROKER (rewritten by every command\n"
            "# that opens the instance: change those variables, not this file)\n"
            + yaml.safe_dump(cfg, sort_keys=False))


#: the driver dagster-postgres ships with (psycopg2-binary); SQLAlchemy 2.1 maps a bare
#: ``postgresql://`` to psycopg 3, which is not installed
PG_SCHEME = "postgresql+psycopg2"


def with_psycopg2(url: str) -> str:
    """``url`` with the psycopg2 driver named (``postgresql://`` -> ``postgresql+psycopg2://``)."""
    return PG_SCHEME + url[len("postgresql"):] if url.startswith("postgresql://") else url


def use_psycopg2(env: Any = None) -> None:
    """Name the psycopg2 driver in ``$DBPRUNE_POSTGRES_URL`` of this process
    (and so of the webserver, daemon and pool processes it starts), which
    the instance's ``dagster.yaml`` reads."""
    env = os.environ if env is None else env
    url = env.get(ENV_POSTGRES, "").strip()
    if url:
        env[ENV_POSTGRES] = with_psycopg2(url)


def check_reachable(env: Mapping[str, str] | None = None, timeout_s: float = 5.0, broker: bool = True) -> None:
    """Connect to the database (and the broker) once: one clear error
    naming the URL and what to check, instead of a failure half-way.
    Without ``env``, this process's environment (its PostgreSQL URL then
    names the psycopg2 driver: :func:`use_psycopg2`)."""
    own = env is None
    env = os.environ if env is None else env
    if own:
        check_config(env)
    pg = env.get(ENV_POSTGRES, "").strip()
    if pg:
        _check_postgres(pg, timeout_s)
    if broker and enabled(env):
        check_broker(env[ENV_BROKER].strip(), timeout_s)
        backend = backend_url(env)
        if backend and backend != env[ENV_BROKER].strip() and backend.startswith(("redis://", "rediss://")):
            check_broker(backend, timeout_s, what=f"Celery result backend ({ENV_BACKEND})")
    if own:
        use_psycopg2()


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0].strip().rstrip(".") if text else type(err).__name__


def _check_postgres(url: str, timeout_s: float) -> None:
    import psycopg2

    dsn = url.replace(f"{PG_SCHEME}://", "postgresql://", 1)  # libpq's own URI form
    try:
        psycopg2.connect(dsn, connect_timeout=max(1, int(timeout_s))).close()
    except psycopg2.Error as e:
        raise ClusterError(
            f"the Dagster database at {mask_url(url)} ({ENV_POSTGRES}) cannot be reached: "
            f"{secret_free(first_line(e), url)}. Check that PostgreSQL runs on that host and port and accepts "
            "connections from this machine (listen_addresses, pg_hba.conf, firewall), that the database exists "
            "and that the user and password are right; no run was started") from None


def check_broker(url: str, timeout_s: float, what: str = f"Celery broker ({ENV_BROKER})") -> None:
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=timeout_s) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=timeout_s)
    except Exception as e:  # kombu raises the transport's own errors (OperationalError, ConnectionError, …)
        raise ClusterError(
            f"the {what} at {mask_url(url)} cannot be reached: {secret_free(first_line(e), url)}. Check that "
            "Redis (or RabbitMQ) runs on that host and port and accepts connections from this machine "
            "(bind address, protected-mode, firewall; `redis-cli -u URL ping`) and that the password is right; "
            "no run was started") from None


# ---------------------------------------------------------------------------
# the instance and the runs' config
# ---------------------------------------------------------------------------
def console_config(log_level: str | None) -> dict[str, Any]:
    """Run config of Dagster's console logger: its lines at ``log_level`` (``-v``),
    else none (every event still goes to the run's log in the instance)."""
    return {"loggers": {"console": {"config": {"log_level": log_level or "CRITICAL"}}}}


def dagster_instance(layout: Layout):  # -> dg.DagsterInstance
    """This home's instance: its ``dagster.yaml`` (re)written from the
    environment (:func:`instance_yaml`), the database and broker checked."""
    import dagster as dg

    layout.dagster_home.mkdir(parents=True, exist_ok=True)
    cfg = layout.dagster_home / "dagster.yaml"
    # SQLite; PostgreSQL and Celery with DBPRUNE_POSTGRES_URL / DBPRUNE_BROKER
    text = instance_yaml(dagster_home=str(layout.dagster_home))
    if not cfg.exists() or cfg.read_text() != text:
        from dbprune_assets.core.store.atomic import write_bytes

        write_bytes(cfg, text.encode(), layout.tmp)  # atomic: a kill never leaves half of it
    check_reachable()  # database or broker down: one clear error before any run
    # this home's instance, whatever $DAGSTER_HOME says (`dbprune ui` exports it for dagster dev)
    return dg.DagsterInstance.from_config(str(layout.dagster_home))


#: Dagster's switch for one ``ASSET_MATERIALIZATION_PLANNED`` event per asset
#: holding the run's partition subset, instead of one event per partition
PLANNED_SUBSET_ENV = "DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS"
#: runs over more partitions than this log their planned partitions as one subset
PLANNED_SUBSET_FROM = 100


@contextlib.contextmanager
def planned_events(n_partitions: int) -> Iterator[None]:
    """While runs over ``n_partitions`` are created: above
    :data:`PLANNED_SUBSET_FROM`, Dagster logs each asset's planned partitions as
    one event rather than one per partition (measured: a third of the
    per-partition cost of a 300-partition step on SQLite).  The cost: partitions
    of a failed run show as missing, not failed, in the UI (the run itself shows
    failed, and ``dbprune run`` names the failed range); small runs keep
    Dagster's per-partition events.  A value the user set is left alone."""
    if n_partitions <= PLANNED_SUBSET_FROM or PLANNED_SUBSET_ENV in os.environ:
        yield
        return
    os.environ[PLANNED_SUBSET_ENV] = "1"
    try:
        yield
    finally:
        os.environ.pop(PLANNED_SUBSET_ENV, None)
