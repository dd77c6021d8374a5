"""A bad shard or a killed run costs nothing.

* damaged pools run to the end, with exact accounting of every parquet row;
* ``dbprune run`` killed with SIGKILL at six points (one between a write and its
  rename) and started again ends with the decisions of an uninterrupted run;
* a forced re-run replaces files and rows, also when killed half-way;
* parallel processes refresh and query the DuckDB catalog, and ingest shards
  in parallel runs, without a lock error;
* bad settings fail before any Dagster run is created, naming the setting and
  what is allowed.

Each test builds its input in a temp folder; the pipeline runs through
``*pruned_subset`` (no training) with an encoder trained once per session.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dbprune_assets.core.store.catalog import query
from dbprune_assets.core.store.layout import Layout
from dbprune_assets.core.settings import STRATEGIES, load_settings

from . import faultkit as fk
from .conftest import run_cli, write_config

pytestmark = pytest.mark.slow

SELECT = "*pruned_subset"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = fk.fast_tmp(tmp_path_factory, "faults")
    yield d
    fk.drop_fast_tmp(d)


@pytest.fixture(scope="module")
def config(work: Path, tmp_path_factory) -> Path:
    return fk.config_with_encoder(work / "tiny.yaml", fk.shared_encoder(tmp_path_factory))


@pytest.fixture(scope="module")
def clean(work: Path, config: Path) -> SimpleNamespace:
    """The uninterrupted run every crash test compares with."""
    pool = fk.write_pool(work / "pool")
    home = work / "clean"
    r = run_cli("run", "--config", str(config), "--select", SELECT, env=fk.env_for(home, pool))
    assert r.returncode == 0, r.stdout + r.stderr
    digest, rows = fk.decisions_digest(home)
    n_samples = sum(int(json.loads(p.read_text())["summary"]["rows"]) for p in (home / "state" / "raw_metadata").glob("*.json"))
    assert rows == len(STRATEGIES) * n_samples
    return SimpleNamespace(home=home, pool=pool, digest=digest, rows=rows, samples=n_samples)


def _rows(layout: Layout, sql: str) -> list[dict]:
    return query(layout, sql).to_pylist()


# ---------------------------------------------------------------------------
# 1. damaged pools
# ---------------------------------------------------------------------------
def test_damaged_pool_runs_to_the_end_with_exact_accounting(work: Path, config: Path) -> None:
    pool = fk.write_pool(work / "damaged", shards=5, samples_per_shard=40)
    dmg = fk.damage_pool(pool)
    home = work / "damaged-home"
    r = run_cli("run", "--config", str(config), "--select", SELECT, env=fk.env_for(home, pool))
    assert r.returncode == 0, r.stdout + r.stderr
    layout = Layout(home, pool)

    # every parquet row is exactly one samples row, with the status its damage implies
    samples = _rows(layout, "SELECT shard, key, status FROM samples")
    assert len(samples) == len(dmg.expected_status) == 4 * 40  # 00002 has zero rows
    assert {(s["shard"], s["key"]): s["status"] for s in samples} == dmg.expected_status
    counts = {(c["shard"], c["status"]): c["n"] for c in _rows(layout, "SELECT shard, status, count(*) n FROM samples GROUP BY ALL")}
    for shard in ("00000", "00001", "00003", "00004"):
        assert {st: n for (sh, st), n in counts.items() if sh == shard} == dmg.status_counts(shard), shard
    assert not any(sh == "00002" for sh, _ in counts)
    totals = dmg.status_counts()
    assert set(totals) == {"ok", "failed_download", "undecodable", "missing_in_tar", "empty_caption", "truncated_tar"}
    assert totals["missing_in_tar"] == dmg.status_counts("00001")["missing_in_tar"] + 2  # tar gone + 2 keys in 00003
    assert dmg.status_counts("00003").get("empty_caption", 0) >= 2 and dmg.status_counts("00003")["undecodable"] >= 2
    assert "000039999" not in {s["key"] for s in samples}  # the tar member without a parquet row

    # problems: one row per damaged key (shard, key, cause) and one per damaged tar
    problems = _rows(layout, "SELECT shard, key, stage, cause FROM problems")
    assert {p["stage"] for p in problems} == {"ingest"}
    keyed: dict[tuple[str, str], list[str]] = {}
    for p in problems:
        if p["key"] is not None:
            keyed.setdefault((p["shard"], p["key"]), []).append(p["cause"])
    assert set(keyed) == set(dmg.problem_keys)
    for k, word in dmg.problem_keys.items():
        assert len(keyed[k]) == 1 and word in keyed[k][0], (k, keyed[k])
    shard_level = sorted((p["shard"], p["cause"]) for p in problems if p["key"] is None)
    assert [s for s, _ in shard_level] == ["00000", "00001"]
    for shard, cause in shard_level:
        assert dmg.shard_problems[shard] in cause and f"{shard}.tar" in cause
    assert len(problems) == len(dmg.problem_keys) + 2

    # ... and per shard in the UI: raw_metadata's metadata table has each shard with its problem count
    per_shard_problems = {p["shard"]: 0 for p in problems}
    for p in problems:
        per_shard_problems[p["shard"]] += 1
    table = _ui_shard_table(home)
    assert set(table) == {"00000", "00001", "00002", "00003", "00004"}
    for shard, row in table.items():
        assert int(row["problems"]) == per_shard_problems.get(shard, 0), shard
        assert int(row["rows"]) == sum(n for (sh, _), n in counts.items() if sh == shard)

    # decisions: one per sample per strategy, corrupt exactly where the sample is not ok
    n_ok, n_bad = totals["ok"], sum(totals.values()) - totals["ok"]
    dup = _rows(layout, "SELECT count(DISTINCT (shard, uid)) n FROM duplicates")[0]["n"]
    cand = _rows(layout, "SELECT count(*) n FROM assignments")[0]["n"]
    M = math.floor(load_settings(config).dbp.keep_fraction * cand)
    survivors = n_ok - dup
    assert 0 < M < cand < survivors <= n_ok
    sized = {"corrupt": n_bad, "duplicate": dup, "low_clip_score": survivors - cand, "pruned": cand - M, "kept": M}
    expected = {s: sized for s in ("dbp", "ssp", "random", "clip_score", "balanced_kmeans")}
    expected["semdedup"] = {"corrupt": n_bad, "duplicate": dup, "low_clip_score": survivors - cand, "kept": cand}
    expected["full"] = {"corrupt": n_bad, "kept": n_ok}
    got: dict[str, dict[str, int]] = {}
    for row in _rows(layout, "SELECT strategy, reason, count(*) n FROM decisions GROUP BY ALL"):
        got.setdefault(row["strategy"], {})[row["reason"]] = row["n"]
    # negclip and datacomp_image select from the dedup survivors, below the CLIP filter too (datacomp_image
    # keeps at most M: those in a target cluster)
    for s, most in (("negclip", M), ("datacomp_image", M)):
        mine = got.pop(s)
        assert (mine["corrupt"], mine["duplicate"]) == (n_bad, dup), s
        assert 0 < mine["kept"] <= most and (s != "negclip" or mine["kept"] == M), s
        assert mine.get("low_clip_score", 0) + mine.get("pruned", 0) + mine["kept"] == survivors, s
    assert got == {s: {k: v for k, v in e.items() if v} for s, e in expected.items()}
    one_each = _rows(layout, """
        SELECT d.strategy, count(*) n, count(DISTINCT (d.shard, d.uid)) distinct_n,
               count(*) FILTER (WHERE (s.status <> 'ok') <> (d.reason = 'corrupt')) wrong_corrupt,
               count(*) FILTER (WHERE s.status <> 'ok' AND d.keep) kept_bad
        FROM decisions d JOIN samples s ON s.shard = d.shard AND s.uid = d.uid GROUP BY 1""")
    assert {r["strategy"]: (r["n"], r["distinct_n"], r["wrong_corrupt"], r["kept_bad"]) for r in one_each} == {
        s: (len(samples), len(samples), 0, 0) for s in STRATEGIES}

    # the export holds exactly the kept samples, read from the damaged tars
    sizes = json.loads((home / "subsets" / "full" / "sizes.json").read_text())
    assert sum(sizes.values()) == n_ok == len(np.load(home / "subsets" / "full" / "uids.npy"))


def _ui_shard_table(home: Path) -> dict[str, dict[str, str]]:
    """The per-shard markdown table of raw_metadata's latest materialisations (the UI's view)."""
    import dagster as dg
    from dagster._core.instance.ref import InstanceRef

    instance = dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home / "dagster")))
    try:
        records = instance.fetch_materializations(dg.AssetKey("raw_metadata"), limit=50).records
        md = records[0].asset_materialization.metadata["step_shards"].value  # type: ignore[union-attr]
    finally:
        instance.dispose()
    lines = [line for line in md.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
    return {r["shard"]: r for r in rows}


# ---------------------------------------------------------------------------
# 2. kill and resume
# ---------------------------------------------------------------------------
#: (DBPRUNE_FAULT, files that exist after the kill, files that do not) — paths relative to $DBPRUNE_HOME
KILL_POINTS = [
    # ingest, mid-shard: 00000's samples renamed into place, its problems written but not renamed
    ("rename:*/tables/problems/00000.parquet", ["tables/samples/00000.parquet"],
     ["tables/problems/00000.parquet", "state/raw_metadata/00000.json"]),
    # embeddings: between the write of 00001's image embeddings and their rename
    ("rename:*/embeddings/img_emb/00001.npy", ["state/embeddings/00000.json"],
     ["embeddings/img_emb/00001.npy", "embeddings/metadata/00001.parquet", "state/embeddings/00001.json"]),
    # SemDeDup's k-means: outputs in place, the commit marker written but not renamed
    ("rename:*/state/dedup_centroids/all.json", ["tables/dedup_centroids/all.parquet"], ["state/dedup_centroids/all.json"]),
    # mid-semdedup: duplicates in place, killed inside the catalog's view transaction, before the marker
    ("catalog:*", ["tables/duplicates/all.parquet"], ["state/semantic_dedup/all.json"]),
    # mid-decisions: dbp and ssp decided, random's decisions written but not renamed
    ("rename:*/tables/decisions/random.parquet", ["state/pruned_subset/ssp.json", "tables/decisions/ssp.parquet"],
     ["tables/decisions/random.parquet", "state/pruned_subset/random.json"]),
    # mid-export: clip_score's decisions in place, its exported folder complete but not renamed
    ("rename:*/subsets/clip_score", ["tables/decisions/clip_score.parquet"],
     ["subsets/clip_score", "state/pruned_subset/clip_score.json"]),
]


def test_kill_at_six_points_then_resume_gives_the_uninterrupted_decisions(clean, work: Path, config: Path) -> None:
    home = work / "killed"
    env = fk.env_for(home, clean.pool)
    for fault, present, absent in KILL_POINTS:
        r = run_cli("run", "--config", str(config), "--select", SELECT, env={**env, "DBPRUNE_FAULT": fault})
        assert r.returncode == -signal.SIGKILL, f"{fault}: rc {r.returncode}\n{r.stdout[-3000:]}{r.stderr[-3000:]}"
        for rel in present:
            assert (home / rel).exists(), f"{fault}: {rel} should exist"
        for rel in absent:
            assert not (home / rel).exists(), f"{fault}: {rel} should not exist"
        if fault.startswith("rename:"):  # the written temp is left behind by the killed process
            assert fk.tmp_leftovers(home), fault
        statuses = _run_statuses(home)
        assert statuses.get("STARTED", 0) == 1, (fault, statuses)  # the killed run, left "started"
        assert _rows(Layout(home, clean.pool), "SELECT count(*) n FROM samples")[0]["n"] >= 0  # catalog opens

    r = run_cli("run", "--config", str(config), "--select", SELECT, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "marked it failed" in r.stdout  # the last killed run, no longer shown as running
    assert fk.decisions_digest(home) == (clean.digest, clean.rows)
    assert _run_statuses(home).get("STARTED", 0) == 0
    assert _run_statuses(home)["FAILURE"] == len(KILL_POINTS)
    assert fk.tmp_leftovers(home) == []  # the killed processes' temp folders were cleaned
    layout = Layout(home, clean.pool)
    assert _rows(layout, "SELECT count(*) n, count(DISTINCT (shard, key)) k FROM samples")[0] == {
        "n": clean.samples, "k": clean.samples}
    assert _rows(layout, "SELECT count(*) n FROM decisions")[0]["n"] == clean.rows
    for strategy in STRATEGIES:
        assert (home / "subsets" / strategy / "sizes.json").is_file()


def _run_statuses(home: Path) -> dict[str, int]:
    import sqlite3

    con = sqlite3.connect(home / "dagster" / "history" / "runs.db")
    try:
        return dict(con.execute("SELECT status, count(*) FROM runs GROUP BY status").fetchall())
    finally:
        con.close()


# ---------------------------------------------------------------------------
# 3. idempotence
# ---------------------------------------------------------------------------
def test_forced_rerun_replaces_files_and_rows_also_when_killed_mid_swap(clean, work: Path, config: Path) -> None:
    home = work / "forced"
    shutil.copytree(clean.home, home)
    env = fk.env_for(home, clean.pool)
    samples_before = sorted(p.name for p in (home / "tables" / "samples").iterdir())

    # re-ingesting replaces the shard files and rows; same inputs, same version: nothing downstream reruns
    r = run_cli("run", "--config", str(config), "--select", "raw_metadata", "--force", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in (home / "tables" / "samples").iterdir()) == samples_before
    layout = Layout(home, clean.pool)
    assert _rows(layout, "SELECT count(*) n, count(DISTINCT (shard, key)) k FROM samples")[0] == {
        "n": clean.samples, "k": clean.samples}

    # a forced re-run of the decisions killed while subsets/ssp is swapped (old moved out, new not in)
    r = run_cli("run", "--config", str(config), "--select", "pruned_subset", "--force",
                env={**env, "DBPRUNE_FAULT": "swap:*/subsets/ssp"})
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    assert not (home / "subsets" / "ssp").exists()
    assert not (home / "state" / "pruned_subset" / "ssp.json").exists()  # markers dropped before the redo

    # a plain run redoes the strategies the killed run had not committed (dbp it had: it ran first);
    # nothing is duplicated, nothing differs
    r = run_cli("run", "--config", str(config), "--select", SELECT, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"pruned_subset [{len(STRATEGIES) - 1} of {len(STRATEGIES)} partitions]" in r.stdout
    assert "✓ raw_metadata: up to date" in r.stdout
    assert "✓ embeddings: up to date" in r.stdout, r.stdout
    assert fk.decisions_digest(home) == (clean.digest, clean.rows)
    assert sorted(p.name for p in (home / "tables" / "decisions").iterdir()) == sorted(f"{s}.parquet" for s in STRATEGIES)
    for strategy in STRATEGIES:
        a = json.loads((home / "subsets" / strategy / "sizes.json").read_text())
        assert a == json.loads((clean.home / "subsets" / strategy / "sizes.json").read_text()), strategy
    assert fk.tmp_leftovers(home) == []


# ---------------------------------------------------------------------------
# 4. concurrency
# ---------------------------------------------------------------------------
_CATALOG_WORKER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from dbprune_assets.core.store import catalog
    from dbprune_assets.core.store.layout import Layout

    role, home, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    layout = Layout(home, home / "pool")
    if role == "holder":  # a long writer: holds the read-write lock for a while
        import duckdb
        con = duckdb.connect(str(layout.catalog))
        (home / "held").write_text("1")
        time.sleep(2.0)
        con.close()
        print(json.dumps({"role": role}))
        sys.exit(0)
    waits = 0
    real_sleep = catalog.time.sleep
    def counting_sleep(s):
        global waits
        waits += 1
        real_sleep(s)
    catalog.time.sleep = counting_sleep
    results = set()
    for i in range(n):
        if role == "writer":
            catalog.refresh_catalog(layout, timeout_s=60)
        row = catalog.query(layout, "SELECT (SELECT count(*) FROM samples), (SELECT count(*) FROM decisions)", timeout_s=60)
        results.add(tuple(v[0].as_py() for v in row.columns))
    print(json.dumps({"role": role, "waits": waits, "results": sorted(results)}))
""")


