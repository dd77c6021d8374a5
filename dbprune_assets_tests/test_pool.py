"""The synthetic sample pool: layout, determinism and the planted ground truth."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from dbprune_assets.core.settings import PoolSettings
from dbprune_assets.core.pool.wds import POOL_MTIME
from dbprune_assets.samplepool import writer as pool_writer
from dbprune_assets.samplepool import (
    COLORS,
    ZIPF_EXPONENT,
    EVAL_TEMPLATES,
    SHAPES,
    concept_counts,
    is_sample_pool,
    load_ground_truth,
    make_concepts,
    write_sample_pool,
)

TINY = PoolSettings(shards=2, samples_per_shard=60, concepts=6, image_size=32, reference_samples=60, eval_per_class=3, seed=7)
ROWS = 120
# planted counts for 120 rows, by hand: max(1, round(120 * rate))
N_FAILED, N_UNDECODABLE, N_EMPTY = 2, 1, 1  # 2.4, 0.6, 0.6
N_COPIES, N_MISMATCHED = 12, 10  # 12.0, 9.6
SHARD_COLUMNS = [
    "uid", "key", "caption", "url", "status", "error_message",
    "width", "height", "original_width", "original_height", "sha256",
]


def _tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}  # type: ignore[union-attr]


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pool")
    write_sample_pool(root / "pool", TINY)
    return root / "pool"


@pytest.fixture(scope="module")
def gt(pool: Path) -> pl.DataFrame:
    return load_ground_truth(pool)


@pytest.fixture(scope="module")
def shards(pool: Path) -> pl.DataFrame:
    """All shard parquets, with the shard name and the row index."""
    frames = [
        pl.read_parquet(pool / f"{s}.parquet").with_columns(pl.lit(s).alias("shard"), pl.int_range(pl.len()).alias("row"))
        for s in ("00000", "00001")
    ]
    return pl.concat(frames)


@pytest.fixture(scope="module")
def members(pool: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for s in ("00000", "00001"):
        out.update(_tar_members(pool / f"{s}.tar"))
    return out


def test_same_settings_give_byte_identical_files(pool: Path, tmp_path: Path) -> None:
    summary = write_sample_pool(tmp_path / "again", TINY)
    a = sorted(p.relative_to(pool) for p in pool.rglob("*") if p.is_file())
    b = sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    assert a == b
    # 2 shards x (tar, parquet, _stats.json), gt, info, eval/ 8 files (shapes: test/0.tar, test/nshards.txt,
    # classnames, templates, dataset_type; shapes_retrieval: tar, nshards, dataset_type), reference tar + sizes
    assert len(a) == 6 + 2 + 8 + 2
    for rel in a:
        assert (pool / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel
    assert summary.samples == ROWS and summary.shards == ("00000", "00001")
    other = write_sample_pool(tmp_path / "seed8", TINY.model_copy(update={"seed": 8}))
    assert (other.pool_dir / "00000.tar").read_bytes() != (pool / "00000.tar").read_bytes()


def test_write_is_atomic_and_replaces_an_old_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target, tmp_root = tmp_path / "pool", tmp_path / "scratch"
    write_sample_pool(target, TINY, tmp_root=tmp_root)
    (target / "stray.txt").write_text("left from an older pool")
    before = (target / "00000.tar").read_bytes()

    def boom(*_: object) -> int:
        raise RuntimeError("crash while writing eval/")

    monkeypatch.setattr(pool_writer, "_write_eval_split", boom)
    with pytest.raises(RuntimeError):
        write_sample_pool(target, TINY.model_copy(update={"seed": 9}), tmp_root=tmp_root)
    assert (target / "stray.txt").exists() and (target / "00000.tar").read_bytes() == before  # old pool untouched
    assert list(tmp_root.iterdir()) == []  # no half pool left behind
    monkeypatch.undo()
    write_sample_pool(target, TINY, tmp_root=tmp_root)
    assert not (target / "stray.txt").exists()  # replaced as a whole
    assert list(tmp_root.iterdir()) == []


def test_is_sample_pool_and_load_ground_truth(pool: Path, tmp_path: Path) -> None:
    assert is_sample_pool(pool)
    assert not is_sample_pool(tmp_path)
    (tmp_path / "pool_info.json").write_text("{not json")
    assert not is_sample_pool(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a generated sample pool"):
        load_ground_truth(tmp_path)


def test_shard_parquets_are_img2dataset_rows(shards: pl.DataFrame, members: dict[str, bytes]) -> None:
    assert shards.height == ROWS
    assert shards.columns[: len(SHARD_COLUMNS)] == SHARD_COLUMNS
    assert shards["uid"].n_unique() == ROWS
    assert all(re.fullmatch(r"[0-9a-f]{32}", u) for u in shards["uid"])
    assert shards["key"].to_list() == [f"{s}{r:04d}" for s, r in zip(shards["shard"], shards["row"])]
    assert set(shards["status"]) == {"success", "failed_to_download"}
    failed = shards.filter(pl.col("status") == "failed_to_download")
    assert failed.height == N_FAILED
    assert failed["error_message"].null_count() == 0
    for col in ("width", "height", "original_width", "original_height", "sha256"):
        assert failed[col].null_count() == N_FAILED, col
    ok = shards.filter(pl.col("status") == "success")
    assert ok["error_message"].null_count() == ok.height
    assert set(ok["width"]) == {32} and set(ok["height"]) == {32}
    assert all(u.startswith("https://") and u.endswith(".jpg") for u in shards["url"])
    for key, sha in zip(ok["key"], ok["sha256"]):
        assert hashlib.sha256(members[f"{key}.jpg"]).hexdigest() == sha


def test_tars_hold_one_sample_per_success_row(pool: Path, shards: pl.DataFrame, members: dict[str, bytes]) -> None:
    ok = shards.filter(pl.col("status") == "success")
    assert sorted(members) == sorted(f"{k}.{e}" for k in ok["key"] for e in ("jpg", "json", "txt"))
    for row in ok.iter_rows(named=True):
        assert members[f"{row['key']}.txt"].decode() == row["caption"]
        meta = json.loads(members[f"{row['key']}.json"])
        assert (meta["uid"], meta["key"], meta["status"]) == (row["uid"], row["key"], "success")
    with tarfile.open(pool / "00000.tar") as tf:
        first = tf.getmembers()[:3]
    assert [m.name.split(".")[1] for m in first] == ["jpg", "json", "txt"]  # webdataset's sorted order
    assert {(m.mtime, m.uid, m.gid, m.uname) for m in first} == {(POOL_MTIME, 0, 0, "")}


def test_stats_files_count_every_parquet_row_like_img2dataset(pool: Path, shards: pl.DataFrame,
                                                               members: dict[str, bytes]) -> None:
    """img2dataset's NNNNN_stats.json beside each tar and parquet (its logger.write_stats: these keys
    in this order, json.dump indent=4): successes = success rows = samples in the tar,
    failed_to_download = the failed rows, status_dict = "success" plus each failed row's error message."""
    from dbprune_assets.core.pool.shard_stats import check_stats
    from dbprune_assets.core.pool.wds import POOL_MTIME

    assert sorted(p.name for p in pool.glob("*_stats.json")) == ["00000_stats.json", "00001_stats.json"]
    total = {"count": 0, "successes": 0, "failed_to_download": 0}
    for shard in ("00000", "00001"):
        text = (pool / f"{shard}_stats.json").read_text()
        stats = json.loads(text)
        assert text == json.dumps(stats, indent=4)
        assert list(stats) == ["count", "successes", "failed_to_download", "failed_to_resize", "duration",
                               "start_time", "end_time", "status_dict"]
        rows = shards.filter(pl.col("shard") == shard)
        failed = rows.filter(pl.col("status") == "failed_to_download")
        in_tar = {m.split(".")[0] for m in members if m.startswith(shard)}
        assert stats["count"] == rows.height == 60
        assert stats["successes"] == rows.height - failed.height == len(in_tar)
        assert stats["failed_to_download"] == failed.height and stats["failed_to_resize"] == 0
        expect_sd = {"success": stats["successes"]}
        for msg in failed["error_message"]:
            expect_sd[msg] = expect_sd.get(msg, 0) + 1
        assert stats["status_dict"] == expect_sd
        assert (stats["start_time"], stats["end_time"], stats["duration"]) == (float(POOL_MTIME), POOL_MTIME + 1.0, 1.0)
        assert check_stats(stats, shard, samples=len(in_tar)) == []
        # DataComp's resharder (load_shard_size) sizes a shard by int(stats["successes"])
        assert int(json.loads(text).get("successes")) == len(in_tar)
        for k in total:
            total[k] += stats[k]
    assert total == {"count": ROWS, "successes": ROWS - N_FAILED, "failed_to_download": N_FAILED}


