"""faiss' spherical k-means and flat inner-product search, step for step, in torch.

The GPU path where only torch sees CUDA (faiss-gpu's wheel is built for CUDA
12; the GPU machines at hand run torch on CUDA 13).  It is faiss 1.15's
``Clustering::train`` with ``spherical=True`` and the default RANDOM init, not
a second algorithm (tests compare it with faiss on the CPU, torch's CPU
standing in for CUDA):

* **init**: rows ``perm[:k]`` of faiss' ``rand_perm(n, seed + 1)``, a
  Fisher-Yates shuffle driven by ``std::mt19937`` (:func:`faiss_init_rows`;
  numpy's legacy ``RandomState`` is the same generator, seeded the same way);
* **each of ``niter`` iterations**: assign every row to its largest inner
  product (float32, first maximum); each centroid becomes its members' mean;
  empty clusters are refilled as faiss' ``split_clusters`` does (a donor drawn
  with probability ``(size - 1) / (n - k)`` from ``mt19937(1234)``, else the
  largest; the copy and the donor perturbed by ``±1/1024``; the donor's count
  halved); then every centroid is L2-normalised;
* **early stop** as faiss 1.15 (``early_stop_threshold`` 0): when the
  iteration's objective, the rows' best scores summed in float32 in row
  order, equals the previous one (at the latest one iteration after every row
  kept its cluster);
* ``n == k``: the rows themselves, as faiss.

What differs is rounding: faiss sums a cluster in float32 in row order and its
BLAS rounds inner products its own way; here a cluster is summed in float64
(row order within fixed chunks, so the result is deterministic on a GPU too)
and rounded once.  On separated data the fits are equal up to rounding, with
identical assignments; on data with near-ties a row may go the other way in
some iteration, and the objectives stay within a fraction of a percent.
"""

from __future__ import annotations

import numpy as np

#: faiss' split perturbation (``split_clusters``: a bit above float16's epsilon)
_EPS = np.float32(1.0 / 1024.0)
#: ``float(std::mt19937::max())`` as faiss' ``rand_float`` divides by it
_MT_MAX = np.float32(4294967295.0)


def faiss_init_rows(n: int, k: int, seed: int) -> np.ndarray:
    """Row indices of faiss' RANDOM init (int64 (k,)): ``perm[:k]`` of
    ``faiss::rand_perm(perm, n, seed + 1)`` (``seed`` as ``ClusteringParameters.seed``
    holds it, >= 0).  Only the first k swaps matter; they are replayed sparsely."""
    draws = np.random.RandomState((int(seed) + 1) & 0xFFFFFFFF).randint(0, 2**32, size=min(k, n - 1), dtype=np.uint32)
    moved: dict[int, int] = {}
    out = np.empty(k, dtype=np.int64)
    for i in range(k):
        j = i + int(draws[i]) % (n - i) if i < len(draws) else i
        vi, vj = moved.get(i, i), moved.get(j, j)
        moved[i], moved[j] = vj, vi
        out[i] = vj
    return out


class _Mt19937Floats:
    """``RandomGenerator::rand_float()`` draws of one ``std::mt19937(seed)``,
    with look-ahead (:meth:`peek`) and :meth:`consume`."""

    def __init__(self, seed: int) -> None:
        self._rs = np.random.RandomState(seed)
        self._buf = np.zeros(0, dtype=np.float32)

    def peek(self, count: int) -> np.ndarray:
        if len(self._buf) < count:
            raw = self._rs.randint(0, 2**32, size=count - len(self._buf), dtype=np.uint32)
            self._buf = np.concatenate([self._buf, raw.astype(np.float32) / _MT_MAX])
        return self._buf[:count]

    def consume(self, count: int) -> None:
        self._buf = self._buf[count:]


