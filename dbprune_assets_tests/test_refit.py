"""Growing pools: fits kept across pool changes, the drift alarm, and the
contract that an incremental run decides exactly as a fresh home given the
same grown pool and ``--centroids-from`` the incremental home."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from dbprune_assets.core.method import drift, fitrecord
from dbprune_assets.core.method.embstore import centroid_frame
from dbprune_assets.core.settings import STRATEGIES, PoolSettings, build_settings
from dbprune_assets.core.store.layout import UNPARTITIONED, Layout, list_pool_shards
from dbprune_assets.core.store.state import read_state

from .conftest import deep_merge
from .faultkit import decisions_digest


# ---------------------------------------------------------------------------
# the alarm's arithmetic, by hand
# ---------------------------------------------------------------------------
def test_fit_profile_by_hand() -> None:
    d = np.arange(1, 101, dtype=np.float64) / 100  # 0.01 .. 1.00
    p = drift.fit_profile(d)
    assert p.p99 == pytest.approx(0.9901)  # numpy's linear percentile: 0.99 + 0.01 * 0.01
    assert p.mean == pytest.approx(0.505)
    assert p.far_share == pytest.approx(0.01) and p.rows == 100  # only 1.00 lies beyond


def test_the_alarm_fires_past_factor_times_the_fits_share_and_only_with_enough_samples() -> None:
    fit = drift.FitProfile(p99=0.5, mean=0.3, far_share=0.01, rows=10_000)
    near = drift.shard_drift("a", np.full(600, 0.4), fit)
    far = drift.shard_drift("b", np.r_[np.full(570, 0.4), np.full(30, 0.6)], fit)  # 5% beyond 0.5
    assert (near.rows, near.far, far.far) == (600, 0, 30)
    quiet = drift.verdict(fit, [near], factor=3.0, min_samples=1000)
    assert not quiet.fires and quiet.far_share == 0 and quiet.limit == pytest.approx(0.03)
    both = drift.verdict(fit, [near, far], factor=3.0, min_samples=1000)  # 30 of 1200 = 2.5% < 3%
    assert not both.fires and both.far_share == pytest.approx(0.025)
    assert drift.verdict(fit, [far, far], factor=3.0, min_samples=1000).fires  # 60 of 1200 = 5%
    assert not drift.verdict(fit, [far], factor=3.0, min_samples=1000).fires  # 600 samples: too few to say
    assert drift.verdict(fit, [far], factor=3.0, min_samples=500).fires
    assert "5.0% of the 600 samples of the 1 shard(s) added" in drift.verdict(fit, [far], min_samples=500).line("x")
    # fewer samples than the alarm needs: said, not "they fit"; a shard without samples (damaged) is not counted
    empty = drift.shard_drift("c", np.zeros(0), fit)
    few = drift.verdict(fit, [near, empty], factor=3.0, min_samples=1000)
    assert few.shards == 1 and few.line("x").endswith(": too few to judge (the alarm waits for 1,000, drift.min_samples)")
    assert drift.verdict(fit, [empty], min_samples=10).line("x") == "x: no samples added since the fit"
    assert drift.verdict(fit, [near], min_samples=500).line("x").endswith(": they fit")


def test_a_fit_without_far_rows_still_has_a_limit() -> None:
    fit = drift.fit_profile(np.full(50, 0.2))  # every distance equal: nothing beyond p99
    assert fit.far_share == 0
    v = drift.verdict(fit, [drift.shard_drift("s", np.full(2000, 0.3), fit)], factor=3.0, min_samples=10)
    assert v.limit == pytest.approx(3 / 50) and v.fires


# ---------------------------------------------------------------------------
# which fit is kept: fitrecord.holds under each policy
# ---------------------------------------------------------------------------
def _home_with_fit(tmp_path: Path, distances_of_new: float) -> Layout:
    import polars as pl

    layout = Layout(tmp_path / "home", tmp_path / "pool")
    cent = np.eye(4, 8, dtype=np.float32)
    layout.table("dedup_centroids").parent.mkdir(parents=True)
    centroid_frame(cent).write_parquet(layout.table("dedup_centroids"))
    record = fitrecord.FitRecord("dedup_centroids", 4, drift.FitProfile(0.5, 0.3, 0.01, 10_000), ("a", "b"), None,
                                 fit_id=fitrecord.fit_id(cent), fit_of="F")
    fitrecord.write_record(layout, record)
    path = layout.table("dedup_assignments", "c")
    path.parent.mkdir(parents=True)
    pl.DataFrame({"distance": np.full(2000, distances_of_new, np.float32)}).write_parquet(path)
    return layout


@pytest.mark.parametrize("refit, new_distance, kept", [
    ("auto", 0.4, True), ("auto", 0.9, False),  # the added shard fits / lies beyond the fit's p99
    ("never", 0.9, True), ("always", 0.4, False),
])
def test_holds_follows_the_refit_setting_and_the_alarm(tmp_path: Path, refit: str, new_distance: float,
                                                       kept: bool) -> None:
    layout = _home_with_fit(tmp_path, new_distance)
    settings = build_settings({"refit": refit}, profile="paper")
    shards = ["a", "b", "c"]
    assert fitrecord.holds(layout, settings, "dedup_centroids", "F", shards, "dedup_assignments") is kept
    # what the fit is of changed (an upstream setting, the encoder, its code): never kept
    assert not fitrecord.holds(layout, settings, "dedup_centroids", "G", shards, "dedup_assignments")
    assert not fitrecord.holds(layout, settings, "centroids", "F", shards, "assignments")  # no fit at all
    centroid_frame(np.eye(4, 8, 1, dtype=np.float32)).write_parquet(layout.table("dedup_centroids"))
    assert not fitrecord.holds(layout, settings, "dedup_centroids", "F", shards, "dedup_assignments")  # not its centroids


def test_a_shard_re_embedded_since_the_fit_counts_as_added() -> None:
    record = fitrecord.FitRecord("x", 2, drift.FitProfile(0.5, 0.3, 0.01, 100), ("a", "b"), versions=("va", "vb"))
    assert fitrecord.added_since(record, ["a", "b", "c"]) == ["c"]
    assert fitrecord.added_since(record, ["a", "b", "c"], {"a": "va", "b": "vB", "c": "vc"}) == ["b", "c"]


def test_an_import_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(fitrecord.FitImportError, match=r"fits/centroids.json is missing.*run dbprune run there"):
        (tmp_path / "other" / "tables" / "centroids").mkdir(parents=True)
        (tmp_path / "other" / "tables" / "centroids" / "all.parquet").write_bytes(b"x")
        fitrecord.import_fit(Layout(tmp_path / "home", tmp_path / "pool"), tmp_path / "other", "centroids", "F", "e")


# ---------------------------------------------------------------------------
# the contract, on a DataComp-format pool, runs in process
# ---------------------------------------------------------------------------
BASE: dict[str, Any] = {
    "embeddings": {"source": "datacomp", "model": "b32"},
    "semdedup": {"dedup_k": 6, "niter": 10, "sample_size": 10000},
    "dbp": {"k": 5, "l": 2, "niter": 10, "sample_size": 10000},
    "compute": {"threads": 1},
    "drift": {"min_samples": 150},
}


class Home:
    """A $DBPRUNE_HOME over ``pool``, run as ``dbprune run --select '*pruned_subset'`` does."""

    def __init__(self, mp: pytest.MonkeyPatch, root: Path, pool: Path, **overrides: Any) -> None:
        self.mp, self.layout = mp, Layout(root, pool)
        self.settings = build_settings(deep_merge(BASE, overrides), profile="sample")

    def run(self, **overrides: Any) -> tuple[list[str], dict[str, list[str]]]:
        from dbprune_assets.runner import run_pipeline

        if overrides:
            self.settings = self.settings.model_copy(update=overrides)
        for name, value in (("DBPRUNE_HOME", self.layout.home), ("DBPRUNE_POOL", self.layout.pool),
                            ("DAGSTER_HOME", self.layout.home / "dagster")):
            self.mp.setenv(name, str(value))
        self.layout.home.mkdir(parents=True, exist_ok=True)
        self.layout.config_file.write_text(self.settings.to_yaml())
        said: list[str] = []
        report = run_pipeline(self.layout, self.settings, select="*pruned_subset", echo=said.append,
                              log_level="ERROR")
        assert report.ok, report.failure
        ran: dict[str, list[str]] = {}
        for g in report.groups:
            for a in g.ran:
                ran.setdefault(a, []).extend(g.partitions)
        return said, ran

    def record(self, asset: str) -> fitrecord.FitRecord:
        record = fitrecord.read_record(self.layout.home, asset)
        assert record is not None
        return record


def _dedup_pass(layout: Layout) -> tuple[int | None, int | None]:
    """(shards added, removed) that the last semantic_dedup built on; (None, None): a full pass."""
    summary = read_state(layout, "semantic_dedup", UNPARTITIONED).summary
    return summary["added_shards"], summary["removed_shards"]


def _move(src: Path, dst: Path, stem: str) -> None:
    for ext in ("parquet", "npz"):
        shutil.move(str(src / f"{stem}.{ext}"), str(dst / f"{stem}.{ext}"))


@pytest.fixture(scope="module")
def grown(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A fit on four shards, then one added, then one of the four removed;
    fresh homes given each grown pool and --centroids-from the first."""
    from dbprune_assets.samplepool import write_datacomp_pool

    root = tmp_path_factory.mktemp("refit")
    mp = pytest.MonkeyPatch()
    pool, aside = root / "pool", root / "aside"
    write_datacomp_pool(pool, PoolSettings(shards=5, samples_per_shard=150, concepts=6, seed=1), models=("b32",))
    shards = list_pool_shards(pool)
    aside.mkdir()
    _move(pool, aside, shards[4])
    out: dict[str, Any] = {"shards": shards}
    a = Home(mp, root / "a", pool)
    out["first"] = a.run()
    out["fit_id"] = {f: read_state(a.layout, f, UNPARTITIONED).data_version for f in ("dedup_centroids", "centroids")}
    _move(aside, pool, shards[4])  # a shard is added
    out["added"] = a.run()
    out["digest_added"] = decisions_digest(a.layout.home)
    out["dedup_pass_added"] = _dedup_pass(a.layout)
    out["duplicates_added"] = pl.read_parquet(a.layout.table("duplicates"))
    out["records"] = {f: a.record(f) for f in ("dedup_centroids", "centroids")}
    out["fit_id_after"] = {f: read_state(a.layout, f, UNPARTITIONED).data_version for f in ("dedup_centroids", "centroids")}
    b = Home(mp, root / "b", pool, centroids_from=str(a.layout.home))
    out["fresh_added"] = b.run()
    out["digest_fresh_added"] = decisions_digest(b.layout.home)
    out["duplicates_fresh_added"] = pl.read_parquet(b.layout.table("duplicates"))
    _move(pool, aside, shards[0])  # and one of the fitted shards leaves
    out["removed"] = a.run()
    out["digest_removed"] = decisions_digest(a.layout.home)
    out["dedup_pass_removed"] = _dedup_pass(a.layout)
    out["duplicates_removed"] = pl.read_parquet(a.layout.table("duplicates"))
    c = Home(mp, root / "c", pool, centroids_from=str(a.layout.home))
    c.run()
    out["digest_fresh_removed"] = decisions_digest(c.layout.home)
    out["duplicates_fresh_removed"] = pl.read_parquet(c.layout.table("duplicates"))
    out["full"] = Home(mp, root / "full", pool)  # for the drift test: the pool as it now is
    yield out
    mp.undo()


