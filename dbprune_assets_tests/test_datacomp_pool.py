"""The generated DataComp-format pool: DataComp's file layout and types, read
back through ``core/pool/sources/readers.py``, and the planted story (concept
spread, duplicates, mismatched captions) checked against its ground truth."""

from __future__ import annotations

import json
import re
import tracemalloc
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dbprune_assets.cli import main
from dbprune_assets.core.method import dbp
from dbprune_assets.core.settings import PoolSettings
from dbprune_assets.core.pool.sources.readers import clip_scores, read_datacomp
from dbprune_assets.samplepool import (
    COLORS,
    concept_counts,
    is_datacomp_pool,
    is_sample_pool,
    load_ground_truth,
    make_concepts,
    write_datacomp_pool,
)
from dbprune_assets.samplepool.datacomp import expected_within_cosine

SETTINGS = PoolSettings(shards=3, samples_per_shard=200, concepts=8, seed=3)
DIMS = {"b32": 512, "l14": 768}
PAPER_EPS = 0.07  # SemDeDup's eps on LAION; planted near duplicates sit within eps/2
HEX32 = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dc") / "pool"
    write_datacomp_pool(out, SETTINGS)
    return out


@pytest.fixture(scope="module")
def info(pool: Path) -> dict:
    return json.loads((pool / "pool_info.json").read_text())


@pytest.fixture(scope="module")
def truth(pool: Path) -> pl.DataFrame:
    return load_ground_truth(pool)


@pytest.fixture(scope="module")
def rows(pool: Path, info: dict, truth: pl.DataFrame) -> dict:
    """Every shard read back through core/pool/sources/readers.py, in shard order, with its ground truth aligned."""
    out: dict = {"uid": [], "score": {m: [] for m in DIMS}, "img": {m: [] for m in DIMS}, "txt": {m: [] for m in DIMS},
                 "sha256": [], "text": []}
    for stem in info["shards"]:
        meta = pq.read_table(pool / f"{stem}.parquet")
        out["uid"] += meta.column("uid").to_pylist()
        out["sha256"] += meta.column("sha256").to_pylist()
        out["text"] += meta.column("text").to_pylist()
        for m in DIMS:
            src = read_datacomp(pool / f"{stem}.parquet", m)
            assert list(src.ids) == meta.column("uid").to_pylist()
            out["img"][m].append(np.asarray(src.img, np.float32))
            out["txt"][m].append(np.asarray(src.txt, np.float32))
            out["score"][m].append(meta.column(f"clip_{m}_similarity_score").to_numpy())
    for key in ("img", "txt", "score"):
        out[key] = {m: np.concatenate(v) for m, v in out[key].items()}
    order = {u: i for i, u in enumerate(truth["uid"].to_list())}
    out["truth"] = truth[[order[u] for u in out["uid"]]]
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# -- DataComp's layout and types ----------------------------------------------


def test_layout_and_types_are_datacomps(pool: Path, info: dict) -> None:
    stems = info["shards"]
    assert len(stems) == SETTINGS.shards and all(HEX32.match(s) for s in stems)
    assert sorted(p.name for p in pool.iterdir()) == sorted(
        [f"{s}.parquet" for s in stems] + [f"{s}.npz" for s in stems]
        + ["ground_truth.parquet", "pool_info.json", "targets"])
    schema = pq.read_schema(pool / f"{stems[0]}.parquet")
    assert schema.names == ["uid", "url", "text", "original_width", "original_height", "clip_b32_similarity_score",
                            "clip_l14_similarity_score", "face_bboxes", "sha256"]
    types = {f.name: f.type for f in schema}
    assert types["original_width"] == types["original_height"] == pa.int64()
    assert types["clip_b32_similarity_score"] == types["clip_l14_similarity_score"] == pa.float32()
    assert pa.types.is_list(types["face_bboxes"]) and pa.types.is_list(types["face_bboxes"].value_type)
    assert types["face_bboxes"].value_type.value_type == pa.float64()
    with np.load(pool / f"{stems[0]}.npz") as npz:
        assert npz.files == ["b32_img", "b32_txt", "l14_img", "l14_txt"]
        for key in npz.files:
            arr = npz[key]
            assert arr.dtype == np.float16 and arr.shape == (SETTINGS.samples_per_shard, DIMS[key[:3]])
            norms = np.linalg.norm(arr.astype(np.float32), axis=1)
            assert np.abs(norms - 1).max() < 2e-3  # unit vectors, to float16 precision