def test_ground_truth_has_one_row_per_parquet_row(gt: pl.DataFrame, shards: pl.DataFrame, pool: Path) -> None:
    assert gt.height == ROWS
    joined = shards.join(gt, on="uid", how="inner", suffix="_gt")
    assert joined.height == ROWS
    assert joined["key"].to_list() == joined["key_gt"].to_list()
    assert joined["shard"].to_list() == joined["shard_gt"].to_list()
    counts = dict(gt["planted_status"].value_counts().iter_rows())
    assert counts == {"ok": ROWS - N_FAILED - N_UNDECODABLE - N_EMPTY, "failed_download": N_FAILED, "undecodable": N_UNDECODABLE, "empty_caption": N_EMPTY}
    info = json.loads((pool / "pool_info.json").read_text())
    assert {k: v for k, v in info["planted_status_counts"].items() if v} == counts
    assert info["settings"] == TINY.model_dump(mode="json")
    assert (joined["status"] == "failed_to_download").to_list() == (joined["planted_status"] == "failed_download").to_list()


def test_failed_rows_have_no_member_and_empty_captions_are_empty(gt: pl.DataFrame, shards: pl.DataFrame, members: dict[str, bytes]) -> None:
    j = shards.join(gt.select("uid", "planted_status"), on="uid")
    for key in j.filter(pl.col("planted_status") == "failed_download")["key"]:
        assert not any(name.startswith(key) for name in members)
    empty = j.filter(pl.col("planted_status") == "empty_caption")
    assert empty["caption"].to_list() == [""] * N_EMPTY
    assert (j.filter(pl.col("planted_status") != "empty_caption")["caption"].str.len_chars() > 0).all()


