"""clip-retrieval output as the embedding source (``embeddings.source:
clip_retrieval``): hand-made output folders whose parts do not follow the
pool's shards, linked by key or uid through the on-disk index, with exact
accounting; the index rebuilt only when a metadata file changes; every bad
input an error naming the file; and the whole graph through the exports."""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbprune_assets.core.pool.shards import PROBLEMS_SCHEMA, SAMPLES_SCHEMA, ShardIngest
from dbprune_assets.core.pool.sources import clip_retrieval
from dbprune_assets.core.pool.sources import clip_retrieval_index as source_index
from dbprune_assets.core.pool.sources.readers import SourceError, clip_scores
from dbprune_assets.core.pool.sources.stored import EmbeddingFiles

D = 8


def _unit(rng: np.random.Generator, n: int, d: int = D) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def _uid(key: str) -> str:
    return f"{int(key):032x}"


def write_part(folder: Path, part: str, image_paths: list[str], img: np.ndarray, txt: np.ndarray,
               uids: list[str | None] | None = None) -> None:
    """One part as clip-retrieval's writer lays it out: image_path and caption
    (+ the json's columns, uid among them, with --enable_metadata)."""
    for sub in ("img_emb", "text_emb", "metadata"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    np.save(folder / "img_emb" / f"img_emb_{part}.npy", img)
    np.save(folder / "text_emb" / f"text_emb_{part}.npy", txt)
    cols: dict[str, list] = {"image_path": image_paths, "caption": [f"caption of {p}" for p in image_paths]}
    if uids is not None:
        cols["uid"] = uids
        cols["key"] = image_paths
    pl.DataFrame(cols, schema={c: pl.String for c in cols}).write_parquet(
        folder / "metadata" / f"metadata_{part}.parquet")


# ---------------------------------------------------------------------------
# a hand-made pool of 3 shards and a source of 2 parts
# ---------------------------------------------------------------------------
SHARDS = ("00000", "00001", "00002")
KEYS = {s: [f"{s}{i:04d}" for i in range(4)] for s in SHARDS}  # img2dataset keys: shard + index
FAILED = "000010003"  # a failed download: no image, so no source row and no link
MISSING = "000020001"  # an ok pool sample the source has no row for -> no_embedding
NAN = "000010001"  # its source row has a NaN -> bad_embedding
STRAY = "000090000"  # a source row for a key the pool does not have: ignored
#: part 0 and part 1 in inference order, across shard boundaries
PART_KEYS = {
    "0": ["000020000", "000000001", "000010000", "000000003", "000010002", STRAY],
    "1": ["000000000", NAN, "000020003", "000000002", "000020002"],
}


def _ingest(shard: str) -> ShardIngest:
    keys = KEYS[shard]
    status = ["failed_download" if k == FAILED else "ok" for k in keys]
    samples = pl.DataFrame({
        "uid": [_uid(k) for k in keys], "shard": [shard] * 4, "key": keys, "row": list(range(4)),
        "caption": ["c"] * 4, "width": [8] * 4, "height": [8] * 4, "status": status,
    }, schema=SAMPLES_SCHEMA)
    problems = pl.DataFrame([(shard, FAILED, "ingest", "failed_download: x")] if FAILED in keys else [],
                            schema=PROBLEMS_SCHEMA, orient="row")
    return ShardIngest(shard, samples, problems)


def _source(folder: Path, by: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    stored = {}
    for part, keys in PART_KEYS.items():
        img, txt = _unit(rng, len(keys)), _unit(rng, len(keys))
        if NAN in keys:
            img[keys.index(NAN), 2] = np.nan
        # webdataset input: image_path is the sample's __key__ as is
        write_part(folder, part, keys, img, txt, [_uid(k) for k in keys] if by == "uid" else None)
        stored.update({k: (img[i], txt[i]) for i, k in enumerate(keys)})
    return stored


@pytest.mark.parametrize("by", ["key", "uid"])
def test_shards_link_across_parts_with_exact_accounting(tmp_path: Path, by: str) -> None:
    src, home, tmp = tmp_path / "cr", tmp_path / "home", tmp_path / "home" / ".tmp"
    stored = _source(src, by)
    got = {s: clip_retrieval.link_clip_retrieval_shard(_ingest(s), src, home, tmp) for s in SHARDS}
    assert got["00000"].samples["status"].to_list() == ["ok"] * 4
    assert got["00001"].samples["status"].to_list() == ["ok", "bad_embedding", "ok", "failed_download"]
    assert got["00002"].samples["status"].to_list() == ["ok", "no_embedding", "ok", "ok"]
    statuses = pl.concat([g.samples for g in got.values()])["status"].value_counts().sort("status").rows()
    assert statuses == [("bad_embedding", 1), ("failed_download", 1), ("no_embedding", 1), ("ok", 9)]
    problems = pl.concat([g.problems for g in got.values()])
    assert problems.rows() == [
        ("00001", FAILED, "ingest", "failed_download: x"),
        ("00001", NAN, "ingest", "bad_embedding: row 1 of metadata_1.parquet (img_emb_1.npy + text_emb_1.npy) "
                                 "has a NaN, inf or zero-norm image or text embedding"),
        ("00002", MISSING, "ingest", f"no_embedding: the clip-retrieval output {src.resolve()} has no row for "
                                     f"{by} {MISSING if by == 'key' else _uid(MISSING)}"),
    ]
    # the embeddings stage: every ok row's stored pair, in the shard's order, float16, its cosine
    dim = None
    for shard, g in got.items():
        ok = g.samples.filter(pl.col("status") == "ok").select("uid", "key", "row")
        out = tmp_path / "emb" / shard
        files = EmbeddingFiles(out / "i.npy", out / "t.npy", out / "m.parquet", tmp)
        dim = clip_retrieval.write_clip_retrieval_embeddings(src, ok, home, files, shard, expected_dim=dim)
        img, txt = np.load(out / "i.npy"), np.load(out / "t.npy")
        keys = ok["key"].to_list()
        assert img.dtype == np.float16 and img.shape == (len(keys), D)
        np.testing.assert_array_equal(img, np.stack([stored[k][0] for k in keys]))
        np.testing.assert_array_equal(txt, np.stack([stored[k][1] for k in keys]))
        meta = pl.read_parquet(out / "m.parquet")
        assert meta["key"].to_list() == keys and meta["row"].to_list() == ok["row"].to_list()
        assert meta["shard"].to_list() == [shard] * len(keys) and meta["uid"].to_list() == ok["uid"].to_list()
        np.testing.assert_array_equal(meta["clip_score"].to_numpy(), clip_scores(img, txt))
    assert dim == D
    k = "000000003"  # one cosine by hand
    a, b = (v.astype(np.float32) for v in stored[k])
    row = pl.read_parquet(tmp_path / "emb" / "00000" / "m.parquet").filter(pl.col("key") == k)
    assert row["clip_score"][0] == pytest.approx(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), abs=1e-6)
    with pytest.raises(SourceError, match=rf"{src.resolve()}: embeddings are 8-d but earlier shards were 16-d"):
        clip_retrieval.write_clip_retrieval_embeddings(src, ok, home, files, "00002", expected_dim=16)


def test_the_index_is_sorted_and_names_the_stray_row(tmp_path: Path) -> None:
    src = tmp_path / "cr"
    _source(src, "key")
    idx = source_index.ensure_index(src, tmp_path / "idx", tmp_path / "tmp")
    assert (idx.by, idx.parts, idx.rows, idx.dim, idx.dtype, idx.built) == ("key", ("0", "1"), (6, 5), D, "float16",
                                                                             True)
    table = pl.read_parquet(idx.ids)
    assert table["id"].to_list() == sorted(PART_KEYS["0"] + PART_KEYS["1"])
    assert table.filter(pl.col("id") == STRAY).rows() == [(STRAY, 0, 5)]
    part, row = source_index.lookup(idx, [NAN, MISSING, STRAY], tmp_path / "tmp")
    assert part.tolist() == [1, -1, 0] and row.tolist() == [1, -1, 5]


def test_index_rebuilt_when_a_metadata_file_changes_and_not_otherwise(tmp_path: Path) -> None:
    src, out, tmp = tmp_path / "cr", tmp_path / "idx", tmp_path / "tmp"
    _source(src, "key")
    first = source_index.ensure_index(src, out, tmp)
    assert first.built
    mtime = first.ids.stat().st_mtime_ns
    sig = source_index.source_signature(src)
    again = source_index.ensure_index(src, out, tmp)
    assert not again.built and again.ids == first.ids and again.ids.stat().st_mtime_ns == mtime
    assert source_index.source_signature(src) == sig
    # an array rewritten (same shape): the signature changes, the sorted ids are kept
    arr = src / "img_emb" / "img_emb_0.npy"
    st = arr.stat()
    os.utime(arr, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    kept = source_index.ensure_index(src, out, tmp)
    assert not kept.built and kept.ids.stat().st_mtime_ns == mtime
    assert source_index.source_signature(src) != sig and kept.signature == source_index.source_signature(src)
    good = np.load(arr)
    np.save(arr, good[:5])  # an array rewritten with a row less: the cheap checks catch it without a rebuild
    with pytest.raises(SourceError, match=rf"{arr.resolve()}: 5 rows but metadata_0.parquet has 6"):
        source_index.ensure_index(src, out, tmp)
    np.save(arr, good)
    assert not source_index.ensure_index(src, out, tmp).built
    # a metadata file changes: rebuilt, the new key is found, the old file is gone
    rng = np.random.default_rng(9)
    write_part(src, "1", ["000000000", NAN, "000020003", "000000002", "000020001"], _unit(rng, 5), _unit(rng, 5))
    rebuilt = source_index.ensure_index(src, out, tmp)
    assert rebuilt.built and rebuilt.ids != first.ids and not first.ids.exists()
    assert sorted(p.name for p in out.glob("ids-*.parquet")) == [rebuilt.ids.name]
    part, row = source_index.lookup(rebuilt, [MISSING, "000020002"], tmp)
    assert part.tolist() == [1, -1] and row.tolist() == [4, -1]
    # only a touch of the metadata (same bytes, new mtime): its signature changed, so rebuilt
    meta = src / "metadata" / "metadata_0.parquet"
    st = meta.stat()
    os.utime(meta, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert source_index.ensure_index(src, out, tmp).built
    assert not source_index.ensure_index(src, out, tmp).built
    # a part that comes: rebuilt with it
    write_part(src, "2", ["000030000"], _unit(rng, 1), _unit(rng, 1))
    grown = source_index.ensure_index(src, out, tmp)
    assert grown.built and grown.parts == ("0", "1", "2") and grown.rows == (6, 5, 1)


def _broken(src: Path, case: str) -> str:
    """Break a good two-part source; the error's expected words."""
    rng = np.random.default_rng(3)
    write_part(src, "0", ["000000000", "000000001", "000000002"], _unit(rng, 3), _unit(rng, 3))
    write_part(src, "1", ["000000003", "000000004"], _unit(rng, 2), _unit(rng, 2))
    part1 = f"{src}/{{}}/{{}}_1.{{}}"
    if case == "missing_text":
        (src / "text_emb" / "text_emb_1.npy").unlink()
        return rf"{part1.format('text_emb', 'text_emb', 'npy')} is missing: .*re-run its inference"
    if case == "missing_metadata":
        (src / "metadata" / "metadata_1.parquet").unlink()
        return rf"{part1.format('metadata', 'metadata', 'parquet')} is missing"
    if case == "rows":
        np.save(src / "img_emb" / "img_emb_1.npy", _unit(rng, 3))
        return (rf"{part1.format('img_emb', 'img_emb', 'npy')}: 3 rows but metadata_1.parquet has 2 .*"
                r"re-run clip-retrieval's inference for part 1")
    if case == "dim":
        write_part(src, "1", ["000000003", "000000004"], _unit(rng, 2, 16), _unit(rng, 2, 16))
        return (rf"{part1.format('img_emb', 'img_emb', 'npy')}: 16-d embeddings but {src}/img_emb/img_emb_0.npy is "
                r"8-d; every part must come from one CLIP model")
    if case == "text_dim":
        np.save(src / "text_emb" / "text_emb_1.npy", _unit(rng, 2, 4))
        return rf"{part1.format('text_emb', 'text_emb', 'npy')}: 4-d text embeddings but img_emb_1.npy is 8-d"
    if case == "twice_across_parts":
        write_part(src, "1", ["000000003", "000000001"], _unit(rng, 2), _unit(rng, 2))
        return (rf"image_path '000000001' appears 2 times in {src} \(row 1 of {src}/metadata/metadata_0.parquet, "
                rf"row 1 of {src}/metadata/metadata_1.parquet\); every uid/key must have one embedding row")
    if case == "twice_in_a_part":
        write_part(src, "1", ["000000003", "000000003"], _unit(rng, 2), _unit(rng, 2))
        return (rf"image_path '000000003' appears 2 times in {src} \(row 0 of {src}/metadata/metadata_1.parquet, "
                rf"row 1 of {src}/metadata/metadata_1.parquet\)")
    if case == "uid_twice":
        write_part(src, "0", ["000000000", "000000001", "000000002"], _unit(rng, 3), _unit(rng, 3), ["a", "b", "c"])
        write_part(src, "1", ["000000003", "000000004"], _unit(rng, 2), _unit(rng, 2), ["d", "b"])
        return rf"uid 'b' appears 2 times in {src} \(row 1 of .*metadata_0.parquet, row 1 of .*metadata_1.parquet\)"
    if case == "no_uid":
        write_part(src, "1", ["000000003", "000000004"], _unit(rng, 2), _unit(rng, 2), ["d", None])
        write_part(src, "0", ["000000000", "000000001", "000000002"], _unit(rng, 3), _unit(rng, 3), ["a", "b", "c"])
        return rf"{part1.format('metadata', 'metadata', 'parquet')}: row 1 has no uid"
    if case == "mixed_uid":
        write_part(src, "1", ["000000003", "000000004"], _unit(rng, 2), _unit(rng, 2), ["d", "e"])
        return (rf"{src}/metadata/metadata_0.parquet has no uid column but "
                rf"{part1.format('metadata', 'metadata', 'parquet')} has")
    if case == "no_link_column":
        pl.DataFrame({"caption": ["x", "y"]}).write_parquet(src / "metadata" / "metadata_1.parquet")
        return rf"{part1.format('metadata', 'metadata', 'parquet')} has neither uid nor image_path"
    if case == "not_npy":
        (src / "img_emb" / "img_emb_1.npy").write_bytes(b"not an array")
        return rf"{part1.format('img_emb', 'img_emb', 'npy')}: not a readable .npy array"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing_text", "missing_metadata", "rows", "dim", "text_dim", "twice_across_parts",
                                  "twice_in_a_part", "uid_twice", "no_uid", "mixed_uid", "no_link_column", "not_npy"])
def test_bad_sources_are_errors_naming_the_file(tmp_path: Path, case: str) -> None:
    src = (tmp_path / "cr").resolve()
    words = _broken(src, case)
    with pytest.raises(SourceError, match=words):
        source_index.ensure_index(src, tmp_path / "idx", tmp_path / "tmp")
    assert not list((tmp_path / "idx").glob("ids-*.parquet"))  # nothing half-built left behind


def test_a_repeated_id_across_the_check_batches_is_found(tmp_path: Path) -> None:
    """The duplicate check streams the sorted ids in batches of 65536: a
    repeated id at a batch boundary (three times) is still found, with every row."""
    n = 70_000
    keys = [f"{i:09d}" for i in range(n)]
    keys[65_536] = keys[65_535]
    keys[65_537] = keys[65_535]
    x = np.ones((n, 2), np.float16)
    write_part(tmp_path / "cr", "0", keys, x, x)
    with pytest.raises(SourceError, match=r"'000065535' appears 3 times .*row 65535 of .*, row 65536 of .*, "
                                          r"row 65537 of .*metadata_0.parquet\)"):
        source_index.ensure_index(tmp_path / "cr", tmp_path / "idx", tmp_path / "tmp")


def test_no_folder_and_no_parts_say_what_to_set(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"does not exist: set embeddings.path to clip-retrieval's output folder"):
        source_index.ensure_index(tmp_path / "nowhere", tmp_path / "idx", tmp_path / "tmp")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"has no img_emb/img_emb_N.npy: point embeddings.path"):
        source_index.ensure_index(tmp_path / "empty", tmp_path / "idx", tmp_path / "tmp")


