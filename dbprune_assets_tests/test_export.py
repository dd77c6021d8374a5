"""Subset export: original bytes, equal shuffled shards, sizes.json, uids.npy /
keys.txt, determinism, verification, and that webdataset reads the result."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from pathlib import Path

import braceexpand
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dbprune_assets.core.store.export import export_subset, train_data_spec, verify_export
from dbprune_assets.core.pool.shard_stats import STATS_KEYS
from dbprune_assets.core.method.kmeans import uid_hash
from dbprune_assets.core.strategies import decide

N_PER_SHARD = 12
# row -> status; missing_in_tar / failed_download rows have no tar members
STATUS = {1: "failed_download", 4: "undecodable", 7: "missing_in_tar", 10: "empty_caption"}


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def make_pool(root: Path, hex_uids: bool = True) -> dict:
    """Two source shards in img2dataset's layout plus tables/samples; returns
    {key: (shard, uid, status, {member name: bytes})}."""
    pool = root / "pool"
    samples_dir = root / "tables" / "samples"
    pool.mkdir(parents=True)
    samples_dir.mkdir(parents=True)
    info: dict = {}
    for si, shard in enumerate(("00000", "00001")):
        rows = []
        with tarfile.open(pool / f"{shard}.tar", "w") as tf:  # sloppy, non-deterministic headers
            for row in range(N_PER_SHARD):
                key = f"{shard}{row:04d}"
                uid = hashlib.md5(key.encode()).hexdigest() if hex_uids else key
                status = STATUS.get(row, "ok")
                members: dict[str, bytes] = {}
                if status not in ("failed_download", "missing_in_tar"):
                    members[f"{key}.jpg"] = _jpeg(si * 100 + row) if status != "undecodable" else b"not a jpeg"
                    members[f"{key}.txt"] = f"caption of {key}".encode()
                    members[f"{key}.json"] = json.dumps({"key": key, "uid": uid}).encode()
                    if row % 5 == 0:
                        members[f"{key}.cls"] = str(row).encode()
                    for name, data in members.items():
                        ti = tarfile.TarInfo(name)
                        ti.size = len(data)
                        ti.mtime = int(time.time()) - row
                        ti.mode = 0o600
                        ti.uname = "someone"
                        tf.addfile(ti, io.BytesIO(data))
                info[key] = (shard, uid, status, members)
                rows.append((uid, shard, key, row, status))
        pq.write_table(
            pa.table(
                {
                    "uid": [r[0] for r in rows],
                    "shard": [r[1] for r in rows],
                    "key": [r[2] for r in rows],
                    "row": pa.array([r[3] for r in rows], pa.int32()),
                    "caption": [f"caption of {r[2]}" for r in rows],
                    "width": pa.array([16] * len(rows), pa.int32()),
                    "height": pa.array([16] * len(rows), pa.int32()),
                    "status": [r[4] for r in rows],
                }
            ),
            samples_dir / f"{shard}.parquet",
        )
    return info


def write_decisions(root: Path, info: dict, kept_keys: set[str], name: str = "dbp") -> Path:
    path = root / "tables" / "decisions" / f"{name}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted(info)
    pq.write_table(
        pa.table(
            {
                "strategy": [name] * len(keys),
                "uid": [info[k][1] for k in keys],
                "shard": [info[k][0] for k in keys],
                "keep": [k in kept_keys for k in keys],
                "reason": ["kept" if k in kept_keys else "pruned" for k in keys],
            }
        ),
        path,
    )
    return path


def ok_keys(info: dict) -> list[str]:
    return sorted(k for k, v in info.items() if v[2] == "ok")


def read_tar(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tf:
        return [(m, tf.extractfile(m).read()) for m in tf.getmembers()]


@pytest.fixture()
def setup(tmp_path: Path):
    info = make_pool(tmp_path)
    oks = ok_keys(info)  # 16 ok samples
    kept = set(oks[:-1])  # 15 kept
    dec = write_decisions(tmp_path, info, kept)
    return tmp_path, info, kept, dec


def do_export(root: Path, dec: Path, out: Path, shard_size: int = 4, seed: int = 0, **kw):
    return export_subset(dec, root / "pool", out, shard_size, seed, root / ".tmp", threads=1, memory_limit="256MB", **kw)


def expected_order(info: dict, kept: set[str], seed: int) -> list[str]:
    keys = sorted(kept)
    uids = np.array([info[k][1] for k in keys], dtype=object)
    h = uid_hash(uids, seed).tolist()
    return [k for _, _, _, k in sorted(zip(h, uids.tolist(), [info[k][0] for k in keys], keys))]


def test_export_contents(setup) -> None:
    root, info, kept, dec = setup
    out = root / "subsets" / "dbp"
    s = do_export(root, dec, out)
    assert (s.n_samples, s.n_shards, s.id_file) == (15, 4, "uids.npy")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json", "00002.tar",
                     "00002_stats.json", "00003.tar", "00003_stats.json", "sizes.json", "uids.npy"]
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"00000.tar": 4, "00001.tar": 4, "00002.tar": 4, "00003.tar": 3}

    # every kept sample once, members byte-identical, in the shuffled order
    order: list[str] = []
    for t in sorted(sizes):
        members = read_tar(out / t)
        keys_t: list[str] = []
        for m, data in members:
            key = m.name.split(".", 1)[0]
            if not keys_t or keys_t[-1] != key:
                keys_t.append(key)
            assert info[key][3][m.name] == data
            assert (m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) == (0, 0o644, 0, 0, "", "")
            assert m.isfile()
        for key in keys_t:  # every member of the sample, in the source order
            assert [m.name for m, _ in members if m.name.split(".", 1)[0] == key] == list(info[key][3])
        assert len(keys_t) == sizes[t]
        order += keys_t
    assert order == expected_order(info, kept, seed=0)
    assert sorted(order) == sorted(kept)

    # DataComp's uids.npy
    arr = np.load(out / "uids.npy")
    assert arr.dtype == np.dtype("u8,u8") and arr.shape == (15,)
    expect = np.array([(int(info[k][1][:16], 16), int(info[k][1][16:], 16)) for k in kept], np.dtype("u8,u8"))
    expect.sort()
    assert np.array_equal(arr, expect)
    assert np.array_equal(arr, np.sort(arr))

    # open_clip_train's view: brace pattern + sizes.json (get_dataset_size's logic)
    pattern, n = train_data_spec(out)
    assert pattern == str(out / "{00000..00003}.tar") and n == 15 and s.train_data == pattern
    shards = list(braceexpand.braceexpand(pattern))
    assert [Path(p).name for p in shards] == sorted(sizes)
    assert sum(int(sizes[Path(p).name]) for p in shards) == 15

    assert verify_export(out, dec, tmp_root=root / ".tmp") == []
    assert list((root / ".tmp").iterdir()) == []


def test_the_export_and_its_check_on_one_kept_connection_are_those_of_their_own(setup) -> None:
    """make_subset builds the kept table once for the export and its check:
    the same files and verdicts as each on a connection of its own, the
    shared connection left open, and a wrong export still found."""
    from dbprune_assets.core.store.kept import kept_connection

    root, info, kept, dec = setup
    own, shared = root / "subsets" / "own", root / "subsets" / "shared"
    do_export(root, dec, own)
    with kept_connection(dec, root / "tables" / "samples", root / ".tmp", "256MB", threads=1) as con:
        do_export(root, dec, shared, kept=con)
        assert verify_export(shared, dec, kept=con) == []
        assert con.execute("SELECT count(*) FROM kept").fetchall() == [(len(kept),)]
    assert sorted(p.name for p in own.iterdir()) == sorted(p.name for p in shared.iterdir())
    for p in own.iterdir():
        assert p.read_bytes() == (shared / p.name).read_bytes(), p.name
    (shared / "00003.tar").unlink()
    with kept_connection(dec, root / "tables" / "samples", root / ".tmp", "256MB") as con:
        assert any("00003.tar" in p for p in verify_export(shared, dec, kept=con))
    assert list((root / ".tmp").iterdir()) == []


def test_webdataset_reads_every_kept_key_once(setup) -> None:
    import webdataset as wds

    root, info, kept, dec = setup
    out = root / "subsets" / "dbp"
    do_export(root, dec, out)
    pattern, n = train_data_spec(out)
    seen = []
    for sample in wds.WebDataset(pattern, shardshuffle=False):
        seen.append(sample["__key__"])
        assert sample["txt"] == info[sample["__key__"]][3][sample["__key__"] + ".txt"]
        assert Image.open(io.BytesIO(sample["jpg"])).size == (16, 16)
    assert sorted(seen) == sorted(kept) and len(seen) == n


def test_deterministic_and_seeded(setup) -> None:
    root, info, kept, dec = setup
    a, b, c = root / "out_a", root / "out_b", root / "out_c"
    do_export(root, dec, a)
    do_export(root, dec, b, max_open=1)  # LRU reopening in append mode: same bytes
    for p in sorted(a.iterdir()):
        assert p.read_bytes() == (b / p.name).read_bytes(), p.name
    do_export(root, dec, c, seed=1)
    assert (c / "00000.tar").read_bytes() != (a / "00000.tar").read_bytes()
    assert (c / "uids.npy").read_bytes() == (a / "uids.npy").read_bytes()  # same set


def test_reexport_replaces_atomically(setup) -> None:
    root, info, kept, dec = setup
    out = root / "subsets" / "dbp"
    do_export(root, dec, out, shard_size=4)
    s = do_export(root, dec, out, shard_size=10)
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 10, "00001.tar": 5}
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json",
                                                     "sizes.json", "uids.npy"]
    assert s.n_shards == 2 and verify_export(out, dec) == []
    assert list((root / ".tmp").iterdir()) == []


def test_keys_txt_when_uids_are_not_hex(tmp_path: Path) -> None:
    info = make_pool(tmp_path, hex_uids=False)
    kept = set(ok_keys(info)[::2])
    dec = write_decisions(tmp_path, info, kept)
    out = tmp_path / "subsets" / "dbp"
    s = do_export(tmp_path, dec, out, shard_size=3)
    assert s.id_file == "keys.txt" and not (out / "uids.npy").exists()
    assert (out / "keys.txt").read_text().splitlines() == sorted(kept)
    assert verify_export(out, dec) == []


def test_export_from_decide(tmp_path: Path) -> None:
    """The real hand-off: decisions written by decide() export cleanly."""
    info = make_pool(tmp_path)
    tables = tmp_path / "tables"
    dec = tables / "decisions" / "full.parquet"
    decide("full", tables, None, None, 0, dec, tmp_path / ".tmp", threads=1)
    out = tmp_path / "subsets" / "full"
    s = do_export(tmp_path, dec, out, shard_size=5)
    ok = {k for k, v in info.items() if v[2] == "ok"}
    assert s.n_samples == len(ok) == 16 and s.n_shards == 4
    assert verify_export(out, dec) == []


def test_empty_subset(setup) -> None:
    root, info, _, _ = setup
    dec = write_decisions(root, info, set(), name="none")
    out = root / "subsets" / "none"
    s = do_export(root, dec, out)
    assert s.n_samples == 0 and s.n_shards == 0
    assert json.loads((out / "sizes.json").read_text()) == {}
    assert np.load(out / "uids.npy").shape == (0,)
    assert verify_export(out, dec) == []
    with pytest.raises(ValueError, match="empty"):
        train_data_spec(out)


def test_kept_sample_missing_from_tar_is_an_error(setup) -> None:
    root, info, kept, dec = setup
    out = root / "subsets" / "dbp"
    do_export(root, dec, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = write_decisions(root, info, kept | {"000000007"}, name="bad")  # missing_in_tar row
    with pytest.raises(ValueError, match=r"shard 00000: 1 kept samples could not be exported, e.g. key 000000007: .*not in the tar"):
        export_subset(bad, root / "pool", out, 4, 0, root / ".tmp")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old export untouched
    assert list((root / ".tmp").iterdir()) == []


def test_verify_finds_problems(setup) -> None:
    root, info, kept, dec = setup
    out = root / "subsets" / "dbp"
    do_export(root, dec, out)
    # decisions now keep one more sample than the export holds
    more = write_decisions(root, info, kept | {ok_keys(info)[-1]}, name="more")
    problems = verify_export(out, more)
    assert any("missing from the export" in p for p in problems)
    assert any("uids.npy: 15 uids" in p for p in problems)
    # a shard disappears and sizes.json lies
    (out / "00001.tar").unlink()
    sizes = json.loads((out / "sizes.json").read_text())
    sizes["00000.tar"] = 5
    (out / "sizes.json").write_text(json.dumps(sizes))
    problems = verify_export(out, dec)
    assert any("without a tar" in p for p in problems)
    assert any("00000.tar: holds 4 samples, sizes.json says 5" in p for p in problems)
    assert any("4 kept samples are missing" in p for p in problems)
    assert verify_export(root / "nowhere", dec) == [f"{root / 'nowhere'}: no exported subset"]


def _datacomp_shard_size(stats_path: Path) -> int:
    """DataComp's resharder.py (load_shard_size, commit 4a8df19) reads a shard's size as
    ``int(simdjson.Parser().parse(f.read()).get("successes"))``; json is simdjson's equal here."""
    return int(json.loads(stats_path.read_text()).get("successes"))


