"""The real asset graph on a tiny pool in tmp_path with an ephemeral Dagster
instance: ingest → encoder → embeddings, with exact counts per status."""

from __future__ import annotations


import dagster as dg
import numpy as np
import polars as pl
import pytest

from dbprune_assets.core.store.catalog import query
from dbprune_assets.core.store.layout import Layout, list_pool_shards
from dbprune_assets.samplepool import load_ground_truth, write_sample_pool
from dbprune_assets.core.settings import build_settings
from dbprune_assets.core.store.state import read_state
from dbprune_assets.defs.common import SHARDS, DbpruneResource
from dbprune_assets.definitions import ASSETS
from dbprune_assets.runner import RANGE_END_TAG, RANGE_START_TAG

from .conftest import TINY


@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory: pytest.TempPathFactory):
    """A home with the tiny pool and its saved settings; an ephemeral instance."""
    root = tmp_path_factory.mktemp("integration")
    layout = Layout.from_env(root / "home", root / "home" / "pool")
    settings = build_settings(TINY)
    layout.home.mkdir(parents=True)
    layout.config_file.write_text(settings.to_yaml())
    write_sample_pool(layout.pool, settings.pool, tmp_root=layout.tmp)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(SHARDS, list_pool_shards(layout.pool))
    return layout, settings, instance


def _materialize(layout: Layout, instance: dg.DagsterInstance, selection: list[str], shards: list[str] | None = None):
    tags = {}
    if shards:
        tags = {RANGE_START_TAG: shards[0], RANGE_END_TAG: shards[-1]}
    result = dg.materialize(
        ASSETS, selection=selection, instance=instance, tags=tags,
        resources={"dbprune": DbpruneResource(home=str(layout.home), pool=str(layout.pool))},
    )
    assert result.success
    return result


def test_ingest_encoder_embeddings(tiny_home):
    layout, settings, instance = tiny_home
    shards = list_pool_shards(layout.pool)
    assert shards == ["00000", "00001"]

    _materialize(layout, instance, ["raw_metadata"], shards)
    _materialize(layout, instance, ["pool_manifest", "encoder"])
    _materialize(layout, instance, ["embeddings"], shards)

    # exact count per status: what the generator planted, row for row
    truth = load_ground_truth(layout.pool)
    planted = dict(truth.group_by("planted_status").len().iter_rows())
    counts = {r["status"]: r["n"] for r in query(layout, "SELECT status, count(*) AS n FROM samples GROUP BY 1").to_pylist()}
    assert counts == planted
    assert sum(counts.values()) == 2 * 80  # no parquet row disappears
    assert counts["ok"] == 2 * 80 - sum(v for k, v in planted.items() if k != "ok")
    joined = query(layout, "SELECT count(*) AS n FROM samples").to_pylist()[0]["n"]
    assert joined == truth.height
    # every non-ok sample is listed in problems with shard, key and cause
    bad = query(layout, "SELECT count(*) AS n FROM samples WHERE status <> 'ok'").to_pylist()[0]["n"]
    named = query(layout, "SELECT count(DISTINCT (shard, key)) AS n FROM problems WHERE key IS NOT NULL").to_pylist()[0]["n"]
    assert named == bad and bad > 0

    # encoder: the bootstrap was trained on the reference split; version = weights hash
    enc = read_state(layout, "encoder", "all")
    assert enc is not None and enc.data_version == enc.summary["weights"]["cluster"][:16] + "-" + enc.summary["weights"]["score"][:16]
    assert (layout.encoder_dir / "bootstrap" / "open_clip_config.json").exists()

    # embeddings: ok samples only, float16, unit norm, rows aligned with metadata
    for shard in shards:
        img = np.load(layout.img_emb(shard))
        txt = np.load(layout.text_emb(shard))
        meta = pl.read_parquet(layout.emb_metadata(shard))
        ok = pl.read_parquet(layout.table("samples", shard)).filter(pl.col("status") == "ok")
        assert img.dtype == np.float16 and txt.dtype == np.float16
        assert img.shape[0] == txt.shape[0] == meta.height == ok.height
        assert meta["uid"].to_list() == ok["uid"].to_list()
        assert meta["row"].to_list() == ok["row"].to_list()
        np.testing.assert_allclose(np.linalg.norm(img.astype(np.float32), axis=1), 1.0, atol=1e-2)
        dots = (img.astype(np.float32) * txt.astype(np.float32)).sum(1)
        np.testing.assert_allclose(meta["clip_score"].to_numpy(), dots, atol=1e-2)
    scores = query(layout, "SELECT count(*) AS n FROM scores").to_pylist()[0]["n"]
    assert scores == counts["ok"]


def test_rematerialising_a_partition_replaces_its_rows(tiny_home):
    layout, _, instance = tiny_home
    before = query(layout, "SELECT count(*) AS n FROM samples").to_pylist()[0]["n"]
    _materialize(layout, instance, ["raw_metadata"], ["00001"])
    after = query(layout, "SELECT shard, count(*) AS n FROM samples GROUP BY 1 ORDER BY 1").to_pylist()
    assert sum(r["n"] for r in after) == before
    assert [r["shard"] for r in after] == ["00000", "00001"]


def test_materializations_carry_metadata(tiny_home):
    layout, _, instance = tiny_home
    ev = instance.get_latest_materialization_event(dg.AssetKey("encoder"))
    md = ev.asset_materialization.metadata
    assert md["cluster_embed_dim"].value == md["score_embed_dim"].value > 0
    assert "bootstrap_loss_curve" in md
    ev = instance.get_latest_materialization_event(dg.AssetKey("raw_metadata"))
    assert ev.asset_materialization.metadata["rows"].value > 0