def test_rows_uids_and_metadata(pool: Path, info: dict, rows: dict) -> None:
    uids = rows["uid"]
    assert len(uids) == SETTINGS.shards * SETTINGS.samples_per_shard == len(set(uids))
    assert all(HEX32.match(u) for u in uids)
    meta = pl.concat([pl.read_parquet(pool / f"{s}.parquet") for s in info["shards"]])
    assert meta["url"].str.starts_with("https://").all()
    # sizes as the image pool draws them; a rescaled near copy is 3/4 of its original
    assert (meta["original_width"] >= 180 * 3 // 4).all() and (meta["original_height"] > 0).all()
    boxes = [b for row in meta["face_bboxes"].to_list() for b in row]
    assert boxes and all(len(b) == 4 and 0 <= b[0] < b[2] <= 1 and 0 <= b[1] < b[3] <= 1 for b in boxes)
    assert meta["sha256"].str.contains(r"^[0-9a-f]{64}$").all()


def test_similarity_columns_are_the_stored_pairs_cosines(rows: dict) -> None:
    for m in DIMS:
        np.testing.assert_array_equal(rows["score"][m], clip_scores(rows["img"][m], rows["txt"][m]))


def test_models_choose_the_npz_keys_and_bad_models_are_refused(tmp_path: Path) -> None:
    small = PoolSettings(shards=1, samples_per_shard=30, concepts=4, seed=0)
    write_datacomp_pool(tmp_path / "l14", small, models=("l14",))
    (stem,) = json.loads((tmp_path / "l14" / "pool_info.json").read_text())["shards"]
    with np.load(tmp_path / "l14" / f"{stem}.npz") as npz:
        assert npz.files == ["l14_img", "l14_txt"]
    assert pl.read_parquet(tmp_path / "l14" / f"{stem}.parquet")["clip_b32_similarity_score"].is_not_null().all()
    for bad in (("h14",), (), ("l14", "l14")):
        with pytest.raises(ValueError, match="choose one or more of"):
            write_datacomp_pool(tmp_path / "bad", small, models=bad)
    assert not (tmp_path / "bad").exists()


# -- ground truth and the planted counts ----------------------------------------


def test_targets_are_images_of_the_evaluation_classes(pool: Path, rows: dict) -> None:
    """targets/image_embeddings.npz (datacomp_image's target set): eval_per_class
    image embeddings per concept, each nearest to its own concept's mean image."""
    with np.load(pool / "targets" / "image_embeddings.npz") as npz:
        assert npz.files == ["b32_img", "l14_img"]
        for key in npz.files:
            x = npz[key].astype(np.float32)
            assert npz[key].dtype == np.float16
            assert x.shape == (SETTINGS.concepts * SETTINGS.eval_per_class, DIMS[key[:3]])
            concept = np.repeat(np.arange(SETTINGS.concepts), SETTINGS.eval_per_class)
            img, truth_concept = rows["img"][key[:3]], rows["truth"]["concept"].to_numpy()
            means = _unit(np.stack([img[truth_concept == c].mean(axis=0) for c in range(SETTINGS.concepts)]))
            assert ((x @ means.T).argmax(axis=1) == concept).mean() > 0.95


def test_ground_truth_and_pool_info(pool: Path, info: dict, truth: pl.DataFrame, rows: dict) -> None:
    assert is_datacomp_pool(pool) and not is_sample_pool(pool)  # not mistaken for the image pool
    assert sorted(truth["uid"].to_list()) == sorted(rows["uid"])
    assert truth["key"].is_null().all() and (truth["planted_status"] == "ok").all()
    copies = truth.filter(pl.col("dup_kind").is_in(["exact", "near"]))
    # the image pool's rates, per shard: min(round(200 * 0.10), 200 // 3) = 20 copies; max(1, round(600 * 0.08)) = 48
    assert copies.height == 60 == info["duplicates"]["exact"] + info["duplicates"]["near"]
    assert truth["mismatched"].sum() == 48 == info["mismatched"]
    # base rows (copies aside) follow the image pool's exact Zipf counts
    concepts = make_concepts(SETTINGS)
    base = truth.filter(~pl.col("dup_kind").is_in(["exact", "near"]).fill_null(False))
    got = base.group_by("concept").len().sort("concept")["len"].to_list()
    assert got == concept_counts(concepts, 600 - 60).tolist()
    assert [c["rows"] for c in info["concepts"]] == truth.group_by("concept").len().sort("concept")["len"].to_list()
    assert [c["name"] for c in info["concepts"]] == [c.name for c in concepts]


# -- the planted story ----------------------------------------------------------


def test_within_concept_cosine_follows_the_planted_spread(rows: dict) -> None:
    truth = rows["truth"]
    concepts = make_concepts(SETTINGS)
    base = ~truth["dup_kind"].is_in(["exact", "near"]).fill_null(False).to_numpy()
    concept = truth["concept"].to_numpy()
    for m in DIMS:
        x = _unit(rows["img"][m])
        means = []
        for c in sorted(concepts, key=lambda c: c.variability):
            e = x[(concept == c.id) & base]
            s = e @ e.T
            mean = float((s.sum() - np.trace(s)) / (len(e) * (len(e) - 1)))
            assert mean == pytest.approx(expected_within_cosine(c), abs=0.02), (m, c.name)
            means.append(mean)
        assert means == sorted(means, reverse=True), m  # more variability, lower within-concept cosine


def test_dbp_complexity_on_true_concepts_follows_variability(rows: dict) -> None:
    truth = rows["truth"]
    concepts = make_concepts(SETTINGS)
    concept = truth["concept"].to_numpy()
    x = _unit(rows["img"]["l14"])
    centroids = _unit(np.stack([x[concept == c.id].mean(axis=0) for c in concepts]))
    count, total = dbp.cluster_partial_sums(concept, 1 - np.einsum("ij,ij->i", x, centroids[concept]), len(concepts))
    intra = dbp.d_intra(total, count)
    cx = dbp.complexity(dbp.d_inter(centroids, l=3), intra)
    variability = np.array([c.variability for c in concepts])
    by_var = np.argsort(variability)
    assert np.all(np.diff(intra[by_var]) > 0)
    rank = lambda a: np.argsort(np.argsort(a))  # noqa: E731
    assert np.corrcoef(rank(cx), rank(variability))[0, 1] > 0.9


def test_planted_duplicates_are_within_eps_and_nothing_else_is(rows: dict) -> None:
    truth = rows["truth"]
    group = truth["dup_group"].to_numpy()
    kind = truth["dup_kind"].to_list()
    shard = truth["shard"].to_numpy()
    for m in DIMS:
        x = _unit(rows["img"][m])
        s = x @ x.T
        same = (group[:, None] == group[None, :]) & (group[:, None] >= 0)
        np.fill_diagonal(same, False)
        assert s[same].min() > 1 - PAPER_EPS / 2, m
        assert s[~same & ~np.eye(len(x), dtype=bool)].max() < 1 - PAPER_EPS, m
    assert {"original", "exact", "near"} <= set(kind)
    originals = {int(g): i for i, (g, k) in enumerate(zip(group, kind)) if k == "original"}
    assert len(originals) == len(set(group[group >= 0]))
    crossing = 0
    for i, k in enumerate(kind):
        if k not in ("exact", "near"):
            continue
        o = originals[int(group[i])]
        crossing += shard[i] != shard[o]
        same_image = all(np.array_equal(rows["img"][m][i], rows["img"][m][o]) for m in DIMS)
        assert same_image == (k == "exact")
        assert (rows["sha256"][i] == rows["sha256"][o]) == (k == "exact")
        if k == "near":
            assert 1 - PAPER_EPS / 2 < float(_unit(rows["img"]["l14"][[i, o]]).prod(axis=0).sum()) < 0.999
    assert crossing > 0  # some groups span two shards


def test_mismatched_captions_have_the_lowest_scores(rows: dict) -> None:
    truth = rows["truth"]
    concepts = make_concepts(SETTINGS)
    mis = truth["mismatched"].to_numpy()
    for m in DIMS:
        score = rows["score"][m]
        assert score[mis].max() < score[~mis].min(), m
        assert 0.25 < float(np.median(score[~mis])) < 0.65 and float(np.median(score[mis])) < 0.2
    for row, text in zip(truth.iter_rows(named=True), rows["text"]):
        cap = concepts[row["caption_concept"]]
        assert cap.name in text
        if row["mismatched"]:
            me = concepts[row["concept"]]
            assert cap.shape != me.shape and cap.color != me.color and cap.color in COLORS
        else:
            assert row["caption_concept"] == row["concept"]


# -- determinism and memory ------------------------------------------------------


def test_same_settings_give_byte_identical_files(tmp_path: Path) -> None:
    small = PoolSettings(shards=2, samples_per_shard=60, concepts=5, seed=11)
    a, b = tmp_path / "a", tmp_path / "b"
    write_datacomp_pool(a, small)
    write_datacomp_pool(b, small)
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file()) and len(names) == 7
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    write_datacomp_pool(tmp_path / "c", small.model_copy(update={"seed": 12}))
    assert set(load_ground_truth(a)["uid"]).isdisjoint(load_ground_truth(tmp_path / "c")["uid"])


