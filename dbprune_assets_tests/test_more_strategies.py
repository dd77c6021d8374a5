"""The field's other filters (core/strategies/negclip.py, datacomp_image.py,
balanced_kmeans.py) on hand-made pools whose kept sets are known, and their
building blocks against the formulas."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from dbprune_assets.core.method.embstore import centroid_frame
from dbprune_assets.core.settings import build_settings
from dbprune_assets.core.store.duck import polars_schema
from dbprune_assets.core.store.layout import Layout
from dbprune_assets.core.strategies import decide, registry
from dbprune_assets.core.strategies.balanced_kmeans import balanced_quotas, level_sizes, water_fill
from dbprune_assets.core.strategies.base import StrategyContext
from dbprune_assets.core.strategies.negclip import negclip_scores


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _home(tmp_path: Path, img: np.ndarray, txt: np.ndarray, scores: list[float], dedup_cluster: list[int],
          dedup_distance: list[float], centroids: np.ndarray, candidates: list[int] | None = None) -> Layout:
    """One shard ``s0`` of len(img) ok samples u0.. with their embeddings, CLIP
    scores, SemDeDup cluster and distance; the candidates are ``candidates``
    (default: all); no duplicates."""
    layout = Layout.from_env(tmp_path / "home", tmp_path / "home" / "pool")
    layout.pool.mkdir(parents=True)
    n = len(img)
    uids = [f"u{i}" for i in range(n)]
    rows = list(range(n))
    cand = list(range(n)) if candidates is None else candidates

    def write(table: str, data: dict) -> None:
        path = layout.table(table, "s0")
        path.parent.mkdir(parents=True, exist_ok=True)
        schema = polars_schema(table)
        pl.DataFrame(data, schema={c: schema[c] for c in data}).write_parquet(path)

    write("samples", {"uid": uids, "shard": ["s0"] * n, "key": uids, "row": rows, "caption": ["c"] * n,
                      "width": [64] * n, "height": [64] * n, "status": ["ok"] * n})
    write("scores", {"uid": uids, "shard": ["s0"] * n, "clip_score": scores})
    write("duplicates", {"uid": [], "shard": []})
    write("candidates", {"uid": [uids[i] for i in cand], "shard": ["s0"] * len(cand), "row": cand, "emb_row": cand,
                         "clip_score": [scores[i] for i in cand]})
    write("dedup_assignments", {"uid": uids, "shard": ["s0"] * n, "row": rows, "cluster": dedup_cluster,
                                "distance": dedup_distance})
    layout.table("dedup_centroids").parent.mkdir(parents=True, exist_ok=True)
    centroid_frame(_unit(centroids)).write_parquet(layout.table("dedup_centroids"))
    for path, x in ((layout.img_emb("s0"), img), (layout.text_emb("s0"), txt)):
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.asarray(x, dtype=np.float16))
    layout.emb_metadata("s0").parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"uid": uids, "shard": ["s0"] * n, "row": rows}, schema_overrides={"row": pl.Int32}).write_parquet(
        layout.emb_metadata("s0"))
    return layout


def _decide(layout: Layout, name: str, M: int, overrides: dict | None = None, seed: int = 0):
    settings = build_settings(overrides or {}, profile="sample")
    strategy = registry.get(name)
    work = layout.home / "work"
    work.mkdir(exist_ok=True)
    ctx = StrategyContext(layout=layout, tables=layout.home / "tables", shards=("s0",), settings=settings, work=work,
                          M=M, seed=seed, threads=1, device="cpu")
    prepared = strategy.prepare(ctx)
    out = layout.table("decisions", name)
    summary = decide(name, layout.home / "tables", M, None, seed, out, layout.home / "tmp", prepared=prepared)
    kept = pl.read_parquet(out).filter("keep")["uid"].to_list()
    return summary, sorted(kept, key=lambda u: int(u[1:]))


# ---------------------------------------------------------------------------
# negclip

IMG = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
TXT = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]


def _negclip_by_hand(img: list[list[float]], txt: list[list[float]], tau: float) -> list[float]:
    """The paper's formula with one batch holding every pair."""
    dot = [[sum(a * b for a, b in zip(x, t)) for t in txt] for x in img]  # dot[i][j] = <x_i, t_j>
    out = []
    for i in range(len(img)):
        r = tau / 2 * (math.log(sum(math.exp(dot[i][j] / tau) for j in range(len(img))))
                       + math.log(sum(math.exp(dot[j][i] / tau) for j in range(len(img)))))
        out.append(dot[i][i] - r)
    return out


