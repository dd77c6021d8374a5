"""Many machines: the Dagster instance on PostgreSQL, runs on Celery workers.

* unit tests (fast, no servers): the generated ``dagster.yaml``, password
  masking, settings that cannot work, a database or broker that cannot be
  reached, and the worker's task (it records its worker; a run delivered
  again after it ended is left alone);
* with real servers (``pytest -m cluster``; PostgreSQL and Redis started on
  free loopback ports in a temp folder, skipped when their programs are
  absent): the sample pool through ``pruned_subset`` on three ``dbprune
  worker`` processes, one of them killed with SIGKILL (its whole process
  group, as a machine that dies) while it runs an embeddings shard, gives the
  decisions of the embedded run, with runs executed by more than one worker;
  PostgreSQL restarted in the middle of a group either goes unnoticed or fails
  the run cleanly, and the decisions after ``dbprune run`` are the same.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import dagster as dg
import pytest
import yaml

from dbprune_assets import cluster
from dbprune_assets.cluster import failures, launcher, submit
from dbprune_assets.core.store.layout import Layout

from . import faultkit as fk
from .conftest import run_cli, write_config

SELECT = "*pruned_subset"
SECRET = "s3cr3t-pw"  # the PostgreSQL password of the tests' URLs (trust auth ignores it); never printed


# ---------------------------------------------------------------------------
# unit tests
# ---------------------------------------------------------------------------
def test_without_variables_the_instance_is_the_embedded_sqlite_one() -> None:
    assert cluster.instance_yaml({}) == "telemetry:\n  enabled: false\n"
    assert not cluster.enabled({})


def test_postgres_url_puts_storage_on_postgres_and_broker_adds_the_celery_launcher() -> None:
    pg = f"postgresql://dbp:{SECRET}@db.example:5432/dagster"
    only_pg = cluster.instance_config({cluster.ENV_POSTGRES: pg})
    assert only_pg == {"telemetry": {"enabled": False},
                       "storage": {"postgres": {"postgres_url": {"env": "DBPRUNE_POSTGRES_URL"}}}}
    env = {cluster.ENV_POSTGRES: pg, cluster.ENV_BROKER: "redis://:pw@redis.example:6379/0"}
    text = cluster.instance_yaml(env)
    assert yaml.safe_load(text) == {
        "telemetry": {"enabled": False},
        "storage": {"postgres": {"postgres_url": {"env": "DBPRUNE_POSTGRES_URL"}}},
        "run_launcher": {"module": "dbprune_assets.cluster", "class": "DbpruneRunLauncher",
                         "config": {"broker": {"env": "DBPRUNE_BROKER"}}},
    }
    assert SECRET not in text and "redis.example" not in text  # the file holds references, not URLs
    with_backend = cluster.instance_config({**env, cluster.ENV_BACKEND: "redis://redis.example:6379/1"})
    assert with_backend["run_launcher"]["config"]["backend"] == {"env": "DBPRUNE_CELERY_BACKEND"}


def test_deploy_dagster_yaml_is_what_dbprune_writes() -> None:
    shipped = Path(__file__).resolve().parents[1] / "deploy" / "dagster.yaml"
    env = {cluster.ENV_POSTGRES: "postgresql://u@h/db", cluster.ENV_BROKER: "redis://h:6379/0"}
    assert yaml.safe_load(shipped.read_text()) == yaml.safe_load(cluster.instance_yaml(env))


@pytest.mark.parametrize("module", ["dbprune_assets.cluster", "dbprune_assets.cluster.launcher"])
def test_the_launcher_named_in_dagster_yaml_loads_from_its_config(tmp_path: Path, module: str) -> None:
    from dagster._serdes import ConfigurableClassData

    data = ConfigurableClassData(module, "DbpruneRunLauncher", yaml.safe_dump({"broker": "redis://127.0.0.1:1/0"}))
    run_launcher = data.rehydrate(as_type=cluster.launcher_class())
    assert isinstance(run_launcher, cluster.DbpruneRunLauncher)
    assert (run_launcher.broker, run_launcher.backend, run_launcher.default_queue) == (
        "redis://127.0.0.1:1/0", "redis://127.0.0.1:1/0", "cpu")


def test_a_workers_code_pointer_starts_at_the_repository_root() -> None:
    """The job a worker rebuilds is found from the repository root, by a
    module path that resolves (the old one, ``dbprune_assets.cluster``, too)."""
    import importlib

    job = SimpleNamespace(name="__ASSET_JOB")
    pointer = launcher.reconstructable_job(job, "/h", "/p").repository.pointer
    assert Path(pointer.reconstructor_pointer.working_directory) == Path(__file__).resolve().parents[1]
    module = importlib.import_module(pointer.reconstructor_pointer.module)
    assert getattr(module, pointer.reconstructor_pointer.fn_name) is launcher.reconstruct_defs
    assert cluster.reconstruct_defs is launcher.reconstruct_defs


@pytest.mark.parametrize(("url", "masked"), [
    (f"postgresql://dbp:{SECRET}@db:5432/dagster", "postgresql://dbp:***@db:5432/dagster"),
    ("postgresql://dbp@db/dagster", "postgresql://dbp@db/dagster"),
    (f"postgresql://db/dagster?user=dbp&password={SECRET}&sslmode=require",
     "postgresql://db/dagster?user=dbp&password=***&sslmode=require"),
    (f"redis://:{SECRET}@cache:6379/0", "redis://:***@cache:6379/0"),
    (f"amqp://guest:{SECRET}@mq:5672//", "amqp://guest:***@mq:5672//"),
    ("redis://cache:6379/0", "redis://cache:6379/0"),
])
def test_mask_url_hides_the_password_and_nothing_else(url: str, masked: str) -> None:
    assert cluster.mask_url(url) == masked


def test_psycopg2_driver_is_named_for_sqlalchemy() -> None:
    assert cluster.with_psycopg2("postgresql://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert cluster.with_psycopg2("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"
    env = {cluster.ENV_POSTGRES: "postgresql://u@h/db"}
    cluster.use_psycopg2(env)
    assert env[cluster.ENV_POSTGRES] == "postgresql+psycopg2://u@h/db"


@pytest.mark.parametrize(("env", "words"), [
    ({cluster.ENV_BROKER: "redis://h:6379/0"}, ["DBPRUNE_POSTGRES_URL is not", "unset DBPRUNE_BROKER"]),
    ({cluster.ENV_POSTGRES: f"postgres://u:{SECRET}@h/db"}, ["u:***@h", "write postgresql://"]),
    ({cluster.ENV_POSTGRES: "mysql://u@h/db"}, ["is not a PostgreSQL URL"]),
    ({cluster.ENV_POSTGRES: "postgresql://u@h/db", cluster.ENV_BROKER: "http://h"}, ["not a Celery broker URL"]),
    ({cluster.ENV_POSTGRES: "postgresql://u@h/db", cluster.ENV_BROKER: f"amqp://g:{SECRET}@h//"},
     ["DBPRUNE_CELERY_BACKEND", "g:***@h"]),
])
def test_settings_that_cannot_work_are_refused_by_name(env: dict[str, str], words: list[str]) -> None:
    with pytest.raises(cluster.ClusterError) as e:
        cluster.instance_config(env)
    for word in words:
        assert word in str(e.value)
    assert SECRET not in str(e.value)


def test_queues_gpu_for_encoder_embeddings_training_and_eval_else_cpu() -> None:
    assert [cluster.queue_for(g) for g in (["embeddings"], ["pool_manifest", "encoder"], ["trained_model"],
                                           ["eval_scores"], ["raw_metadata"], ["dedup_assignments"],
                                           ["semantic_dedup", "candidates", "centroids"], ["pruned_subset"])] == \
        ["gpu", "gpu", "gpu", "gpu", "cpu", "cpu", "cpu", "cpu"]


def test_a_died_or_lost_note_belongs_to_its_run_not_to_a_re_execution_that_copied_it() -> None:
    """Dagster copies a run's tags onto its re-executions (the UI's Re-execute):
    the note names its run, and a successful or failed re-execution is not
    taken for a killed or lost run."""
    from types import SimpleNamespace

    from dbprune_assets.cluster.tags import DIED_TAG, LOST_TAG, own_note, run_note

    parent_id, child_id = "8f3a2c1d-0000-4000-8000-000000000001", "c0ffee00-0000-4000-8000-000000000002"
    note = run_note(parent_id, "its process on worker w2 was ended by SIGKILL")
    assert note == "run 8f3a2c1d: its process on worker w2 was ended by SIGKILL"
    parent = SimpleNamespace(run_id=parent_id, tags={DIED_TAG: note})
    child = SimpleNamespace(run_id=child_id, tags={DIED_TAG: note, LOST_TAG: run_note(parent_id, "lost")})
    assert own_note(parent, DIED_TAG) == "its process on worker w2 was ended by SIGKILL"
    assert own_note(child, DIED_TAG) is None and own_note(child, LOST_TAG) is None
    assert own_note(SimpleNamespace(run_id=child_id, tags={}), DIED_TAG) is None


def test_worker_argv_names_queues_concurrency_and_node() -> None:
    argv = cluster.worker_argv(["cpu", "gpu"], 2, "w1@node-a")
    assert argv[argv.index("--queues") + 1] == "cpu,gpu"
    assert argv[argv.index("--concurrency") + 1] == "2"
    assert argv[argv.index("--hostname") + 1] == "w1@node-a"
    assert argv[argv.index("--prefetch-multiplier") + 1] == "1"
    assert cluster.worker_argv(["cpu"], 1, "w1")[argv.index("--hostname") + 1] == "w1@%h"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the socket is: nothing listens there


def test_unreachable_database_is_one_error_naming_the_masked_url() -> None:
    url = f"postgresql://dbp:{SECRET}@127.0.0.1:{_closed_port()}/dagster"
    with pytest.raises(cluster.ClusterError) as e:
        cluster.check_reachable({cluster.ENV_POSTGRES: url}, timeout_s=2)
    msg = str(e.value)
    assert "postgresql://dbp:***@127.0.0.1:" in msg and SECRET not in msg
    assert "DBPRUNE_POSTGRES_URL" in msg and "Check that PostgreSQL runs" in msg and "no run was started" in msg


def test_unreachable_broker_is_one_error_naming_the_masked_url() -> None:
    env = {cluster.ENV_POSTGRES: "postgresql://u@h/db", cluster.ENV_BROKER: f"redis://:{SECRET}@127.0.0.1:{_closed_port()}/0"}
    with pytest.raises(cluster.ClusterError) as e:
        cluster.check_broker(env[cluster.ENV_BROKER], 2)
    msg = str(e.value)
    assert "redis://:***@127.0.0.1:" in msg and SECRET not in msg
    assert "DBPRUNE_BROKER" in msg and "Check that Redis" in msg


def test_cli_worker_and_run_refuse_an_unreachable_cluster_before_any_run(tmp_path: Path) -> None:
    pg = f"postgresql://dbp:{SECRET}@127.0.0.1:{_closed_port()}/dagster"
    env = {"DBPRUNE_HOME": str(tmp_path / "home"), "DBPRUNE_POOL": str(tmp_path / "pool"),
           cluster.ENV_POSTGRES: pg, cluster.ENV_BROKER: f"redis://127.0.0.1:{_closed_port()}/0"}
    r = run_cli("worker", "--queue", "cpu", env=env, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "dbprune: error: the Dagster database at postgresql://dbp:***@127.0.0.1:" in r.stderr
    assert SECRET not in r.stdout + r.stderr

    fk.write_pool(tmp_path / "pool", shards=1, samples_per_shard=8, reference_samples=16, eval_per_class=1)
    r = run_cli("run", "--config", str(write_config(tmp_path / "c.yaml")), env=env, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "the Dagster database at postgresql://dbp:***@127.0.0.1:" in r.stderr and "no run was started" in r.stderr
    assert SECRET not in r.stdout + r.stderr
    assert "▶" not in r.stdout  # no group started
    assert not (tmp_path / "home" / "dagster" / "history").exists()  # nor did a SQLite instance appear


@dg.op
def _one() -> int:
    return 1


@dg.job
def tiny_job() -> None:
    _one()


def _execute_task(instance: dg.DagsterInstance, run_id: str) -> int:
    from dagster._grpc.types import ExecuteRunArgs
    from dagster._serdes import pack_value

    args = ExecuteRunArgs(job_origin=dg.reconstructable(tiny_job).get_python_origin(), run_id=run_id,
                          instance_ref=instance.get_ref(), set_exit_code_on_failure=True)
    task = SimpleNamespace(request=SimpleNamespace(hostname="w9@node-z"))
    return launcher.execute_run_task(task, pack_value(args))


def test_worker_task_tags_its_worker_and_leaves_an_ended_run_alone(tmp_path: Path) -> None:
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        origin = dg.reconstructable(tiny_job).get_python_origin()
        in_process = {"execution": {"config": {"in_process": {}}}}  # as dbprune run submits its runs
        run = instance.create_run_for_job(job_def=tiny_job, job_code_origin=origin, run_config=in_process)
        assert _execute_task(instance, run.run_id) == 0
        done = instance.get_run_by_id(run.run_id)
        assert done.status == dg.DagsterRunStatus.SUCCESS
        assert done.tags[cluster.WORKER_TAG] == "w9@node-z"
        assert done.tags[cluster.WORKER_HOST_TAG] == socket.gethostname()
        assert done.tags[cluster.WORKER_PID_TAG] == str(os.getpid())

        given_up = instance.create_run_for_job(job_def=tiny_job, job_code_origin=origin)
        instance.report_run_failed(given_up, message="given up by dbprune run")
        assert _execute_task(instance, given_up.run_id) == 0  # the broker delivered it again
        after = instance.get_run_by_id(given_up.run_id)
        assert after.status == dg.DagsterRunStatus.FAILURE and cluster.WORKER_TAG not in after.tags


def test_a_failed_run_is_named_by_range_and_worker_with_its_innermost_error(tmp_path: Path) -> None:
    from dagster._core.events import EngineEventData
    from dagster._utils.error import serializable_error_info_from_exc_info

    from dbprune_assets.runner import _failure_message

    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        run = instance.create_run_for_job(job_def=tiny_job, tags={
            cluster.GROUP_TAG: "embeddings", cluster.WORKER_TAG: "w2@node-b", cluster.WORKER_HOST_TAG: "node-b",
            cluster.WORKER_PID_TAG: "4242"})
        try:
            try:
                raise ConnectionError("server closed the connection unexpectedly")
            except ConnectionError as inner:
                raise RuntimeError("Execution of run failed") from inner
        except RuntimeError:
            error = serializable_error_info_from_exc_info(sys.exc_info())
        instance.report_engine_event("run worker failed", run, EngineEventData.engine_error(error))
        instance.report_run_failed(run)
        att = failures.Attempt("00002", "00003", 1, run.run_id, run.run_id)
        failure = failures.failure_of(instance, instance.get_run_by_id(run.run_id), att)
        line = _failure_message(failure, Layout(tmp_path, tmp_path / "pool"))
        assert line.startswith("[embeddings: shards 00002…00003, worker w2@node-b (host node-b, pid 4242)] "
                               "ConnectionError: server closed the connection unexpectedly")


class OperationalError(Exception):
    """Named like SQLAlchemy's and psycopg2's connection errors."""


def test_a_run_failed_by_its_database_connection_is_a_casualty_a_step_failure_is_not(tmp_path: Path) -> None:
    from dagster._core.events import EngineEventData
    from dagster._utils.error import serializable_error_info_from_exc_info

    def failed_run(instance: dg.DagsterInstance, exc: Exception) -> dg.DagsterRun:
        run = instance.create_run_for_job(job_def=tiny_job)
        try:
            raise exc
        except Exception:
            error = serializable_error_info_from_exc_info(sys.exc_info())
        instance.report_engine_event("run worker failed", run, EngineEventData.engine_error(error))
        instance.report_run_failed(run)
        return instance.get_run_by_id(run.run_id)

    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        db = failed_run(instance, OperationalError("server closed the connection unexpectedly"))
        why = failures.db_casualty(instance, db)
        assert why.startswith("it failed on the database connection (") and why.endswith(
            "OperationalError: server closed the connection unexpectedly)")
        assert failures.db_casualty(instance, failed_run(instance, ValueError("bad shard"))) is None


# ---------------------------------------------------------------------------
# real servers on loopback
# ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bindir() -> Path | None:
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
        if (Path(out) / "initdb").exists():
            return Path(out)
    except (OSError, subprocess.CalledProcessError):
        pass
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _as_postgres(argv: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the ``postgres`` user."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


class Postgres:
    def __init__(self) -> None:
        bindir = _pg_bindir()
        if bindir is None:
            pytest.skip("PostgreSQL's initdb/pg_ctl are not installed (apt-get install postgresql)")
        if os.geteuid() == 0 and shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="dbprune-pg-"))  # writable by the postgres user
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
        self.port = _free_port()
        subprocess.run(_as_postgres([str(bindir / "initdb"), "-D", str(self.dir / "data"), "-A", "trust", "-U",
                                     "postgres", "--no-sync", "-E", "UTF8"]), check=True, capture_output=True)
        self.start()
        import psycopg2

        con = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")
        con.autocommit = True
        con.cursor().execute("CREATE DATABASE dbprune")
        con.close()
        self.url = f"postgresql://postgres:{SECRET}@127.0.0.1:{self.port}/dbprune"

    def _ctl(self, *args: str) -> None:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(_as_postgres([str(self.bindir / "pg_ctl"), "-D", str(self.dir / "data"), "-o", opts,
                                     "-l", str(self.dir / "log"), "-w", *args]), check=True, capture_output=True)

    def start(self) -> None:
        self._ctl("start")

    def restart(self) -> None:
        self._ctl("-m", "fast", "restart")

    def stop(self) -> None:
        try:
            self._ctl("-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class Redis:
    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        self.dir = Path(tempfile.mkdtemp(prefix="dbprune-redis-"))
        self.port = _free_port()
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.dir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + 30
        while True:
            try:
                cluster.check_broker(self.url, 1)
                break
            except cluster.ClusterError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def servers() -> Iterator[SimpleNamespace]:
    pg = Postgres()
    try:
        redis = Redis()
    except BaseException:
        pg.stop()
        raise
    try:
        yield SimpleNamespace(pg=pg, redis=redis, env={cluster.ENV_POSTGRES: pg.url, cluster.ENV_BROKER: redis.url})
    finally:
        redis.stop()
        pg.stop()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Iterator[Path]:
    d = fk.fast_tmp(tmp_path_factory, "cluster")
    yield d
    fk.drop_fast_tmp(d)


@pytest.fixture(scope="module")
def config(work: Path, tmp_path_factory) -> Path:
    # one run per partition: 4 shards make 4 runs per shard group, spread over the workers; decode
    # workers and threads as a user gets them (the DataLoader's workers are processes of the run's own)
    return fk.config_with_encoder(work / "tiny.yaml", fk.shared_encoder(tmp_path_factory), default_processes=True,
                                  partitions={"per_run": 1})


@pytest.fixture(scope="module")
def pool(work: Path) -> Path:
    return fk.write_pool(work / "pool", shards=4, samples_per_shard=40)


class Workers:
    """``dbprune worker`` processes, each the leader of its own process group
    (a SIGKILL to the group is a machine that dies: worker and pool processes)."""

    def __init__(self, env: dict[str, str], names: list[str], logs: Path) -> None:
        exe = shutil.which("dbprune") or str(Path(sys.executable).parent / "dbprune")
        logs.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, **env}
        self.procs: dict[str, subprocess.Popen] = {}
        for name in names:
            with open(logs / f"{name.split('@')[0]}.log", "w") as log:
                self.procs[name] = subprocess.Popen(
                    [exe, "worker", "--queue", "cpu", "--queue", "gpu", "--name", name, "--loglevel", "WARNING"],
                    env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.logs = logs

    def wait_ready(self, timeout_s: float = 300) -> None:
        app = cluster.make_app(self.env[cluster.ENV_BROKER], cluster.backend_url(self.env))
        deadline = time.monotonic() + timeout_s
        while True:
            alive = submit.alive_workers(app, set(self.procs))
            if alive == set(self.procs):
                return
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise AssertionError(f"workers {dead or sorted(set(self.procs) - alive)} did not start: " +
                                     "".join(p.read_text()[-2000:] for p in self.logs.glob("*.log")))
            time.sleep(0.5)

    def kill(self, name: str) -> None:
        os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(30)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


@pytest.fixture(scope="module")
def workers(servers, work: Path) -> Iterator[Workers]:
    """Three workers serving both queues (a CPU machine serving gpu on purpose),
    started before the embedded run so they load while it runs."""
    w = Workers(servers.env, ["w1@node-a", "w2@node-b", "w3@node-c"], work / "worker-logs")
    try:
        yield w
    finally:
        w.stop()


@pytest.fixture(scope="module")
def embedded(workers, work: Path, config: Path, pool: Path) -> SimpleNamespace:
    """The uninterrupted embedded run (no cluster variables) the cluster runs compare with."""
    home = work / "embedded"
    env = fk.env_for(home, pool)
    r = run_cli("run", "--config", str(config), "--select", SELECT,
                env={**env, cluster.ENV_POSTGRES: "", cluster.ENV_BROKER: ""})
    assert r.returncode == 0, r.stdout + r.stderr
    digest, rows = fk.decisions_digest(home)
    assert rows > 0
    return SimpleNamespace(digest=digest, rows=rows)


def _instance(home: Path, servers) -> dg.DagsterInstance:
    """The cluster home's instance (its dagster.yaml reads the URL from the
    environment when it is opened; this process's environment is left as it was)."""
    before = os.environ.get(cluster.ENV_POSTGRES)
    os.environ[cluster.ENV_POSTGRES] = cluster.with_psycopg2(servers.pg.url)
    try:
        return dg.DagsterInstance.from_config(str(home / "dagster"))
    finally:
        if before is None:
            del os.environ[cluster.ENV_POSTGRES]
        else:
            os.environ[cluster.ENV_POSTGRES] = before


