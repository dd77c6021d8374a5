"""Changing the pool after a full run.

* Adding a shard: the sensor registers and ingests it, then re-materialises
  ``pool_manifest``, after which Dagster itself reports every global asset
  stale (they all depend on the manifest) — also with more than 100 shards,
  where Dagster stops tracking staleness across the ``raw_metadata`` edge; a
  ``dbprune run`` keeps the k-means fits (assigning only the new shard to
  SemDeDup's clusters), redoes the global steps, and every table holds the
  new shard.
* Removing a shard removes its partition, files and rows.
* Replacing the encoder checkpoint in place with one of another embedding
  dimension re-embeds every shard (the encoder's data version changed),
  rather than mixing dimensions.

Runs are in process (``runner.run_pipeline``), the sensor is evaluated with
``build_sensor_context`` and its run requests executed as the daemon would.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import numpy as np
import pytest

from dbprune_assets.core.store.catalog import query
from dbprune_assets.core.store.layout import Layout, list_pool_shards
from dbprune_assets.core.settings import STRATEGIES, load_settings

from . import faultkit as fk
from .faultkit import decisions_digest

pytestmark = pytest.mark.slow

SELECT = "*pruned_subset"
#: the global assets that read the manifest directly, so Dagster marks them stale when it changes
MANIFEST_CHILDREN = ["dedup_centroids", "semantic_dedup", "candidates", "centroids", "cluster_complexity",
                     *(f"pruned_subset[{s}]" for s in STRATEGIES)]
SHARD_ASSETS = ["raw_metadata", "embeddings", "dedup_assignments", "cluster_assignments"]


class Env:
    """An in-process $DBPRUNE_HOME: runs, sensor ticks and Dagster's staleness."""

    def __init__(self, mp: pytest.MonkeyPatch, home: Path, pool: Path, config: Path):
        self.mp, self.home, self.pool, self.config = mp, home, pool, config
        self.layout = Layout(home, pool)

    def activate(self) -> None:
        self.mp.setenv("DBPRUNE_HOME", str(self.home))
        self.mp.setenv("DBPRUNE_POOL", str(self.pool))
        self.mp.setenv("DAGSTER_HOME", str(self.home / "dagster"))
        self.mp.delenv("DBPRUNE_FAULT", raising=False)

    def instance(self) -> dg.DagsterInstance:
        from dbprune_assets.runner import dagster_instance

        self.activate()
        return dagster_instance(self.layout)

    def run(self, select: str = SELECT) -> dict[str, list[str]]:
        """`dbprune run --select`: the partitions each asset ran."""
        from dbprune_assets.core.store.atomic import write_bytes
        from dbprune_assets.runner import run_pipeline

        self.activate()
        settings = load_settings(self.config)
        self.home.mkdir(parents=True, exist_ok=True)
        write_bytes(self.layout.config_file, settings.to_yaml().encode(), self.layout.tmp)
        report = run_pipeline(self.layout, settings, select=select, echo=lambda m: None, log_level="ERROR")
        assert report.ok, report.failure
        return {a: (g.partitions if a in g.ran else []) for g in report.groups for a in g.assets}

    def sensor_tick(self) -> list[dg.RunRequest]:
        """One tick of pool_shards_sensor, applied as the daemon does."""
        return fk.tick_pool_sensor(self.instance())

    def status(self, names: list[str]) -> dict[str, str]:
        """Dagster's staleness (what the UI shows) of ``asset`` or ``asset[partition]``."""
        from dbprune_assets.definitions import defs

        instance = self.instance()
        out = {}
        for name in names:
            asset, _, part = name.partition("[")
            out[name] = fk.stale_status(instance, defs, asset, part.rstrip("]") or None)
        return out

    def rows(self, sql: str) -> list[dict]:
        return query(self.layout, sql).to_pylist()


def _hide(pool: Path, shard: str, aside: Path) -> None:
    aside.mkdir(exist_ok=True)
    for ext in ("parquet", "tar"):
        (pool / f"{shard}.{ext}").rename(aside / f"{shard}.{ext}")


def _restore(pool: Path, shard: str, aside: Path) -> None:
    for ext in ("parquet", "tar"):
        (aside / f"{shard}.{ext}").rename(pool / f"{shard}.{ext}")


def _requests(reqs: list[dg.RunRequest]) -> list[tuple[list[str], str | None]]:
    return [([k.to_user_string() for k in (r.asset_selection or [])], r.partition_key) for r in reqs]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = fk.fast_tmp(tmp_path_factory, "pool-changes")
    mp = pytest.MonkeyPatch()
    yield SimpleNamespace(dir=d, mp=mp, encoder=fk.shared_encoder(tmp_path_factory))
    mp.undo()
    fk.drop_fast_tmp(d)


