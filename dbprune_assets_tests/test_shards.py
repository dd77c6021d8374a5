"""Ingest of img2dataset shards: statuses, problems and streaming reads.

Damaged inputs are built by hand in tmp_path; every expectation is the exact
status list, worked out from how the shard was built.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dbprune_assets.core.settings import PoolSettings
from dbprune_assets.core.pool.shards import (
    PROBLEMS_SCHEMA,
    SAMPLES_SCHEMA,
    STATUSES,
    ShardError,
    ingest_shard,
    iter_shard_images,
    iter_shard_members,
)
from dbprune_assets.core.pool.wds import write_tar
from dbprune_assets.samplepool import load_ground_truth, write_sample_pool

KEYS = [f"0000000{i:02d}" for i in range(6)]


def _jpeg(width: int = 20, height: int = 10, shade: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30 + shade, 30)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _sample(key: str, jpg: bytes | None = None, caption: str = "a red square") -> tuple[str, dict[str, bytes]]:
    return key, {"jpg": jpg if jpg is not None else _jpeg(shade=int(key[-2:])), "txt": caption.encode(), "json": b"{}"}


def _write_parquet(path: Path, rows: list[dict[str, object]], *, uid: bool = True, caption: bool = True) -> None:
    """img2dataset's columns (plus DataComp's uid); fields default to a success row."""
    full = []
    for i, r in enumerate(rows):
        ok = r.get("status", "success") == "success"
        rec: dict[str, object] = {
            "url": f"https://example.com/{i}.jpg",
            "caption": r.get("caption", "a red square"),
            "key": r["key"],
            "status": r.get("status", "success"),
            "error_message": r.get("error_message", None if ok else "HTTP Error 404: Not Found"),
            "width": r.get("width", 20 if ok else None),
            "height": r.get("height", 10 if ok else None),
            "original_width": 640 if ok else None,
            "original_height": 480 if ok else None,
            "exif": "{}" if ok else None,
            "sha256": "0" * 64 if ok else None,
        }
        if uid:
            rec["uid"] = r.get("uid", f"{int(str(r['key'])):032x}")
        if not caption:
            del rec["caption"]
        full.append(rec)
    schema = pa.schema(
        [(n, t) for n, t in [
            ("url", pa.string()), ("caption", pa.string()), ("key", pa.string()), ("status", pa.string()),
            ("error_message", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
            ("original_width", pa.int64()), ("original_height", pa.int64()), ("exif", pa.string()),
            ("sha256", pa.string()), ("uid", pa.string()),
        ] if (n != "uid" or uid) and (n != "caption" or caption)]
    )
    pq.write_table(pa.Table.from_pylist(full, schema=schema), path)


def _statuses(result) -> list[str]:  # type: ignore[no-untyped-def]
    return result.samples["status"].to_list()


def _member_end(tar_path: Path, name: str) -> int:
    """Offset just past member ``name``'s (padded) data."""
    with tarfile.open(tar_path) as tf:
        m = tf.getmember(name)
    return m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _member_data_offset(tar_path: Path, name: str) -> int:
    with tarfile.open(tar_path) as tf:
        return tf.getmember(name).offset_data


def _cut(path: Path, at: int) -> None:
    path.write_bytes(path.read_bytes()[:at])


@pytest.fixture()
def six(tmp_path: Path) -> Path:
    """A clean shard 00000: six success rows, parquet in REVERSE tar order."""
    write_tar(tmp_path / "00000.tar", [_sample(k) for k in KEYS])
    _write_parquet(tmp_path / "00000.parquet", [{"key": k} for k in reversed(KEYS)])
    return tmp_path


# ---------------------------------------------------------------------------
# the generated pool
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    settings = PoolSettings(shards=2, samples_per_shard=60, concepts=6, image_size=32, reference_samples=0, eval_per_class=1, seed=3)
    return write_sample_pool(tmp_path_factory.mktemp("p") / "pool", settings).pool_dir


def test_statuses_vocabulary() -> None:
    assert STATUSES == ("ok", "failed_download", "undecodable", "missing_in_tar", "empty_caption", "truncated_tar",
                        "duplicate_uid", "bad_uid", "no_embedding", "bad_embedding")


