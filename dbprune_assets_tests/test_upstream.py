"""``dbprune run --select`` of a downstream asset whose inputs no longer match
the pool: refused before it starts, naming the inputs and what to select
(``dbprune_assets/upstream.py``), rather than failing deep in a strategy
("quota of cluster 0 is 2404, above the cluster's size 2379") or mixing an old
pool's quotas with a new pool's assignments."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from dbprune_assets.upstream import refusal, stale_inputs

from .test_refit import Home, _move


class FakeVersions:
    """Freshness and data versions by (asset, partition), as ``defs.common.Versions`` answers them."""

    def __init__(self, stale: set[tuple[str, str]], missing: frozenset[tuple[str, str]] = frozenset()) -> None:
        self.stale, self.missing = stale | missing, missing

    def keys(self, partitioning: str | None) -> list[str]:
        return {"shard": ["s0", "s1", "s2"], "strategy": ["dbp", "full"]}.get(partitioning, ["all"])

    def is_fresh(self, asset: str, partition: str) -> bool:
        return (asset, partition) not in self.stale

    def data_version(self, asset: str, partition: str) -> str | None:
        return None if (asset, partition) in self.missing else "v"


NODES = {
    "assign": SimpleNamespace(partitioning="shard", parents=["fit"]),
    "fit": SimpleNamespace(partitioning=None, parents=[]),
    "complexity": SimpleNamespace(partitioning=None, parents=["assign"]),
    "subset": SimpleNamespace(partitioning="strategy", parents=["complexity", "assign"]),
}


def test_a_parent_partitioned_as_its_child_counts_over_the_partitions_that_run() -> None:
    v = FakeVersions({("assign", "s2")})
    assert stale_inputs(v, NODES, ["assign"], ["s0", "s1"], selected={"assign"}) == {}
    # a shard-partitioned child of a stale shard: only the partitions it runs
    child = {"x": SimpleNamespace(partitioning="shard", parents=["assign"])}
    assert stale_inputs(v, {**NODES, **child}, ["x"], ["s0"], selected={"x"}) == {}
    assert stale_inputs(v, {**NODES, **child}, ["x"], ["s2"], selected={"x"}) == {"assign": ["s2"]}


def test_a_parent_partitioned_otherwise_counts_over_all_its_partitions() -> None:
    v = FakeVersions({("assign", "s2"), ("complexity", "all")})
    assert stale_inputs(v, NODES, ["subset"], ["dbp"], selected={"subset"}) == {
        "complexity": ["all"], "assign": ["s2"]}


def test_selected_parents_and_current_ones_do_not_count() -> None:
    v = FakeVersions({("assign", "s2"), ("complexity", "all")})
    assert stale_inputs(v, NODES, ["subset"], ["dbp"], selected={"subset", "complexity", "assign"}) == {}
    assert stale_inputs(FakeVersions(set()), NODES, ["subset"], ["dbp"], selected={"subset"}) == {}
    # a stale grandparent behind a current parent: the parent is a consistent snapshot
    assert stale_inputs(FakeVersions({("fit", "all")}), NODES, ["complexity"], ["all"], selected={"complexity"}) == {}


def test_a_parent_never_made_does_not_count() -> None:
    """As in Dagster: a step may not need it (precomputed embeddings beside
    the encoder); one that does says so itself."""
    v = FakeVersions({("complexity", "all")}, missing={("complexity", "all"), ("assign", "s1")})
    assert stale_inputs(v, NODES, ["subset"], ["dbp"], selected={"subset"}) == {}


def test_the_refusal_names_each_input_and_what_to_select() -> None:
    nodes = {**NODES, "other": SimpleNamespace(partitioning="strategy", parents=["fit"])}
    line = refusal(["other", "subset"], {"complexity": ["all"], "assign": ["s1", "s2"]}, nodes)
    assert line == ("subset would read inputs that do not match the pool and settings now: complexity is out of "
                    "date; assign (2 partition(s), e.g. s1) is out of date. Select them too "
                    "(dbprune run --select '*subset'), or run without --select")
    line = refusal(["assign", "subset"], {"fit": ["all"], "complexity": ["all"]}, NODES)
    assert "assign, subset would read" in line and "--select '*assign,*subset'" in line


def test_selecting_only_pruned_subset_after_a_shard_left_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    """The case a user met: a pool pruned, a shard taken out, then `--select
    pruned_subset` alone.  Refused, naming the stale inputs; the decisions stay
    those of the last run; the full selection then decides the smaller pool."""
    from dbprune_assets.core.settings import PoolSettings
    from dbprune_assets.core.store.layout import list_pool_shards
    from dbprune_assets.runner import run_pipeline
    from dbprune_assets.samplepool import write_datacomp_pool

    from .test_pool_changes import decisions_digest

    pool, aside = tmp_path / "pool", tmp_path / "aside"
    write_datacomp_pool(pool, PoolSettings(shards=3, samples_per_shard=100, concepts=6, seed=3), models=("b32",))
    home = Home(pytest.MonkeyPatch(), tmp_path / "home", pool)
    home.run()
    before = decisions_digest(home.layout.home)
    aside.mkdir()
    _move(pool, aside, list_pool_shards(pool)[0])
    said: list[str] = []
    report = run_pipeline(home.layout, home.settings, select="pruned_subset", echo=said.append, log_level="ERROR")
    assert not report.ok and [g.partitions for g in report.groups] == [[]]
    assert report.failure.startswith("pruned_subset would read inputs that do not match the pool")
    for name in ("cluster_complexity is out of date", "semantic_dedup is out of date",
                 "--select '*pruned_subset'"):
        assert name in report.failure
    assert said[-1] == f"✗ pruned_subset not started: {report.failure}"
    assert decisions_digest(home.layout.home) == before
    # the downstream selection of a current home still runs alone
    _, ran = home.run()
    assert decisions_digest(home.layout.home)[1] == before[1] * 2 // 3
    report = run_pipeline(home.layout, home.settings, select="pruned_subset", echo=said.append, log_level="ERROR")
    assert report.ok and said[-1].startswith("✓ pruned_subset: up to date")
    home.mp.undo()


def test_a_current_selection_whose_input_setting_changed_is_refused_not_up_to_date(tmp_path: Path) -> None:
    """A user changed ``dbp.tau`` (a setting of ``cluster_complexity``) and
    selected ``pruned_subset`` alone: its own markers are current, but it
    would not reflect the setting.  Refused, naming the input, rather than
    "up to date"; selecting the input too redoes both."""
    from dbprune_assets.core.settings import PoolSettings
    from dbprune_assets.runner import run_pipeline
    from dbprune_assets.samplepool import write_datacomp_pool

    from .test_pool_changes import decisions_digest

    pool = tmp_path / "pool"
    write_datacomp_pool(pool, PoolSettings(shards=2, samples_per_shard=100, concepts=6, seed=3), models=("b32",))
    home = Home(pytest.MonkeyPatch(), tmp_path / "home", pool)
    home.run()
    before = decisions_digest(home.layout.home)
    changed = home.settings.model_copy(update={"dbp": home.settings.dbp.model_copy(update={"tau": 0.3})})
    said: list[str] = []
    report = run_pipeline(home.layout, changed, select="pruned_subset", echo=said.append, log_level="ERROR")
    assert not report.ok and report.failure.startswith("pruned_subset would read inputs that do not match")
    assert "cluster_complexity is out of date" in report.failure
    assert said[-1] == f"✗ pruned_subset not started: {report.failure}"
    assert decisions_digest(home.layout.home) == before
    report = run_pipeline(home.layout, changed, select="cluster_complexity+", echo=said.append, log_level="ERROR")
    assert report.ok and [g.assets for g in report.groups] == [["cluster_complexity"], ["pruned_subset"]]
    home.mp.undo()