@pytest.fixture(scope="module")
def small(work) -> SimpleNamespace:
    """Three shards: a full run over two, then 00002 added, then 00001 removed,
    then the encoder checkpoint replaced in place; observations at each step."""
    encoder = work.dir / "encoder"  # this module's own copy: it is replaced in place below
    shutil.copytree(work.encoder, encoder)
    pool = fk.write_pool(work.dir / "pool3", shards=3)
    aside = work.dir / "aside3"
    _hide(pool, "00002", aside)
    env = Env(work.mp, work.dir / "home3", pool, fk.config_with_encoder(work.dir / "tiny3.yaml", encoder))
    obs = SimpleNamespace(env=env)
    obs.first = env.run()
    obs.runs_first = env.rows("SELECT * FROM decision_runs")

    # a shard appears: the sensor registers and ingests it ...
    _restore(pool, "00002", aside)
    obs.tick_add = _requests(env.sensor_tick())
    obs.after_ingest = env.status(["pool_manifest", *MANIFEST_CHILDREN, *(f"{a}[00002]" for a in SHARD_ASSETS)])
    # ... and on its next tick, every shard being ingested, refreshes the manifest
    obs.tick_manifest = _requests(env.sensor_tick())
    obs.after_manifest = env.status(["pool_manifest", *MANIFEST_CHILDREN, *(f"{a}[00002]" for a in SHARD_ASSETS[1:])])
    obs.tick_idle = _requests(env.sensor_tick())
    # dbprune run brings everything up to date
    obs.rerun = env.run()
    obs.after_rerun = env.status(["pool_manifest", *MANIFEST_CHILDREN, *(f"{a}[{s}]" for a in SHARD_ASSETS for s in ("00000", "00001", "00002"))])
    obs.tables_after_add = {
        t: {r["shard"]: r["n"] for r in env.rows(f"SELECT shard, count(*) n FROM {t} GROUP BY 1")}
        for t in ("samples", "scores", "assignments", "decisions")}
    obs.decisions_per_strategy = {r["strategy"]: r["n"] for r in env.rows("SELECT strategy, count(*) n FROM decisions GROUP BY 1")}
    obs.uids_00001 = {r["uid"] for r in env.rows("SELECT uid FROM samples WHERE shard = '00001'")}
    obs.runs_after_add = env.rows("SELECT * FROM decision_runs")
    obs.full_provenance = env.rows("SELECT shard, run_id, fit_id, count(*) n FROM decisions "
                                   "WHERE strategy = 'full' GROUP BY ALL ORDER BY 1")
    obs.moves_after_add = env.rows("SELECT * FROM quota_moves")
    obs.keys = {r["shard"]: r["n"] for r in env.rows("SELECT shard, count(DISTINCT uid) n FROM samples GROUP BY 1")}

    # a shard disappears
    (pool / "00001.parquet").unlink()
    (pool / "00001.tar").unlink()
    obs.tick_remove = _requests(env.sensor_tick())
    obs.partitions_after_remove_tick = sorted(env.instance().get_dynamic_partitions("shards"))
    obs.after_remove_tick = env.status(MANIFEST_CHILDREN)
    obs.rerun_remove = env.run()
    obs.runs_after_remove = env.rows("SELECT * FROM decision_runs")

    # the encoder checkpoint is replaced in place by one with another embedding dimension
    obs.dims_before = {s: np.load(env.layout.img_emb(s), mmap_mode="r").shape[1] for s in ("00000", "00002")}
    fk.narrow_encoder(work.encoder, encoder, 32)
    obs.rerun_encoder = env.run()
    obs.dims_after = {s: np.load(env.layout.img_emb(s), mmap_mode="r").shape[1] for s in ("00000", "00002")}
    return obs


def test_a_new_shard_turns_pool_manifest_and_every_global_asset_stale(small) -> None:
    assert small.tick_add == [(["raw_metadata"], "00002")]
    # Dagster tracks the raw_metadata -> pool_manifest edge below 100 shards; the new
    # shard's downstream partitions do not exist yet
    assert small.after_ingest == {"pool_manifest": "STALE", **{a: "FRESH" for a in MANIFEST_CHILDREN},
                                  "raw_metadata[00002]": "FRESH", **{f"{a}[00002]": "MISSING" for a in SHARD_ASSETS[1:]}}
    assert small.tick_manifest == [(["pool_manifest"], None)]
    assert small.after_manifest == {"pool_manifest": "FRESH", **{a: "STALE" for a in MANIFEST_CHILDREN},
                                    **{f"{a}[00002]": "MISSING" for a in SHARD_ASSETS[1:]}}
    assert small.tick_idle == []  # the manifest is current: nothing more to request