def test_undecodable_members_fail_to_decode_and_the_rest_decode(gt: pl.DataFrame, members: dict[str, bytes]) -> None:
    for row in gt.filter(pl.col("planted_status") != "failed_download").iter_rows(named=True):
        data = members[f"{row['key']}.jpg"]
        if row["planted_status"] == "undecodable":
            with pytest.raises(Exception):
                with Image.open(io.BytesIO(data)) as im:
                    im.load()
        else:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                assert (im.size, im.mode, im.format) == ((32, 32), "RGB", "JPEG")


def test_duplicate_groups(gt: pl.DataFrame, members: dict[str, bytes]) -> None:
    dups = gt.filter(pl.col("dup_group") >= 0)
    assert (dups["planted_status"] == "ok").all()
    assert dups.filter(pl.col("dup_kind") != "original").height == N_COPIES
    assert gt.filter(pl.col("dup_group") < 0)["dup_kind"].null_count() == ROWS - dups.height
    sizes = dups.group_by("dup_group").agg(pl.len(), (pl.col("dup_kind") == "original").sum().alias("originals"))
    assert sizes["len"].is_between(2, 4).all() and (sizes["originals"] == 1).all()
    assert dups.group_by("dup_group").agg(pl.col("concept").n_unique())["concept"].max() == 1
    originals = {r["dup_group"]: r["key"] for r in dups.filter(pl.col("dup_kind") == "original").iter_rows(named=True)}
    near_diffs = []
    for row in dups.filter(pl.col("dup_kind") != "original").iter_rows(named=True):
        copy, orig = members[f"{row['key']}.jpg"], members[f"{originals[row['dup_group']]}.jpg"]
        if row["dup_kind"] == "exact":
            assert copy == orig
        else:
            assert row["dup_kind"] == "near" and row["dup_variant"] in ("requality", "noise", "rescale")
            assert copy != orig
            near_diffs.append(float(np.abs(_pixels(copy) - _pixels(orig)).mean()))
    assert near_diffs, "the tiny pool plants near duplicates"
    assert max(near_diffs) < 10.0  # measured here: 2.7-6.5 (0-255 scale)
    # non-duplicates of the least variable concept differ more than near duplicates do
    low = gt.filter(pl.col("variability") == 0.0, pl.col("dup_group") < 0, pl.col("planted_status") == "ok")["key"].to_list()
    assert len(low) >= 4
    pair_diffs = [float(np.abs(_pixels(members[f"{a}.jpg"]) - _pixels(members[f"{b}.jpg"])).mean()) for i, a in enumerate(low) for b in low[i + 1 :]]
    assert min(pair_diffs) > 0.0  # never pixel-identical
    assert np.median(pair_diffs) > 1.5 * np.median(near_diffs)


