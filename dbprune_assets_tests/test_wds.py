"""core/pool/wds.py: the one key rule and grouping agree with webdataset's own
(``base_plus_ext``, ``group_by_keys``), damage is reported where it is, and
the writers give fixed bytes that webdataset reads back."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from dbprune_assets.core.pool.wds import (
    POOL_MTIME,
    TarDamaged,
    encode_member,
    iter_sample_headers,
    iter_samples,
    split_key,
    tar_trailer,
    write_tar,
)

NAMES = [
    "000030017.jpg", "000030017.TXT", "a/b/000.seg.png", "dir.v2/000.jpg", "../evil.jpg", "noext",
    "dir/noext", ".hidden", "x.tar.gz", "KEY.JpEg", "a/.b", "sub/dir/key.json",
]


def _raw_tar(path: Path, members: list[tuple[str, bytes]], symlink: str | None = None) -> None:
    """A tar with members exactly as given (names, order), plus an optional symlink member."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if symlink is not None:
            link = tarfile.TarInfo(symlink)
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tf.addfile(link)


def test_split_key_is_webdatasets_rule() -> None:
    from webdataset.tariterators import base_plus_ext

    for name in NAMES:
        key, ext = base_plus_ext(name)
        assert split_key(name) == (None if key is None else (key, ext.lower())), name


def test_grouping_matches_group_by_keys(tmp_path: Path) -> None:
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    members = [
        ("k1.jpg", b"1"), ("k1.TXT", b"t1"), ("sub/k1.jpg", b"s1"), ("k2.jpg", b"2"), ("noext", b"?"),
        ("k2.json", b"{}"), ("k3.png", b"3"), ("k1.cls", b"again"),
    ]
    tar = tmp_path / "t.tar"
    _raw_tar(tar, members, symlink="k9.jpg")
    with open(tar, "rb") as f:
        files = [{**m, "__url__": str(tar)} for m in tar_file_iterator(f)]
        theirs = [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")}) for s in group_by_keys(files)]
    ours = list(iter_samples(tar))
    assert ours == theirs
    assert [k for k, _ in ours] == ["k1", "sub/k1", "k2", "k3", "k1"]  # the symlink is not a sample
    headers = list(iter_sample_headers(tar))
    assert [(k, sorted(m)) for k, m in headers] == [(k, sorted(m)) for k, m in ours]
    data = tar.read_bytes()
    for (_, refs), (_, blobs) in zip(headers, ours):
        assert {e: data[r.offset : r.offset + r.size] for e, r in refs.items()} == blobs
    # wanted keys only, stopping after the last one
    assert list(iter_samples(tar, {"k2"})) == [("k2", {"jpg": b"2", "json": b"{}"})]


def test_damage_is_raised_after_the_complete_samples(tmp_path: Path) -> None:
    tar = tmp_path / "t.tar"
    write_tar(tar, [(f"k{i}", {"jpg": bytes(600), "txt": b"x"}) for i in range(4)])
    with tarfile.open(tar) as tf:
        cut_at = tf.getmember("k2.jpg").offset_data + 10
    tar.write_bytes(tar.read_bytes()[:cut_at])
    seen = []
    with pytest.raises(TarDamaged) as err:
        for key, _ in iter_samples(tar):
            seen.append(key)
    assert seen == ["k0", "k1"] and err.value.offset > 0
    # a cut at a member boundary: every sample before it, then the missing end marker
    write_tar(tar, [(f"k{i}", {"txt": b"x"}) for i in range(3)])
    with tarfile.open(tar) as tf:
        m = tf.getmember("k1.txt")
    tar.write_bytes(tar.read_bytes()[: m.offset_data + tarfile.BLOCKSIZE])
    seen = []
    with pytest.raises(TarDamaged, match="end-of-archive"):
        for key, _ in iter_samples(tar):
            seen.append(key)
    assert seen == ["k0", "k1"]
    with pytest.raises(FileNotFoundError):
        list(iter_samples(tmp_path / "nope.tar"))


def test_writers_are_deterministic_and_readable(tmp_path: Path) -> None:
    import webdataset as wds

    samples = [("000000001", {"txt": b"a", "jpg": b"\xff" * 700}), ("000000002", {"json": b"{}", "cls": b"3"})]
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    assert write_tar(a, samples) == 2
    write_tar(b, samples)
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as tf:
        assert [m.name for m in tf] == ["000000001.jpg", "000000001.txt", "000000002.cls", "000000002.json"]
        assert {(m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) for m in tf} == {(POOL_MTIME, 0o444, 0, 0, "", "")}
    # export's byte-level writer: members in the given order, tarfile's trailer
    blob = b"".join(encode_member(f"{k}.{e}", d) for k, m in samples for e, d in m.items())
    c = tmp_path / "c.tar"
    c.write_bytes(blob + tar_trailer(len(blob)))
    with tarfile.open(c) as tf:
        assert [m.name for m in tf] == ["000000001.txt", "000000001.jpg", "000000002.json", "000000002.cls"]
    assert c.stat().st_size % tarfile.RECORDSIZE == 0
    for path in (a, c):
        got = {s["__key__"]: s["txt"] if "txt" in s else s["cls"] for s in wds.WebDataset(str(path), shardshuffle=False)}
        assert got == {"000000001": b"a", "000000002": b"3"}