def test_negclip_formula_by_hand() -> None:
    img, txt = np.array(IMG, np.float32), np.array(TXT, np.float32)
    keys = np.array([("s0", i) for i in range(3)], dtype=[("shard", object), ("row", np.int64)])
    got = negclip_scores(img, txt, [(img, txt, keys)], [np.arange(3)], temperature=1.0)
    assert got == pytest.approx(_negclip_by_hand(IMG, TXT, 1.0), abs=1e-6)
    # a sample outside the reference batch completes it: the same batch, the same score
    others = [(img[1:], txt[1:], keys[1:])]
    alone = negclip_scores(img[:1], txt[:1], others, [np.array([-1])], temperature=1.0)
    assert alone[0] == pytest.approx(_negclip_by_hand(IMG, TXT, 1.0)[0], abs=1e-6)


@hsettings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 12), b=st.integers(2, 6), tau=st.sampled_from([0.01, 0.07, 1.0]))
def test_negclip_shared_batches_equal_a_batch_per_sample(seed: int, n: int, b: int, tau: float) -> None:
    """Against the formula applied sample by sample: batch k of sample i is i
    plus the reference members other than i."""
    rng = np.random.default_rng(seed)
    img, txt = _unit(rng.standard_normal((n, 4))), _unit(rng.standard_normal((n, 4)))
    refs, own, expected = [], [], np.zeros(n)
    for _ in range(2):
        pick = rng.choice(n, size=min(b, n), replace=False)
        keys = np.array([("s", int(p)) for p in pick], dtype=[("shard", object), ("row", np.int64)])
        refs.append((img[pick].astype(np.float16), txt[pick].astype(np.float16), keys))
        where = {int(p): j for j, p in enumerate(pick)}
        own.append(np.array([where.get(i, -1) for i in range(n)]))
        ri, rt = img[pick].astype(np.float16).astype(np.float64), txt[pick].astype(np.float16).astype(np.float64)
        for i in range(n):
            batch_t = [txt[i].astype(np.float64)] + [rt[j] for j in range(len(pick)) if pick[j] != i]
            batch_x = [img[i].astype(np.float64)] + [ri[j] for j in range(len(pick)) if pick[j] != i]
            a = np.log(sum(np.exp(img[i] @ t / tau) for t in batch_t))
            c = np.log(sum(np.exp(x @ txt[i] / tau) for x in batch_x))
            expected[i] += tau / 2 * (a + c)
    s_ii = np.einsum("ij,ij->i", img.astype(np.float64), txt.astype(np.float64))
    got = negclip_scores(img, txt, refs, own, tau)
    assert np.allclose(got, s_ii - expected / 2, rtol=1e-5, atol=1e-5)


def test_negclip_keeps_the_pairs_that_stand_out(tmp_path: Path) -> None:
    layout = _home(tmp_path, np.array(IMG), np.array(TXT), [0.9, 0.1, 0.5], [0, 0, 0], [0.1, 0.1, 0.1],
                   np.array([[1.0, 0.0]]))
    summary, kept = _decide(layout, "negclip", 1, {"strategies": {"negclip": {"temperature": 1.0}}})
    by_hand = _negclip_by_hand(IMG, TXT, 1.0)
    assert kept == [f"u{int(np.argmax(by_hand))}"]
    assert summary.kept == 1 and summary.eligible == 3
    assert any("one batch of all 3 dedup survivors" in n for n in summary.notes)


# ---------------------------------------------------------------------------
# datacomp_image

