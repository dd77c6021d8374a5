"""A ``pruned_subset`` step reads its input tables once (core/store/subset_inputs.py):
decisions from the consolidated copy equal, byte for byte, those from the
per-shard tables; once consolidated, no strategy reads a per-shard file again;
the pool-level facts (images, tar sizes, sample counts) are right."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from dbprune_assets.core.running import oserrors
from dbprune_assets.core.store.duck import arrow_schema
from dbprune_assets.core.store.export import verify_export
from dbprune_assets.core.store.layout import Layout
from dbprune_assets.core.settings import STRATEGIES, PipelineSettings
from dbprune_assets.core.method.stages import export_bytes, make_subset
from dbprune_assets.core.strategies import decide, strategy_quotas
from dbprune_assets.core.store.subset_inputs import consolidate, pool_tar_sizes, subset_inputs
from dbprune_assets_tests.test_export import make_pool
from dbprune_assets_tests.test_strategies import ASSIGN, DUPLICATES, SAMPLES, SCORES, write_tables

#: M and quotas per strategy on test_strategies' hand-made pool (3 clusters of 4, 3, 2 candidates)
HAND = {"dbp": (5, [1, 2, 2]), "ssp": (5, [2, 1, 2]), "random": (4, None), "clip_score": (6, None),
        "semdedup": (None, None), "full": (None, None)}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------
# the same decisions, byte for byte
# ---------------------------------------------------------------------------
def test_decisions_from_the_copy_equal_the_per_shard_ones_byte_for_byte(tmp_path: Path) -> None:
    tables = write_tables(tmp_path / "home", SAMPLES, DUPLICATES, SCORES, ASSIGN)
    # a cross-shard duplicate uid: its row must be decided corrupt from the copy too
    dup = tables / "duplicate_uids"
    dup.mkdir()
    pq.write_table(pa.table({"shard": ["s1"], "key": ["s1_0002"], "row": pa.array([2], pa.int32()), "uid": ["u12"],
                             "first_shard": ["s0"], "first_key": ["s0_0002"]},
                            schema=arrow_schema("duplicate_uids")), dup / "all.parquet")
    root, n, ids = consolidate(tables, tmp_path / "work", caption=False, memory_limit="256MB", threads=1)
    assert (n, ids) == (20, 20)
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.parquet")) == [
        f"{t}/all.parquet" for t in ("assignments", "candidates", "duplicate_uids", "duplicates", "samples", "scores")]
    assert pq.read_schema(root / "samples" / "all.parquet").names == ["uid", "shard", "row", "status", "key"]
    for strategy, (M, q) in HAND.items():
        a = decide(strategy, tables, M, q, 3, tmp_path / "a" / f"{strategy}.parquet", tmp_path / ".tmp",
                   memory_limit="256MB", threads=1)
        b = decide(strategy, root, M, q, 3, tmp_path / "b" / f"{strategy}.parquet", tmp_path / ".tmp",
                   memory_limit="256MB", threads=1, origin=tables)
        assert _sha(a.path) == _sha(b.path), strategy
        # from one file as from several, uid and shard are written nullable (DuckDB would infer NOT NULL)
        assert [f.nullable for f in pq.read_schema(b.path)][:5] == [False, True, True, True, False]
        assert (a.rows, a.kept, a.eligible, a.M, a.reasons) == (b.rows, b.kept, b.eligible, b.M, b.reasons)
        assert a.reasons["corrupt"] == 6  # 5 by ingest status + u12, the cross-shard duplicate
        if q is not None:
            assert np.array_equal(a.per_cluster_kept, b.per_cluster_kept)


def test_a_table_without_files_stays_absent_and_errors_name_the_real_folder(tmp_path: Path) -> None:
    tables = write_tables(tmp_path / "home", SAMPLES, DUPLICATES, SCORES, ASSIGN)
    shutil.rmtree(tables / "candidates")
    root, _, _ = consolidate(tables, tmp_path / "work", caption=True, memory_limit="256MB", threads=1)
    assert not (root / "candidates").exists() and not (root / "duplicate_uids").exists()
    assert "caption" in pq.read_schema(root / "samples" / "all.parquet").names
    with pytest.raises(ValueError, match=f"needs the candidates table, but {tables / 'candidates'} holds"):
        decide("random", root, 1, None, 0, tmp_path / "x.parquet", tmp_path / ".tmp", threads=1, origin=tables)
    s = decide("full", root, None, None, 0, tmp_path / "full.parquet", tmp_path / ".tmp", threads=1, origin=tables)
    assert s.kept == 15


def test_an_unreadable_shard_file_names_its_table(tmp_path: Path) -> None:
    tables = write_tables(tmp_path / "home", SAMPLES, DUPLICATES, SCORES, ASSIGN)
    (tables / "scores" / "s1.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"scores: cannot read the scores table .*s1\.parquet.*re-materialise"):
        consolidate(tables, tmp_path / "work", caption=False, memory_limit="256MB", threads=1)


def test_the_copy_needs_the_sources_size_free_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tables = write_tables(tmp_path / "home", SAMPLES, DUPLICATES, SCORES, ASSIGN)
    size = sum(f.stat().st_size for f in tables.rglob("*.parquet"))
    monkeypatch.setattr(oserrors, "free_bytes", lambda path: size + oserrors.MIN_FREE_BYTES - 1)
    with pytest.raises(oserrors.NotEnoughSpace, match=f"copying the input tables of {tables} for pruned_subset"):
        consolidate(tables, tmp_path / "work", caption=True, memory_limit="256MB", threads=1)
    assert not (tmp_path / "work" / "tables").exists()
    monkeypatch.setattr(oserrors, "free_bytes", lambda path: size + oserrors.MIN_FREE_BYTES)
    consolidate(tables, tmp_path / "work", caption=True, memory_limit="256MB", threads=1)


# ---------------------------------------------------------------------------
# make_subset on a pool with images: one read for all strategies
# ---------------------------------------------------------------------------
def _write(tables: Path, table: str, name: str, rows: list[dict]) -> None:
    (tables / table).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema(table)), tables / table / f"{name}.parquet")


def _home_with_images(tmp_path: Path) -> tuple[Layout, dict]:
    """test_export's two-shard pool (tars + samples) under a home, with every ok
    sample a candidate in one of 2 DBP clusters, and the clusters table."""
    info = make_pool(tmp_path)  # tmp_path/pool, tmp_path/tables/samples
    layout = Layout(tmp_path / "home", tmp_path / "pool")
    layout.home.mkdir()
    (tmp_path / "tables").rename(layout.home / "tables")
    tables = layout.home / "tables"
    samples = pq.read_table(tables / "samples" / "00000.parquet").to_pylist() + \
        pq.read_table(tables / "samples" / "00001.parquet").to_pylist()
    ok = [r for r in samples if r["status"] == "ok"]
    score = {r["uid"]: 0.2 + 0.01 * i for i, r in enumerate(ok)}
    for shard in ("00000", "00001"):
        mine = [r for r in ok if r["shard"] == shard]
        _write(tables, "scores", shard, [{"uid": r["uid"], "shard": shard, "clip_score": score[r["uid"]]} for r in mine])
        _write(tables, "candidates", shard, [{"uid": r["uid"], "shard": shard, "row": r["row"], "emb_row": i,
                                              "clip_score": score[r["uid"]]} for i, r in enumerate(mine)])
        _write(tables, "assignments", shard, [{"uid": r["uid"], "shard": shard, "row": r["row"], "cluster": r["row"] % 2,
                                               "distance": 0.1 * r["row"]} for r in mine])
    _write(tables, "duplicates", "all", [])
    sizes = np.bincount([r["row"] % 2 for r in ok], minlength=2)
    _write(tables, "clusters", "all", [
        {"cluster": c, "size": int(sizes[c]), "d_intra": 0.1, "d_inter": 0.2, "complexity": 0.02, "probability": 0.5,
         "quota": int(sizes[c]) // 2, "lower_bound": 1, "kept": None} for c in range(2)])
    return layout, info


#: the strategies that read only the tables this hand-made home has (datacomp_image, negclip and
#: balanced_kmeans also read embeddings and SemDeDup's fit: test_more_strategies.py)
TABLE_ONLY = tuple(s for s in STRATEGIES if s not in ("datacomp_image", "negclip", "balanced_kmeans"))


def test_make_subset_reads_the_per_shard_tables_once_per_step(tmp_path: Path) -> None:
    layout, info = _home_with_images(tmp_path)
    settings = PipelineSettings.model_validate({"export": {"shard_size": 3}, "compute": {"threads": 1}})
    tables = layout.home / "tables"
    clusters = pl.read_parquet(layout.table("clusters"))
    reference = {}
    for strategy in TABLE_ONLY:
        quotas, M = strategy_quotas(strategy, clusters)
        direct = decide(strategy, tables, M, quotas, 0, tmp_path / "direct" / f"{strategy}.parquet", tmp_path / ".tmp",
                        threads=1)  # straight from the per-shard files
        out = make_subset(layout, settings, strategy)  # reads the tables itself
        assert all(not found for found in out.problems.values()), out.problems
        assert _sha(layout.table("decisions", strategy)) == _sha(direct.path), strategy
        reference[strategy] = (_sha(direct.path), _sha(layout.subset_dir(strategy) / "uids.npy"))
    assert len({r[0] for r in reference.values()}) == len(TABLE_ONLY)  # they do decide differently

    with subset_inputs(layout, threads=1) as inputs:
        assert inputs.images and inputs.origin == tables
        assert dict(inputs.tar_sizes) == {s: (layout.pool / f"{s}.tar").stat().st_size for s in ("00000", "00001")}
        assert (inputs.samples, inputs.sample_ids) == (2 * 12, 2 * 12)
        # from here on the per-shard files are gone: every strategy reads the step's copy
        shutil.move(tables / "samples", tmp_path / "samples.aside")
        for t in ("scores", "candidates", "assignments"):
            shutil.rmtree(tables / t)
        for strategy in TABLE_ONLY:
            out = make_subset(layout, settings, strategy, inputs)
            assert all(not found for found in out.problems.values()), out.problems
            dec = layout.table("decisions", strategy)
            assert (_sha(dec), _sha(layout.subset_dir(strategy) / "uids.npy")) == reference[strategy], strategy
            assert export_bytes(layout, dec, inputs.tar_sizes) == export_bytes(layout, dec) > 0
            assert out.export.n_samples == out.summary.kept and out.export.n_shards == -(-out.summary.kept // 3)
        work = inputs.tables.parent
    assert not work.exists()  # the copy was scratch
    shutil.move(tmp_path / "samples.aside", tables / "samples")
    for strategy in TABLE_ONLY:  # the export checked against the real samples table
        assert verify_export(layout.subset_dir(strategy), layout.table("decisions", strategy)) == []
    kept = pq.read_table(layout.table("decisions", "full")).to_pylist()
    assert {r["uid"] for r in kept if r["keep"]} == {v[1] for v in info.values() if v[2] == "ok"}


# ---------------------------------------------------------------------------
# a metadata-only pool: uids.npy, no caption read, no tar listed
# ---------------------------------------------------------------------------
def test_metadata_only_pool_exports_uids_without_reading_captions(tmp_path: Path) -> None:
    layout, _ = _home_with_images(tmp_path)
    for tar in layout.pool.glob("*.tar"):  # DataComp metadata shards: parquet + npz, no tar
        tar.unlink()
        (layout.pool / f"{tar.stem}.parquet").write_bytes(b"")
        (layout.pool / f"{tar.stem}.npz").write_bytes(b"")
    settings = PipelineSettings.model_validate({"compute": {"threads": 1}})
    with subset_inputs(layout, threads=1) as inputs:
        assert not inputs.images and dict(inputs.tar_sizes) == {}
        assert "caption" not in pq.read_schema(inputs.samples_dir / "all.parquet").names
        out = make_subset(layout, settings, "dbp", inputs)
    assert all(not found for found in out.problems.values()), out.problems
    assert sorted(p.name for p in layout.subset_dir("dbp").iterdir()) == ["uids.npy"]
    kept = pq.read_table(layout.table("decisions", "dbp")).filter(pc.field("keep")).column("uid").to_pylist()
    got = np.load(layout.subset_dir("dbp") / "uids.npy")
    assert len(got) == len(kept) == out.summary.M
    assert sorted(f"{int(a):016x}{int(b):016x}" for a, b in got) == sorted(kept)


def test_pool_tar_sizes_lists_top_level_tars_only(tmp_path: Path) -> None:
    (tmp_path / "00000.tar").write_bytes(b"x" * 10)
    (tmp_path / "00001.tar").write_bytes(b"")
    (tmp_path / "00001.parquet").write_bytes(b"y")
    (tmp_path / ".hidden.tar").write_bytes(b"z")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "00000.tar").write_bytes(b"w" * 5)
    assert pool_tar_sizes(tmp_path) == {"00000": 10, "00001": 0}
    assert pool_tar_sizes(tmp_path / "absent") == {}