def test_parallel_processes_refresh_and_query_the_catalog_without_lock_errors(clean, work: Path) -> None:
    home = work / "concurrent"
    shutil.copytree(clean.home, home)
    from dbprune_assets.core.store.catalog import refresh_catalog

    refresh_catalog(Layout(home, clean.pool))  # views over this copy's files
    script = work / "catalog_worker.py"
    script.write_text(_CATALOG_WORKER)

    def spawn(role: str, n: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script), role, str(home), str(n)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    holder = spawn("holder", 0)
    for _ in range(200):  # wait until it holds the lock
        if (home / "held").exists():
            break
        holder.poll()
        assert holder.returncode is None, holder.stderr.read()  # type: ignore[union-attr]
        time.sleep(0.05)
    procs = [spawn("writer", 15), spawn("writer", 15), spawn("reader", 30), spawn("reader", 30)]
    outs = []
    for p in [holder, *procs]:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    workers = [o for o in outs if o["role"] != "holder"]
    # every process waited on the lock at least once (the holder saw to it) and never failed
    assert all(o["waits"] >= 1 for o in workers), workers
    # and every query, during and after the refreshes, saw the same complete tables
    assert all(o["results"] == [[clean.samples, clean.rows]] for o in workers), workers


_INGEST_WORKER = textwrap.dedent("""
    import sys
    import dagster as dg
    from dbprune_assets.core.store.layout import Layout
    from dbprune_assets.definitions import defs
    from dbprune_assets.runner import dagster_instance

    shard = sys.argv[1]
    instance = dagster_instance(Layout.from_env())
    job = defs.resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("raw_metadata")],
                                    partition_key=shard, raise_on_error=False)
    print("ok" if result.success else "failed")
    sys.exit(0 if result.success else 1)
""")


