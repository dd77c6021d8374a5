"""Issue 10, part A: one writer per home, a catalog that only reads, OS errors a
person can act on, and a `dbprune ui` that stops on a signal.

Disk-full, read-only and cross-volume cases mount a small tmpfs or a read-only
bind mount (root only) and skip with the reason where the test cannot.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from dbprune_assets.core.store import catalog
from dbprune_assets.core.running import oserrors
from dbprune_assets.core.store.atomic import write_bytes
from dbprune_assets.core.store.duck import arrow_schema
from dbprune_assets.core.running.homelock import HomeBusy, home_lock, read_holder
from dbprune_assets.core.store.layout import Layout

from .conftest import run_cli, write_config

HOLD = """
import sys, time
from pathlib import Path
from dbprune_assets.core.running.homelock import home_lock
with home_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


@contextlib.contextmanager
def holding(lock: Path, seconds: float) -> Iterator[subprocess.Popen]:
    """A process that holds ``lock`` for ``seconds`` (killed at the end of the block)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), str(seconds)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------
# defect 1: one writer per home
# ---------------------------------------------------------------------------
def test_second_run_refuses_at_once_naming_the_holder(tmp_path: Path) -> None:
    home = tmp_path / "home"
    layout = Layout.from_env(home)
    with holding(layout.lock_file, 60) as holder:
        t0 = time.monotonic()
        proc = run_cli("run", env={"DBPRUNE_HOME": str(home), "DBPRUNE_POOL": str(tmp_path / "no-pool")}, timeout=120)
        assert time.monotonic() - t0 < 60
    assert proc.returncode == 75, proc.stdout + proc.stderr
    err = proc.stderr
    assert f"pid {holder.pid}" in err and "host" in err and "started" in err and "--wait" in err, err
    assert "Traceback" not in err and not layout.config_file.exists()  # nothing written


def test_waiting_run_gets_the_lock_when_the_holder_ends(tmp_path: Path) -> None:
    lock = tmp_path / "home" / ".lock"
    told: list = []
    with holding(lock, 2) as holder:
        t0 = time.monotonic()
        with home_lock(lock, wait_s=60, on_wait=told.append) as me:
            assert time.monotonic() - t0 >= 1
            assert read_holder(lock) == me and me.pid == os.getpid()
    assert told and told[0] is not None and told[0].pid == holder.pid
    with holding(lock, 30), pytest.raises(HomeBusy, match="still held after waiting"):
        with home_lock(lock, wait_s=1.5):
            pass


def test_a_killed_holders_lock_is_taken_over(tmp_path: Path) -> None:
    lock = tmp_path / "home" / ".lock"
    with holding(lock, 600) as holder:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert read_holder(lock).pid == holder.pid  # the dead holder's record is still there …
    with home_lock(lock) as me:  # … and its lock is not: taken at once (wait_s 0 raises HomeBusy if held)
        assert read_holder(lock) == me
    with home_lock(lock), home_lock(lock):  # re-entrant within a process
        pass


@pytest.mark.slow
def test_concurrent_runs_with_different_settings(tmp_path: Path) -> None:
    """Run A holds the home; B (other settings) refuses at once; C (other
    settings again) waits, then runs and reports its own settings."""
    home = tmp_path / "home"
    env = {"DBPRUNE_HOME": str(home), "DBPRUNE_POOL": "", "DAGSTER_HOME": ""}
    cfg = {name: write_config(tmp_path / f"{name}.yaml", selection={"seed": seed})
           for name, seed in (("a", 1), ("b", 2), ("c", 3))}
    import shutil

    exe = shutil.which("dbprune") or str(Path(sys.executable).parent / "dbprune")
    a = subprocess.Popen([exe, "run", "--config", str(cfg["a"]), "--select", "raw_metadata"], env={**os.environ, **env},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while read_holder(home / ".lock") is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert read_holder(home / ".lock").pid == a.pid
    b = run_cli("run", "--config", str(cfg["b"]), "--select", "raw_metadata", env=env)
    c = subprocess.Popen([exe, "run", "--config", str(cfg["c"]), "--select", "raw_metadata", "--wait", "inf"],
                         env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    a_out, a_err = a.communicate(timeout=600)
    assert a.returncode == 0, a_out + a_err
    assert b.returncode == 75 and f"pid {a.pid}" in b.stderr, b.stdout + b.stderr
    c_out, c_err = c.communicate(timeout=600)
    assert c.returncode == 0 and "waiting" in c_err, c_out + c_err
    assert yaml.safe_load((home / "config.yaml").read_text())["selection"]["seed"] == 3  # C's, never B's


# ---------------------------------------------------------------------------
# defect 5: a catalog that only reads
# ---------------------------------------------------------------------------
def test_select_never_writes_the_catalog(small_catalog: Layout) -> None:
    layout = small_catalog
    assert catalog.stale_views(layout) == []
    before = (layout.catalog.stat().st_mtime_ns, layout.catalog.read_bytes())
    time.sleep(0.05)
    catalog.ensure_catalog(layout)
    assert catalog.query(layout, "SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 2}]
    assert catalog.query(layout, "SELECT count(*) AS n FROM decisions").to_pylist() == [{"n": 0}]
    assert (layout.catalog.stat().st_mtime_ns, layout.catalog.read_bytes()) == before
    # a table that gets its first file makes its (empty) view stale: refreshed, then read
    layout.table_dir("problems").mkdir()
    pq.write_table(pa.table({"shard": ["00000"], "key": ["000000001"], "stage": ["ingest"], "cause": ["c"]})
                   .cast(arrow_schema("problems")), layout.table("problems", "00000"))
    assert catalog.stale_views(layout) == ["problems"]
    catalog.ensure_catalog(layout)  # what `dbprune sql` does first
    assert catalog.stale_views(layout) == []
    assert catalog.query(layout, "SELECT count(*) AS n FROM problems").to_pylist() == [{"n": 1}]


@pytest.mark.parametrize("sql, expected", [
    ("COPY samples TO '{outside}'", "COPY statements are refused"),
    ("COPY samples TO '{inside}'", "COPY statements are refused"),
    ("SELECT * FROM read_csv('/etc/passwd')", "read only the catalog's tables"),
    ("SELECT * FROM read_text('{tables}/../../escape.txt')", "read only the catalog's tables"),
    ("ATTACH '{outside}.db' AS other", "ATTACH statements are refused"),
    ("SET enable_external_access = true", "SET statements are refused"),
    ("CREATE TABLE t AS SELECT 1", "CREATE statements are refused"),
    ("SELECT 1; DROP VIEW samples", "DROP statements are refused"),
], ids=["copy-out", "copy-into-tables", "read-csv", "traversal", "attach", "set", "create", "drop"])
def test_catalog_queries_cannot_touch_other_files(small_catalog: Layout, tmp_path: Path, sql: str, expected: str) -> None:
    layout = small_catalog
    (tmp_path / "escape.txt").write_text("secret")
    text = sql.format(outside=tmp_path / "out.csv", inside=layout.table_dir("samples") / "evil.parquet",
                      tables=layout.table_dir("samples"))
    with pytest.raises(catalog.QueryRefused, match=expected):
        catalog.query(layout, text)
    assert not (tmp_path / "out.csv").exists() and not (layout.table_dir("samples") / "evil.parquet").exists()
    assert catalog.query(layout, "SELECT count(*) AS n FROM samples").to_pylist() == [{"n": 2}]


def test_sql_command_refuses_copy_with_a_message(small_catalog: Layout, tmp_path: Path) -> None:
    env = {"DBPRUNE_HOME": str(small_catalog.home)}
    proc = run_cli("sql", f"COPY samples TO '{tmp_path / 'x.csv'}'", env=env, timeout=120)
    assert proc.returncode == 2 and "SQL refused" in proc.stderr and "--format csv" in proc.stderr, proc.stderr
    assert not (tmp_path / "x.csv").exists()


# ---------------------------------------------------------------------------
# defect 6: errors a person can act on
# ---------------------------------------------------------------------------
def _mount(args: list[str], what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root (mount)")
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount {what} here: {proc.stderr.strip()}")


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    _mount(["-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], f"a {size} tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """``path`` made read-only by a read-only bind mount of itself."""
    _mount(["--bind", "-o", "ro", str(path), str(path)], "a read-only bind mount")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_explain_names_the_file_the_cause_and_what_to_do(tmp_path: Path) -> None:
    full = oserrors.explain(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.parquet")))
    assert str(tmp_path / "x.parquet") in full and "disk is full" in full and "free on its volume" in full
    ro = oserrors.explain_text("OSError: [Errno 30] Read-only file system: '/h/tables/samples'")
    assert ro.startswith("/h/tables/samples: Read-only file system (EROFS)") and "DBPRUNE_HOME" in ro
    assert "DBPRUNE_HOME" in oserrors.explain(PermissionError(errno.EACCES, "Permission denied", "/h/x"))
    assert oserrors.explain(FileNotFoundError(errno.ENOENT, "No such file", "/x")) is None  # no advice: as is
    with pytest.raises(oserrors.NotEnoughSpace, match="needs about 1024.0 TiB"):
        oserrors.require_free_space(tmp_path, 2**50, "a test")


def test_disk_full_mid_write_is_explained_and_leaves_no_temp(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "1m") as vol:
        target = vol / "tables" / "samples" / "00000.parquet"
        with pytest.raises(OSError) as info:
            write_bytes(target, b"x" * (2 * 2**20), vol / ".tmp" / "me")
        assert info.value.errno == errno.ENOSPC
        line = oserrors.explain(info.value, default_path=target)
        assert str(target) in line and "disk is full" in line
        assert not target.exists() and list((vol / ".tmp" / "me").iterdir()) == []


def test_a_run_on_a_full_disk_says_so_in_one_line(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "home", "2m") as home:
        proc = run_cli("run", env={"DBPRUNE_HOME": str(home), "DBPRUNE_POOL": "", "DAGSTER_HOME": ""}, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    err = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(err) == 1, proc.stderr
    assert "disk is full" in err[0] and str(home) in err[0] and "DBPRUNE_HOME" in err[0], err[0]


def test_a_read_only_home_says_so_in_one_line(tmp_path: Path, small_catalog: Layout) -> None:
    home = small_catalog.home
    with read_only(home):
        proc = run_cli("run", env={"DBPRUNE_HOME": str(home), "DBPRUNE_POOL": str(tmp_path)}, timeout=300)
        # the catalog only reads: sql works on a read-only home
        sql = run_cli("sql", "SELECT count(*) AS n FROM samples", "--format", "csv",
                      env={"DBPRUNE_HOME": str(home)}, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "Read-only file system" in proc.stderr and "DBPRUNE_HOME" in proc.stderr and str(home) in proc.stderr
    assert sql.returncode == 0 and sql.stdout.split() == ["n", "2"], sql.stderr


def test_temp_files_stay_on_the_targets_volume(tmp_path: Path) -> None:
    """``tables/`` on another volume (a symlink to a tmpfs): no EXDEV, the temp
    file is created on that volume and nothing is left behind."""
    home = tmp_path / "home"
    layout = Layout.from_env(home)
    with tmpfs(tmp_path / "other", "4m") as other:
        home.mkdir()
        (home / "tables").symlink_to(other)
        target = layout.table("samples", "00000")
        write_bytes(target, b"data", layout.tmp)
        assert target.read_bytes() == b"data"
        assert (other / ".tmp").is_dir() and list((other / ".tmp").rglob("*.parquet")) == []
        assert home / "tables" / ".tmp" in layout.tmp_bases()


# ---------------------------------------------------------------------------
# defect 8: `dbprune ui` stops on a signal
# ---------------------------------------------------------------------------
def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_ui_stops_on_a_signal_to_its_own_pid(tmp_path: Path, signum: int) -> None:
    import shutil
    import urllib.request

    from .test_cli import _free_port

    port = _free_port()
    exe = shutil.which("dbprune") or str(Path(sys.executable).parent / "dbprune")
    env = {**os.environ, "DBPRUNE_HOME": str(tmp_path / "home"), "DBPRUNE_POOL": str(tmp_path / "pool"),
           "DAGSTER_HOME": ""}
    proc = subprocess.Popen([exe, "ui", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                q = json.dumps({"query": "{ version }"}).encode()
                req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=q,
                                             headers={"Content-Type": "application/json"})
                urllib.request.urlopen(req, timeout=5).read()
                break
            except Exception:
                assert proc.poll() is None, "dbprune ui exited before it answered"
                time.sleep(1)
        else:
            pytest.fail("the UI did not come up")
        family = _descendants(proc.pid)
        assert family  # dagster dev and its servers
        os.kill(proc.pid, signum)  # its own pid, not its group
        assert proc.wait(timeout=30) == 0
        time.sleep(0.5)
        left = sorted(p for p in family if _alive(p))
        assert not left, f"processes left behind: {left}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


# ---------------------------------------------------------------------------
# defect 6: free space checked before the long steps whose need is predictable
# ---------------------------------------------------------------------------
def test_training_needs_its_weights_free_before_it_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dbprune_assets.core.models.encoders import TRAINING_WEIGHT_COPIES, parameter_count, require_training_space

    n = parameter_count("dbprune-tiny")
    assert 3_000_000 < n < 4_000_000  # the bootstrap architecture (model_configs/dbprune-tiny.json)
    need = 2 * n * 4 * TRAINING_WEIGHT_COPIES + oserrors.MIN_FREE_BYTES
    monkeypatch.setattr(oserrors, "free_bytes", lambda path: need - 1)
    with pytest.raises(oserrors.NotEnoughSpace) as info:
        require_training_space(tmp_path / "models" / "dbp", "dbprune-tiny", "training on the dbp subset", runs=2)
    msg = str(info.value)
    assert "training on the dbp subset" in msg and oserrors.human_bytes(need) in msg and "DBPRUNE_HOME" in msg
    monkeypatch.setattr(oserrors, "free_bytes", lambda path: need)
    require_training_space(tmp_path / "models" / "dbp", "dbprune-tiny", "training on the dbp subset", runs=2)


def test_export_need_is_each_shards_kept_fraction_of_its_tar(tmp_path: Path) -> None:
    from dbprune_assets.core.method.stages import export_bytes

    layout = Layout(tmp_path / "home", tmp_path / "pool")
    layout.pool.mkdir(parents=True)
    (layout.pool / "00000.tar").write_bytes(b"x" * 1000)
    (layout.pool / "00001.tar").write_bytes(b"x" * 3000)
    rows = [("dbp", f"u{i}", "00000", i == 0, "kept" if i == 0 else "pruned") for i in range(4)]
    rows += [("dbp", f"v{i}", "00001", i < 2, "kept" if i < 2 else "pruned") for i in range(3)]
    decisions = layout.table("decisions", "dbp")
    decisions.parent.mkdir(parents=True)
    schema = arrow_schema("decisions")
    pq.write_table(pa.Table.from_pylist([dict(zip(schema.names, r)) for r in rows], schema=schema), decisions)
    assert export_bytes(layout, decisions) == 1000 // 4 + 3000 * 2 // 3
