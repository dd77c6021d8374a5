"""Exact (float64) scoring behind every nearest-centroid decision.

A search on any device (faiss on the CPU or its GPU, torch on CUDA) returns
float32 inner products whose last bits depend on the kernel.  Two things are
therefore decided here, on the CPU, in float64, from the search's candidates:

* the **label**: :func:`exact_labels` keeps the search's best centroid when it
  leads the runner-up by more than the float32 error bound
  (:func:`score_tolerance`), and otherwise re-scores the candidates exactly and
  takes the first maximum (ties: lowest cluster id).  When even the m-th
  candidate is within the bound, the row is re-scored against every centroid.
  The label is thus the exact argmax whichever device searched;
* the **distance**: :func:`exact_distances`, ``1 - x·c`` of the chosen cluster.

Products of float32 values are exact in float64 and each row's sum is taken by
the same loop whatever its position, so the values do not depend on chunking.
"""

from __future__ import annotations

import numpy as np

#: centroids scored at once when a row is re-scored against all of them
_FULL_BLOCK = 4096
#: float64 margin under the best exact score that still counts as a candidate
_F64_MARGIN = 1e-9


def score_tolerance(d: int) -> float:
    """Twice the float32 error bound of an inner product of two unit d-vectors.

    ``|fl32(x·c) - x·c| <= γ_d Σ|x_i c_i| <= γ_d`` with ``γ_d = d u / (1 - d u)``,
    ``u = 2^-24`` (any summation order, FMA or not): two float32 scores closer
    than twice that may be in the wrong order, farther apart they are not."""
    u = 2.0**-24
    gamma = d * u / (1.0 - d * u)
    return 2.0 * gamma * 1.01 + 1e-12


def pair_similarity(x: np.ndarray, centroids: np.ndarray, cluster: np.ndarray, block: int = 256) -> np.ndarray:
    """``x_i · c_{cluster_i}`` in float64 (n,); rows of ``x`` are float32.  Each row's sum is the same
    whatever the block; small blocks keep the float64 copies in cache (3× faster than 8,192 rows)."""
    c = np.asarray(centroids)
    out = np.empty(len(x), dtype=np.float64)
    for a in range(0, len(x), block):
        b = min(a + block, len(x))
        xa = np.asarray(x[a:b], dtype=np.float64)
        ca = np.asarray(c[cluster[a:b]], dtype=np.float64)
        out[a:b] = np.einsum("ij,ij->i", xa, ca)
    return out


def exact_distances(x: np.ndarray, centroids: np.ndarray, cluster: np.ndarray, block: int = 256) -> np.ndarray:
    """``1 - x_i · c_{cluster_i}`` summed in float64 on the CPU, rounded to float32.

    The search picks the cluster; the stored distance is recomputed here so
    that it does not depend on the device or kernel that searched (faiss' GPU
    and CPU kernels, or bf16, round differently: measured up to 1.1e-6 apart,
    which moved 4 of 2M DBP decisions at the quota boundaries).  Rows of ``x``
    must already be L2-normalised (float32).  O(block · d) memory, O(n · d)
    work: about 1/k of the search's.
    """
    return (1.0 - pair_similarity(x, centroids, cluster, block)).astype(np.float32)


def _first_exact_max(x: np.ndarray, centroids: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Per row, the candidate (ids ascending per row) with the largest exact score; first on ties."""
    scores = np.stack([pair_similarity(x, centroids, cand[:, j]) for j in range(cand.shape[1])], axis=1)
    return cand[np.arange(len(cand)), np.argmax(scores, axis=1)]


def _full_rescore(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Exact argmax over every centroid (first maximum) for a few rows."""
    c = np.asarray(centroids)
    x64 = np.asarray(x, dtype=np.float64)
    s = np.empty((len(x), len(c)), dtype=np.float64)
    for a in range(0, len(c), _FULL_BLOCK):
        s[:, a : a + _FULL_BLOCK] = x64 @ np.asarray(c[a : a + _FULL_BLOCK], dtype=np.float64).T
    out = np.empty(len(x), dtype=np.int64)
    for r in range(len(x)):  # the matmul only shortlists; the pairwise sum decides, as for every row
        cand = np.flatnonzero(s[r] >= s[r].max() - _F64_MARGIN)
        out[r] = _first_exact_max(x[r : r + 1], c, cand[None, :])[0]
    return out


def centroid_scale(centroids: np.ndarray) -> float:
    """The largest centroid norm, at least 1 (scales :func:`score_tolerance`
    for centroids that are not unit rows)."""
    c = np.asarray(centroids, dtype=np.float32)
    return max(1.0, float(np.sqrt(np.einsum("ij,ij->i", c, c, dtype=np.float64).max(initial=0.0))))


def exact_labels(x: np.ndarray, centroids: np.ndarray, scores: np.ndarray, ids: np.ndarray,
                 scale: float | None = None) -> np.ndarray:
    """The exact nearest centroid (int32 (n,)) from a search's top-m candidates.

    ``x``: the unit float32 rows searched; ``scores``/``ids`` (n, m): a
    device's float32 inner products and centroid ids, best first (any order
    among equal scores).  Rows whose best leads the runner-up by more than
    :func:`score_tolerance` (times ``scale``, default :func:`centroid_scale`)
    keep it (it is the exact argmax); the others take the exact first maximum
    among the candidates, or among every centroid when the m-th candidate is
    also within the bound.
    """
    ids = np.asarray(ids)
    best = ids[:, 0].astype(np.int32)
    m = ids.shape[1]
    if m < 2 or len(ids) == 0:
        return best
    tol = score_tolerance(x.shape[1]) * (centroid_scale(centroids) if scale is None else scale)
    top = np.asarray(scores[:, 0], dtype=np.float64)
    near = np.flatnonzero(top - scores[:, 1] <= tol)
    if len(near) == 0:
        return best
    crowded = np.zeros(len(near), dtype=bool)
    if m < len(centroids):
        crowded = top[near] - scores[near, m - 1] <= tol
    part, full = near[~crowded], near[crowded]
    if len(part):
        best[part] = _first_exact_max(x[part], centroids, np.sort(ids[part], axis=1))
    if len(full):
        best[full] = _full_rescore(x[full], centroids)
    return best


def kmeans_objective(x: np.ndarray, centroids: np.ndarray, block: int = 16384) -> float:
    """faiss' spherical k-means objective of a fit: ``Σ_i max_j x_i · c_j``
    (rows of ``x`` L2-normalised float32), the maxima from a float32 search,
    summed in float64.  Larger is better."""
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    total = 0.0
    for a in range(0, len(x), block):
        total += float(np.max(np.asarray(x[a : a + block], dtype=np.float32) @ c.T, axis=1).sum(dtype=np.float64))
    return total
