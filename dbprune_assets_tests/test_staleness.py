"""What a run keeps: a subset's data version is its kept set, so a strategy
that keeps the same samples keeps its models; a metadata-only pool leaves the
image stages out however they are selected."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from dbprune_assets.core.method.stages import kept_digest
from dbprune_assets.core.store.layout import Layout


def _decisions(path: Path, rows: list[tuple[str, str, bool]]) -> Path:
    pl.DataFrame({"strategy": ["s"] * len(rows), "uid": [r[1] for r in rows], "shard": [r[0] for r in rows],
                  "keep": [r[2] for r in rows], "reason": ["kept" if r[2] else "pruned" for r in rows]}).write_parquet(path)
    return path


def test_the_kept_digest_is_the_kept_set(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "home", tmp_path / "pool")
    rows = [("00000", "a", True), ("00000", "b", False), ("00001", "c", True), ("00001", "d", True)]
    base = kept_digest(layout, _decisions(tmp_path / "1.parquet", rows))
    # the same kept set in another order, with other dropped rows: the same digest
    same = [rows[3], ("00002", "z", False), rows[0], rows[2]]
    assert kept_digest(layout, _decisions(tmp_path / "2.parquet", same)) == base
    # one sample more, one less, or the same uid in another shard: another digest
    assert kept_digest(layout, _decisions(tmp_path / "3.parquet", [*rows[:1], ("00000", "b", True), *rows[2:]])) != base
    assert kept_digest(layout, _decisions(tmp_path / "4.parquet", rows[:3])) != base
    assert kept_digest(layout, _decisions(tmp_path / "5.parquet", [("00009", "a", True), *rows[1:]])) != base
    assert kept_digest(layout, _decisions(tmp_path / "6.parquet", [("00000", "x", False)])) != base


def test_a_metadata_pool_leaves_the_image_stages_out_of_a_selection(tmp_path: Path) -> None:
    from dbprune_assets.core.settings import build_settings
    from dbprune_assets.definitions import asset_nodes, defs
    from dbprune_assets.runner import _choose_assets
    from dbprune_assets.samplepool import write_datacomp_pool

    small = build_settings({"pool": {"shards": 2, "samples_per_shard": 40, "concepts": 4}}, profile="sample").pool
    write_datacomp_pool(tmp_path / "pool", small)
    layout = Layout(tmp_path / "home", tmp_path / "pool")
    said: list[str] = []
    chosen = _choose_assets(defs.resolve_asset_graph(), asset_nodes(), "raw_metadata*", layout, said.append)
    assert "pruned_subset" in chosen and "comparison" not in chosen and "trained_model" not in chosen
    assert said == ["– trained_model, eval_scores, comparison: skipped: " + said[0].split("skipped: ", 1)[1]]
    assert "images" in said[0]
    # a selection without image stages says nothing
    said.clear()
    assert _choose_assets(defs.resolve_asset_graph(), asset_nodes(), "raw_metadata", layout, said.append) == [
        "raw_metadata"] and said == []
