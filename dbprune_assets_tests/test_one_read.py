"""One read per input file: a precomputed source's ingest stages the ok rows'
pairs it reads anyway, and the embeddings stage moves them into place instead
of reading the npz (or the clip-retrieval parts) again, with the same bytes
as reading them; staged pairs of files that changed since are not used."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbprune_assets.core.pool.sources import clip_retrieval, datacomp, registry
from dbprune_assets.core.pool.sources.stored import EmbeddingFiles
from dbprune_assets.core.settings import PoolSettings, build_settings
from dbprune_assets.core.store.layout import Layout, list_pool_shards
from dbprune_assets.samplepool import write_datacomp_pool, write_sample_pool

from .test_clip_retrieval import write_part


def _counting(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[int]:
    """Count the calls of ``module.name`` (a list: its length is the count)."""
    calls: list[int] = []
    real: Callable = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def _ingest_then_embed(layout: Layout, settings: Any, shards: list[str], drop_staged: bool = False) -> None:
    """What ``raw_metadata`` then ``embeddings`` do through the source."""
    source = registry.get(settings.embeddings.source)
    for shard in shards:
        result = source.ingest(layout.pool, shard, settings, layout.home)
        layout.table("samples", shard).parent.mkdir(parents=True, exist_ok=True)
        result.samples.write_parquet(layout.table("samples", shard))
        if drop_staged:
            import shutil

            shutil.rmtree(layout.staged_pairs(shard))
    list(source.write_embeddings(layout, settings, shards))


def _files(layout: Layout, shard: str) -> list[bytes]:
    return [p.read_bytes() for p in EmbeddingFiles.of(layout, shard).files()]


def test_a_datacomp_pool_reads_each_npz_once_with_the_same_bytes(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    pool = tmp_path / "pool"
    write_datacomp_pool(pool, PoolSettings(shards=3, samples_per_shard=120, concepts=4, seed=2), models=("b32",))
    shards = list_pool_shards(pool)
    settings = build_settings({"embeddings": {"source": "datacomp", "model": "b32"}}, profile="paper")
    reads = _counting(monkeypatch, datacomp, "read_datacomp")
    once = Layout(home=tmp_path / "once", pool=pool)
    _ingest_then_embed(once, settings, shards)
    assert len(reads) == len(shards)  # ingest's reads only
    assert not (once.home / "embeddings" / "staged").exists() or not any((once.home / "embeddings" / "staged").iterdir())
    twice = Layout(home=tmp_path / "twice", pool=pool)
    _ingest_then_embed(twice, settings, shards, drop_staged=True)  # nothing staged: the npz is read again
    assert len(reads) == 3 * len(shards)
    for shard in shards:
        assert _files(once, shard) == _files(twice, shard)
        ok = pl.read_parquet(once.table("samples", shard)).filter(pl.col("status") == "ok")
        assert pl.read_parquet(once.emb_metadata(shard))["uid"].to_list() == ok["uid"].to_list()


def test_staged_pairs_of_a_changed_npz_are_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pool = tmp_path / "pool"
    write_datacomp_pool(pool, PoolSettings(shards=1, samples_per_shard=60, concepts=3, seed=4), models=("b32",))
    (shard,) = list_pool_shards(pool)
    settings = build_settings({"embeddings": {"source": "datacomp", "model": "b32"}}, profile="paper")
    layout = Layout(home=tmp_path / "home", pool=pool)
    source = registry.get("datacomp")
    result = source.ingest(pool, shard, settings, layout.home)
    layout.table("samples", shard).parent.mkdir(parents=True)
    result.samples.write_parquet(layout.table("samples", shard))
    npz = pool / f"{shard}.npz"
    with np.load(npz) as z:
        arrays = {k: z[k].copy() for k in z.files}
    arrays["b32_img"] = arrays["b32_img"][:, ::-1].copy()  # other vectors, same rows: ingest's statuses still hold
    np.savez(npz, **arrays)
    reads = _counting(monkeypatch, datacomp, "read_datacomp")
    (done,) = source.write_embeddings(layout, settings, [shard])
    assert len(reads) == 1  # the stamp names the old npz: read again
    ok = result.samples.filter(pl.col("status") == "ok")["row"].to_numpy()
    np.testing.assert_array_equal(np.load(layout.img_emb(shard)), arrays["b32_img"][ok])
    assert done.data_version == source.pairs_version(layout, settings, shard)
    assert not layout.staged_pairs(shard).exists()


def test_a_clip_retrieval_pool_gathers_each_row_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pool = tmp_path / "pool"
    write_sample_pool(pool, PoolSettings(shards=2, samples_per_shard=30, concepts=3, image_size=16,
                                         reference_samples=0, eval_per_class=1))
    truth = pl.read_parquet(pool / "ground_truth.parquet")
    rows = truth.filter(pl.col("planted_status").is_in(["ok", "empty_caption"])).sort("shard", "key")
    rng = np.random.default_rng(0)
    img = rng.standard_normal((rows.height, 8)).astype(np.float16)
    txt = rng.standard_normal((rows.height, 8)).astype(np.float16)
    img[3, 0] = np.nan  # a bad row: not among the staged pairs
    half = rows.height // 2
    for part, sel in (("0", slice(half, None)), ("1", slice(0, half))):  # parts across the shards
        write_part(pool, part, rows["key"][sel].to_list(), img[sel], txt[sel], rows["uid"][sel].to_list())
    shards = list_pool_shards(pool)
    settings = build_settings({"embeddings": {"source": "clip_retrieval"}}, profile="paper")
    gathers = _counting(monkeypatch, clip_retrieval, "gather")
    once = Layout(home=tmp_path / "once", pool=pool)
    _ingest_then_embed(once, settings, shards)
    assert len(gathers) == len(shards)
    twice = Layout(home=tmp_path / "twice", pool=pool)
    _ingest_then_embed(twice, settings, shards, drop_staged=True)
    assert len(gathers) == 3 * len(shards)
    for shard in shards:
        assert _files(once, shard) == _files(twice, shard)
    statuses = pl.concat(pl.read_parquet(once.table("samples", s)) for s in shards)
    assert statuses.filter(pl.col("key") == rows["key"][3])["status"].to_list() == ["bad_embedding"]


# ---------------------------------------------------------------------------
# the row rules of a DataComp shard, vectorised: the same as row by row
# ---------------------------------------------------------------------------
def _statuses_row_by_row(uids: list, texts: list, bad: np.ndarray) -> tuple[list[str], list[str]]:
    """The rules as stated (``datacomp._statuses``), one row at a time: statuses and problem causes' heads."""
    from dbprune_assets.core.pool.shards import HEX32

    status, causes, first = [], [], {}
    for i, (uid, text) in enumerate(zip(uids, texts)):
        if uid is None or not uid.strip():
            raise ValueError(i)
        if not HEX32.fullmatch(uid):
            status.append("bad_uid")
        elif uid.lower() in first:
            status.append("duplicate_uid")
            causes.append(f"duplicate_uid: uid {uid} of row {i} is row {first[uid.lower()]}'s")
            continue
        else:
            first[uid.lower()] = i
            status.append("bad_embedding" if bad[i] else "empty_caption" if text is None or not text.strip() else "ok")
        if status[-1] not in ("ok", "duplicate_uid"):
            causes.append(f"{status[-1]}:")
    return status, causes