@pytest.mark.slow
def test_added_shards_are_assigned_to_the_fitted_clusters(grown: dict[str, Any]) -> None:
    said, ran = grown["added"]
    new = grown["shards"][4]
    assert ran["raw_metadata"] == ran["embeddings"] == ran["dedup_assignments"] == [new]  # the old shards stay
    assert ran["dedup_centroids"] == ran["centroids"] == ["all"]  # run, and kept: the same data version
    assert grown["fit_id_after"] == grown["fit_id"]
    for fit, record in grown["records"].items():
        assert list(record.shards) == grown["shards"][:4], fit
    lines = [line for line in said if line.startswith("  drift: dedup_centroids:")]
    assert len(lines) == 1 and "of the 150 samples of the 1 shard(s) added since the fit" in lines[0]
    assert lines[0].endswith("they fit")


@pytest.mark.slow
def test_incremental_decisions_equal_a_fresh_home_given_the_same_centroids(grown: dict[str, Any]) -> None:
    digest, rows = grown["digest_added"]
    assert rows == len(STRATEGIES) * 5 * 150  # every strategy decides every sample of the five shards
    assert grown["digest_fresh_added"] == grown["digest_added"]
    assert grown["digest_fresh_removed"] == grown["digest_removed"]
    assert grown["digest_removed"][1] == len(STRATEGIES) * 4 * 150
    said, ran = grown["fresh_added"]
    assert ran["dedup_centroids"] == ["all"] and not any("refitting" in line for line in said)