def test_parallel_runs_of_shard_partitions_share_instance_and_catalog(clean, work: Path, config: Path) -> None:
    """Two runs of a backfill (one shard each) at once, in two processes, against the
    same Dagster instance and catalog, while a third process queries the catalog."""
    home = work / "parallel"
    env = {**os.environ, **fk.env_for(home, clean.pool)}
    env.pop("DAGSTER_HOME", None)
    home.mkdir()
    shutil.copy(config, home / "config.yaml")  # the settings the assets read
    # register the partitions (as `dbprune run` or the sensor does), then ingest both shards at once
    reg = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        from dbprune_assets.core.store.layout import Layout
        from dbprune_assets.definitions import defs
        from dbprune_assets.defs.common import graph_nodes
        from dbprune_assets.defs.ingest import sync_shard_partitions
        from dbprune_assets.runner import dagster_instance
        layout = Layout.from_env()
        print(sync_shard_partitions(dagster_instance(layout), layout, graph_nodes(defs.resolve_asset_graph())))
    """)], env=env, capture_output=True, text=True)
    assert reg.returncode == 0, reg.stderr
    script = work / "ingest_worker.py"
    script.write_text(_INGEST_WORKER)
    shards = ["00000", "00001"]
    procs = [subprocess.Popen([sys.executable, str(script), s], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for s in shards]
    reader = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        from dbprune_assets.core.store.catalog import query
        from dbprune_assets.core.store.layout import Layout
        layout = Layout.from_env()
        seen = set()
        for _ in range(40):
            seen.add(query(layout, "SELECT count(*) FROM samples").columns[0][0].as_py())
        print(sorted(seen))
    """)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for p in [*procs, reader]:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, out + err
        assert "Lock" not in err and "locked" not in err, err
    # the reader only ever saw whole shards: 0, one shard, or both
    per_shard = clean.samples // 2
    assert set(json.loads(out.strip())) <= {0, per_shard, clean.samples}
    layout = Layout(home, clean.pool)
    assert _rows(layout, "SELECT shard, count(*) n FROM samples GROUP BY 1 ORDER BY 1") == [
        {"shard": s, "n": per_shard} for s in shards]
    assert sorted(p.name for p in (home / "state" / "raw_metadata").iterdir()) == [f"{s}.json" for s in shards]
    statuses = _run_statuses(home)
    assert statuses == {"SUCCESS": 2}