def test_generated_pool_statuses_equal_planted_ground_truth(pool: Path) -> None:
    gt = load_ground_truth(pool)
    results = [ingest_shard(pool, s) for s in ("00000", "00001")]
    samples = pl.concat([r.samples for r in results])
    assert samples.schema == pl.Schema(SAMPLES_SCHEMA)
    for r in results:  # parquet order, nothing dropped
        parquet = pq.read_table(pool / f"{r.shard}.parquet").to_pydict()
        assert r.samples["key"].to_list() == parquet["key"]
        assert r.samples["uid"].to_list() == parquet["uid"]
        assert r.samples["row"].to_list() == list(range(60))
        assert r.samples["caption"].to_list() == parquet["caption"]
    planted = dict(gt["planted_status"].value_counts().iter_rows())
    assert planted["failed_download"] == 2 and planted["undecodable"] == planted["empty_caption"] == 1
    totals = {s: sum(r.status_counts()[s] for r in results) for s in STATUSES}
    assert totals == {s: planted.get(s, 0) for s in STATUSES}
    joined = samples.join(gt, on="uid")
    assert joined.height == 120 and (joined["status"] == joined["planted_status"]).all()
    ok = samples.filter(pl.col("status") == "ok")
    assert set(ok["width"]) == {32} and set(ok["height"]) == {32}
    problems = pl.concat([r.problems for r in results])
    assert problems.schema == pl.Schema(PROBLEMS_SCHEMA)
    bad = samples.filter(pl.col("status") != "ok")
    assert sorted(problems["key"].to_list()) == sorted(bad["key"].to_list())  # one named problem per non-ok sample
    assert set(problems["stage"]) == {"ingest"}


# ---------------------------------------------------------------------------
# hand-built shards
# ---------------------------------------------------------------------------


def test_clean_shard_keeps_parquet_order_and_measures_images(six: Path) -> None:
    r = ingest_shard(six, "00000")
    assert r.samples["key"].to_list() == list(reversed(KEYS))
    assert r.samples["row"].to_list() == list(range(6))
    assert _statuses(r) == ["ok"] * 6
    assert r.samples["uid"].to_list() == [f"{i:032x}" for i in reversed(range(6))]
    assert set(r.samples.select("width", "height").rows()) == {(20, 10)}
    assert r.problems.height == 0 and r.problems.schema == pl.Schema(PROBLEMS_SCHEMA)


def test_truncated_tar_mid_member(six: Path) -> None:
    tar = six / "00000.tar"
    _cut(tar, _member_data_offset(tar, f"{KEYS[3]}.jpg") + 10)
    r = ingest_shard(six, "00000")
    # parquet order is k5..k0: k3..k5 lie behind the damage
    assert _statuses(r) == ["truncated_tar"] * 3 + ["ok"] * 3
    assert r.problems.height == 1 and r.problems["key"].to_list() == [None]
    cause = r.problems["cause"][0]
    assert "00000.tar" in cause and "truncated" in cause and "3 rows" in cause and "re-download" in cause


def test_truncated_tar_at_member_boundary_has_no_end_marker(six: Path) -> None:
    tar = six / "00000.tar"
    _cut(tar, _member_end(tar, f"{KEYS[2]}.txt"))  # tarfile alone would see a clean end here
    r = ingest_shard(six, "00000")
    assert _statuses(r) == ["truncated_tar"] * 3 + ["ok"] * 3
    assert "end-of-archive marker" in r.problems["cause"][0]


def test_tar_that_is_not_a_tar(six: Path) -> None:
    (six / "00000.tar").write_bytes(b"this is not a tar archive " * 40)
    r = ingest_shard(six, "00000")
    assert _statuses(r) == ["truncated_tar"] * 6
    assert r.problems["key"].to_list() == [None]


def test_missing_tar(tmp_path: Path) -> None:
    _write_parquet(tmp_path / "00007.parquet", [{"key": KEYS[0]}, {"key": KEYS[1], "status": "failed_to_download"}, {"key": KEYS[2]}])
    r = ingest_shard(tmp_path, "00007")
    assert _statuses(r) == ["missing_in_tar", "failed_download", "missing_in_tar"]
    shard_rows = r.problems.filter(pl.col("key").is_null())
    assert shard_rows.height == 1 and str(tmp_path / "00007.tar") in shard_rows["cause"][0]
    assert "2 rows" in shard_rows["cause"][0]
    assert r.problems.filter(pl.col("key") == KEYS[1])["cause"][0].startswith("download failed (HTTP Error 404")
    assert r.problems.height == 2


