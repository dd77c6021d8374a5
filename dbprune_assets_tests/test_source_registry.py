"""The embedding-source registry: the built-in sources are registered, an
unknown name is refused naming the known ones, and a toy source defined and
registered here alone (a folder of ``<shard>.img.npy`` + ``<shard>.txt.npy``,
rows aligned with the pool shard's parquet) works through the same calls the
pipeline makes: ingest links rows and marks a damaged one ``bad_embedding``,
``raw_metadata``'s fingerprint lists its files, and writing its embeddings
produces the clip-retrieval layout."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import polars as pl
import pytest

from dbprune_assets.core.pool.shards import ShardIngest
from dbprune_assets.core.pool.sources import registry
from dbprune_assets.core.pool.sources.base import EmbeddingSource, Memo, StoredShard, ingest_image_shard, pool_files
from dbprune_assets.core.pool.sources.readers import bad_rows, check_dim, clip_scores
from dbprune_assets.core.pool.sources.stored import (EmbeddingFiles, mark_embeddings, ok_positions, ok_rows,
                                                     write_stored_pairs)
from dbprune_assets.core.settings import EmbeddingsSettings, PipelineSettings, PoolSettings, build_settings
from dbprune_assets.core.store.atomic import write_parquet
from dbprune_assets.core.store.layout import Layout
from dbprune_assets.core.store.state import file_signature, stable_hash

TOY = "toy_npy"
SHARD = "00000"
D = 8


class NpySource(EmbeddingSource):
    """``<shard>.img.npy`` and ``<shard>.txt.npy`` in ``embeddings.path``, row
    ``i`` the embedding of the shard parquet's row ``i``."""

    name = TOY

    def files(self, settings: PipelineSettings, pool: Path, shard: str) -> tuple[Path, Path]:
        folder = settings.embeddings.folder(pool)
        return folder / f"{shard}.img.npy", folder / f"{shard}.txt.npy"

    def ingest(self, pool: Path, shard: str, settings: PipelineSettings, home: Path | None = None) -> ShardIngest:
        ingest = ingest_image_shard(self, pool, shard, settings)
        img_p, txt_p = self.files(settings, pool, shard)
        img, txt = np.load(img_p), np.load(txt_p)
        ok = ok_positions(ingest)
        rows = ingest.samples["row"].to_numpy()[ok]
        found = rows < len(img)
        bad = np.zeros(len(ok), dtype=bool)
        bad[found] = bad_rows(img[rows[found]], txt[rows[found]])
        return mark_embeddings(ingest, ok, found, bad, lambda j: f"{img_p.name} has no row {rows[j]}",
                               lambda j: f"row {rows[j]} of {img_p.name}")

    def signature(self, layout: Layout, settings: PipelineSettings, shard: str, memo: Memo) -> list:
        return [*pool_files(layout, shard), *map(file_signature, self.files(settings, layout.pool, shard))]

    def write_embeddings(self, layout: Layout, settings: PipelineSettings, shards: Iterable[str],
                         dim: int | None = None) -> Iterator[StoredShard]:
        for shard in shards:
            ok = ok_rows(layout, shard)
            img_p, txt_p = self.files(settings, layout.pool, shard)
            rows = ok["row"].to_numpy()
            img, txt = np.load(img_p)[rows], np.load(txt_p)[rows]
            dim = check_dim(int(img.shape[1]), dim, str(img_p))
            write_stored_pairs(img, txt, ok, shard, EmbeddingFiles.of(layout, shard))
            yield StoredShard(shard, ok.height, dim, img_p, stable_hash([file_signature(img_p), file_signature(txt_p)]))


@pytest.fixture()
def toy() -> Iterator[NpySource]:
    source = registry.register(NpySource())
    yield source
    registry.unregister(TOY)


@pytest.fixture()
def pool(tmp_path: Path) -> Path:
    """A generated one-shard image pool with its toy embeddings beside it; the
    first downloaded sample's image row is NaN."""
    from dbprune_assets.samplepool import write_sample_pool

    out = tmp_path / "pool"
    write_sample_pool(out, PoolSettings(shards=1, samples_per_shard=8, concepts=2, image_size=16,
                                        reference_samples=0, eval_per_class=1))
    n = pl.read_parquet(out / f"{SHARD}.parquet").height
    rng = np.random.default_rng(0)
    img, txt = (rng.standard_normal((n, D)).astype(np.float16) for _ in range(2))
    img[_truth(out).index("ok"), 3] = np.nan
    np.save(out / f"{SHARD}.img.npy", img)
    np.save(out / f"{SHARD}.txt.npy", txt)
    return out


def _truth(pool: Path) -> list[str]:
    return pl.read_parquet(pool / "ground_truth.parquet")["planted_status"].to_list()


def _settings(source: str) -> PipelineSettings:
    """Settings whose ``embeddings.source`` is ``source`` (a registered toy name is accepted)."""
    return build_settings({"embeddings": {"source": source}}, profile="paper")