def test_a_broken_source_stops_ingest_rather_than_failing_each_shard(tmp_path: Path) -> None:
    """The source's ingest raises the SourceError (not a ShardError, which
    would record the shard as failed and go on with the others)."""
    from dbprune_assets.core.settings import build_settings
    from dbprune_assets.core.pool.sources import registry
    from dbprune_assets.samplepool import write_sample_pool
    from dbprune_assets.core.settings import PoolSettings

    pool = tmp_path / "pool"
    write_sample_pool(pool, PoolSettings(shards=1, samples_per_shard=6, concepts=2, image_size=16,
                                         reference_samples=0, eval_per_class=1))
    settings = build_settings({"embeddings": {"source": "clip_retrieval", "path": str(tmp_path / "cr")}},
                              profile="paper")
    keys = pl.read_parquet(pool / "00000.parquet")["key"].to_list()
    rng = np.random.default_rng(1)
    write_part(tmp_path / "cr", "0", keys[:3], _unit(rng, 3), _unit(rng, 3))
    write_part(tmp_path / "cr", "1", keys[3:], _unit(rng, 3), _unit(rng, 2))
    source = registry.get(settings.embeddings.source)
    with pytest.raises(SourceError, match=r"text_emb_1.npy: 2 rows but metadata_1.parquet has 3"):
        source.ingest(pool, "00000", settings, home=tmp_path / "home")
    write_part(tmp_path / "cr", "1", keys[3:], _unit(rng, 3), _unit(rng, 3))
    got = source.ingest(pool, "00000", settings, home=tmp_path / "home")
    truth = pl.read_parquet(pool / "ground_truth.parquet")["planted_status"].to_list()
    assert got.samples["status"].to_list() == truth  # every downloaded sample has its row
    assert (tmp_path / "home" / "embeddings" / "source_index" / "index.json").is_file()


