"""Benchmark: the whole pipeline on a DataComp-format pool of many shards,
against the bare libraries doing the same compute, in the same run.

Writes a DataComp-format pool with the project's generator (``--shards`` ×
``--samples-per-shard``, b32 embeddings only; no images, so no encoder) and runs

  dbprune   ``dbprune run --select '*pruned_subset'`` in a subprocess: ingest,
            stored embeddings, SemDeDup, CLIP filter, DBP, all six strategies
            and their exports (``uids.npy``), through Dagster with its SQLite
            instance; wall time and peak RSS per group (RSS sampled every
            0.2 s), Dagster runs launched
  bare      in one subprocess, streaming (memory: the k-means samples and a
            few numbers per row; the image rows go to a float16 scratch
            file): faiss spherical k-means + assignment for SemDeDup's
            clusters, per-cluster SemDeDup (full similarity matrix, torch),
            CLIP-score filter, faiss k-means + assignment for DBP's clusters
            (same k, niter, sample size as the settings)
  status    the GraphQL query the UI's partitions page makes for a per-shard
            asset (partition statuses), timed in process

and prints the figures and the ratio dbprune / bare.  Asserts nothing.

    python benchmarks/bench_pool_scale.py --shards 1000 --samples-per-shard 1000
    python benchmarks/bench_pool_scale.py --shards 10000 --samples-per-shard 100 --keep
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_pool(pool: Path, a: argparse.Namespace) -> float:
    from dbprune_assets.core.settings import PoolSettings
    from dbprune_assets.samplepool import write_datacomp_pool

    t = time.perf_counter()
    write_datacomp_pool(pool, PoolSettings(shards=a.shards, samples_per_shard=a.samples_per_shard,
                                           concepts=a.concepts, seed=a.seed), models=("b32",))
    return time.perf_counter() - t


#: the strategies the benchmarks decide: DBP and its baselines
SIX = ("dbp", "ssp", "random", "clip_score", "semdedup", "full")


def settings_yaml(a: argparse.Namespace) -> str:
    return (f"embeddings: {{source: datacomp, model: b32}}\n"
            f"semdedup: {{dedup_k: {a.dedup_k}, eps: 0.07, niter: {a.niter}, sample_size: {a.sample_size}}}\n"
            f"clip_filter: {{fraction: 0.85}}\n"
            f"dbp: {{k: {a.k}, niter: {a.niter}, sample_size: {a.sample_size}, keep_fraction: 0.5}}\n"
            f"compute: {{threads: {a.threads}}}\n"
            f"partitions: {{per_run: {a.per_run}}}\n"
            # the six strategies the bare baseline also decides (the other three are the field's filters, their
            # cost is their own: negclip's large-batch products, balanced_kmeans' levels)
            f"selection: {{strategies: [{', '.join(SIX)}]}}\n")


def rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` and its children (KiB)."""
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def _children(pid: int) -> list[int]:
    try:
        kids = [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in _children(k)]