def _image_pool(tmp_path: Path) -> tuple[Layout, Path]:
    # SemDeDup clusters: 0 at (1, 0), 1 at (0, 1), 2 at (-1, 0); samples u0, u1 in 0, u2, u3 in 1, u4 in 2
    img = np.array([[1, 0.1], [1, -0.1], [0.1, 1], [-0.1, 1], [-1, 0]])
    layout = _home(tmp_path, img, img, [0.2, 0.3, 0.9, 0.8, 0.95], [0, 0, 1, 1, 2], [0.01] * 5,
                   np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    targets = tmp_path / "targets.npy"
    np.save(targets, np.array([[0.9, 0.05], [0.95, 0.2], [-0.9, -0.1]], np.float32))  # nearest: 0, 0, 2
    return layout, targets


def test_datacomp_image_keeps_the_best_scores_in_target_clusters(tmp_path: Path) -> None:
    layout, targets = _image_pool(tmp_path)
    summary, kept = _decide(layout, "datacomp_image", 2, {"strategies": {"target_embeddings": str(targets)}})
    # target clusters 0 and 2: u0, u1, u4; the two best CLIP scores among them: u4 (0.95), u1 (0.3)
    assert kept == ["u1", "u4"]
    assert summary.eligible == 3
    assert any("3 target embeddings from strategies.target_embeddings" in n and "2 of SemDeDup's 3" in n
               for n in summary.notes)


def test_datacomp_image_keeps_all_it_can_when_the_filter_passes_fewer_than_m(tmp_path: Path) -> None:
    layout, targets = _image_pool(tmp_path)
    summary, kept = _decide(layout, "datacomp_image", 4, {"strategies": {"target_embeddings": str(targets)}})
    assert kept == ["u0", "u1", "u4"] and summary.M == 4 and summary.kept == 3
    assert any("kept all 3 eligible samples, fewer than M = 4" in n for n in summary.notes)


def test_datacomp_image_without_targets_is_left_out_saying_what_to_provide(tmp_path: Path) -> None:
    layout, _ = _image_pool(tmp_path)
    settings = build_settings({"embeddings": {"source": "datacomp"}}, profile="sample")
    why = registry.get("datacomp_image").unavailable(layout, settings)
    assert why is not None and "strategies.target_embeddings" in why
    chosen, left_out = registry.runnable(settings.selection.strategies, layout, settings)
    assert "datacomp_image" not in chosen and set(left_out) == {"datacomp_image"}
    assert "dbp" in chosen and "negclip" in chosen
    bad = build_settings({"strategies": {"target_embeddings": str(tmp_path / "nothing")}}, profile="sample")
    assert "is not a .npy/.npz file" in registry.get("datacomp_image").unavailable(layout, bad)


def test_targets_of_another_dimension_are_an_error(tmp_path: Path) -> None:
    layout, _ = _image_pool(tmp_path)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, l14_img=np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="3 dimensions but SemDeDup's centroids 2"):
        _decide(layout, "datacomp_image", 1, {"strategies": {"target_embeddings": str(wrong)}})


# ---------------------------------------------------------------------------
# balanced_kmeans

def test_water_fill_by_hand() -> None:
    rng = np.random.default_rng(0)
    got = water_fill(np.array([5, 1, 3]), 6, rng)  # x = 2: 2 + 1 + 2 = 5, one more to cluster 0 or 2
    assert got.sum() == 6 and got[1] == 1 and sorted(got[[0, 2]].tolist()) == [2, 3]
    assert water_fill(np.array([5, 1, 3]), 9, rng).tolist() == [5, 1, 3]
    assert water_fill(np.array([4, 4, 4]), 6, rng).tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="cannot take 10"):
        water_fill(np.array([5, 1, 3]), 10, rng)


@hsettings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=12), frac=st.floats(0, 1), seed=st.integers(0, 99))
def test_water_fill_is_exact_capped_and_balanced(sizes: list[int], frac: float, seed: int) -> None:
    s = np.array(sizes)
    target = int(frac * s.sum())
    got = water_fill(s, target, np.random.default_rng(seed))
    assert got.sum() == target and (got <= s).all() and (got >= 0).all()
    short = got < s  # clusters not exhausted get within one of each other, and no cluster gets more than one above
    if short.any():
        assert got[short].max() - got[short].min() <= 1
        assert (got <= got[short].min() + 1).all()


def test_balanced_quotas_split_down_the_hierarchy_by_hand() -> None:
    # leaves 0-3 (sizes 10, 10, 1, 30); level 2: leaves 0, 1 -> A, leaves 2, 3 -> B
    leaf = np.array([10, 10, 1, 30])
    got = balanced_quotas(leaf, [np.array([0, 0, 1, 1])], 20, seed=0)
    # top: A (20) and B (31) get 10 each; A: 5 + 5; B: 1 + 9
    assert got.tolist() == [5, 5, 1, 9]