def test_mismatched_captions_name_another_concept(gt: pl.DataFrame, shards: pl.DataFrame) -> None:
    j = shards.join(gt, on="uid")
    names = dict(zip(gt["concept"], gt["concept_name"]))
    mis = j.filter(pl.col("mismatched"))
    assert mis.height == N_MISMATCHED
    assert (mis["planted_status"] == "ok").all() and (mis["dup_group"] == -1).all()
    for row in mis.iter_rows(named=True):
        assert row["caption_concept"] != row["concept"]
        assert names[row["caption_concept"]] in row["caption"] and names[row["concept"]] not in row["caption"]
    clean = j.filter(~pl.col("mismatched"), pl.col("planted_status") != "empty_caption")
    assert (clean["caption_concept"] == clean["concept"]).all()
    assert all(names[c] in cap for c, cap in zip(clean["concept"], clean["caption"]))


def test_concepts_variability_and_long_tail(gt: pl.DataFrame, pool: Path) -> None:
    info = json.loads((pool / "pool_info.json").read_text())
    table = info["concepts"]
    assert [c["id"] for c in table] == list(range(6))
    assert len({c["name"] for c in table}) == 6
    assert all(c["name"] == f"{c['color']} {c['shape']}" and c["shape"] in SHAPES and c["color"] in COLORS for c in table)
    assert sorted(c["variability"] for c in table) == pytest.approx(np.linspace(0, 1, 6).tolist(), abs=1e-6)
    rows = gt.group_by("concept").len().sort("len")["len"].to_list()
    assert sum(rows) == ROWS and rows[-1] >= 2.5 * rows[0]  # long tail even at 6 concepts
    assert sorted(c["rows"] for c in table) == rows