# ---------------------------------------------------------------------------
# point lookups of 32-hex uids: the memory-mapped uid arrays
# ---------------------------------------------------------------------------
#: uids whose 16 bytes start or end with 00 (numpy drops an S item's trailing
#: NULs when it turns it into bytes: S16 is exact only if nothing does that)
EDGE_UIDS = ["00" * 16, "00" * 15 + "01", "01" + "00" * 15, "01" + "00" * 14 + "01", "ff" * 16, "ff" * 15 + "00",
             "00" * 8 + "ff" * 8, "ab" * 15 + "00"]


def _uid_source(folder: Path, parts: list[list[str]]) -> dict[str, tuple[int, int]]:
    """A source linked by uid, ``parts[p]`` the uids of part p in row order; ``{uid: (part, row)}``."""
    where, at = {}, 0
    for p, uids in enumerate(parts):
        x = np.ones((len(uids), 2), np.float16)
        write_part(folder, str(p), [f"{at + i:09d}" for i in range(len(uids))], x, x, uids)
        where.update({u: (p, r) for r, u in enumerate(uids)})
        at += len(uids)
    return where


def _expected(where: dict[str, tuple[int, int]], queries: list[str]) -> tuple[list[int], list[int]]:
    return [where.get(q, (-1, -1))[0] for q in queries], [where.get(q, (-1, -1))[1] for q in queries]


