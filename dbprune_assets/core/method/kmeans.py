"""Spherical k-means, nearest-centroid assignment and the bounded uniform sample.

Shared by SemDeDup (``dedup_k`` clusters over the ``ok`` samples) and DBP (``k``
clusters over the candidates).  Everything here is a plain function over numpy
arrays; faiss is imported inside the functions so importing this module is
cheap.

Streaming model (``docs/design.md``: no stage holds every embedding at once):

1. :class:`~.sample.UniformSample` (``sample.py``) walks the shards once and keeps the ``size`` samples with the smallest ``uid_hash(seed, uid)``:
   a uniform sample whose memory is ``O(size * d + one chunk)`` and which does
   not depend on the order in which the shards are visited.
2. :func:`spherical_kmeans` trains faiss' spherical k-means on that sample
   (faiss on the CPU or its GPU, or the same algorithm in torch on CUDA:
   :mod:`~dbprune_assets.core.method.kmeans_torch`).
3. :func:`nearest_centroid` assigns every shard, chunk by chunk; labels and
   distances are decided exactly on the CPU
   (:mod:`~dbprune_assets.core.method.kmeans_exact`), whichever device searched.

Cosine distance is ``1 - x . c`` throughout; rows are L2-normalised in float32
before use and rows that are NaN/inf or have (near) zero norm are an error that
names the shard/rows (:func:`l2_normalize_checked`).
"""

from __future__ import annotations

from typing import Callable, ContextManager, Sequence, Union

import numpy as np

# exact_distances is also imported from here (its home moved to kmeans_exact)
from dbprune_assets.core.method.kmeans_exact import centroid_scale, exact_distances, exact_labels  # noqa: F401
# the uid hash is also imported from here (its home is uidhash.py)
from dbprune_assets.core.method.uidhash import uid_hash  # noqa: F401
from dbprune_assets.core.running.device import KmeansBackend, faiss_threads, kmeans_backend, torch_threads

#: rows whose L2 norm is below this are "zero-norm" (an embedding of a real
#: sample has norm ~1; float16 storage moves it by ~1e-3 at most)
ZERO_NORM = 1e-6

EmbSource = Union[np.ndarray, Callable[[np.ndarray], np.ndarray]]

# ---------------------------------------------------------------------------
# validation / normalisation
# ---------------------------------------------------------------------------


def _row_names(bad: np.ndarray, uids: Sequence[str] | np.ndarray | None, offset: int = 0, limit: int = 5) -> str:
    rows = np.flatnonzero(bad)[:limit]
    if uids is None:
        return ", ".join(f"row {int(r) + offset}" for r in rows)

    def name(u: object) -> str:
        return u.decode("utf-8", "replace") if isinstance(u, bytes) else str(u)

    return ", ".join(f"row {int(r) + offset} (uid {name(uids[int(r)])})" for r in rows)


def _check_sq_norms(sq: np.ndarray, what: str, uids: Sequence[str] | np.ndarray | None, offset: int) -> None:
    """Raise on rows whose squared norm is non-finite (NaN/inf values) or ~0."""
    n = len(sq)
    bad = ~np.isfinite(sq)
    if bad.any():
        # a non-finite squared norm means a NaN/inf value (or an absurdly large one)
        raise ValueError(
            f"{what}: {int(bad.sum())} of {n} embedding rows hold NaN/inf values "
            f"(first: {_row_names(bad, uids, offset)}); re-embed the shard"
        )
    zero = sq < ZERO_NORM * ZERO_NORM
    if zero.any():
        raise ValueError(
            f"{what}: {int(zero.sum())} of {n} embedding rows have zero norm "
            f"(first: {_row_names(zero, uids, offset)}); re-embed the shard"
        )


def check_rows(
    x: np.ndarray, what: str, uids: Sequence[str] | np.ndarray | None = None, offset: int = 0, block: int = 65536
) -> np.ndarray:
    """Validate embedding rows; return their float32 L2 norms.

    Raises ValueError naming ``what`` (e.g. the shard) and the first bad rows
    (numbered from ``offset``, with their uids when given) when a row holds
    NaN/inf or its norm is below :data:`ZERO_NORM`.  Works in blocks of
    ``block`` rows (a float32 copy of one block at a time).
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D (n, d) embedding array, got shape {x.shape}")
    n = len(x)
    sq = np.empty(n, dtype=np.float32)
    for a in range(0, n, block):
        xb = np.asarray(x[a : a + block], dtype=np.float32)
        sq[a : a + len(xb)] = np.einsum("ij,ij->i", xb, xb)
    _check_sq_norms(sq, what, uids, offset)
    return np.sqrt(sq)


def l2_normalize_checked(
    x: np.ndarray, what: str, uids: Sequence[str] | np.ndarray | None = None, offset: int = 0
) -> np.ndarray:
    """Float32, C-contiguous, unit-L2-norm copy of ``x`` (n, d).

    Raises ValueError naming ``what`` (shard/rows) and the first offending rows
    (numbered from ``offset``, with their uid when ``uids`` is given) when rows
    are NaN/inf or zero-norm.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D (n, d) embedding array, got shape {x.shape}")
    out = np.array(x, dtype=np.float32, order="C", copy=True)
    if len(out):
        sq = np.einsum("ij,ij->i", out, out)
        _check_sq_norms(sq, what, uids, offset)
        out *= (1.0 / np.sqrt(sq))[:, None]
    return out