def test_a_rerun_after_adding_a_shard_keeps_the_fits_and_redoes_the_global_steps(small) -> None:
    """The k-means fits are kept (refit: auto, no drift: core/method/fitrecord.py):
    re-committed unchanged, so only the new shard is assigned to SemDeDup's
    clusters; the global steps and everything after the candidates are redone."""
    assert small.first["raw_metadata"] == small.first["embeddings"] == ["00000", "00001"]
    ran = small.rerun
    assert ran["encoder"] == []  # beside the stale pool_manifest in its group, but not retrained
    assert ran["raw_metadata"] == []  # the sensor ingested 00002
    assert ran["embeddings"] == ["00002"]  # the old shards' embeddings are kept
    assert ran["pool_manifest"] == []  # the sensor refreshed it
    for asset in ("dedup_centroids", "semantic_dedup", "candidates", "centroids", "cluster_complexity"):
        assert ran[asset] == ["all"], asset
    assert ran["dedup_assignments"] == ["00002"]  # the old shards' assignments to the kept fit stay
    assert ran["cluster_assignments"] == ["00000", "00001", "00002"]  # the candidates changed
    assert ran["pruned_subset"] == list(STRATEGIES)
    assert set(small.after_rerun.values()) == {"FRESH"}, small.after_rerun
    rows = small.tables_after_add
    assert rows["samples"] == {"00000": 80, "00001": 80, "00002": 80}
    assert set(rows["scores"]) == set(rows["assignments"]) == {"00000", "00001", "00002"}
    assert rows["decisions"] == {s: 80 * len(STRATEGIES) for s in ("00000", "00001", "00002")}
    assert small.decisions_per_strategy == {s: 240 for s in STRATEGIES}


def test_removing_a_shard_removes_its_partition_files_and_rows(small) -> None:
    env = small.env
    assert small.tick_remove == [(["pool_manifest"], None)]  # partition dropped, manifest refreshed
    assert small.partitions_after_remove_tick == ["00000", "00002"]
    assert set(small.after_remove_tick.values()) == {"STALE"}
    ran = small.rerun_remove
    assert ran["raw_metadata"] == ran["embeddings"] == []
    assert ran["dedup_assignments"] == []  # the kept fit: the remaining shards' assignments stand
    assert ran["cluster_assignments"] == ["00000", "00002"]
    assert ran["pruned_subset"] == list(STRATEGIES)
    # no file, commit marker or row of 00001 is left (exported subsets are re-sharded: their NNNNN are not pool shards)
    left = [str(p.relative_to(env.home)) for p in env.home.rglob("*00001*")
            if p.relative_to(env.home).parts[0] not in ("subsets", "dagster")]
    assert left == []
    for table in ("samples", "problems", "scores", "duplicates", "assignments", "decisions"):
        assert env.rows(f"SELECT count(*) n FROM {table} WHERE shard = '00001'") == [{"n": 0}], table
    assert env.rows("SELECT strategy, count(*) n FROM decisions GROUP BY 1 ORDER BY 1") == [
        {"strategy": s, "n": 160} for s in sorted(STRATEGIES)]
    manifest = env.rows("SELECT count(*) n FROM read_parquet('%s')" % env.layout.table("pool_manifest"))
    assert manifest == [{"n": 2}]
    kept = {r["uid"] for r in env.rows("SELECT uid FROM decisions WHERE keep")}
    assert kept and not (kept & small.uids_00001)
    full = json.loads((env.home / "subsets" / "full" / "sizes.json").read_text())
    assert sum(full.values()) == env.rows("SELECT count(*) n FROM samples WHERE status = 'ok'")[0]["n"]


def test_the_catalog_shows_what_each_run_added_removed_and_redecided(small) -> None:
    """decision_runs: a row per run and strategy; decisions name the run that
    last changed them (full's rows of the first shards: the first run's) and
    the fits; quota_moves: the DBP clusters whose quota moved as the pool grew."""
    keys = small.keys

    def new_rows(before: list[dict], after: list[dict]) -> dict[str, dict]:
        seen = {(r["run_id"], r["strategy"]) for r in before}
        fresh = [r for r in after if (r["run_id"], r["strategy"]) not in seen]
        assert len({r["run_id"] for r in fresh}) == 1, fresh
        return {r["strategy"]: r for r in fresh}

    first = {r["strategy"]: r for r in small.runs_first}
    assert set(first) == set(STRATEGIES)
    for r in first.values():
        assert (r["added"], r["removed"], r["redecided"]) == (keys["00000"] + keys["00001"], 0, 0)
        assert r["fit_id"].startswith("semdedup ") and " dbp " in r["fit_id"]
    added = new_rows(small.runs_first, small.runs_after_add)
    assert set(added) == set(STRATEGIES)
    for r in added.values():
        assert (r["added"], r["removed"]) == (keys["00002"], 0)
        assert r["samples"] == sum(keys.values()) and r["redecided"] == r["newly_kept"] + r["newly_pruned"]
    assert added["full"]["redecided"] == 0 and added["full"]["kept"] > first["full"]["kept"]  # full keeps what it kept
    removed = new_rows(small.runs_after_add, small.runs_after_remove)
    for r in removed.values():
        assert (r["added"], r["removed"]) == (0, keys["00001"])
    first_run = next(iter(first.values()))["run_id"]
    add_run = next(iter(added.values()))["run_id"]
    assert [(r["shard"], r["run_id"]) for r in small.full_provenance] == [
        ("00000", first_run), ("00001", first_run), ("00002", add_run)]
    moves = [m for m in small.moves_after_add if m["run_id"] == add_run]
    assert moves and {m["strategy"] for m in moves} <= {"dbp", "ssp"}
    for m in moves:
        assert m["quota"] != m["quota_before"] or m["kept"] != m["kept_before"]
        assert m["move"] == (m["quota"] or 0) - (m["quota_before"] or 0)