def test_zero_row_parquet(tmp_path: Path) -> None:
    _write_parquet(tmp_path / "00000.parquet", [])
    r = ingest_shard(tmp_path, "00000")  # no tar either: nothing to report beyond the shard
    assert r.samples.height == 0 and r.samples.schema == pl.Schema(SAMPLES_SCHEMA)
    assert r.problems.schema == pl.Schema(PROBLEMS_SCHEMA)
    write_tar(tmp_path / "00000.tar", [])
    r = ingest_shard(tmp_path, "00000")
    assert r.samples.height == 0 and r.problems.height == 0


def test_member_without_parquet_row_and_row_without_member(tmp_path: Path) -> None:
    write_tar(tmp_path / "00000.tar", [_sample(KEYS[0]), _sample(KEYS[1]), _sample("000000099"), (KEYS[3], {"txt": b"x", "json": b"{}"})])
    _write_parquet(tmp_path / "00000.parquet", [{"key": k} for k in KEYS[:4]])
    r = ingest_shard(tmp_path, "00000")
    assert _statuses(r) == ["ok", "ok", "missing_in_tar", "missing_in_tar"]
    causes = dict(r.problems.select("key", "cause").iter_rows())
    assert causes["000000099"] == "tar member 000000099.jpg has no parquet row; it is ignored"
    assert "no member" in causes[KEYS[2]] and "00000.tar" in causes[KEYS[2]]
    assert f"only {KEYS[3]}.json, {KEYS[3]}.txt" in causes[KEYS[3]]
    assert len(causes) == 3


def test_parquet_without_uid_uses_the_key(six: Path) -> None:
    _write_parquet(six / "00000.parquet", [{"key": k} for k in KEYS], uid=False)
    r = ingest_shard(six, "00000")
    assert r.samples["uid"].to_list() == KEYS and _statuses(r) == ["ok"] * 6


def test_img2dataset_statuses_and_precedence(tmp_path: Path) -> None:
    cut = _jpeg()
    sos = cut.index(b"\xff\xda")
    write_tar(
        tmp_path / "00000.tar",
        [_sample(KEYS[0]), _sample(KEYS[1]), _sample(KEYS[3], jpg=b"garbage bytes"), _sample(KEYS[4], jpg=cut[: sos + 20]), _sample(KEYS[5])],
    )
    rows = [
        {"key": KEYS[0], "status": "failed_to_resize", "error_message": "image too small"},  # member present, still undecodable
        {"key": KEYS[1], "status": "failed_to_download", "caption": ""},  # failed beats empty caption
        {"key": KEYS[2], "caption": None},  # missing member beats empty caption
        {"key": KEYS[3], "caption": "   "},  # undecodable beats empty caption
        {"key": KEYS[4]},  # header fine, pixels truncated
        {"key": KEYS[5], "status": "mystery"},
        {"key": "000000077", "caption": "   ", "status": "success"},  # missing member
    ]
    _write_parquet(tmp_path / "00000.parquet", rows)
    r = ingest_shard(tmp_path, "00000")
    assert _statuses(r) == ["undecodable", "failed_download", "missing_in_tar", "undecodable", "undecodable", "failed_download", "missing_in_tar"]
    causes = dict(r.problems.select("key", "cause").iter_rows())
    assert "image too small" in causes[KEYS[0]]
    assert "'mystery'" in causes[KEYS[5]]
    assert f"{KEYS[4]}.jpg in 00000.tar does not decode" in causes[KEYS[4]]
    # header-only verification lets the truncated pixels through; none checks nothing
    r = ingest_shard(tmp_path, "00000", verify_images="header")
    assert _statuses(r)[3:5] == ["undecodable", "ok"]
    r = ingest_shard(tmp_path, "00000", verify_images="none")
    assert _statuses(r)[3:5] == ["empty_caption", "ok"]


def test_empty_captions(six: Path) -> None:
    captions = [None, "", "  \t", "a red square", " x ", "\n"]
    _write_parquet(six / "00000.parquet", [{"key": k, "caption": c} for k, c in zip(KEYS, captions)])
    r = ingest_shard(six, "00000")
    assert _statuses(r) == ["empty_caption", "empty_caption", "empty_caption", "ok", "ok", "empty_caption"]
    assert r.samples["caption"].to_list() == captions


def test_captions_from_tar_when_parquet_has_none(six: Path) -> None:
    write_tar(six / "00000.tar", [_sample(KEYS[0], caption="blue ring"), _sample(KEYS[1], caption=" ")])
    _write_parquet(six / "00000.parquet", [{"key": k} for k in KEYS[:2]], caption=False)
    r = ingest_shard(six, "00000")
    assert r.samples["caption"].to_list() == ["blue ring", " "]
    assert _statuses(r) == ["ok", "empty_caption"]