def _donor(hassign: np.ndarray, p: np.ndarray, rng: _Mt19937Floats) -> int:
    """The cluster faiss' ``split_clusters`` splits for one empty cluster."""
    k = len(hassign)
    max_tries, t = 10 * k, 0
    while t < max_tries:
        block = min(max_tries - t, max(1024, k))
        r = rng.peek(block)
        cj = (t + np.arange(block)) % k
        hit = np.flatnonzero(r < p[cj])
        if len(hit):
            rng.consume(int(hit[0]) + 1)
            return int(cj[hit[0]])
        rng.consume(block)
        t += block
    return int(np.argmax(hassign))  # faiss' fallback: the largest (first on ties)


def split_plan(hassign: np.ndarray, n: int) -> list[tuple[int, int]]:
    """faiss' ``split_clusters`` choices: ``(empty cluster, donor)`` in order;
    ``hassign`` (float32 counts) is updated as faiss updates it."""
    k = len(hassign)
    rng = _Mt19937Floats(1234)
    denom = np.float64(np.float32(n - k))

    def prob(h: np.ndarray) -> np.ndarray:
        return ((h.astype(np.float64) - 1.0) / denom).astype(np.float32)

    p = prob(hassign)
    plan = []
    for ci in np.flatnonzero(hassign == 0):
        cj = _donor(hassign, p, rng)
        hassign[ci] = hassign[cj] / np.float32(2)
        hassign[cj] -= hassign[ci]
        p[[ci, cj]] = prob(hassign[[ci, cj]])
        plan.append((int(ci), cj))
    return plan


def _apply_splits(c: "torch.Tensor", plan: list[tuple[int, int]]) -> None:
    """Copy and perturb centroid rows as the plan says (in place, in order)."""
    import torch

    if not plan:
        return
    touched = sorted({i for pair in plan for i in pair})
    rows = {i: r for i, r in zip(touched, c[touched].cpu().numpy())}
    even = (np.arange(c.shape[1]) % 2 == 0)
    up = np.where(even, np.float32(1) + _EPS, np.float32(1) - _EPS).astype(np.float32)
    down = np.where(even, np.float32(1) - _EPS, np.float32(1) + _EPS).astype(np.float32)
    for ci, cj in plan:
        rows[ci] = rows[cj] * up
        rows[cj] = rows[cj] * down
    c[touched] = torch.from_numpy(np.stack([rows[i] for i in touched])).to(c.device)


