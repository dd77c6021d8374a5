"""Benchmark: the whole pipeline on a DataComp-format pool of many shards,
against the bare libraries doing the same compute, in the same run.

Writes a DataComp-format pool with the project's generator (``--shards`` ×
``--samples-per-shard``, b32 embeddings only; no images, so no encoder) and runs

  dbprune   ``dbprune run --select '*pruned_subset'`` in a subprocess: ingest,
            stored embeddings, SemDeDup, CLIP filter, DBP, all six strategies
            and their exports (``uids.npy``), through Dagster with its SQLite
            instance; wall time and peak RSS per group (RSS sampled every
            0.2 s), Dagster runs launched
  bare      in one subprocess, everything in memory: all image embeddings
            loaded (float32), faiss spherical k-means + assignment for
            SemDeDup's clusters, per-cluster SemDeDup (full similarity matrix),
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


def settings_yaml(a: argparse.Namespace) -> str:
    return (f"embeddings: {{source: datacomp, model: b32}}\n"
            f"semdedup: {{dedup_k: {a.dedup_k}, eps: 0.07, niter: {a.niter}, sample_size: {a.sample_size}}}\n"
            f"clip_filter: {{fraction: 0.85}}\n"
            f"dbp: {{k: {a.k}, niter: {a.niter}, sample_size: {a.sample_size}, keep_fraction: 0.5}}\n"
            f"compute: {{threads: {a.threads}}}\n"
            f"partitions: {{per_run: {a.per_run}}}\n")


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


def run_dbprune(home: Path, pool: Path, config: Path) -> dict:
    env = {**os.environ, "DBPRUNE_HOME": str(home), "DBPRUNE_POOL": str(pool), "DBPRUNE_PROGRESS": "0"}
    exe = Path(sys.executable).parent / "dbprune"
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(exe), "run", "--config", str(config), "--select", "*pruned_subset"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
            "peak_rss_mib": round(max(state["peak"].values()) / 1024)}


def bare(pool: Path, a: argparse.Namespace) -> dict:
    """The same compute with the bare libraries, everything in memory (subprocess)."""
    import faiss
    import pyarrow.parquet as pq
    import torch

    faiss.omp_set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    stems = sorted(p.stem for p in pool.glob("*.npz"))
    img, txt, uids = [], [], []
    for s in stems:
        with np.load(pool / f"{s}.npz") as z:
            img.append(z["b32_img"].astype(np.float32))
            txt.append(z["b32_txt"].astype(np.float32))
        uids += pq.read_table(pool / f"{s}.parquet", columns=["uid"]).column("uid").to_pylist()
    x, t = np.concatenate(img), np.concatenate(txt)
    del img, txt
    uids_a = np.asarray(uids)
    timings = {"load": time.perf_counter() - t0}
    rng = np.random.default_rng(a.seed)

    def kmeans_assign(data: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sample = data[rng.choice(len(data), min(a.sample_size, len(data)), replace=False)]
        km = faiss.Kmeans(data.shape[1], k, niter=a.niter, seed=a.seed, spherical=True)
        km.train(sample)
        index = faiss.IndexFlatIP(data.shape[1])
        index.add(km.centroids)
        sims, lab = index.search(data, 1)
        return km.centroids, np.column_stack([lab[:, 0], 1 - sims[:, 0]])

    t1 = time.perf_counter()
    _, assign = kmeans_assign(x, a.dedup_k)
    timings["semdedup_kmeans_assign"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    cl, dist = assign[:, 0].astype(np.int64), assign[:, 1]
    order = np.argsort(cl, kind="stable")
    bounds = np.searchsorted(cl[order], np.arange(cl.max() + 2))
    dup = np.zeros(len(x), bool)
    with torch.no_grad():
        for c in range(len(bounds) - 1):
            m = order[bounds[c] : bounds[c + 1]]
            if len(m) < 2:
                continue
            m = m[np.lexsort((uids_a[m], -dist[m]))]
            e = torch.from_numpy(x[m])
            s = e @ e.T
            s.masked_fill_(torch.ones_like(s, dtype=torch.bool).tril_(), float("-inf"))
            dup[m] = (s.max(dim=0).values > 1 - 0.07).numpy()
    timings["semdedup_per_cluster"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    score = np.einsum("ij,ij->i", x, t)
    keep = ~dup
    thr = np.quantile(score[keep], 1 - 0.85)
    cand = np.flatnonzero(keep & (score >= thr))
    timings["clip_filter"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    kmeans_assign(x[cand], a.k)
    timings["dbp_kmeans_assign"] = time.perf_counter() - t1
    timings["total"] = time.perf_counter() - t0
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
    runs = len(instance.get_run_records())
    return {"status_query_seconds": round(min(times), 3), "partition_stats": stats, "dagster_runs": runs}


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
                 if k not in ("stage", "keep", "work") and v is not None]
    sub = [sys.executable, __file__, *forwarded, f"--work={work}"]
    ours = run_dbprune(home, pool, config)
    base = json.loads(subprocess.run([*sub, "--stage=bare"], capture_output=True, text=True, check=True).stdout)
    ui = json.loads(subprocess.run([*sub, "--stage=status"], capture_output=True, text=True, check=True).stdout)
    print(f"\n{'group':<45} {'partitions':>10} {'seconds':>9} {'ms/partition':>13} {'peak MiB':>9}")
    for g in ours["groups"]:
        per = 1000 * g["seconds"] / g["partitions"] if g["partitions"] > 1 else float("nan")
        print(f"{g['group']:<45} {g['partitions']:>10} {g['seconds']:>9.1f} {per:>13.1f} {g['peak_rss_mib']:>9}")
    print(f"\ndbprune run (through pruned_subset): {ours['seconds']:.1f}s, peak RSS {ours['peak_rss_mib']} MiB, "
          f"{ui['dagster_runs']} Dagster runs")
    print(f"bare libraries, in memory:           {base['seconds']:.1f}s, peak RSS {base['peak_rss_mib']} MiB "
          f"({base['timings']}; {base['duplicates']} duplicates, {base['candidates']} candidates)")
    print(f"ratio dbprune / bare: {ours['seconds'] / base['seconds']:.2f}×")
    # the bare run stops at DBP's assignment; pruned_subset (six strategies' decisions, exports and checks) is extra
    subsets = sum(g["seconds"] for g in ours["groups"] if g["group"] == "pruned_subset")
    print(f"  without pruned_subset ({subsets:.1f}s, work the bare run does not do): "
          f"{(ours['seconds'] - subsets) / base['seconds']:.2f}×")
    print(f"UI partition-status query (embeddings, {ui['partition_stats']['numPartitions']} partitions): "
          f"{ui['status_query_seconds']:.3f}s")
    if not a.keep and a.work is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