@pytest.mark.slow
def test_semdedup_after_shards_came_and_went_builds_on_the_last_pass_and_equals_a_full_one(
        grown: dict[str, Any]) -> None:
    assert grown["dedup_pass_added"] == (1, 0)  # built on the last pass: the one added shard
    assert grown["dedup_pass_removed"] == (0, 1)  # and then on that one: the one removed
    assert grown["duplicates_added"].height > 0
    assert grown["duplicates_added"].equals(grown["duplicates_fresh_added"])
    assert grown["duplicates_removed"].equals(grown["duplicates_fresh_removed"])


@pytest.mark.slow
def test_new_data_unlike_the_fit_fires_the_alarm_and_auto_refits(grown: dict[str, Any], tmp_path: Path) -> None:
    """A shard of vectors from nowhere near the fitted concepts (random
    directions): the alarm fires on dedup_assignments, refit: auto fits again
    on the whole pool, and the new fit has seen the shard."""
    import dagster as dg

    home: Home = grown["full"]
    pool = home.layout.pool
    said, _ = home.run()
    assert home.record("dedup_centroids").shards == tuple(list_pool_shards(pool))
    odd = "f" * 8
    shutil.copy(pool / f"{grown['shards'][1]}.parquet", tmp_path / "t.parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "t.parquet")
    uids = [f"{i:032x}" for i in range(table.num_rows)]
    pq.write_table(table.set_column(table.schema.get_field_index("uid"), "uid", pa.array(uids, pa.string())),
                   pool / f"{odd}.parquet")
    rng = np.random.default_rng(9)
    x = rng.standard_normal((table.num_rows, 512)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    np.savez(pool / f"{odd}.npz", b32_img=x.astype(np.float16), b32_txt=x.astype(np.float16))
    said, ran = home.run()
    assert any(line.startswith("  drift: dedup_centroids:") and "no longer fits" in line for line in said), said
    assert "  refitting dedup_centroids (refit: auto), then every shard is assigned to the new clusters" in said
    assert odd in home.record("dedup_centroids").shards
    assert sorted(ran["dedup_assignments"]) == sorted([odd, *list_pool_shards(pool)[:-1]]) or odd in ran["dedup_assignments"]
    instance = dg.DagsterInstance.from_config(str(home.layout.home / "dagster"))
    key = dg.AssetCheckKey(dg.AssetKey("dedup_assignments"), "new_shards_fit_the_clusters")
    history = instance.event_log_storage.get_asset_check_execution_history(key, limit=10)
    passed = [r.event.dagster_event.event_specific_data.passed for r in history if r.event is not None]
    assert False in passed  # the alarm, before the refit (newest first: the refit's check passes)
    assert passed[0] is True


def test_a_group_run_again_after_a_refit_counts_once_in_the_summary() -> None:
    from dbprune_assets.refits import group_counts
    from dbprune_assets.runner import GroupResult

    def g(assets: list[str], ran: bool) -> GroupResult:
        return GroupResult(assets, ["p"] if ran else [], [] if ran else ["p"], 1.0)

    fit, assign, later = ["dedup_centroids"], ["dedup_assignments"], ["semantic_dedup"]
    # the fit up to date, the new shard assigned, the alarm: back to the fit, which then refits, all shards again
    passes = [g(["raw_metadata"], True), g(fit, False), g(assign, True), g(fit, True), g(assign, True), g(later, True)]
    assert group_counts(passes) == (4, 0, 2)
    assert group_counts([g(["raw_metadata"], False), g(fit, False), g(later, True)]) == (1, 2, 0)
    assert group_counts([]) == (0, 0, 0)