def test_memory_is_bounded_by_a_shard_not_the_pool(tmp_path: Path) -> None:
    peaks = []
    for shards in (2, 8):
        tracemalloc.start()
        write_datacomp_pool(tmp_path / f"p{shards}", PoolSettings(shards=shards, samples_per_shard=300, concepts=8))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.3 * peaks[0], peaks  # 4x the rows, about the same peak


# -- the command -------------------------------------------------------------------


def test_sample_pool_command_writes_the_datacomp_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("DBPRUNE_HOME", str(home))
    monkeypatch.delenv("DBPRUNE_POOL", raising=False)
    args = ["sample-pool", "--format", "datacomp", "--shards", "2", "--samples-per-shard", "40", "--concepts", "4"]
    assert main(args) == 0
    assert "80 rows in 2 DataComp shards" in capsys.readouterr().out
    pool = home / "pool"
    assert is_datacomp_pool(pool) and len(list(pool.glob("*.npz"))) == 2
    assert load_ground_truth(pool).height == 80
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    out = tmp_path / "elsewhere"
    assert main([*args, "--out", str(out), "--seed", "5"]) == 0 and is_datacomp_pool(out)
    assert main([*args, "--out", str(tmp_path / "x"), "--image-size", "32"]) == 2
    assert "--image-size do not apply to --format datacomp" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