def _both_paths(idx: source_index.SourceIndex, queries: list[str], tmp: Path) -> tuple[tuple, tuple]:
    from dataclasses import replace

    assert idx.uids is not None
    fast = source_index.lookup(idx, queries, tmp)
    slow = source_index.lookup(replace(idx, uids=None, uid_case=None), queries, tmp)  # the DuckDB join
    assert fast[0].dtype == slow[0].dtype == np.int32 and fast[1].dtype == slow[1].dtype == np.int64
    return (fast[0].tolist(), fast[1].tolist()), (slow[0].tolist(), slow[1].tolist())


def test_uid_lookup_by_the_arrays_equals_the_duckdb_join(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    uids = [bytes(b).hex() for b in rng.integers(0, 256, (300, 16), dtype=np.uint8)] + EDGE_UIDS
    order = rng.permutation(len(uids))  # inference order, unrelated to the uid order
    parts = [[uids[i] for i in order[a:b]] for a, b in ((0, 120), (120, 121), (121, len(uids)))]
    where = _uid_source(tmp_path / "cr", parts)
    idx = source_index.ensure_index(tmp_path / "cr", tmp_path / "idx", tmp_path / "tmp")
    assert idx.by == "uid" and idx.uid_case == "lower" and idx.uids == tmp_path / "idx" / f"{idx.ids.stem}-uid16"
    stored = np.load(idx.uids / "uid.npy")
    assert stored.dtype == np.dtype("S16") and stored.shape == (len(uids),)
    # the raw bytes, trailing 00s included, are the sorted uids; part and row aligned with them
    assert [bytes(r).hex() for r in stored.view(np.uint8).reshape(-1, 16)] == sorted(uids)
    assert list(zip(np.load(idx.uids / "part.npy").tolist(), np.load(idx.uids / "row.npy").tolist())) == [
        where[u] for u in sorted(uids)]
    absent = [bytes(b).hex() for b in rng.integers(0, 256, (200, 16), dtype=np.uint8)]
    near = ["01" + "00" * 13 + "01" + "00", "00" * 14 + "01" + "00", "ff" * 14 + "fe" + "00", "ff" * 15 + "01",
            "00" * 15 + "02", "ab" * 15 + "01"]  # one byte off an edge uid
    not_hex = [uids[0].upper(), uids[1][:-2], uids[2] + "00", "", "None", "g" * 32, "é" * 16, " " + uids[3][1:]]
    queries = list(rng.permutation(uids[:150] + EDGE_UIDS + absent + near + not_hex + uids[:3]))  # repeats too
    assert not set(absent + near + not_hex) & set(uids)
    fast, slow = _both_paths(idx, queries, tmp_path / "tmp")
    assert fast == slow == _expected(where, queries)
    assert sum(p >= 0 for p in fast[0]) == 150 + len(EDGE_UIDS) + 3
    # a shard's ids as the pool gives them (a numpy object array), and none at all
    part, row = source_index.lookup(idx, np.asarray(EDGE_UIDS, dtype=object), tmp_path / "tmp")
    assert (part.tolist(), row.tolist()) == _expected(where, EDGE_UIDS)
    assert [a.tolist() for a in source_index.lookup(idx, [], tmp_path / "tmp")] == [[], []]
    _source(tmp_path / "keys", "key")
    key_idx = source_index.ensure_index(tmp_path / "keys", tmp_path / "kidx", tmp_path / "tmp")
    assert key_idx.uids is None and not list((tmp_path / "kidx").glob("*-uid16"))  # keys: the parquet serves


def test_uid_arrays_are_rebuilt_with_the_index_and_only_then(tmp_path: Path) -> None:
    import json

    src, out, tmp = tmp_path / "cr", tmp_path / "idx", tmp_path / "tmp"
    a, b, c = "0a" * 16, "0b" * 15 + "00", "0c" * 16
    _uid_source(src, [[a, b], [c]])
    first = source_index.ensure_index(src, out, tmp)
    assert first.built and first.uids is not None
    built = (first.uids / "uid.npy").stat().st_mtime_ns
    arr = src / "img_emb" / "img_emb_0.npy"  # an array touched: nothing rebuilt
    st = arr.stat()
    os.utime(arr, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    kept = source_index.ensure_index(src, out, tmp)
    assert not kept.built and kept.uids == first.uids and (kept.uids / "uid.npy").stat().st_mtime_ns == built
    # a metadata file changes: new arrays (the new uid found, the removed one not), the old folder gone
    d = "0d" * 15 + "00"
    x = np.ones((2, 2), np.float16)
    write_part(src, "1", ["000000002", "000000003"], x, x, [d, c])
    rebuilt = source_index.ensure_index(src, out, tmp)
    assert rebuilt.built and rebuilt.uids is not None and rebuilt.uids != first.uids and not first.uids.exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("ids-")) == sorted([rebuilt.ids.name,
                                                                                        rebuilt.uids.name])
    part, row = source_index.lookup(rebuilt, [d, c, b, "0c" * 15 + "0d"], tmp)
    assert part.tolist() == [1, 1, 0, -1] and row.tolist() == [0, 1, 1, -1]
    # the arrays' folder lost, or an index of the format before them: rebuilt, with them
    shutil.rmtree(rebuilt.uids)
    again = source_index.ensure_index(src, out, tmp)
    assert again.built and again.uids == rebuilt.uids and again.uids.is_dir()
    manifest = out / source_index.MANIFEST
    old = {k: v for k, v in json.loads(manifest.read_text()).items() if k not in ("uids", "uid_case")}
    manifest.write_text(json.dumps({**old, "format": 1}))
    upgraded = source_index.ensure_index(src, out, tmp)
    assert upgraded.built and upgraded.uids == rebuilt.uids and upgraded.uid_case == "lower"
    assert json.loads(manifest.read_text())["uids"] == rebuilt.uids.name


@pytest.mark.parametrize("case", ["short", "not_hex", "mixed_case_rows", "mixed_case_batches", "mixed_in_a_uid"])
def test_uids_that_are_not_32_hex_of_one_case_keep_the_duckdb_join(tmp_path: Path, case: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from dbprune_assets.core.pool.sources import clip_retrieval_lookup as source_lookup

    uids = {
        "short": ["a", "b", "0a" * 16],
        "not_hex": ["0a" * 16, "0g" + "0a" * 15, "ff" * 16],
        # one uid with upper-case letters, one with lower-case: "AB.." and "ab.." would be one value as bytes
        "mixed_case_rows": ["0A" * 16, "0b" * 16, "11" * 16],
        # the same, a batch apart (batches of 2): lower-case letters in the first, upper-case in the second
        "mixed_case_batches": ["0a" * 16, "11" * 16, "1A" * 16, "22" * 16, "33" * 16, "44" * 16],
        "mixed_in_a_uid": ["0A0b" * 8, "11" * 16],
    }[case]
    monkeypatch.setattr(source_lookup, "_BATCH", 2)
    where = _uid_source(tmp_path / "cr", [uids[:2], uids[2:]])
    idx = source_index.ensure_index(tmp_path / "cr", tmp_path / "idx", tmp_path / "tmp")
    assert idx.by == "uid" and idx.uids is None and idx.uid_case is None
    assert not list((tmp_path / "idx").glob("*-uid16")) and not list((tmp_path / "tmp").rglob("*uid16*"))
    queries = uids + [u.swapcase() for u in uids] + ["0c" * 16, "a" * 31]
    part, row = source_index.lookup(idx, queries, tmp_path / "tmp")
    assert (part.tolist(), row.tolist()) == _expected(where, queries)


def test_upper_case_uids_have_arrays_and_match_only_as_written(tmp_path: Path) -> None:
    uids = ["0A" * 16, "FF" * 15 + "00", "12" * 16]
    where = _uid_source(tmp_path / "cr", [uids])
    idx = source_index.ensure_index(tmp_path / "cr", tmp_path / "idx", tmp_path / "tmp")
    assert idx.uid_case == "upper"
    queries = uids + [u.lower() for u in uids]  # "12..." has no letter: the same string either way
    fast, slow = _both_paths(idx, queries, tmp_path / "tmp")
    assert fast == slow == _expected(where, queries) == ([0, 0, 0, -1, -1, 0], [0, 1, 2, -1, -1, 2])


def test_a_repeated_hex_uid_is_an_error_and_leaves_no_arrays(tmp_path: Path) -> None:
    u = "00" * 15 + "ab"
    _uid_source(tmp_path / "cr", [["11" * 16, u], [u]])
    with pytest.raises(SourceError, match=rf"uid '{u}' appears 2 times in .*row 1 of .*metadata_0.parquet, "
                                          r"row 0 of .*metadata_1.parquet\)"):
        source_index.ensure_index(tmp_path / "cr", tmp_path / "idx", tmp_path / "tmp")
    assert not [p for p in (tmp_path / "idx").iterdir() if p.name.startswith("ids-")]
    assert not list((tmp_path / "tmp").rglob("*uid16*"))


@given(uids=st.sets(st.binary(min_size=16, max_size=16), min_size=1, max_size=40),
       others=st.lists(st.binary(min_size=16, max_size=16), max_size=20),
       cuts=st.lists(st.integers(0, 40), max_size=3), upper=st.booleans())
@settings(max_examples=25, deadline=None)
def test_property_uid_array_lookup_is_a_dict_lookup(uids: set[bytes], others: list[bytes], cuts: list[int],
                                                   upper: bool) -> None:
    import tempfile

    def hexed(b: bytes) -> str:
        return b.hex().upper() if upper else b.hex()

    ids = [hexed(b) for b in sorted(uids, key=lambda b: b[::-1])]  # any order but the sorted one
    bounds = sorted({0, len(ids), *(min(c, len(ids)) for c in cuts)})
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        where = _uid_source(root / "cr", [ids[a:b] for a, b in zip(bounds, bounds[1:]) if b > a])
        idx = source_index.ensure_index(root / "cr", root / "idx", root / "tmp")
        letters = any(ch.isalpha() for u in ids for ch in u)  # with digits only, either case: "lower"
        assert idx.uids is not None and idx.uid_case == ("upper" if upper and letters else "lower")
        queries = ids[::2] + [hexed(b) for b in others]
        part, row = source_index.lookup(idx, queries, root / "tmp")
        assert (part.tolist(), row.tolist()) == _expected(where, queries)


# ---------------------------------------------------------------------------
# the whole graph
# ---------------------------------------------------------------------------
def _tar_keys(folder: Path) -> list[str]:
    keys = []
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as tf:
            keys += [m.name.split(".", 1)[0] for m in tf.getmembers() if m.name.endswith(".jpg")]
    return keys


@pytest.mark.slow
def test_dbprune_run_with_clip_retrieval_embeddings(tmp_path: Path) -> None:
    """A generated webdataset pool embedded "by clip-retrieval" (synthetic unit
    vectors per concept, so no encoder is involved), 2 parts shuffled across
    the 3 shards, linked by uid, with a NaN row, a sample without a row and a
    row for a key the pool lacks: ``dbprune run`` trains and loads no encoder,
    the statuses and reasons are exact, and every strategy's tars hold exactly
    its kept samples."""
    import json

    from dbprune_assets.core.store.catalog import query
    from dbprune_assets.core.store.layout import Layout
    from dbprune_assets.core.settings import PoolSettings, STRATEGIES
    from dbprune_assets.samplepool import write_sample_pool

    from .conftest import run_cli, write_config

    pool, home = tmp_path / "pool", tmp_path / "home"
    pool_settings = dict(shards=3, samples_per_shard=100, concepts=6, image_size=32, reference_samples=0,
                         eval_per_class=1)
    write_sample_pool(pool, PoolSettings(**pool_settings))
    truth = pl.read_parquet(pool / "ground_truth.parquet")
    # clip-retrieval embeds what the tars hold: the downloaded, decodable samples
    rows = truth.filter(pl.col("planted_status").is_in(["ok", "empty_caption"])).sort("shard", "key")
    rng = np.random.default_rng(7)
    concept = _unit(rng, 6, 16).astype(np.float32)
    d = 16
    noise_i = rng.standard_normal((rows.height, d)).astype(np.float32) * 0.05
    noise_t = rng.standard_normal((rows.height, d)).astype(np.float32) * 0.05
    img = concept[rows["concept"].to_numpy()] + noise_i
    txt = concept[rows["caption_concept"].to_numpy()] + noise_t
    # an exact duplicate has its original's vectors (so SemDeDup finds it), a near one its own
    group_first: dict[int, int] = {}
    for i, (g, kind) in enumerate(zip(rows["dup_group"].to_list(), rows["dup_kind"].to_list())):
        if g is not None and kind in ("original", "exact"):
            if g in group_first:
                img[i], txt[i] = img[group_first[g]], txt[group_first[g]]
            else:
                group_first[g] = i
    img = (img / np.linalg.norm(img, axis=1, keepdims=True)).astype(np.float16)
    txt = (txt / np.linalg.norm(txt, axis=1, keepdims=True)).astype(np.float16)
    keys, uids = rows["key"].to_list(), rows["uid"].to_list()
    ok_keys = truth.filter(pl.col("planted_status") == "ok").sort("shard", "key")["key"].to_list()
    nan_key, missing_key = ok_keys[10], ok_keys[150]
    img[keys.index(nan_key), 0] = np.nan
    drop = keys.index(missing_key)
    keep = [i for i in range(len(keys)) if i != drop]
    order = rng.permutation(keep)  # inference order: unrelated to the shards
    where = {}  # key -> (part, row)
    for part, sel in (("0", order[: len(order) // 2]), ("1", order[len(order) // 2:])):
        paths = [keys[i] for i in sel]
        pi, pt, pu = img[sel], txt[sel], [uids[i] for i in sel]
        if part == "0":  # and a row for a key the pool does not have
            paths, pu = paths + ["999990000"], pu + ["f" * 32]
            pi, pt = np.vstack([pi, _unit(rng, 1, d)]), np.vstack([pt, _unit(rng, 1, d)])
        write_part(pool, part, paths, pi, pt, pu)  # embeddings.path defaults to the pool
        where.update({k: (part, r) for r, k in enumerate(paths)})
    for shard in truth["shard"].unique():  # every shard spread over both parts
        assert {where[k][0] for k in rows.filter(pl.col("shard") == shard)["key"] if k in where} == {"0", "1"}
    nan_part, nan_row = where[nan_key]
    expected_dups = 0  # exact copies that stay ok after the planted damage
    for g, members in rows.filter(pl.col("dup_kind").is_in(["original", "exact"])).group_by("dup_group"):
        usable = [k for k in members["key"].to_list() if k in ok_keys and k not in (nan_key, missing_key)]
        expected_dups += max(0, len(usable) - 1)

    config = write_config(tmp_path / "cr.yaml", pool=pool_settings, embeddings={"source": "clip_retrieval"},
                          semdedup={"dedup_k": 6}, dbp={"k": 6, "l": 3})
    env = {"DBPRUNE_HOME": str(home), "DBPRUNE_POOL": str(pool), "DBPRUNE_PROGRESS": "0"}
    r = run_cli("run", "--config", str(config), "--select", "*pruned_subset", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    # a clip-retrieval pool brings no target images and its encoder is not at hand: datacomp_image is left out
    assert "– strategy datacomp_image: left out: no target images for datacomp_image" in r.stdout
    decided = [s for s in STRATEGIES if s != "datacomp_image"]
    layout = Layout.from_env(home, pool)

    def q(sql: str) -> list[tuple]:
        return [tuple(d.values()) for d in query(layout, sql).to_pylist()]

    n_ok = len(ok_keys) - 2
    assert q("SELECT status, count(*) FROM samples GROUP BY 1 ORDER BY 1") == [
        ("bad_embedding", 1), ("empty_caption", 2), ("failed_download", 6), ("no_embedding", 1), ("ok", n_ok),
        ("undecodable", 2)]
    assert q("SELECT key, cause FROM problems WHERE cause LIKE '%_embedding:%' ORDER BY key") == sorted([
        (nan_key, f"bad_embedding: row {nan_row} of metadata_{nan_part}.parquet (img_emb_{nan_part}.npy + "
                  f"text_emb_{nan_part}.npy) has a NaN, inf or zero-norm image or text embedding"),
        (missing_key, f"no_embedding: the clip-retrieval output {pool.resolve()} has no row for uid "
                      f"{uids[keys.index(missing_key)]}"),
    ])
    assert q("SELECT count(*) FROM scores") == [(n_ok,)]
    assert not (layout.encoder_dir / "bootstrap").exists()  # nothing trained
    assert json.loads((layout.encoder_dir / "encoder.json").read_text())["precomputed"].startswith("clip_retrieval")
    assert q("SELECT count(*) FROM duplicates") == [(expected_dups,)]
    assert expected_dups > 0
    key_of = dict(zip(truth["uid"].to_list(), truth["key"].to_list()))
    for strategy in decided:
        of = f"FROM decisions WHERE strategy = '{strategy}'"
        assert q(f"SELECT count(*) {of}") == [(300,)]
        assert q(f"SELECT count(*) {of} AND reason = 'corrupt'") == [(300 - n_ok,)]
        assert q(f"SELECT reason {of} AND uid IN ('{uids[keys.index(nan_key)]}', "
                 f"'{uids[keys.index(missing_key)]}')") == [("corrupt",), ("corrupt",)]
        kept = sorted(key_of[u] for (u,) in q(f"SELECT uid {of} AND keep"))
        exported = _tar_keys(layout.subset_dir(strategy))  # one jpg per kept sample, nothing else
        assert kept and sorted(exported) == kept
        if strategy != "full":  # full keeps every ok sample, duplicates included
            assert q(f"SELECT count(*) {of} AND reason = 'duplicate'") == [(expected_dups,)]
    assert q("SELECT count(*) FROM decisions WHERE strategy = 'full' AND keep") == [(n_ok,)]
    # nothing changed: nothing to redo (the source's signatures are stable)
    r = run_cli("run", "--config", str(config), "--select", "*pruned_subset", env=env)
    assert r.returncode == 0 and "▶" not in r.stdout, r.stdout + r.stderr
    # the NaN row repaired in its array (metadata untouched): every shard is re-ingested, the sample is ok
    ids_file = next((home / "embeddings" / "source_index").glob("ids-*.parquet"))
    built = ids_file.stat().st_mtime_ns
    arr = pool / "img_emb" / f"img_emb_{nan_part}.npy"
    fixed = np.load(arr)
    fixed[nan_row] = _unit(rng, 1, d)[0]
    np.save(arr, fixed)
    r = run_cli("run", "--config", str(config), "--select", "raw_metadata", env=env)
    assert r.returncode == 0 and "▶ raw_metadata [3 of 3 partitions]" in r.stdout, r.stdout + r.stderr
    assert q(f"SELECT status FROM samples WHERE key = '{nan_key}'") == [("ok",)]
    assert ids_file.stat().st_mtime_ns == built  # only an array changed: the index was not rebuilt
    # a part's text file lost: the run stops at ingest naming it (no shard is ingested without its embeddings)
    (pool / "text_emb" / "text_emb_1.npy").unlink()
    r = run_cli("run", "--config", str(config), "--select", "raw_metadata", env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"{pool.resolve()}/text_emb/text_emb_1.npy is missing" in r.stdout + r.stderr
