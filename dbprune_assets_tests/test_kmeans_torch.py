"""The torch k-means and search path against faiss, on the CPU (torch's CPU
stands in for CUDA, so the code the GPU machines run is exercised here), the
exact label rule, and which backend ``compute.device`` picks."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbprune_assets.core.method import kmeans_torch
from dbprune_assets.core.method.kmeans import _training_rows, nearest_centroid, spherical_kmeans
from dbprune_assets.core.method.kmeans_exact import exact_labels, kmeans_objective, score_tolerance
from dbprune_assets.core.method.kmeans_torch import faiss_init_rows, split_plan, torch_spherical_kmeans
from dbprune_assets.core.running import device as dev
from dbprune_assets.core.running.device import FAISS_CPU, FAISS_GPU, DeviceError, kmeans_backend, torch_backend

TORCH_CPU = torch_backend("cpu")


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _blobs(k: int = 6, n_per: int = 80, d: int = 24, noise: float = 0.15, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(k, d)))
    return _unit(np.repeat(centres, n_per, axis=0) + noise * rng.normal(size=(k * n_per, d)))


def _faiss_fit(x: np.ndarray, k: int, niter: int, seed: int) -> faiss.Kmeans:
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True,
                      max_points_per_centroid=len(x) // k + 1, min_points_per_centroid=1)
    km.train(x)
    return km


# ---------------------------------------------------------------------------
# the same algorithm: init, splits, iterations
# ---------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.integers(3, 400), st.data(), st.integers(0, 2**31 - 2))
def test_init_rows_are_faiss_own_init(n: int, data: st.DataObject, seed: int):
    """faiss_init_rows replays faiss' rand_perm: with niter=0 faiss returns
    exactly its initial centroids (normalised rows of x)."""
    k = data.draw(st.integers(1, n - 1))
    x = _unit(np.random.default_rng(n).normal(size=(n, 8)))  # distinct rows
    rows = faiss_init_rows(n, k, seed)
    assert len(set(rows.tolist())) == k
    km = _faiss_fit(x, k, 0, seed)
    np.testing.assert_array_equal(np.argmax(km.centroids @ x.T, axis=1), rows)
    np.testing.assert_allclose(km.centroids, x[rows], atol=1e-6)


def test_splits_of_empty_clusters_are_faiss_own():
    """Duplicate rows make duplicate initial centroids, so the first iteration
    leaves clusters empty: the split choices and perturbations equal faiss'."""
    rng = np.random.default_rng(3)
    x = _training_rows(np.repeat(rng.normal(size=(10, 8)), 100, axis=0).astype(np.float32), 30, 1, 0, None, "x")
    km = _faiss_fit(x, 30, 1, 5)
    assert km.iteration_stats[0]["nsplit"] > 0
    np.testing.assert_allclose(torch_spherical_kmeans(x, 30, 1, 5, "cpu"), _unit(km.centroids), atol=1e-6)


def test_split_plan_consumes_draws_like_faiss():
    hassign = np.array([0, 5, 0, 1, 9, 0], dtype=np.float32)
    plan = split_plan(hassign, n=15)
    assert [ci for ci, _ in plan] == [0, 2, 5]  # every empty cluster, in order
    assert hassign.sum() == 15 and (hassign > 0).all()  # counts move, none are lost
    assert split_plan(np.array([0, 5, 0, 1, 9, 0], dtype=np.float32), n=15) == plan  # the same draws each time


@pytest.mark.parametrize("k, niter, seed", [(6, 20, 1), (9, 25, 7)])
def test_torch_fit_equals_faiss_on_separated_data(k: int, niter: int, seed: int):
    """Same init, same iterations: the same clusters (k = 9 > 6 blobs also splits)."""
    x = _blobs()
    cf = spherical_kmeans(x, k, niter, seed, use_gpu=False)
    ct = spherical_kmeans(x, k, niter, seed, use_gpu=TORCH_CPU)
    np.testing.assert_allclose(ct, cf, atol=1e-5)
    lf, df = nearest_centroid(x, cf, use_gpu=False)
    lt, dt = nearest_centroid(x, ct, use_gpu=False)
    np.testing.assert_array_equal(lt, lf)
    np.testing.assert_allclose(dt, df, atol=1e-5)
    of, ot = kmeans_objective(x, cf), kmeans_objective(x, ct)
    assert abs(ot - of) <= 0.005 * abs(of)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_torch_fit_objective_within_half_percent_on_random_data(seed: int):
    x = _unit(np.random.default_rng(seed).normal(size=(3000, 16)))
    cf = spherical_kmeans(x, 40, 30, seed, use_gpu=False)
    ct = spherical_kmeans(x, 40, 30, seed, use_gpu=TORCH_CPU)
    of, ot = kmeans_objective(x, cf), kmeans_objective(x, ct)
    assert abs(ot - of) <= 0.005 * abs(of), (of, ot)