def test_size_from_decoded_image_else_parquet(tmp_path: Path) -> None:
    write_tar(tmp_path / "00000.tar", [_sample(KEYS[0], jpg=_jpeg(24, 12))])
    _write_parquet(tmp_path / "00000.parquet", [{"key": KEYS[0], "width": 99, "height": 98}, {"key": KEYS[1], "status": "failed_to_download"}])
    assert ingest_shard(tmp_path, "00000").samples.select("width", "height").rows() == [(24, 12), (None, None)]
    assert ingest_shard(tmp_path, "00000", verify_images="none").samples.select("width", "height").rows() == [(99, 98), (None, None)]


def test_pandas_style_float_sizes(six: Path) -> None:
    """img2dataset writes through pandas: sizes become float with NaN for failures."""
    table = pa.table({
        "key": KEYS[:2],
        "caption": ["a", "b"],
        "status": ["success", "failed_to_download"],
        "width": pa.array([20.0, float("nan")]),
        "height": pa.array([10.0, float("nan")]),
    })
    pq.write_table(table, six / "00000.parquet")
    r = ingest_shard(six, "00000", verify_images="none")
    assert r.samples.select("width", "height").rows() == [(20, 10), (None, None)]
    assert _statuses(r) == ["ok", "failed_download"]


def test_unreadable_or_missing_parquet_raises(six: Path) -> None:
    (six / "00000.parquet").write_bytes(b"PAR1 but not really parquet")
    with pytest.raises(ShardError, match=r"00000\.parquet.*re-download") as err:
        ingest_shard(six, "00000")
    assert isinstance(err.value, ValueError)
    with pytest.raises(ShardError, match=r"00003\.parquet"):
        ingest_shard(six, "00003")
    pq.write_table(pa.table({"caption": ["x"], "status": ["success"]}), six / "00000.parquet")
    with pytest.raises(ShardError, match=r"no 'key' column"):
        ingest_shard(six, "00000")


# ---------------------------------------------------------------------------
# streaming readers
# ---------------------------------------------------------------------------


def test_iter_shard_images_in_tar_order(six: Path) -> None:
    tar = six / "00000.tar"
    got = list(iter_shard_images(tar, {KEYS[4], KEYS[1]}))
    assert [k for k, _ in got] == [KEYS[1], KEYS[4]]
    assert got[0][1] == _sample(KEYS[1])[1]["jpg"]
    assert [k for k, _ in iter_shard_images(tar, None)] == KEYS
    with pytest.raises(ShardError, match="000000099"):
        list(iter_shard_images(tar, {KEYS[0], "000000099"}))


def test_iter_shard_members_groups_a_sample(six: Path) -> None:
    got = list(iter_shard_members(six / "00000.tar", {KEYS[2]}))
    assert got == [_sample(KEYS[2])]
    assert [k for k, _ in iter_shard_members(six / "00000.tar")] == KEYS


def test_iterators_on_a_truncated_tar(six: Path) -> None:
    tar = six / "00000.tar"
    _cut(tar, _member_data_offset(tar, f"{KEYS[3]}.jpg") + 10)
    assert [k for k, _ in iter_shard_images(tar, {KEYS[0], KEYS[2]})] == [KEYS[0], KEYS[2]]  # before the damage
    with pytest.raises(ShardError, match=r"00000\.tar.*damaged"):
        list(iter_shard_images(tar, {KEYS[4]}))
    seen: list[str] = []
    with pytest.raises(ShardError, match="damaged"):
        for key, _ in iter_shard_members(tar):
            seen.append(key)
    assert seen == KEYS[:3]
    with pytest.raises(ShardError, match="does not exist"):
        list(iter_shard_images(six / "00009.tar", None))


def test_repeated_parquet_key_is_reported_not_dropped(six: Path) -> None:
    _write_parquet(six / "00000.parquet", [{"key": KEYS[0], "uid": "a" * 32}, {"key": KEYS[0], "uid": "b" * 32}, {"key": KEYS[1]}])
    r = ingest_shard(six, "00000")
    assert r.samples.select("uid", "status").rows() == [("a" * 32, "ok"), ("b" * 32, "ok"), (f"{1:032x}", "ok")]
    causes = r.problems.filter(pl.col("key") == KEYS[0])["cause"].to_list()
    assert len(causes) == 1 and "appears 2 times" in causes[0]
    # the other tar samples have no parquet row here
    assert sorted(r.problems.filter(pl.col("cause").str.contains("no parquet row"))["key"]) == KEYS[2:]