def test_the_built_in_sources_are_registered() -> None:
    assert registry.names()[:3] == ["compute", "datacomp", "clip_retrieval"]
    assert [(s.name, s.precomputed) for s in map(registry.get, registry.names()[:3])] == [
        ("compute", False), ("datacomp", True), ("clip_retrieval", True)]
    # every value settings accept picks a registered source
    allowed = typing.get_args(EmbeddingsSettings.model_fields["source"].annotation)
    assert set(allowed) <= set(registry.names())
    with pytest.raises(ValueError, match="'nope', which is no embedding source; the registered ones are compute, "
                                         "datacomp, clip_retrieval"):
        registry.get("nope")

    class Impostor(NpySource):
        name = "datacomp"

    with pytest.raises(ValueError, match="'datacomp' is registered already"):
        registry.register(Impostor())
    assert type(registry.get("datacomp")).__name__ == "DataCompSource"


def test_detect_recognises_a_datacomp_metadata_pool(tmp_path: Path) -> None:
    (tmp_path / "a.parquet").touch()
    assert registry.detect(tmp_path) is None
    (tmp_path / "a.npz").touch()
    assert registry.detect(tmp_path) == "datacomp"
    (tmp_path / "a.tar").touch()  # images: an img2dataset pool
    assert registry.detect(tmp_path) is None


def test_a_toy_source_ingests_through_the_registry(toy: NpySource, pool: Path, tmp_path: Path) -> None:
    assert registry.get(TOY) is toy and TOY in registry.names()
    settings = _settings(TOY)
    got = registry.get(settings.embeddings.source).ingest(pool, SHARD, settings, home=tmp_path / "home")
    truth = _truth(pool)
    nan_row = truth.index("ok")
    assert got.samples["status"].to_list() == [
        "bad_embedding" if i == nan_row else t for i, t in enumerate(truth)]
    cause = got.problems.filter(pl.col("cause").str.starts_with("bad_embedding"))["cause"].to_list()
    assert cause == [f"bad_embedding: row {nan_row} of {SHARD}.img.npy has a NaN, inf or zero-norm image or text "
                     "embedding"]


def test_the_fingerprint_lists_the_toy_source_files(toy: NpySource, pool: Path, tmp_path: Path) -> None:
    from dbprune_assets.defs.common import Versions
    from dbprune_assets.defs.ingest import ingest_inputs

    layout = Layout(tmp_path / "home", pool)
    versions = Versions(layout, _settings(TOY), [SHARD], {})
    files = [pool / f"{SHARD}{ext}" for ext in (".parquet", ".tar", ".img.npy", ".txt.npy")]
    assert ingest_inputs(versions, SHARD) == {"files": [file_signature(p) for p in files]}
    before = ingest_inputs(versions, SHARD)
    np.save(pool / f"{SHARD}.txt.npy", np.zeros((3, D), np.float16))  # a source file changed: the shard is stale
    assert ingest_inputs(versions, SHARD) != before


def test_the_toy_source_writes_the_clip_retrieval_layout(toy: NpySource, pool: Path, tmp_path: Path) -> None:
    layout = Layout(tmp_path / "home", pool)
    settings = _settings(TOY)
    ingest = toy.ingest(pool, SHARD, settings, layout.home)
    write_parquet(layout.table("samples", SHARD), ingest.samples, layout.tmp)
    ok = ingest.samples.filter(pl.col("status") == "ok")
    (done,) = toy.write_embeddings(layout, settings, [SHARD])
    assert (done.shard, done.rows, done.dim, done.source) == (SHARD, ok.height, D, pool / f"{SHARD}.img.npy")
    img, txt = np.load(layout.img_emb(SHARD)), np.load(layout.text_emb(SHARD))
    stored_img, stored_txt = np.load(pool / f"{SHARD}.img.npy"), np.load(pool / f"{SHARD}.txt.npy")
    rows = ok["row"].to_numpy()
    assert img.dtype == np.float16 and img.shape == (ok.height, D)
    np.testing.assert_array_equal(img, stored_img[rows])
    np.testing.assert_array_equal(txt, stored_txt[rows])
    meta = pl.read_parquet(layout.emb_metadata(SHARD))
    assert meta.columns == ["uid", "shard", "key", "row", "clip_score"]
    assert meta["uid"].to_list() == ok["uid"].to_list() and meta["row"].to_list() == rows.tolist()
    np.testing.assert_array_equal(meta["clip_score"].to_numpy(), clip_scores(img, txt))
    # and what the encoder asset records instead of a model
    record = toy.encoder_record(settings)
    assert record is not None and record.used == f"{TOY} (stored embeddings; no encoder)"


def test_compute_has_no_stored_pairs(tmp_path: Path) -> None:
    compute = registry.get("compute")
    assert compute.encoder_record(_settings("compute")) is None
    with pytest.raises(TypeError, match="computes them with the encoder"):
        next(compute.write_embeddings(Layout(tmp_path, tmp_path), _settings("compute"), ["x"]))


def test_settings_accept_a_registered_source_and_refuse_others(toy: NpySource) -> None:
    from dbprune_assets.core.settings import SettingsError, build_settings

    registry.check_setting(build_settings({"embeddings": {"source": TOY}}, profile="sample"))
    with pytest.raises(SettingsError, match=f"embeddings.source: 'parquet_only' is no embedding source; allowed: "
                                            f"compute, datacomp, clip_retrieval, {TOY}"):
        registry.check_setting(build_settings({"embeddings": {"source": "parquet_only"}}, profile="sample"))