_HEX = st.sampled_from(["0" * 32, "A" * 32, "a" * 32, "0123456789abcdef" * 2, "0123456789ABCDEF" * 2])
_UID = st.one_of(_HEX, st.sampled_from(["x" * 32, "0" * 31, "0" * 33, " " + "0" * 31, "0" * 32 + "\n", "g" * 32]))
_TEXT = st.one_of(st.none(), st.sampled_from(["", " ", "\x1c", "\x1f\t", "\u3000", "\xa0", "\u200b", "a", " a "]),
                  st.text(max_size=4))


@given(st.lists(st.tuples(_UID, _TEXT, st.booleans()), min_size=1, max_size=40))
@settings(max_examples=200, deadline=None)
def test_vectorised_row_rules_equal_the_rules_row_by_row(rows: list[tuple[str, str | None, bool]]) -> None:
    uids, texts, bad = [r[0] for r in rows], [r[1] for r in rows], np.array([r[2] for r in rows])
    status, problems = datacomp._statuses(uids, texts, bad, Path("s.parquet"), "s", "s.npz")
    want, causes = _statuses_row_by_row(uids, texts, bad)
    assert status == want
    assert len(problems) == len(causes)
    for (_, uid, _, cause), head in zip(problems, causes):
        assert cause.startswith(head)


def test_a_row_without_uid_is_an_error_naming_it() -> None:
    from dbprune_assets.core.pool.shards import ShardError

    with pytest.raises(ShardError, match=r"row 2 of shard s has no uid"):
        datacomp._statuses(["0" * 32, "bad", " \t"], ["a", "b", "c"], np.zeros(3, bool), Path("s.parquet"), "s", "o")
