"""A shard read again with the same contents redoes nothing after its ingest.

A pool file's identity is its size and mtime, so ``touch`` or a copy without
``-p`` re-ingests the shard; when it comes out the same (rows, tar bytes,
stored pairs) ``raw_metadata`` keeps its data version and nothing downstream
runs (``core/pool/reingest.py``).  A real change still carries through.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from dbprune_assets.core.pool import reingest
from dbprune_assets.core.pool.shards import PROBLEMS_SCHEMA, SAMPLES_SCHEMA, ShardIngest
from dbprune_assets.core.pool.sources.stored import EmbeddingFiles, write_stored_pairs
from dbprune_assets.core.settings import PoolSettings, load_settings
from dbprune_assets.core.store.layout import UNPARTITIONED, Layout, list_pool_shards
from dbprune_assets.core.store.state import read_state

from . import faultkit as fk
from .faultkit import decisions_digest


def _later(path: Path, seconds: int = 100) -> None:
    """``touch``: the same bytes, a later mtime."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def _copy_without_times(path: Path) -> None:
    """``cp`` without ``-p`` over the file: a new file of the same bytes."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)
    _later(path, 7)


# ---------------------------------------------------------------------------
# the rule, by hand
# ---------------------------------------------------------------------------
def _ingest(shard: str, captions: list[str]) -> ShardIngest:
    n = len(captions)
    samples = pl.DataFrame({
        "uid": [f"{i:032x}" for i in range(n)], "key": [f"{i:09d}" for i in range(n)], "caption": captions,
        "shard": [shard] * n, "row": list(range(n)), "status": ["ok"] * n,
    }).select([pl.lit(None, dtype=dt).alias(c) if c not in ("uid", "key", "caption", "shard", "row", "status")
               else pl.col(c).cast(dt) for c, dt in SAMPLES_SCHEMA.items()])
    return ShardIngest(shard, samples, pl.DataFrame(schema=PROBLEMS_SCHEMA))


def _write(layout: Layout, ingest: ShardIngest) -> None:
    for name, frame in (("samples", ingest.samples), ("problems", ingest.problems)):
        layout.table(name, ingest.shard).parent.mkdir(parents=True, exist_ok=True)
        frame.write_parquet(layout.table(name, ingest.shard))


def _pairs(layout: Layout, shard: str, ingest: ShardIngest, files: EmbeddingFiles, scale: float = 1.0) -> None:
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(2, ingest.samples.height, 8)) * scale
    for p in files.files():
        p.parent.mkdir(parents=True, exist_ok=True)
    write_stored_pairs(img, txt, ingest.samples.select("uid", "key", "row"), shard, files)


def test_unchanged_needs_a_marker_the_same_tar_rows_and_pairs(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "home", tmp_path / "pool")
    before = _ingest("00000", ["a dog", "a cat"])
    _write(layout, before)
    marker = {reingest.TAR_DIGEST: "absent"}
    again = _ingest("00000", ["a dog", "a cat"])
    assert reingest.unchanged(layout, again, "absent", marker)
    assert not reingest.unchanged(layout, again, "absent", None)  # never ingested
    assert not reingest.unchanged(layout, again, "absent", {})  # a marker without the digest: an older dbprune
    assert not reingest.unchanged(layout, again, "0" * 64, marker)  # other tar bytes
    assert not reingest.unchanged(layout, _ingest("00000", ["a dog", "a bird"]), "absent", marker)
    assert not reingest.unchanged(layout, _ingest("00000", ["a dog"]), "absent", marker)

    # a stored source's staged pairs: unchanged only when they are the files in place
    _pairs(layout, "00000", again, EmbeddingFiles.staged(layout, "00000"))
    assert not reingest.unchanged(layout, again, "absent", marker)  # nothing in place yet
    _pairs(layout, "00000", again, EmbeddingFiles.of(layout, "00000"))
    assert reingest.unchanged(layout, again, "absent", marker)
    _pairs(layout, "00000", again, EmbeddingFiles.staged(layout, "00000"), scale=2.0)
    assert not reingest.unchanged(layout, again, "absent", marker)
    reingest.drop_staged(layout, "00000")
    assert not layout.staged_pairs("00000").exists()


def test_the_tar_digest_is_of_the_bytes(tmp_path: Path) -> None:
    p = tmp_path / "00000.tar"
    assert reingest.tar_digest(p) == "absent"
    p.write_bytes(b"abc")
    assert reingest.tar_digest(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256("abc")
    _later(p)
    assert reingest.tar_digest(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# ---------------------------------------------------------------------------
# through dbprune run
# ---------------------------------------------------------------------------
def _ran(report: Any) -> dict[str, list[str]]:
    assert report.ok, report.failure
    ran: dict[str, list[str]] = {}
    for g in report.groups:
        for a in g.ran:
            ran.setdefault(a, []).extend(g.partitions)
    return ran


def test_a_touched_datacomp_pool_redoes_only_the_ingest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dbprune_assets.samplepool import write_datacomp_pool

    from .test_refit import Home

    pool = tmp_path / "pool"
    write_datacomp_pool(pool, PoolSettings(shards=3, samples_per_shard=100, concepts=6, seed=3), models=("b32",))
    home = Home(monkeypatch, tmp_path / "home", pool)
    home.run()
    before = decisions_digest(home.layout.home)
    one, two, _ = list_pool_shards(pool)
    versions = {s: read_state(home.layout, "raw_metadata", s).data_version for s in (one, two)}
    manifest = read_state(home.layout, "pool_manifest", UNPARTITIONED).data_version

    for ext in ("parquet", "npz"):
        _later(pool / f"{one}.{ext}")
        _copy_without_times(pool / f"{two}.{ext}")
    said, ran = home.run()
    assert ran == {"raw_metadata": [one, two]}, said
    assert ("  2 of them read again: 2 unchanged (the same rows, tar bytes and stored pairs: what follows them "
            "is kept)") in said, said
    assert {s: read_state(home.layout, "raw_metadata", s).data_version for s in (one, two)} == versions
    assert read_state(home.layout, "pool_manifest", UNPARTITIONED).data_version == manifest
    assert decisions_digest(home.layout.home) == before
    assert not any((home.layout.home / "embeddings" / "staged").glob("*/*"))  # nothing left staged
    _, ran = home.run()
    assert ran == {}  # the markers hold the new times

    # a stored pair that really changed carries through, for that shard
    npz = pool / f"{one}.npz"
    with np.load(npz) as data:
        arrays = dict(data)
    key = next(k for k in arrays if k.startswith("b32_img"))
    arrays[key] = arrays[key].copy()
    arrays[key][0] = -arrays[key][0]
    np.savez(npz, **arrays)
    said, ran = home.run()
    assert ran["raw_metadata"] == [one] and ran["embeddings"] == [one] and "semantic_dedup" in ran
    assert "  1 of them read again: 1 changed" in said, said
    assert read_state(home.layout, "raw_metadata", one).data_version != versions[one]


def _swap_two_images(tar: Path) -> None:
    """Rewrite ``tar`` with the bytes of its first two images exchanged (both still decode)."""
    with tarfile.open(tar) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers() if m.isfile()]
    images = [i for i, (m, _) in enumerate(members) if m.name.endswith(".jpg")][:2]
    a, b = images
    (ma, da), (mb, db) = members[a], members[b]
    members[a], members[b] = (ma, db), (mb, da)
    with tarfile.open(tar, "w") as t:
        for m, data in members:
            m.size = len(data)
            t.addfile(m, io.BytesIO(data))


def test_a_touched_image_shard_is_not_embedded_again_but_other_images_are(tmp_path_factory: pytest.TempPathFactory,
                                                                          tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from dbprune_assets.runner import run_pipeline

    pool = fk.write_pool(tmp_path / "pool", shards=2)
    config = fk.config_with_encoder(tmp_path / "tiny.yaml", fk.shared_encoder(tmp_path_factory))
    layout = Layout(tmp_path / "home", pool)
    for name, value in (("DBPRUNE_HOME", layout.home), ("DBPRUNE_POOL", pool), ("DAGSTER_HOME", layout.home / "dagster")):
        monkeypatch.setenv(name, str(value))
    layout.home.mkdir(parents=True)
    settings = load_settings(config)
    layout.config_file.write_text(settings.to_yaml())

    def run() -> dict[str, list[str]]:
        return _ran(run_pipeline(layout, settings, select="*embeddings", echo=lambda m: None, log_level="ERROR"))

    run()
    shard = list_pool_shards(pool)[0]
    embedded = layout.img_emb(shard).read_bytes()
    version = read_state(layout, "raw_metadata", shard).data_version
    for ext in ("parquet", "tar"):
        _copy_without_times(pool / f"{shard}.{ext}")
    for f in (pool / "reference").iterdir():  # the encoder's training data: by content too
        _copy_without_times(f)
    assert run() == {"raw_metadata": [shard]}
    assert read_state(layout, "raw_metadata", shard).data_version == version

    _swap_two_images(pool / f"{shard}.tar")  # the same keys and rows, other pixels: the embeddings must follow
    ran = run()
    assert ran["raw_metadata"] == [shard] and ran["embeddings"] == [shard]
    assert layout.img_emb(shard).read_bytes() != embedded


def test_a_re_ingest_killed_after_its_tables_never_keeps_the_old_version(tmp_path: Path) -> None:
    """Captions changed, the ingest killed with the new tables in place and no
    marker: the set-aside marker of the earlier ingest must not make the next
    run take those tables for the earlier ones (it is forgotten first)."""
    import signal

    import yaml

    from dbprune_assets.samplepool import write_datacomp_pool

    from .conftest import run_cli
    from .test_refit import BASE

    pool, home = tmp_path / "pool", tmp_path / "home"
    write_datacomp_pool(pool, PoolSettings(shards=2, samples_per_shard=100, concepts=6, seed=3), models=("b32",))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(BASE))
    env = fk.env_for(home, pool)
    args = ("run", "--config", str(config), "--select", "*pool_manifest,*embeddings")
    assert (r := run_cli(*args, env=env)).returncode == 0, r.stdout + r.stderr
    shard = list_pool_shards(pool)[0]
    layout = Layout(home, pool)
    version = read_state(layout, "raw_metadata", shard).data_version

    parquet = pool / f"{shard}.parquet"
    rows = pl.read_parquet(parquet)
    rows.with_columns(pl.col("text").str.to_uppercase()).write_parquet(parquet)
    r = run_cli(*args, env={**env, "DBPRUNE_FAULT": f"rename:*/state/raw_metadata/{shard}.json"})
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    assert read_state(layout, "raw_metadata", shard) is None  # the new tables are in place, the marker is not

    assert (r := run_cli(*args, env=env)).returncode == 0, r.stdout + r.stderr
    assert "read again" not in r.stdout
    assert read_state(layout, "raw_metadata", shard).data_version != version
    assert "pool_manifest [unpartitioned]" in r.stdout  # the changed shard carries on


def test_a_set_aside_marker_lives_until_the_commit_or_the_shards_removal(tmp_path: Path) -> None:
    from dbprune_assets.core.store.state import State, clear_state, last_commit, write_state
    from dbprune_assets.defs.ingest import remove_shard_outputs

    layout = Layout(tmp_path / "home", tmp_path / "pool")
    write_state(layout, "raw_metadata", "00000", State("f1", "v1", {reingest.TAR_DIGEST: "absent"}))
    clear_state(layout, "raw_metadata", "00000")
    assert read_state(layout, "raw_metadata", "00000") is None  # a crash now leaves the shard out of date
    assert last_commit(layout, "raw_metadata", "00000").data_version == "v1"
    write_state(layout, "raw_metadata", "00000", State("f2", "v1", {}))
    assert not list(layout.state("raw_metadata", "00000").parent.glob("*.was"))  # committed: gone
    clear_state(layout, "raw_metadata", "00000")
    remove_shard_outputs(layout, "00000", [])
    assert last_commit(layout, "raw_metadata", "00000") is None
    assert not list(layout.state("raw_metadata", "00000").parent.iterdir())