def test_default_pool_plan_is_long_tailed_and_unconfounded() -> None:
    """The default pool's plan (no rendering): Zipf frequencies, every concept
    >= 15 base samples, variability evenly spread and not tied to frequency."""
    settings = PoolSettings()
    concepts = make_concepts(settings)
    assert len(concepts) == 24
    freq = np.array([c.frequency for c in concepts])
    zipf = 1 / np.arange(1, 25) ** ZIPF_EXPONENT
    assert sorted(freq, reverse=True) == pytest.approx(zipf / zipf.sum())
    # the most frequent concepts are mid-variability, both extremes in the tail
    var = np.array([c.variability for c in concepts])
    # frequency ranks are dealt round-robin over three interleaved variability
    # strata: every three consecutive frequency ranks hold one of each stratum
    stratum = {c.id: int(r) % 3 for c, r in zip(concepts, np.argsort(np.argsort(var)))}
    by_freq = sorted(concepts, key=lambda c: -c.frequency)
    for i in range(0, 24, 3):
        assert sorted(stratum[c.id] for c in by_freq[i:i + 3]) == [0, 1, 2]
    assert np.diff(np.sort(var)) == pytest.approx(np.full(23, 1 / 23), abs=1e-5)
    rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    assert abs(np.corrcoef(rank(var), rank(freq))[0, 1]) < 0.05
    counts = concept_counts(concepts, 2700)
    assert counts.sum() == 2700 and counts.min() >= 15 and counts.max() >= 5 * counts.min()


def test_eval_split(pool: Path) -> None:
    """eval/ holds two sets in CLIP_benchmark's webdataset layout: shapes (classification) and
    shapes_retrieval (captions that describe their own image)."""
    ev = pool / "eval" / "shapes"
    names = (ev / "classnames.txt").read_text().splitlines()
    info = json.loads((pool / "pool_info.json").read_text())
    assert names == [c["name"] for c in info["concepts"]]
    assert info["eval"]["datasets"] == ["shapes", "shapes_retrieval"] and info["eval"]["samples"] == 36
    templates = (ev / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert templates == list(EVAL_TEMPLATES) and all(t.count("{c}") == 1 for t in templates)
    assert (ev / "test" / "nshards.txt").read_text() == "1\n" and (ev / "dataset_type.txt").read_text() == "classification\n"
    m = _tar_members(ev / "test" / "0.tar")
    keys = sorted({n.split(".")[0] for n in m})
    assert len(keys) == 18 and all(set(f"{k}.{e}" for e in ("jpg", "cls")) == {n for n in m if n.startswith(k + ".")}
                                   for k in keys)
    classes = [int(m[f"{k}.cls"]) for k in keys]
    assert sorted(classes) == sorted(list(range(6)) * 3)
    assert all(_pixels(m[f"{k}.jpg"]).shape == (32, 32, 3) for k in keys)

    rt = pool / "eval" / "shapes_retrieval"
    assert (rt / "dataset_type.txt").read_text() == "retrieval\n" and (rt / "test" / "nshards.txt").read_text() == "1\n"
    assert not (rt / "classnames.txt").exists()
    m = _tar_members(rt / "test" / "0.tar")
    keys = sorted({n.split(".")[0] for n in m})
    assert len(keys) == 18 and len(m) == 36
    captions = [m[f"{k}.txt"].decode().split("\n") for k in keys]
    assert all(len(c) == 2 for c in captions)
    flat = [c for cs in captions for c in cs]
    assert len(set(flat)) == len(flat)  # no two images share a caption
    per_concept = [sum(n in cs[0] for cs in captions) for n in names]
    assert per_concept == [3] * 6  # 3 images per concept, each caption naming its concept


def test_reference_split(pool: Path) -> None:
    ref = pool / "reference"
    assert json.loads((ref / "sizes.json").read_text()) == {"00000.tar": 60}
    m = _tar_members(ref / "00000.tar")
    keys = sorted({n.split(".")[0] for n in m})
    assert len(keys) == 60 and len(m) == 180
    metas = [json.loads(m[f"{k}.json"]) for k in keys]
    assert np.bincount([x["concept"] for x in metas]).tolist() == [10] * 6  # balanced
    for k, meta in zip(keys, metas):
        assert m[f"{k}.txt"].decode() == meta["caption"] and meta["concept_name"] in meta["caption"]