def test_stats_files_are_img2dataset_s(setup) -> None:
    """Every exported tar has img2dataset's NNNNN_stats.json: its keys in its order, all samples
    successes, written as json.dump(..., indent=4); DataComp's resharder reads the tar's size from it."""
    root, info, kept, dec = setup
    out = root / "subsets" / "dbp"
    do_export(root, dec, out)  # 15 kept, shards of 4: 4, 4, 4, 3
    for name, n in (("00000", 4), ("00001", 4), ("00002", 4), ("00003", 3)):
        path = out / f"{name}_stats.json"
        stats = json.loads(path.read_text())
        assert list(stats) == list(STATS_KEYS) == [
            "count", "successes", "failed_to_download", "failed_to_resize", "duration", "start_time", "end_time",
            "status_dict"]
        assert stats == {"count": n, "successes": n, "failed_to_download": 0, "failed_to_resize": 0,
                         "duration": 1.0, "start_time": 0.0, "end_time": 1.0, "status_dict": {"success": n}}
        assert path.read_text() == json.dumps(stats, indent=4)  # img2dataset's write_stats formatting
        assert _datacomp_shard_size(path) == n == sum(1 for _ in _tar_keys(out / f"{name}.tar"))


def _tar_keys(path: Path) -> set[str]:
    return {m.name.split(".", 1)[0] for m, _ in read_tar(path)}


