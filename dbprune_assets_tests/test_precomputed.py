"""Pools with precomputed embeddings (``embeddings.source: datacomp``):
ingest with exact accounting, stored embeddings copied, errors that name the
file, and the whole graph on a metadata-only pool through ``uids.npy``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dbprune_assets.core.pool.sources import datacomp, registry
from dbprune_assets.core.pool.sources.readers import SourceError, clip_scores
from dbprune_assets.core.pool.sources.stored import EmbeddingFiles
from dbprune_assets.core.settings import build_settings, choose_settings
from dbprune_assets.core.pool.shards import ShardError, ShardIngest, SAMPLES_SCHEMA, PROBLEMS_SCHEMA

D = 512  # DataComp's b32 width


def _uid(i: int) -> str:
    return f"{i:032x}"


def _unit(rng: np.random.Generator, n: int, d: int = D) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def write_shard(folder: Path, stem: str, uids: list[str], texts: list[str | None], img: np.ndarray,
                txt: np.ndarray, model: str = "b32") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "uid": pa.array(uids, pa.string()), "url": pa.array([f"http://x/{u}" for u in uids], pa.string()),
        "text": pa.array(texts, pa.string()),
        "original_width": pa.array([640] * len(uids), pa.int64()),
        "original_height": pa.array([480] * len(uids), pa.int64()),
    }), folder / f"{stem}.parquet")
    np.savez(folder / f"{stem}.npz", **{f"{model}_img": img, f"{model}_txt": txt})
    return folder / f"{stem}.parquet"


def test_metadata_shard_statuses_are_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    img, txt = _unit(rng, 6), _unit(rng, 6)
    img[1, 3] = np.nan  # bad image row
    txt[2] = 0  # zero-norm text row
    uids = [_uid(1), _uid(2), _uid(3), _uid(1), _uid(5), _uid(6)]
    texts = ["a cat", "a dog", "a car", "a cat again", "   ", "a tree"]
    write_shard(tmp_path, "aa", uids, texts, img, txt)
    got = datacomp.ingest_datacomp_shard(tmp_path, "aa", "b32")
    assert got.samples["status"].to_list() == ["ok", "bad_embedding", "bad_embedding", "duplicate_uid",
                                               "empty_caption", "ok"]
    assert got.samples["key"].to_list() == uids and got.samples["row"].to_list() == list(range(6))
    assert got.samples["caption"][0] == "a cat" and got.samples["width"].to_list() == [640] * 6
    causes = dict(zip(got.problems["key"].to_list()[:2], got.problems["cause"].to_list()[:2]))
    assert causes[_uid(2)].startswith("bad_embedding: row 1 of aa.parquet + aa.npz")
    assert got.problems.height == 4  # one per non-ok row
    dup = got.problems.filter(pl.col("cause").str.starts_with("duplicate_uid"))["cause"][0]
    assert "row 3" in dup and "row 0" in dup


def test_image_shard_linked_by_uid(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    samples = pl.DataFrame({
        "uid": [_uid(i) for i in range(4)], "shard": ["00000"] * 4, "key": [f"00000000{i}" for i in range(4)],
        "row": [0, 1, 2, 3], "caption": ["x"] * 4, "width": [8] * 4, "height": [8] * 4,
        "status": ["ok", "ok", "ok", "failed_download"],
    }, schema=SAMPLES_SCHEMA)
    ingest = ShardIngest("00000", samples, pl.DataFrame(schema=PROBLEMS_SCHEMA))
    img, txt = _unit(rng, 3), _unit(rng, 3)
    img[1] = np.inf
    # the source lists uid 2 (bad), uid 0 and uid 3 (a failed download: not linked), not uid 1
    src = write_shard(tmp_path / "emb", "00000", [_uid(3), _uid(2), _uid(0)], ["x"] * 3, img, txt)
    got = datacomp.link_image_shard(ingest, src, "b32")
    assert got.samples["status"].to_list() == ["ok", "no_embedding", "bad_embedding", "failed_download"]
    assert got.problems["key"].to_list() == ["000000001", "000000002"]
    assert got.problems["cause"][0].startswith("no_embedding") and _uid(1) in got.problems["cause"][0]


def test_stored_pairs_are_copied_with_their_cosine(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    img, txt = _unit(rng, 5), _unit(rng, 5)
    src = write_shard(tmp_path, "s", [_uid(i) for i in range(5)], ["t"] * 5, img, txt)
    ok = pl.DataFrame({"uid": [_uid(4), _uid(1)], "key": [_uid(4), _uid(1)], "row": [4, 1]})
    out = tmp_path / "out"
    files = EmbeddingFiles(out / "i.npy", out / "t.npy", out / "m.parquet", tmp_path / "tmp")
    dim = datacomp.write_datacomp_embeddings(src, ok, "b32", files, "s")
    assert dim == D
    np.testing.assert_array_equal(np.load(out / "i.npy"), img[[4, 1]])
    np.testing.assert_array_equal(np.load(out / "t.npy"), txt[[4, 1]])
    meta = pl.read_parquet(out / "m.parquet")
    assert meta["uid"].to_list() == [_uid(4), _uid(1)] and meta["row"].to_list() == [4, 1]
    np.testing.assert_array_equal(meta["clip_score"].to_numpy(), clip_scores(img[[4, 1]], txt[[4, 1]]))
    hand = float(np.dot(img[4].astype(np.float32), txt[4].astype(np.float32))
                 / np.linalg.norm(img[4].astype(np.float32)) / np.linalg.norm(txt[4].astype(np.float32)))
    assert meta["clip_score"][0] == pytest.approx(hand, abs=1e-6)
    with pytest.raises(SourceError, match=r"s.parquet \+ s.npz: embeddings are 512-d but earlier shards were 768-d"):
        datacomp.write_datacomp_embeddings(src, ok, "b32", files, "s", expected_dim=768)


def test_bad_files_are_errors_naming_them(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    write_shard(tmp_path, "s", [_uid(0)], ["t"], _unit(rng, 1), _unit(rng, 1))
    with pytest.raises(ShardError, match=r"shard s: .*s.npz has no \['l14_img', 'l14_txt'\].*set embeddings.model"):
        datacomp.ingest_datacomp_shard(tmp_path, "s", "l14")
    (tmp_path / "s.npz").unlink()
    (tmp_path / "s.tar").touch()  # an image shard whose npz is missing
    samples = pl.DataFrame({"uid": [_uid(0)], "shard": ["s"], "key": ["0"], "row": [0], "caption": ["t"],
                            "width": [1], "height": [1], "status": ["ok"]}, schema=SAMPLES_SCHEMA)
    with pytest.raises(ShardError, match=r"s.npz is missing"):
        datacomp.link_image_shard(ShardIngest("s", samples, pl.DataFrame(schema=PROBLEMS_SCHEMA)),
                                     tmp_path / "s.parquet", "b32")
    np.savez(tmp_path / "t.npz", b32_img=_unit(rng, 2), b32_txt=_unit(rng, 2))
    pq.write_table(pa.table({"uid": pa.array([1, 2], pa.int64()), "text": ["a", "b"]}), tmp_path / "t.parquet")
    with pytest.raises(ShardError, match=r"t.parquet: column 'uid' of shard t has type int64, expected string"):
        datacomp.ingest_datacomp_shard(tmp_path, "t", "b32")


def test_a_datacomp_shard_under_compute_says_which_setting(tmp_path: Path) -> None:
    def ingest(settings):  # as raw_metadata does: through the source the settings name
        return registry.get(settings.embeddings.source).ingest(tmp_path, "s", settings)

    rng = np.random.default_rng(4)
    write_shard(tmp_path, "s", [_uid(0)], ["t"], _unit(rng, 1), _unit(rng, 1))
    with pytest.raises(ShardError, match="set embeddings.source: datacomp"):
        ingest(build_settings({}, profile="paper"))
    got = ingest(build_settings({"embeddings": {"source": "datacomp", "model": "b32"}}, profile="paper"))
    assert got.samples["status"].to_list() == ["ok"]


def test_a_datacomp_pool_chooses_the_stored_embeddings(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    write_shard(tmp_path / "pool", "0a1b", [_uid(0)], ["t"], _unit(rng, 1), _unit(rng, 1))
    s, why = choose_settings(pool=tmp_path / "pool")
    assert (s.profile, s.embeddings.source, s.semdedup.dedup_k, s.dbp.k) == ("paper", "datacomp", "auto", "auto")
    assert "DataComp metadata pool" in why


# ---------------------------------------------------------------------------
# the whole graph on a metadata-only pool
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_dbprune_run_on_a_datacomp_metadata_pool(tmp_path: Path) -> None:
    """The generated DataComp-format pool, with a NaN row and a uid repeated
    across shards planted: ``dbprune run`` needs no encoder, skips the training
    stages saying why, and every strategy's ``uids.npy`` holds exactly its kept
    uids; every samples row has one decision, non-ok rows decided corrupt."""
    from dbprune_assets.core.store.catalog import query
    from dbprune_assets.core.store.layout import Layout, list_pool_shards
    from dbprune_assets.core.settings import PoolSettings, STRATEGIES
    from dbprune_assets.samplepool import write_datacomp_pool

    from .conftest import run_cli

    pool, home = tmp_path / "pool", tmp_path / "home"
    write_datacomp_pool(pool, PoolSettings(shards=2, samples_per_shard=150, concepts=6, seed=3), models=("b32",))
    first, second = list_pool_shards(pool)
    with np.load(pool / f"{first}.npz") as z:
        arrays = {k: z[k].copy() for k in z.files}
    arrays["b32_img"][7] = np.nan
    np.savez(pool / f"{first}.npz", **arrays)
    t1 = pq.read_table(pool / f"{first}.parquet")
    t2 = pq.read_table(pool / f"{second}.parquet")
    repeated = t1.column("uid")[0].as_py()
    uids2 = t2.column("uid").to_pylist()
    uids2[5] = repeated
    pq.write_table(t2.set_column(t2.schema.get_field_index("uid"), "uid", pa.array(uids2, pa.string())),
                   pool / f"{second}.parquet")
    config = tmp_path / "b32.yaml"
    config.write_text("embeddings:\n  model: b32\n")
    env = {"DBPRUNE_HOME": str(home), "DBPRUNE_POOL": str(pool), "DBPRUNE_PROGRESS": "0"}
    r = run_cli("run", "--config", str(config), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "trained_model, eval_scores, comparison: skipped: the pool is DataComp metadata without images" in r.stdout
    assert "embeddings.source: datacomp" in r.stdout  # the automatic choice, said
    layout = Layout.from_env(home, pool)
    # no example images to draw, and nothing wrong with that: said in the metadata, no warning
    import dagster as dg

    from dbprune_assets.core.pool.poolkind import NO_EXAMPLES

    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        for asset, key in (("semantic_dedup", "example_pairs"), ("cluster_complexity", "most_and_least_complex_clusters")):
            event = instance.get_latest_materialization_event(dg.AssetKey(asset))
            assert event.asset_materialization.metadata[key].value == NO_EXAMPLES, asset

    def rows(sql: str) -> list[tuple]:
        return [tuple(d.values()) for d in query(layout, sql).to_pylist()]

    assert rows("SELECT status, count(*) FROM samples GROUP BY 1 ORDER BY 1") == [
        ("bad_embedding", 1), ("duplicate_uid", 1), ("ok", 298)]
    assert rows("SELECT count(*) FROM problems WHERE cause LIKE 'bad_embedding: row 7 %'") == [(1,)]
    assert rows("SELECT shard FROM samples WHERE status = 'duplicate_uid'") == [(second,)]
    assert not (layout.encoder_dir / "bootstrap").exists()  # nothing trained
    assert json.loads((layout.encoder_dir / "encoder.json").read_text())["precomputed"].startswith("datacomp b32")
    for strategy in STRATEGIES:
        of = f"FROM decisions WHERE strategy = '{strategy}'"
        assert rows(f"SELECT count(*) {of}") == [(300,)]
        assert rows(f"SELECT count(*) {of} AND reason = 'corrupt'") == [(2,)]
        kept = sorted(u for (u,) in rows(f"SELECT uid {of} AND keep"))
        got = np.load(layout.subset_dir(strategy) / "uids.npy")
        assert [f"{a:016x}{b:016x}" for a, b in got.tolist()] == kept
        assert sorted(p.name for p in layout.subset_dir(strategy).iterdir()) == ["uids.npy"]
    assert "datacomp_image: 120 target embeddings from the pool's targets" in r.stdout  # where they came from
    # explicitly asked for, training says why it cannot
    r = run_cli("run", "--select", "trained_model", env=env)
    assert r.returncode == 1 and "nothing to train on" in r.stdout + r.stderr
    # a DataComp pool without targets (a user's): datacomp_image is left out, saying what to provide
    shutil.rmtree(pool / "targets")
    r = run_cli("run", "--select", "pruned_subset", "--force", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "– strategy datacomp_image: left out: no target images for datacomp_image: set " \
           "strategies.target_embeddings" in r.stdout
    assert "pruned_subset [8 of 8 partitions]" in r.stdout