def _chunk_rows(k: int, device: str) -> int:
    """Rows per search chunk: a (rows, k) float32 score block of <= 1 GiB on CUDA, 64 MiB on the CPU."""
    budget = (1 << 28) if device.startswith("cuda") else (1 << 24)
    return int(min(65536, max(256, budget // max(k, 1))))


def _accumulate(xc: "torch.Tensor", lab: "torch.Tensor", sums: "torch.Tensor") -> None:
    """``sums[j] += Σ_{lab_i = j} x_i`` in float64, deterministically: rows
    sorted by label (stable), one segment sum per cluster, one add per cluster."""
    import torch

    order = torch.argsort(lab, stable=True)
    ls = lab[order]
    cs = xc[order].double().cumsum(0)
    last = torch.ones_like(ls, dtype=torch.bool)
    last[:-1] = ls[1:] != ls[:-1]
    ends = torch.nonzero(last).squeeze(1)
    seg = cs[ends]
    seg[1:] -= cs[ends[:-1]]
    sums.index_add_(0, ls[ends], seg)


def _lloyd_step(x: "torch.Tensor", c: "torch.Tensor", chunk: int) -> tuple["torch.Tensor", "torch.Tensor", np.ndarray]:
    """One assignment pass: per-cluster float64 sums (k, d), counts (k,) and
    each row's best inner product (float32 (n,), on the CPU)."""
    import torch

    k, d = c.shape
    sums = torch.zeros((k, d), dtype=torch.float64, device=c.device)
    counts = torch.zeros(k, dtype=torch.int64, device=c.device)
    scores = np.empty(len(x), dtype=np.float32)
    for a in range(0, len(x), chunk):
        xc = x[a : a + chunk].to(c.device, non_blocking=True)
        best = torch.max(xc @ c.T, dim=1)
        scores[a : a + len(xc)] = best.values.cpu().numpy()
        counts += torch.bincount(best.indices, minlength=k)
        _accumulate(xc, best.indices, sums)
    return sums, counts, scores


def _faiss_objective(scores: np.ndarray) -> np.float32:
    """faiss' iteration objective: the float32 scores summed in float32, in row order."""
    return np.cumsum(scores, dtype=np.float32)[-1]


def _new_centroids(sums: "torch.Tensor", counts: "torch.Tensor", n: int) -> "torch.Tensor":
    """Means (float64, rounded once), faiss' splits of empty clusters, L2-normalised."""
    import torch

    c = (sums / counts.clamp(min=1).unsqueeze(1).double()).float()
    hassign = counts.cpu().numpy().astype(np.float32)
    if (hassign == 0).any():
        _apply_splits(c, split_plan(hassign, n))
    norms = c.double().norm(dim=1, keepdim=True)
    return (c.double() / torch.where(norms > 0, norms, torch.ones_like(norms))).float()


def _resident(x: np.ndarray, device: str) -> "torch.Tensor":
    """``x`` on the device when it fits in half its free memory, else left on the CPU (copied per chunk)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if not device.startswith("cuda"):
        return t
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return t.to(device) if t.numel() * 4 < free // 2 else t


def torch_spherical_kmeans(x: np.ndarray, k: int, niter: int, seed: int, device: str = "cuda",
                           history: list[float] | None = None) -> np.ndarray:
    """faiss' spherical k-means (see the module) on L2-normalised float32 rows:
    float32 centroids (k, d), unit rows.  ``seed`` as faiss gets it (>= 0).
    ``history``, when given, receives each iteration's objective (``Σ`` of the
    rows' best inner products before the update, faiss' ``iteration_stats.obj``)."""
    import torch

    n, d = x.shape
    if n == k:
        return np.array(x, dtype=np.float32, copy=True)
    from dbprune_assets.core.running.device import highest_matmul_precision

    with highest_matmul_precision(), torch.no_grad():
        xt = _resident(x, device)
        init = x[faiss_init_rows(n, k, seed)].astype(np.float64)
        c = torch.from_numpy(init / np.linalg.norm(init, axis=1, keepdims=True)).float().to(device)
        chunk = _chunk_rows(k, device)
        prev = None
        for _ in range(int(niter)):
            sums, counts, scores = _lloyd_step(xt, c, chunk)
            obj = _faiss_objective(scores)
            if history is not None:
                history.append(float(obj))
            c = _new_centroids(sums, counts, n)
            if prev is not None and prev != 0 and obj == prev:
                break  # faiss' early stop (early_stop_threshold 0): the objective did not change
            prev = obj
        return c.cpu().numpy()


def torch_centroids(centroids: np.ndarray, device: str) -> "torch.Tensor":
    """Centroids on the device for :func:`torch_search`."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(device)


def torch_search(x: np.ndarray, c: "torch.Tensor", m: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact flat inner-product search, faiss ``IndexFlatIP.search(x, m)``'s
    output: scores float32 (n, m) and ids int64 (n, m), best first."""
    import torch

    from dbprune_assets.core.running.device import highest_matmul_precision

    n = len(x)
    scores = np.empty((n, m), dtype=np.float32)
    ids = np.empty((n, m), dtype=np.int64)
    chunk = _chunk_rows(len(c), str(c.device))
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    with highest_matmul_precision(), torch.no_grad():
        for a in range(0, n, chunk):
            top = torch.topk(xt[a : a + chunk].to(c.device) @ c.T, m, dim=1, largest=True, sorted=True)
            scores[a : a + chunk] = top.values.cpu().numpy()
            ids[a : a + chunk] = top.indices.cpu().numpy()
    return scores, ids
