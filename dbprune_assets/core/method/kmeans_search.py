"""The CPU's nearest-centroid shortlist: numpy's float32 matmul, then the
``m`` best per row.

A search only shortlists: :func:`~.kmeans_exact.exact_labels` decides each
label exactly in float64 from the shortlist and its float32 scores, so any
kernel whose scores are within the float32 error bound serves, and the labels
and distances do not change with the kernel.  On the CPU this one is used
instead of faiss' ``IndexFlatIP.search``: with ``m`` > 1 candidates faiss
keeps a heap per query row, and on the 2-core machines measured it took 4×
(100 centroids) to 7× (2,000 centroids) as long as an sgemm followed by ``m``
passes of ``argmax`` (``benchmarks/bench_pool_scale.py`` figures in the README).
k-means training still runs in faiss.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import numpy as np

#: rows scored at once: a (rows, k) float32 block of scores, a few MiB at the usual k
_ROWS = 2048


def blas_threads(threads: int) -> ContextManager[None]:
    """numpy's BLAS threads for the block (0 = leave as is)."""
    if threads <= 0:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=int(threads), user_api="blas")


def top_candidates(x: np.ndarray, centroids_t: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """``IndexFlatIP.search(x, m)``'s output from ``centroids_t`` (d, k), the
    centroids transposed (contiguous): scores float32 (n, m) and ids int64
    (n, m), best first (ties: the lowest id first)."""
    x = np.asarray(x, dtype=np.float32)
    n, k = len(x), centroids_t.shape[1]
    m = min(m, k)
    scores = np.empty((n, m), dtype=np.float32)
    ids = np.empty((n, m), dtype=np.int64)
    for a in range(0, n, _ROWS):
        block = x[a : a + _ROWS] @ centroids_t
        rows = np.arange(len(block))
        for j in range(m):  # m passes of argmax beat a partition for the few candidates wanted
            best = block.argmax(axis=1)
            scores[a + rows, j] = block[rows, best]
            ids[a + rows, j] = best
            block[rows, best] = -np.inf
    return scores, ids
