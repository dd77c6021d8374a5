"""Benchmark: the pipeline to the six strategies' ``uids.npy`` on a pool of a
few million L/14 samples, on one GPU machine, and what it says about
DataComp-Medium (128M samples, 12,800 shards, ``dedup_k`` 50,000, DBP k 500).

1. Writes a DataComp-format pool on local disk: ``--base-shards`` shards from
   the project's generator (planted concepts and duplicates), then replicas
   of them until ``--samples``: fresh uids and stems, the L/14 pairs moved by
   Gaussian noise (``--noise``) and re-normalised, CLIP scores recomputed, in
   parallel processes.  (Writing every shard with the generator would take
   the whole budget.)
2. Runs ``dbprune run --select '*pruned_subset'`` on it, SemDeDup and DBP
   clusters scaled from the paper's settings to the pool (``dedup_k`` =
   50,000 · n / 128M, DBP k = 500 · n / 128M, ``niter`` 100), while sampling
   GPU utilisation and memory with ``nvidia-smi`` every second.
3. Prints per group: seconds, samples/s, mean and peak GPU utilisation, and
   the group's time extrapolated to DataComp-Medium (per-shard and
   per-cluster work grows with n, k-means fits with k at a bounded sample),
   then the total against the goal (20 minutes on one H200 machine) and the
   group that stands in the way.

On a machine without a GPU it runs a small CPU version (``--samples``
defaults to 100,000) and says so.  Asserts nothing.

    python benchmarks/gpu_pipeline.py                       # GPU: 3M samples
    python benchmarks/gpu_pipeline.py --samples 1000000 --work /local/disk
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MEDIUM = 128_000_000  # DataComp-Medium samples
GOAL_S = 20 * 60  # the goal on one H200 machine


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------------------
# the pool
# ---------------------------------------------------------------------------
def replicate(args: tuple[Path, Path, int, float]) -> int:
    """Write replica ``i`` of base shard ``src`` into ``pool``; its rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src, pool, i, noise = args
    rng = np.random.default_rng(i)
    table = pq.read_table(src)
    with np.load(src.with_suffix(".npz")) as z:
        pairs = {k: z[k].astype(np.float32) for k in z.files}
    for key, x in pairs.items():
        x += rng.normal(0.0, noise, x.shape).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        pairs[key] = x
    stem = hashlib.sha256(f"replica-{i}".encode()).hexdigest()[:32]
    uids = [hashlib.sha256(f"{i}-{r}".encode()).hexdigest()[:32] for r in range(table.num_rows)]
    score = (pairs["l14_img"] * pairs["l14_txt"]).sum(axis=1)
    table = table.set_column(table.schema.get_field_index("uid"), "uid", pa.array(uids, pa.string()))
    table = table.set_column(table.schema.get_field_index("clip_l14_similarity_score"), "clip_l14_similarity_score",
                             pa.array(score, pa.float32()))
    pq.write_table(table, pool / f"{stem}.parquet")
    np.savez(pool / f"{stem}.npz", **{k: v.astype(np.float16) for k, v in pairs.items()})
    return table.num_rows