def run_dbprune(home: Path, pool: Path, config: Path | None, extra: tuple[str, ...] = ()) -> dict:
    """``dbprune run --select '*pruned_subset'`` in a subprocess: seconds, groups, peak RSS, its output."""
    env = {**os.environ, "DBPRUNE_HOME": str(home), "DBPRUNE_POOL": str(pool), "DBPRUNE_PROGRESS": "0"}
    exe = Path(sys.executable).parent / "dbprune"
    t0 = time.perf_counter()
    args = [str(exe), "run", *(["--config", str(config)] if config else []), "--select", "*pruned_subset", *extra]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state = {"stage": "start", "peak": {}, "stop": False}

    def poll() -> None:
        while not state["stop"]:
            kib = rss_kib(proc.pid)
            state["peak"][state["stage"]] = max(state["peak"].get(state["stage"], 0), kib)
            time.sleep(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    groups, out = [], []
    assert proc.stdout is not None
    for line in proc.stdout:
        out.append(line)
        if m := re.match(r"▶ (.+?) \[", line):
            state["stage"] = m.group(1)
        elif m := re.match(r"✓ (.+?): (\d+) partition\(s\) in ([\d.]+)s", line):
            groups.append({"group": m.group(1), "partitions": int(m.group(2)), "seconds": float(m.group(3)),
                           "peak_rss_mib": round(state["peak"].get(m.group(1), 0) / 1024)})
    proc.wait()
    state["stop"] = True
    poller.join()
    if proc.returncode != 0:
        sys.exit("dbprune run failed:\n" + "".join(out[-40:]))
    return {"seconds": time.perf_counter() - t0, "groups": groups,
            "peak_rss_mib": round(max(state["peak"].values()) / 1024), "output": out}


def _bare_load(pool: Path, a: argparse.Namespace, scratch: Path) -> tuple:
    """The bare run's one pass over the npz files: the image rows (float16
    scratch file), CLIP score and uid per row, the k-means sample rows."""
    import pyarrow.parquet as pq

    stems = sorted(p.stem for p in pool.glob("*.npz"))
    sizes = [pq.read_metadata(pool / f"{s}.parquet").num_rows for s in stems]
    n, dim = sum(sizes), 512
    rng = np.random.default_rng(a.seed)
    want = np.sort(rng.choice(n, min(a.sample_size, n), replace=False))
    x = np.lib.format.open_memmap(scratch / "x.npy", mode="w+", dtype=np.float16, shape=(n, dim))
    score = np.empty(n, np.float32)
    uids = np.empty(n, "S32")
    sample = np.empty((len(want), dim), np.float32)
    at = 0
    for s, size in zip(stems, sizes):
        with np.load(pool / f"{s}.npz") as z:
            img, txt = z["b32_img"], z["b32_txt"]
        x[at:at + size] = img
        score[at:at + size] = np.einsum("ij,ij->i", img.astype(np.float32), txt.astype(np.float32))
        uids[at:at + size] = pq.read_table(pool / f"{s}.parquet", columns=["uid"]).column("uid").to_numpy()
        lo, hi = np.searchsorted(want, [at, at + size])
        sample[lo:hi] = img[want[lo:hi] - at]
        at += size
    return x, score, uids, sample, rng


def bare(pool: Path, a: argparse.Namespace) -> dict:
    """The same compute with the bare libraries, streaming (subprocess): memory
    is the k-means samples and a few numbers per row, never the pool.

    1. ``load``: every npz once: CLIP score per row (einsum of the pair), uid,
       the k-means sample rows (a seeded random choice of the pool), and the
       image rows written in shard order to one float16 scratch file;
    2. ``semdedup_kmeans_assign``: faiss spherical k-means on the sample, then
       each row's nearest centroid, block by block from the scratch file;
    3. ``semdedup_per_cluster``: the rows reordered by cluster into a second
       scratch file, then per cluster its full similarity matrix (torch);
    4. ``clip_filter``: the threshold over the non-duplicates;
    5. ``dbp_kmeans_assign``: k-means on a sample of the candidates and every
       candidate's nearest centroid, block by block.
    """
    import faiss
    import torch

    faiss.omp_set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="bare-", dir=pool.parent))
    x, score, uids, sample, rng = _bare_load(pool, a, scratch)
    n, dim = x.shape
    x.flush()
    timings = {"load": time.perf_counter() - t0}
    block = 200_000

    def fit_assign(train: np.ndarray, rows: Callable[[int, int], np.ndarray], m: int, k: int):
        km = faiss.Kmeans(dim, k, niter=a.niter, seed=a.seed, spherical=True)
        km.train(train)
        index = faiss.IndexFlatIP(dim)
        index.add(km.centroids)
        lab, dist = np.empty(m, np.int64), np.empty(m, np.float32)
        for lo in range(0, m, block):
            sims, got = index.search(np.ascontiguousarray(rows(lo, min(m, lo + block)), np.float32), 1)
            lab[lo:lo + len(got)], dist[lo:lo + len(got)] = got[:, 0], 1 - sims[:, 0]
        return lab, dist

    t1 = time.perf_counter()
    cl, dist = fit_assign(sample, lambda lo, hi: x[lo:hi], n, a.dedup_k)
    del sample
    timings["semdedup_kmeans_assign"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    order = np.lexsort((uids, -dist, cl))  # by cluster, then farthest from the centroid first, then uid
    bounds = np.searchsorted(cl[order], np.arange(a.dedup_k + 1))
    by_cluster = np.lib.format.open_memmap(scratch / "c.npy", mode="w+", dtype=np.float16, shape=(n, dim))
    for lo in range(0, n, block):  # gather in order, from the page cache / disk
        by_cluster[lo:lo + block] = x[np.sort(order[lo:lo + block])][np.argsort(np.argsort(order[lo:lo + block]))]
    dup = np.zeros(n, bool)
    with torch.no_grad():
        for c in range(a.dedup_k):
            lo, hi = int(bounds[c]), int(bounds[c + 1])
            if hi - lo < 2:
                continue
            e = torch.from_numpy(np.asarray(by_cluster[lo:hi], np.float32))
            sim = e @ e.T
            sim.masked_fill_(torch.ones_like(sim, dtype=torch.bool).tril_(), float("-inf"))
            dup[order[lo:hi]] = (sim.max(dim=0).values > 1 - 0.07).numpy()
    del by_cluster
    timings["semdedup_per_cluster"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    keep = ~dup
    thr = np.quantile(score[keep], 1 - 0.85)
    cand = np.flatnonzero(keep & (score >= thr))
    timings["clip_filter"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    pick = np.sort(rng.choice(len(cand), min(a.sample_size, len(cand)), replace=False))
    fit_assign(np.asarray(x[cand[pick]], np.float32), lambda lo, hi: x[cand[lo:hi]], len(cand), a.k)
    timings["dbp_kmeans_assign"] = time.perf_counter() - t1
    timings["total"] = time.perf_counter() - t0
    del x
    import shutil

    shutil.rmtree(scratch, ignore_errors=True)
    return {"seconds": timings["total"], "timings": {k: round(v, 2) for k, v in timings.items()},
            "duplicates": int(dup.sum()), "candidates": int(len(cand)),
            "peak_rss_mib": round(__import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss / 1024)}


def status_query(home: Path, pool: Path) -> dict:
    """Time the UI's partition-status query for ``embeddings`` (in process, no webserver)."""
    os.environ["DBPRUNE_HOME"], os.environ["DBPRUNE_POOL"] = str(home), str(pool)
    import dagster as dg
    from dagster._core.remote_origin import InProcessCodeLocationOrigin
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
    from dagster_graphql.test.utils import execute_dagster_graphql

    instance = dg.DagsterInstance.from_config(str(home / "dagster"))
    query = """{ assetNodeOrError(assetKey: {path: ["embeddings"]}) { ... on AssetNode {
      partitionStats { numMaterialized numPartitions numFailed }
      assetPartitionStatuses { ... on DefaultPartitionStatuses { materializedPartitions failedPartitions } } } } }"""
    origin = InProcessCodeLocationOrigin(LoadableTargetOrigin(module_name="dbprune_assets.definitions",
                                                              attribute="defs"), location_name="dbprune")
    with WorkspaceProcessContext(instance, InProcessWorkspaceLoadTarget(origin)) as process:
        times = []
        for _ in range(3):
            t = time.perf_counter()
            result = execute_dagster_graphql(process.create_request_context(), query)
            times.append(time.perf_counter() - t)
        stats = result.data["assetNodeOrError"]["partitionStats"]
    records = instance.get_run_records()
    steps: dict[str, float] = {}  # each asset's step seconds, summed over the runs
    for record in records:
        for stat in instance.get_run_step_stats(record.dagster_run.run_id):
            if stat.start_time is not None and stat.end_time is not None:
                steps[stat.step_key] = steps.get(stat.step_key, 0.0) + stat.end_time - stat.start_time
    return {"status_query_seconds": round(min(times), 3), "partition_stats": stats, "dagster_runs": len(records),
            "steps": steps}


#: the bare run's stages and the assets that do the same work
STAGES: dict[str, tuple[str, ...]] = {
    "load": ("raw_metadata", "pool_manifest", "encoder", "embeddings"),
    "semdedup_kmeans_assign": ("dedup_centroids", "dedup_assignments"),
    "semdedup_per_cluster": ("semantic_dedup",),
    "clip_filter": ("candidates",),
    "dbp_kmeans_assign": ("centroids", "cluster_assignments", "cluster_complexity"),
}


def print_stages(steps: dict[str, float], bare_timings: dict[str, float]) -> None:
    """Each stage: the assets' step seconds (from the Dagster runs) against the bare run's."""
    print(f"\n{'stage':<24} {'dbprune s':>10} {'bare s':>8} {'ratio':>6}   assets")
    for stage, assets in STAGES.items():
        ours = sum(steps.get(a, 0.0) for a in assets)
        base = bare_timings.get(stage, 0.0)
        ratio = f"{ours / base:.2f}×" if base > 0.05 else "–"
        print(f"{stage:<24} {ours:>10.1f} {base:>8.1f} {ratio:>6}   {', '.join(assets)}")
    other = {k: v for k, v in steps.items() if not any(k in a for a in STAGES.values())}
    for k, v in sorted(other.items()):
        print(f"{k:<24} {v:>10.1f} {'':>8} {'':>6}   (no bare equivalent)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=10_000)
    p.add_argument("--samples-per-shard", type=int, default=1_000)
    p.add_argument("--concepts", type=int, default=64)
    p.add_argument("--dedup-k", type=int, default=500)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--niter", type=int, default=20)
    p.add_argument("--sample-size", type=int, default=500_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--per-run", type=int, default=1000, help="partitions per Dagster run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=None, help="folder to work in (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--lean-disk", action="store_true",
                   help="delete the home's embeddings before the bare run (its scratch files need the room)")
    p.add_argument("--stage", choices=["bare", "status"], help=argparse.SUPPRESS)
    a = p.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-pool-scale-", dir=os.environ.get("TMPDIR")))
    pool, home = work / "pool", work / "home"
    if a.stage == "bare":
        print(json.dumps(bare(pool, a)))
        return
    if a.stage == "status":
        print(json.dumps(status_query(home, pool)))
        return
    n = a.shards * a.samples_per_shard
    print(f"pool: {a.shards} shards × {a.samples_per_shard} = {n:,} samples (b32), dedup_k {a.dedup_k}, k {a.k}, "
          f"niter {a.niter}, {a.threads} threads, {a.per_run} partitions per run; work {work}", flush=True)
    if not pool.exists():
        print(f"  pool written in {write_pool(pool, a):.1f}s", flush=True)
    config = work / "settings.yaml"
    config.write_text(settings_yaml(a))
    forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                 if k not in ("stage", "keep", "work", "lean_disk") and v is not None]
    sub = [sys.executable, __file__, *forwarded, f"--work={work}"]
    ours = run_dbprune(home, pool, config)
    ui = json.loads(subprocess.run([*sub, "--stage=status"], capture_output=True, text=True, check=True).stdout)
    if a.lean_disk:  # the bare run's scratch files need the room the home's embeddings take
        import shutil

        shutil.rmtree(home / "embeddings", ignore_errors=True)
    base = json.loads(subprocess.run([*sub, "--stage=bare"], capture_output=True, text=True, check=True).stdout)
    print(f"\n{'group':<45} {'partitions':>10} {'seconds':>9} {'ms/partition':>13} {'peak MiB':>9}")
    for g in ours["groups"]:
        per = 1000 * g["seconds"] / g["partitions"] if g["partitions"] > 1 else float("nan")
        print(f"{g['group']:<45} {g['partitions']:>10} {g['seconds']:>9.1f} {per:>13.1f} {g['peak_rss_mib']:>9}")
    print(f"\ndbprune run (through pruned_subset): {ours['seconds']:.1f}s, peak RSS {ours['peak_rss_mib']} MiB, "
          f"{ui['dagster_runs']} Dagster runs")
    print(f"bare libraries, streaming:           {base['seconds']:.1f}s, peak RSS {base['peak_rss_mib']} MiB "
          f"({base['timings']}; {base['duplicates']} duplicates, {base['candidates']} candidates)")
    print(f"ratio dbprune / bare: {ours['seconds'] / base['seconds']:.2f}×")
    # the bare run stops at DBP's assignment; pruned_subset (six strategies' decisions, exports and checks) is extra
    subsets = sum(g["seconds"] for g in ours["groups"] if g["group"] == "pruned_subset")
    print(f"  without pruned_subset ({subsets:.1f}s, work the bare run does not do): "
          f"{(ours['seconds'] - subsets) / base['seconds']:.2f}×")
    print(f"UI partition-status query (embeddings, {ui['partition_stats']['numPartitions']} partitions): "
          f"{ui['status_query_seconds']:.3f}s")
    print_stages(ui["steps"], base["timings"])
    if not a.keep and a.work is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