def test_level_sizes_auto_and_given() -> None:
    assert level_sizes(16, "auto", "auto") == [16]
    assert level_sizes(50_000, "auto", "auto") == [50_000, 5_000, 500, 50]
    assert level_sizes(25, "auto", "auto") == [25, 2]
    assert level_sizes(16, 2, "auto") == [16, 2]
    assert level_sizes(100, "auto", (20, 4)) == [100, 20, 4]
    with pytest.raises(ValueError, match="levels = 2 but k names 2 levels"):
        level_sizes(100, 2, (20, 4))
    with pytest.raises(ValueError, match="a level of 200 clusters above one of 100"):
        level_sizes(100, "auto", (200,))


def test_balanced_kmeans_keeps_each_leafs_share_closest_to_its_centroid(tmp_path: Path) -> None:
    # one level (SemDeDup's 2 clusters): leaf 0 holds u0-u3, leaf 1 u4-u5; M = 4: 2 + 2
    img = np.array([[1, 0]] * 4 + [[0, 1]] * 2, dtype=float)
    layout = _home(tmp_path, img, img, [0.5] * 6, [0, 0, 0, 0, 1, 1], [0.4, 0.1, 0.3, 0.2, 0.5, 0.6],
                   np.array([[1.0, 0.0], [0.0, 1.0]]))
    summary, kept = _decide(layout, "balanced_kmeans", 4)
    assert kept == ["u1", "u3", "u4", "u5"]  # closest two of leaf 0 (0.1, 0.2), all of leaf 1
    assert summary.kept == 4 and any("levels of 2 clusters" in n for n in summary.notes)
    _, random_pick = _decide(layout, "balanced_kmeans", 4, {"strategies": {"balanced_kmeans": {"pick": "random"}}})
    assert sum(u in {"u4", "u5"} for u in random_pick) == 2 and len(random_pick) == 4


def test_build_level_clusters_the_centroids_below_with_resampling() -> None:
    """Level 2 over 40 unit centroids drawn around 4 directions: 4 clusters,
    each parent holding one direction's centroids; resampling keeps them."""
    from dbprune_assets.core.strategies.balanced_kmeans import build_level

    rng = np.random.default_rng(0)
    axes = np.eye(8, dtype=np.float32)[:4]
    truth = np.repeat(np.arange(4), 10)
    x = _unit(axes[truth] + 0.05 * rng.standard_normal((40, 8)).astype(np.float32))
    level = build_level(x, 4, resampling_steps=3, seed=0)
    assert level.centroids.shape == (4, 8)
    assert np.allclose(np.linalg.norm(level.centroids, axis=1), 1, atol=1e-5)
    for c in range(4):  # one parent per direction
        assert len(set(level.parent[truth == c].tolist())) == 1
    assert len(set(level.parent.tolist())) == 4
    leaf_sizes = rng.integers(0, 30, size=40)
    quotas = balanced_quotas(leaf_sizes, [level.parent], 100, seed=1)
    assert quotas.sum() == 100 and (quotas <= leaf_sizes).all()
    per_parent = np.bincount(level.parent, weights=quotas).astype(int)
    sizes = np.bincount(level.parent, weights=leaf_sizes).astype(int)
    short = per_parent < sizes
    assert per_parent[short].max() - per_parent[short].min() <= 1  # the top level splits M evenly


def test_negclip_scores_the_same_in_threads() -> None:
    rng = np.random.default_rng(3)
    img, txt = _unit(rng.standard_normal((1500, 8))), _unit(rng.standard_normal((1500, 8)))
    pick = rng.choice(1500, size=300, replace=False)
    keys = np.array([("s", int(p)) for p in pick], dtype=[("shard", object), ("row", np.int64)])
    where = {int(p): j for j, p in enumerate(pick)}
    own = [np.array([where.get(i, -1) for i in range(1500)])]
    refs = [(img[pick].astype(np.float16), txt[pick].astype(np.float16), keys)]
    one = negclip_scores(img, txt, refs, own, 0.01, parallel=1)
    assert np.array_equal(one, negclip_scores(img, txt, refs, own, 0.01, parallel=3))