def test_verify_checks_stats_files(setup) -> None:
    root, info, kept, dec = setup
    out = root / "subsets" / "dbp"
    do_export(root, dec, out)
    assert verify_export(out, dec) == []
    (out / "00001_stats.json").unlink()
    stats = json.loads((out / "00002_stats.json").read_text())
    stats["successes"] = 5  # and count no longer adds up
    (out / "00002_stats.json").write_text(json.dumps(stats))
    stats = json.loads((out / "00003_stats.json").read_text())
    del stats["status_dict"]
    (out / "00003_stats.json").write_text(json.dumps(stats))
    (out / "00009_stats.json").write_text("{}")
    problems = verify_export(out, dec)
    assert "00001_stats.json is missing (img2dataset's stats of 00001.tar)" in problems
    assert "00002_stats.json: count 4 != successes + failed_to_download + failed_to_resize = 5" in problems
    assert "00002_stats.json: status_dict['success'] is 4, successes is 5" in problems
    assert "00002_stats.json: successes 5, but the tar holds 4 samples" in problems
    assert any(p.startswith("00003_stats.json: missing status_dict") for p in problems)
    assert "stats files without a tar: ['00009_stats.json']" in problems
    (out / "00000_stats.json").write_text("{not json")
    assert any(p.startswith(f"{out / '00000_stats.json'}: not valid JSON") for p in verify_export(out, dec))