def test_replacing_the_encoder_checkpoint_in_place_re_embeds_every_shard(small) -> None:
    """An embedding dimension that no longer matches the stored embeddings is not
    an error: the encoder's files changed, so its data version did, and every
    shard is embedded again with the new dimension (nothing mixes 64 and 32)."""
    assert small.dims_before == {"00000": 64, "00002": 64}
    ran = small.rerun_encoder
    assert ran["encoder"] == ["all"]
    assert ran["raw_metadata"] == [] and ran["embeddings"] == ["00000", "00002"]
    assert ran["pruned_subset"] == list(STRATEGIES)
    assert small.dims_after == {"00000": 32, "00002": 32}
    rows = small.env.rows("SELECT strategy, count(*) n, count(DISTINCT (shard, uid)) d FROM decisions GROUP BY 1")
    assert {r["strategy"]: (r["n"], r["d"]) for r in rows} == {s: (160, 160) for s in STRATEGIES}


def test_over_100_shards_the_manifest_carries_staleness(work) -> None:
    """With 101 shards Dagster no longer tracks raw_metadata -> pool_manifest; the
    sensor's manifest refresh is what turns every global asset stale."""
    pool = fk.write_pool(work.dir / "pool102", shards=102, samples_per_shard=4)
    aside = work.dir / "aside102"
    _hide(pool, "00101", aside)
    env = Env(work.mp, work.dir / "home102", pool, fk.config_with_encoder(work.dir / "tiny102.yaml", work.encoder))
    first = env.run()
    assert len(first["raw_metadata"]) == len(first["embeddings"]) == 101

    _restore(pool, "00101", aside)
    assert _requests(env.sensor_tick()) == [(["raw_metadata"], "00101")]
    # Dagster's own tracking stops here: >= 100 upstream partitions
    assert env.status(["pool_manifest", *MANIFEST_CHILDREN]) == {
        "pool_manifest": "FRESH", **{a: "FRESH" for a in MANIFEST_CHILDREN}}
    assert _requests(env.sensor_tick()) == [(["pool_manifest"], None)]
    assert env.status(["pool_manifest", *MANIFEST_CHILDREN]) == {
        "pool_manifest": "FRESH", **{a: "STALE" for a in MANIFEST_CHILDREN}}


def test_a_shard_that_leaves_and_comes_back_unchanged_is_decided_again(tmp_path: Path) -> None:
    """A shard taken out while a run selects only pruned_subset loses its files,
    candidates' among them; put back unchanged, the pool's version is the one
    before, and the next run must still redo candidates (its marker went with
    the file) rather than fail on the missing file."""
    from dbprune_assets.core.settings import PoolSettings
    from dbprune_assets.runner import run_pipeline
    from dbprune_assets.samplepool import write_datacomp_pool

    from .test_refit import Home, _move

    pool, aside = tmp_path / "pool", tmp_path / "aside"
    write_datacomp_pool(pool, PoolSettings(shards=3, samples_per_shard=100, concepts=6, seed=3), models=("b32",))
    home = Home(pytest.MonkeyPatch(), tmp_path / "home", pool)
    home.run()
    shard = list_pool_shards(pool)[1]
    aside.mkdir()
    _move(pool, aside, shard)
    run_pipeline(home.layout, home.settings, select="pruned_subset", echo=lambda m: None, log_level="ERROR")
    assert not home.layout.table("candidates", shard).exists()
    _move(aside, pool, shard)
    _, ran = home.run()
    assert ran["candidates"] == ["all"] and shard in ran["cluster_assignments"]
    assert decisions_digest(home.layout.home)[1] == len(STRATEGIES) * 3 * 100
    home.mp.undo()