# ---------------------------------------------------------------------------
# faiss helpers
# ---------------------------------------------------------------------------


_GPU_RES: list = []

#: candidates each search returns per row (the exact re-scoring picks among them)
SEARCH_CANDIDATES = 4

Device = Union[bool, str, KmeansBackend, None]


def _gpu_resources():  # one per process: creating them costs ~100 ms and GPU memory
    import faiss

    if not _GPU_RES:
        _GPU_RES.append(faiss.StandardGpuResources())
    return _GPU_RES[0]


def _training_rows(x: np.ndarray, k: int, niter: int, seed: int, max_points_per_centroid: int | None,
                   what: str) -> np.ndarray:
    """The checked, subsampled, L2-normalised float32 rows k-means trains on."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D (n, d) array, got shape {x.shape}")
    n = len(x)
    if k <= 0:
        raise ValueError(f"k={k}: the number of clusters must be positive; set dbp.k / semdedup.dedup_k >= 1")
    if k > n:
        raise ValueError(
            f"k={k} exceeds the {n} samples available for k-means ({what}); lower dbp.k / semdedup.dedup_k "
            f"(or raise dbp.sample_size / semdedup.sample_size if the sample is smaller than the pool)"
        )
    if niter <= 0:
        raise ValueError(f"niter={niter} must be positive")
    idx = training_subset(n, k, seed, max_points_per_centroid)
    return l2_normalize_checked(x if idx is None else x[idx], what)


def training_subset(n: int, k: int, seed: int, max_points_per_centroid: int | None = 256) -> np.ndarray | None:
    """The rows of an n-row sample that k-means on ``k`` clusters trains on
    (sorted positions), or None for all of them: a seeded uniform subset of
    ``max_points_per_centroid * k`` rows when the sample is larger (faiss'
    own cap, drawn here before any float32 copy)."""
    if max_points_per_centroid is None or n <= max_points_per_centroid * k:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points_per_centroid * k, replace=False))


def _faiss_kmeans(xn: np.ndarray, k: int, niter: int, seed: int, gpu: bool, threads: int, verbose: bool) -> np.ndarray:
    import faiss

    km = faiss.Kmeans(
        xn.shape[1],
        k,
        niter=int(niter),
        seed=seed,
        spherical=True,
        gpu=gpu,
        verbose=verbose,
        max_points_per_centroid=max(len(xn) // k + 1, 1),  # we already subsampled
        min_points_per_centroid=1,  # silence the "too few points" warning for small pools
    )
    with faiss_threads(threads):
        km.train(xn)
    return np.array(km.centroids, dtype=np.float32).reshape(k, xn.shape[1])


def spherical_kmeans(
    x: np.ndarray,
    k: int,
    niter: int,
    seed: int,
    use_gpu: Device = None,
    *,
    threads: int = 0,
    max_points_per_centroid: int | None = 256,
    what: str = "k-means sample",
    verbose: bool = False,
) -> np.ndarray:
    """Unit-norm float32 centroids (k, d) of spherical k-means on ``x``.

    faiss' ``Kmeans(d, k, niter=niter, seed=seed, spherical=True)`` on the
    L2-normalised rows of ``x`` (float16 or float32), run where
    :func:`~dbprune_assets.core.running.device.kmeans_backend` says for
    ``use_gpu`` (a ``compute.device`` value, a bool, or a backend): faiss on
    the CPU or its GPU, or the same algorithm in torch on CUDA
    (:mod:`~dbprune_assets.core.method.kmeans_torch`: same sample, same init
    from the same seed, same iterations).  Deterministic for the same data,
    seed, backend and thread count.

    ``max_points_per_centroid`` mirrors faiss' own cap (default 256): when
    ``n > max_points_per_centroid * k`` a seeded uniform subset of that many
    rows is drawn *before* the float32 copy is made (faiss would subsample the
    same way, after copying everything); ``None`` trains on every row.

    Errors: ``k <= 0``, ``k > n`` (names the setting to lower), NaN/inf or
    zero-norm rows (names ``what`` and the rows).
    """
    k = int(k)
    xn = _training_rows(x, k, niter, seed, max_points_per_centroid, what)
    backend = kmeans_backend(use_gpu)
    faiss_seed = int(seed) & 0x7FFFFFFF
    if backend.library == "torch":
        from dbprune_assets.core.method.kmeans_torch import torch_spherical_kmeans

        with torch_threads(threads):
            c = torch_spherical_kmeans(xn, k, int(niter), faiss_seed, backend.device)
    else:
        c = _faiss_kmeans(xn, k, niter, faiss_seed, backend.gpu, threads, verbose)
    if not np.isfinite(c).all():
        raise ValueError(f"k-means on {what} produced non-finite centroids")
    norms = np.linalg.norm(c, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return np.ascontiguousarray(c / norms, dtype=np.float32)


def _searcher(c: np.ndarray, backend: KmeansBackend) -> Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]:
    """``search(x, m) -> (scores (n, m), ids (n, m))``, best first, on the backend."""
    if backend.library == "torch":
        from dbprune_assets.core.method.kmeans_torch import torch_centroids, torch_search

        ct = torch_centroids(c, backend.device)
        return lambda xc, m: torch_search(xc, ct, m)
    if not backend.gpu:  # numpy's sgemm shortlists faster than faiss' flat search (kmeans_search.py)
        from dbprune_assets.core.method.kmeans_search import top_candidates

        ct = np.ascontiguousarray(c.T)
        return lambda xc, m: top_candidates(xc, ct, m)
    import faiss

    index = faiss.IndexFlatIP(c.shape[1])
    index.add(c)
    return faiss.index_cpu_to_gpu(_gpu_resources(), 0, index).search


def _search_threads(backend: KmeansBackend, threads: int) -> ContextManager[None]:
    """The thread limit of the library :func:`_searcher` searches with."""
    if backend.library == "torch":
        return torch_threads(threads)
    if backend.gpu:
        return faiss_threads(threads)
    from dbprune_assets.core.method.kmeans_search import blas_threads

    return blas_threads(threads)


def _check_centroids(x: np.ndarray, c: np.ndarray, what: str) -> None:
    if x.ndim != 2 or c.ndim != 2 or x.shape[1] != c.shape[1]:
        raise ValueError(f"{what}: shapes {x.shape} and centroids {c.shape} do not match")
    if len(c) == 0:
        raise ValueError("nearest_centroid: no centroids")
    if not np.isfinite(c).all():
        raise ValueError("nearest_centroid: centroids hold NaN/inf")


def nearest_centroid(
    x: np.ndarray,
    centroids: np.ndarray,
    chunk: int = 65536,
    *,
    use_gpu: Device = None,
    threads: int = 0,
    what: str = "embeddings",
    uids: Sequence[str] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row: ``(cluster int32 (n,), distance float32 (n,))``.

    ``distance = 1 - x . c`` (cosine distance; rows are L2-normalised in
    float32 first).  Chunked exact flat inner-product search for the
    :data:`SEARCH_CANDIDATES` best centroids, on the backend
    :func:`~dbprune_assets.core.running.device.kmeans_backend` picks for
    ``use_gpu`` (faiss ``IndexFlatIP`` on the CPU or its GPU, or torch), so
    memory is ``O(chunk * (d + k))`` besides ``x``.  The label and the
    distance are then decided exactly on the CPU
    (:func:`~dbprune_assets.core.method.kmeans_exact.exact_labels`,
    :func:`exact_distances`): the exact argmax, ties by the lowest cluster id,
    and ``1 - x·c`` in float64, so both are the same whichever device searched.

    Raises ValueError naming ``what`` for NaN/inf or zero-norm rows.
    """
    x = np.asarray(x)
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    _check_centroids(x, c, what)
    n = len(x)
    cluster = np.empty(n, dtype=np.int32)
    dist = np.empty(n, dtype=np.float32)
    if n == 0:
        return cluster, dist
    backend = kmeans_backend(use_gpu)
    search = _searcher(c, backend)
    m, scale = min(SEARCH_CANDIDATES, len(c)), centroid_scale(c)
    with _search_threads(backend, threads):
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            xc = l2_normalize_checked(x[a:b], what, None if uids is None else uids[a:b], offset=a)
            scores, ids = search(xc, m)
            best = exact_labels(xc, c, scores, ids, scale)
            cluster[a:b] = best
            dist[a:b] = exact_distances(xc, c, best)
    return cluster, dist