def test_torch_fit_history_is_faiss_objective_and_deterministic():
    x = _unit(np.random.default_rng(5).normal(size=(1500, 12)))
    h1: list[float] = []
    c1 = torch_spherical_kmeans(x, 25, 12, 3, "cpu", history=h1)
    c2 = torch_spherical_kmeans(x, 25, 12, 3, "cpu")
    np.testing.assert_array_equal(c1, c2)
    km = _faiss_fit(x, 25, 12, 3)
    assert len(h1) == len(km.obj)  # the same iterations, early stop included
    np.testing.assert_allclose(h1, km.obj, rtol=1e-5)


def test_torch_fit_corner_cases():
    x = _unit(np.random.default_rng(0).normal(size=(7, 5)))
    np.testing.assert_allclose(spherical_kmeans(x, 7, 5, 0, use_gpu=TORCH_CPU),
                               spherical_kmeans(x, 7, 5, 0, use_gpu=False), atol=1e-7)  # n == k: the rows
    big = _blobs(k=3, n_per=200)
    a = spherical_kmeans(big, 3, 5, 0, use_gpu=TORCH_CPU, max_points_per_centroid=50)  # the same subsample
    b = spherical_kmeans(big, 3, 5, 0, use_gpu=False, max_points_per_centroid=50)
    np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="k=9 exceeds"):
        spherical_kmeans(x, 9, 5, 0, use_gpu=TORCH_CPU)


# ---------------------------------------------------------------------------
# assignment: identical labels and distances whichever backend searched
# ---------------------------------------------------------------------------