def _home_runs(instance: dg.DagsterInstance, home: Path, **filters) -> list[dg.DagsterRun]:
    return list(instance.get_runs(dg.RunsFilter(tags={cluster.HOME_TAG: str(home)}, **filters)))


def _wait_for_started(home: Path, servers, group: str, proc: subprocess.Popen, timeout_s: float = 600) -> dg.DagsterRun:
    """The first run of ``group`` a worker has started, polled every 0.1 s while ``proc`` (dbprune run) lives."""
    instance = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"dbprune run ended before a {group} run started:\n{out[-3000:]}{err[-3000:]}")
        if instance is None and (home / "dagster" / "dagster.yaml").exists():
            instance = _instance(home, servers)
        if instance is not None:
            started = [r for r in _home_runs(instance, home, statuses=[dg.DagsterRunStatus.STARTED])
                       if r.tags.get(cluster.GROUP_TAG) == group and r.tags.get(cluster.WORKER_TAG)]
            if started:
                return started[0]
        time.sleep(0.1)
    raise AssertionError(f"no {group} run started within {timeout_s:.0f}s")


def _cluster_run(home: Path, pool: Path, config: Path, servers, *args: str, lost_after: str = "5") -> subprocess.Popen:
    exe = shutil.which("dbprune") or str(Path(sys.executable).parent / "dbprune")
    env = {**os.environ, **fk.env_for(home, pool), **servers.env, cluster.ENV_LOST_AFTER: lost_after}
    env.pop("DAGSTER_HOME", None)
    return subprocess.Popen([exe, "run", "--config", str(config), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.cluster
@pytest.mark.slow
def test_cluster_run_with_a_worker_killed_mid_embeddings_gives_the_embedded_decisions(
        servers, workers: Workers, embedded: SimpleNamespace, work: Path, config: Path, pool: Path) -> None:
    home = work / "cluster"
    workers.wait_ready()
    proc = _cluster_run(home, pool, config, servers, "--select", SELECT)
    victim_run = _wait_for_started(home, servers, "embeddings", proc)
    victim = victim_run.tags[cluster.WORKER_TAG]
    workers.kill(victim)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:] + err[-4000:]
    assert fk.decisions_digest(home) == (embedded.digest, embedded.rows)

    start = victim_run.tags["dagster/asset_partition_range_start"]
    assert f"↻ shard {start}: worker {victim}" in out and "submitted again" in out
    assert SECRET not in out + err
    instance = _instance(home, servers)
    killed = instance.get_run_by_id(victim_run.run_id)
    assert killed.status == dg.DagsterRunStatus.FAILURE and "stopped renewing" in killed.tags[cluster.LOST_TAG]
    retry = [r for r in _home_runs(instance, home) if r.tags.get("dagster/parent_run_id") == victim_run.run_id]
    assert len(retry) == 1 and retry[0].status == dg.DagsterRunStatus.SUCCESS
    assert retry[0].tags["dagster/asset_partition_range_start"] == start and retry[0].tags[cluster.WORKER_TAG] != victim
    runs = _home_runs(instance, home)
    assert not [r for r in runs if not r.is_finished]
    by_worker = {r.tags.get(cluster.WORKER_TAG) for r in runs if r.status == dg.DagsterRunStatus.SUCCESS}
    assert len(by_worker) >= 2 and None not in by_worker, by_worker
    embeddings = [r for r in runs if r.tags.get(cluster.GROUP_TAG) == "embeddings"]
    assert {r.tags[cluster.QUEUE_TAG] for r in embeddings} == {"gpu"}
    assert {r.tags[cluster.QUEUE_TAG] for r in runs if r.tags.get(cluster.GROUP_TAG) == "raw_metadata"} == {"cpu"}

    # `dbprune ui` serves the same instance: its dagster.yaml is the PostgreSQL one
    assert yaml.safe_load((home / "dagster" / "dagster.yaml").read_text())["storage"] == {
        "postgres": {"postgres_url": {"env": "DBPRUNE_POSTGRES_URL"}}}


@pytest.mark.cluster
@pytest.mark.slow
def test_postgres_restarted_mid_group_resumes_or_fails_cleanly_then_the_decisions_are_equal(
        servers, workers: Workers, embedded: SimpleNamespace, work: Path, config: Path, pool: Path) -> None:
    home = work / "cluster"  # the previous test's home: redo the last groups
    if not (home / "tables" / "decisions").is_dir():
        pytest.skip("needs the home of the killed-worker test")
    select = "cluster_assignments,cluster_complexity,pruned_subset"
    proc = _cluster_run(home, pool, config, servers, "--force", "--select", select)
    _wait_for_started(home, servers, "cluster_assignments", proc)
    servers.pg.restart()
    out, err = proc.communicate(timeout=900)
    assert SECRET not in out + err
    print(f"PostgreSQL restarted during cluster_assignments: dbprune run exited {proc.returncode}")
    if proc.returncode != 0:  # failed cleanly: one line naming the group, then the next run completes it
        assert proc.returncode == 1 and ("✗ " in out or "dbprune: error:" in err), out[-4000:] + err[-4000:]
        print((out + err)[-1500:])
        r = run_cli("run", "--config", str(config), "--select", SELECT,
                    env={**fk.env_for(home, pool), **servers.env, cluster.ENV_LOST_AFTER: "5"})
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert fk.decisions_digest(home) == (embedded.digest, embedded.rows)
    assert fk.tmp_leftovers(home) == []
    instance = _instance(home, servers)
    assert not [r for r in _home_runs(instance, home) if not r.is_finished]


@pytest.mark.cluster
@pytest.mark.slow
def test_a_busy_worker_is_not_taken_for_dead_and_no_range_runs_twice(
        servers, workers: Workers, work: Path, config: Path) -> None:
    """The workers' main processes (those that answer Celery's ping) are
    stopped for 12 s, more than twice ``DBPRUNE_WORKER_LOST_S``, while their
    runs (shards of 500 samples) go on, as when a run keeps every core busy:
    no run is given up, none is submitted again, each range runs once.  (With
    Celery's ping as the liveness signal, a run in work then was submitted
    again while it still ran.)"""
    home, pool = work / "busy", fk.write_pool(work / "busy-pool", shards=2, samples_per_shard=500)
    proc = _cluster_run(home, pool, config, servers, "--select", "raw_metadata,embeddings")
    _wait_for_started(home, servers, "raw_metadata,embeddings", proc)  # one group: they run together
    mains = [p.pid for p in workers.procs.values() if p.poll() is None]
    for pid in mains:
        os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(12)
    finally:
        for pid in mains:
            os.kill(pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:] + err[-4000:]
    assert "submitted again" not in out, out[-4000:]
    runs = _home_runs(_instance(home, servers), home)
    assert not [r.tags[cluster.LOST_TAG] for r in runs if cluster.LOST_TAG in r.tags]
    ranges = [(r.tags[cluster.GROUP_TAG], r.tags.get("dagster/asset_partition_range_start")) for r in runs]
    assert len(ranges) == len(set(ranges)) == 2 and {g for g, _ in ranges} == {"raw_metadata,embeddings"}
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