# ---------------------------------------------------------------------------
# 6. settings errors
# ---------------------------------------------------------------------------
BAD_SETTINGS = [
    ({"selection": {"strategies": ["dbp", "magic"]}},
     ["selection.strategies", "unknown strategy ['magic']", "allowed: dbp, ssp, random, clip_score, semdedup, full"]),
    ({"dbp": {"k": 0}}, ["dbp.k", "allowed: dbp.k > 0"]),
    ({"dbp": {"k": -3}}, ["dbp.k", "allowed: dbp.k > 0"]),
    ({"dbp": {"tau": 0}}, ["dbp.tau", "allowed: dbp.tau > 0"]),
    ({"dbp": {"tau": -0.1}}, ["dbp.tau", "allowed: dbp.tau > 0"]),
    ({"dbp": {"keep_fraction": 0}}, ["dbp.keep_fraction", "0 < dbp.keep_fraction ≤ 1"]),
    ({"dbp": {"keep_fraction": 1.5}}, ["dbp.keep_fraction", "0 < dbp.keep_fraction ≤ 1"]),
    ({"encoder": {"cluster_encoder": {"model": "dbprune-tiny", "pretrained": "{missing}/ckpt.pt"}}},
     ["encoder.cluster_encoder.pretrained", "does not exist", "an open_clip pretrained tag, or model: bootstrap"]),
    ({"encoder": {"score_encoder": {"model": "local-dir:{missing}/encoder"}}},
     ["encoder.score_encoder.model", "not an open_clip folder", "hf-hub: id, or model: bootstrap"]),
]


@pytest.mark.parametrize("overrides, expected", BAD_SETTINGS, ids=[
    "unknown-strategy", "k-zero", "k-negative", "tau-zero", "tau-negative", "keep-fraction-zero",
    "keep-fraction-above-one", "missing-checkpoint", "missing-encoder-folder"])
def test_bad_settings_fail_before_any_run(overrides, expected, clean, work: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(clean.home / "dagster", home / "dagster")  # an instance that has runs already
    runs_before = fk.runs_in_db(home)
    assert runs_before > 0
    over = json.loads(json.dumps(overrides).replace("{missing}", str(tmp_path / "missing")))
    bad = write_config(tmp_path / "bad.yaml", **over)
    r = run_cli("run", "--config", str(bad), "--select", SELECT, env=fk.env_for(home, clean.pool))
    assert r.returncode == 2, r.stdout + r.stderr
    for text in expected:
        assert text in r.stderr, (text, r.stderr)
    assert fk.runs_in_db(home) == runs_before  # no Dagster run was created
    assert not (home / "config.yaml").exists() and not (home / "state").exists()