def _tied_centroids(rng: np.random.Generator, k: int, d: int) -> np.ndarray:
    """Random unit centroids, one an exact copy of another and one nudged by one ulp."""
    c = _unit(rng.normal(size=(k, d)))
    c[k // 2] = c[0]
    c[k // 3] = np.nextafter(c[1], np.float32(2))
    return c


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 40), st.sampled_from([1, 7, 4096]))
def test_nearest_centroid_torch_equals_faiss(seed: int, k: int, chunk: int):
    rng = np.random.default_rng(seed)
    c = _tied_centroids(rng, k, 16)
    x = np.concatenate([rng.normal(size=(300, 16)), c[:3] + c[k // 2], c[:4]]).astype(np.float16)
    lf, df = nearest_centroid(x, c, chunk=chunk, use_gpu=False)
    lt, dt = nearest_centroid(x, c, chunk=chunk, use_gpu=TORCH_CPU)
    np.testing.assert_array_equal(lt, lf)
    np.testing.assert_array_equal(dt, df)
    xn = _unit(x.astype(np.float32))
    exact = xn.astype(np.float64) @ c.astype(np.float64).T
    np.testing.assert_allclose(exact[np.arange(len(x)), lf], exact.max(axis=1), rtol=0, atol=1e-12)


def test_exact_labels_corrects_a_device_near_tie_order():
    """A device that ranks two near-tied centroids the wrong way round (within
    the float32 error bound) still yields the exact argmax."""
    c = _unit(np.array([[1.0, 0.0, 0.0], [1.0, 2e-7, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    x = _unit(np.array([[1.0, 1.0, 0.0]]))
    s = (x.astype(np.float64) @ c.astype(np.float64).T)[0]
    assert s[1] > s[0] and s[1] - s[0] < score_tolerance(3)
    wrong = (np.array([[s[0], s[1]]], dtype=np.float32), np.array([[0, 1]]))
    assert exact_labels(x, c, *wrong)[0] == 1
    crowded = (np.array([[s[0]] * 2], dtype=np.float32), np.array([[0, 3]]))  # the best is not even a candidate
    assert exact_labels(x, c, *crowded)[0] == 1
    clear = (np.array([[0.9, 0.1]], dtype=np.float32), np.array([[2, 0]]))  # a clear lead is kept as searched
    assert exact_labels(x, c, *clear)[0] == 2


def test_exact_labels_ties_lowest_id_whatever_candidate_order():
    c = _unit(np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0], [1, 0, 0]], dtype=np.float32))
    x = _unit(np.array([[1, 0.5, 0]], dtype=np.float32))
    for ids in ([[3, 1, 2, 0]], [[1, 3, 2, 0]]):
        scores = np.array([[0.9, 0.9, 0.5, 0.0]], dtype=np.float32)
        assert exact_labels(x, c, scores, np.array(ids))[0] == 1


# ---------------------------------------------------------------------------
# dispatch: which backend compute.device picks
# ---------------------------------------------------------------------------


def _machine(monkeypatch: pytest.MonkeyPatch, faiss_gpus: int, torch_cuda: bool) -> None:
    monkeypatch.setattr(dev, "faiss_gpu_count", lambda: faiss_gpus)
    monkeypatch.setattr(dev, "_torch_cuda", lambda: torch_cuda)


@pytest.mark.parametrize("faiss_gpus, torch_cuda, setting, expect", [
    (0, False, "auto", FAISS_CPU), (0, False, None, FAISS_CPU), (0, False, "cpu", FAISS_CPU),
    (1, True, "cpu", FAISS_CPU), (1, True, False, FAISS_CPU),
    (1, True, "auto", FAISS_GPU), (1, False, "cuda", FAISS_GPU), (2, True, True, FAISS_GPU),
    (0, True, "auto", torch_backend("cuda")), (0, True, "cuda", torch_backend("cuda")),
    (0, True, "cuda:1", torch_backend("cuda:1")), (0, True, True, torch_backend("cuda")),
])
def test_kmeans_backend_choice(monkeypatch, faiss_gpus, torch_cuda, setting, expect):
    _machine(monkeypatch, faiss_gpus, torch_cuda)
    assert kmeans_backend(setting) == expect
    assert kmeans_backend(expect) is expect


@pytest.mark.parametrize("setting", ["cuda", True])
def test_kmeans_backend_gpu_without_one_is_an_error(monkeypatch, setting):
    _machine(monkeypatch, 0, False)
    with pytest.raises(DeviceError, match="neither faiss nor torch sees one"):
        kmeans_backend(setting)


def test_cuda_without_faiss_gpu_routes_fit_and_search_through_torch(monkeypatch):
    """faiss without a GPU, torch with CUDA: both steps go through torch on
    'cuda' (redirected to the CPU here) and give faiss' answers."""
    _machine(monkeypatch, 0, True)
    seen: list[str] = []
    fit, place = kmeans_torch.torch_spherical_kmeans, kmeans_torch.torch_centroids
    monkeypatch.setattr(kmeans_torch, "torch_spherical_kmeans",
                        lambda x, k, niter, seed, device: seen.append(device) or fit(x, k, niter, seed, "cpu"))
    monkeypatch.setattr(kmeans_torch, "torch_centroids", lambda c, device: seen.append(device) or place(c, "cpu"))
    x = _blobs()
    c = spherical_kmeans(x, 6, 10, 0, use_gpu="cuda")
    labels, dist = nearest_centroid(x, c, use_gpu="auto")
    assert seen == ["cuda", "cuda"]
    np.testing.assert_allclose(c, spherical_kmeans(x, 6, 10, 0, use_gpu="cpu"), atol=1e-5)
    ref = nearest_centroid(x, c, use_gpu="cpu")
    np.testing.assert_array_equal(labels, ref[0])
    np.testing.assert_array_equal(dist, ref[1])


def test_cpu_setting_never_touches_torch(monkeypatch):
    _machine(monkeypatch, 0, True)
    monkeypatch.setattr(kmeans_torch, "torch_spherical_kmeans", lambda *a, **k: pytest.fail("torch path taken"))
    monkeypatch.setattr(kmeans_torch, "torch_centroids", lambda *a, **k: pytest.fail("torch path taken"))
    x = _blobs(k=3, n_per=30)
    nearest_centroid(x, spherical_kmeans(x, 3, 5, 0, use_gpu="cpu"), use_gpu="cpu")