@pytest.mark.slow
def test_open_clip_train_reads_sizes(setup) -> None:
    """open_clip_train's own get_dataset_size on the exported folder (imports torch)."""
    data = pytest.importorskip("open_clip_train.data")
    root, info, kept, dec = setup
    out = root / "subsets" / "dbp"
    do_export(root, dec, out)
    pattern, n = train_data_spec(out)
    assert data.get_dataset_size(pattern) == (15, 4)


def _kept_tables(root: Path, decisions: list[tuple[str, str, bool]]) -> tuple[Path, Path]:
    """Shard ``a``: rows 0 and 2 share uid U1 (row 2 is its duplicate_uid), row 1 is U2; and the decisions
    ``(shard, uid, keep)`` given."""
    samples = root / "samples"
    samples.mkdir(parents=True)
    pq.write_table(pa.table({"uid": ["U1", "U2", "U1"], "shard": ["a"] * 3, "key": ["k0", "k1", "k2"],
                             "row": pa.array([0, 1, 2], pa.int32()), "caption": ["c0", "c1", None]}),
                   samples / "a.parquet")
    dec = root / "decisions.parquet"
    pq.write_table(pa.table({"strategy": ["dbp"] * len(decisions), "uid": [d[1] for d in decisions],
                             "shard": [d[0] for d in decisions], "keep": [d[2] for d in decisions],
                             "reason": ["kept" if d[2] else "pruned" for d in decisions]}), dec)
    return dec, samples


def test_kept_view_gives_each_kept_decision_the_first_samples_row_of_its_uid(tmp_path: Path) -> None:
    """By hand: U1 kept names row 0 (key k0, caption c0), not its duplicate row 2; U2 dropped is not kept."""
    from dbprune_assets.core.store.kept import check_kept, kept_connection

    dec, samples = _kept_tables(tmp_path, [("a", "U1", True), ("a", "U2", False), ("a", "U1", False)])
    with kept_connection(dec, samples, tmp_path / "tmp", "256MB") as con:
        assert con.execute("SELECT shard, uid, key, caption FROM kept").fetchall() == [("a", "U1", "k0", "c0")]
        assert check_kept(con, dec, samples) == 1


@pytest.mark.parametrize("decisions, message", [
    ([("a", "U1", True), ("a", "U1", True)], r"tar key 'k0' is shared by 2 kept samples"),
    ([("a", "U3", True)], r"1 kept decisions map to 0 samples rows .* shard a uid U3 has no samples row"),
])
def test_kept_decisions_that_match_no_single_sample_are_errors(tmp_path: Path, decisions, message) -> None:
    from dbprune_assets.core.store.kept import check_kept, kept_connection

    dec, samples = _kept_tables(tmp_path, decisions)
    with kept_connection(dec, samples, tmp_path / "tmp", "256MB") as con, pytest.raises(ValueError, match=message):
        check_kept(con, dec, samples)