def write_pool(pool: Path, a: argparse.Namespace) -> tuple[int, float]:
    """The pool (base shards, then replicas up to ``a.samples``): (samples, seconds)."""
    from dbprune_assets.core.settings import PoolSettings
    from dbprune_assets.samplepool import write_datacomp_pool

    t = time.perf_counter()
    per = a.samples_per_shard
    base = min(a.base_shards, max(1, a.samples // per))
    write_datacomp_pool(pool, PoolSettings(shards=base, samples_per_shard=per, concepts=a.concepts, seed=0),
                        models=("l14",))
    (pool / "ground_truth.parquet").unlink(missing_ok=True)  # it covers the base shards only
    sources = sorted(pool.glob("*.parquet"))
    wanted = max(0, a.samples // per - base)
    jobs = [(sources[i % base], pool, i, a.noise) for i in range(wanted)]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as ex:
        replicas = sum(ex.map(replicate, jobs, chunksize=4))
    return base * per + replicas, time.perf_counter() - t


# ---------------------------------------------------------------------------
# the run, with the GPU sampled
# ---------------------------------------------------------------------------
class GpuSampler:
    """``nvidia-smi`` every second: (time, utilisation %, memory MiB)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                          "--format=csv,noheader,nounits", "-l", "1"],
                                         stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) >= 2 and parts[0].replace(".", "").isdigit():
                self.samples.append((time.monotonic(), float(parts[0]), float(parts[1])))

    def between(self, start: float, end: float) -> tuple[float, float, float]:
        """(mean %, peak %, peak MiB) of the samples in ``[start, end]`` (NaN without any)."""
        got = [s for s in self.samples if start <= s[0] <= end]
        if not got:
            return float("nan"), float("nan"), float("nan")
        return (float(np.mean([u for _, u, _ in got])), max(u for _, u, _ in got), max(m for _, _, m in got))

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()


def run(home: Path, pool: Path, config: Path, gpu: GpuSampler) -> list[dict]:
    """``dbprune run --select '*pruned_subset'``; per group: seconds and GPU figures."""
    env = {**os.environ, "DBPRUNE_HOME": str(home), "DBPRUNE_POOL": str(pool), "DBPRUNE_PROGRESS": "0"}
    exe = Path(sys.executable).parent / "dbprune"
    proc = subprocess.Popen([str(exe), "run", "--config", str(config), "--select", "*pruned_subset"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    groups, out, started = [], [], time.monotonic()
    assert proc.stdout is not None
    for line in proc.stdout:
        out.append(line)
        if re.match(r"▶ ", line):
            started = time.monotonic()
        elif m := re.match(r"✓ (.+?): (\d+) partition\(s\) in ([\d.]+)s", line):
            mean, peak, mem = gpu.between(started, time.monotonic())
            groups.append({"group": m.group(1), "seconds": float(m.group(3)), "gpu_mean": mean, "gpu_peak": peak,
                           "gpu_mib": mem})
    if proc.wait() != 0:
        sys.exit("dbprune run failed:\n" + "".join(out[-40:]))
    return groups


def extrapolate(group: str, seconds: float, n: int, fit_k: dict[str, tuple[int, int]]) -> float:
    """The group's seconds at DataComp-Medium: k-means fits grow with k (their
    sample is bounded), everything else with the samples."""
    for name, (k_here, k_medium) in fit_k.items():
        if group == name:
            return seconds * k_medium / max(1, k_here)
    return seconds * MEDIUM / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=None, help="pool size (default 3M on a GPU, 100k without)")
    p.add_argument("--samples-per-shard", type=int, default=10_000)
    p.add_argument("--base-shards", type=int, default=8)
    p.add_argument("--concepts", type=int, default=64)
    p.add_argument("--noise", type=float, default=0.02)
    p.add_argument("--niter", type=int, default=None, help="k-means iterations (default 100 on a GPU, 20 without)")
    p.add_argument("--work", type=Path, default=None, help="a folder on local disk (default: a temp folder)")
    a = p.parse_args()
    gpu_here = has_gpu()
    a.samples = a.samples or (3_000_000 if gpu_here else 100_000)
    niter = a.niter or (100 if gpu_here else 20)
    if not gpu_here:
        print("no GPU here: a small CPU version (the figures say nothing about a GPU machine)")
    work = a.work or Path(tempfile.mkdtemp(prefix="gpu-pipeline-", dir=os.environ.get("TMPDIR")))
    pool, home = work / "pool", work / "home"
    n, wrote = write_pool(pool, a)
    dedup_k, k = max(16, round(50_000 * n / MEDIUM)), max(8, round(500 * n / MEDIUM))
    config = work / "settings.yaml"
    config.write_text("embeddings: {source: datacomp, model: l14}\n"
                      f"semdedup: {{dedup_k: {dedup_k}, niter: {niter}}}\n"
                      f"dbp: {{k: {k}, niter: {niter}}}\ncompute: {{device: auto}}\n"
                      "selection: {strategies: [dbp, ssp, random, clip_score, semdedup, full]}\n")
    print(f"pool: {n:,} L/14 samples in {n // a.samples_per_shard} shards, written in {wrote:.0f}s; "
          f"dedup_k {dedup_k}, DBP k {k}, niter {niter}; work {work}", flush=True)
    gpu = GpuSampler()
    t = time.perf_counter()
    try:
        groups = run(home, pool, config, gpu)
    finally:
        gpu.stop()
    total = time.perf_counter() - t
    fit_k = {"dedup_centroids": (dedup_k, 50_000), "centroids": (k, 500)}
    print(f"\n{'group':<44}{'seconds':>9}{'samples/s':>12}{'GPU mean %':>11}{'GPU peak %':>11}{'GPU MiB':>9}"
          f"{'at Medium s':>13}")
    at_medium = {}
    for g in groups:
        at_medium[g["group"]] = extrapolate(g["group"], g["seconds"], n, fit_k)
        print(f"{g['group']:<44}{g['seconds']:>9.1f}{n / g['seconds']:>12,.0f}{g['gpu_mean']:>11.0f}"
              f"{g['gpu_peak']:>11.0f}{g['gpu_mib']:>9.0f}{at_medium[g['group']]:>13,.0f}")
    medium = sum(at_medium.values())
    worst = max(at_medium, key=at_medium.get) if at_medium else "?"
    print(f"\ndbprune run: {total:.0f}s for {n:,} samples ({n / total:,.0f} samples/s)")
    print(f"extrapolated to DataComp-Medium (128M, dedup_k 50,000, k 500): {medium / 60:.0f} min against the goal of "
          f"{GOAL_S / 60:.0f} min ({medium / GOAL_S:.1f}× the goal); the largest share: {worst} "
          f"({at_medium.get(worst, 0) / 60:.0f} min)" + ("" if gpu_here else " [CPU figures]"))
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
