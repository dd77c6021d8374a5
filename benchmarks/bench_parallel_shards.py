"""Benchmark: per-shard steps with ``compute.parallel_shards`` 1, 2, … up to
the cores, on the same DataComp-format pool, in the same run.

Writes a DataComp-format pool (b32 embeddings, no images), then for each
``parallel_shards`` value runs ``dbprune run --select '*pruned_subset'`` on a
fresh home and prints, per group, the seconds and the samples per second,
the speed-up over one shard at a time, and whether the decisions digest
equals the one-at-a-time run's (it must).  ``compute.threads`` is left at
auto, so with N shards in work each gets cores / N faiss threads.  Asserts
nothing.

    python benchmarks/bench_parallel_shards.py --shards 32 --samples-per-shard 5000
    python benchmarks/bench_parallel_shards.py --parallel 1,4,16   # a 16-core machine
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_pool_scale import run_dbprune, write_pool  # noqa: E402

#: the groups whose steps work shard by shard
PER_SHARD = ("raw_metadata", "embeddings", "dedup_assignments", "cluster_assignments")


def digest(home: Path) -> str:
    import polars as pl

    files = sorted((home / "tables" / "decisions").glob("*.parquet"))
    frame = pl.concat([pl.read_parquet(f, columns=["strategy", "shard", "uid", "keep", "reason"]) for f in files])
    h = hashlib.sha256()
    for row in frame.sort(["strategy", "shard", "uid"]).iter_rows():
        h.update(("\t".join(map(str, row)) + "\n").encode())
    return h.hexdigest()


def settings_yaml(a: argparse.Namespace, parallel: int) -> str:
    return (f"embeddings: {{source: datacomp, model: b32}}\n"
            f"semdedup: {{dedup_k: {a.dedup_k}, niter: {a.niter}, sample_size: {a.sample_size}}}\n"
            f"dbp: {{k: {a.k}, niter: {a.niter}, sample_size: {a.sample_size}}}\n"
            f"compute: {{parallel_shards: {parallel}}}\n")


def main() -> None:
    from dbprune_assets.core.running.device import available_cores

    cores = available_cores()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=32)
    p.add_argument("--samples-per-shard", type=int, default=5000)
    p.add_argument("--concepts", type=int, default=64)
    p.add_argument("--dedup-k", type=int, default=200)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--niter", type=int, default=10)
    p.add_argument("--sample-size", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parallel", default=",".join(str(n) for n in sorted({1, 2, cores})),
                   help="comma-separated parallel_shards values (default: 1, 2 and the cores)")
    p.add_argument("--work", type=Path, default=None)
    a = p.parse_args()
    values = [int(v) for v in a.parallel.split(",")]
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-parallel-", dir=os.environ.get("TMPDIR")))
    pool = work / "pool"
    n = a.shards * a.samples_per_shard
    print(f"pool: {a.shards} shards × {a.samples_per_shard} = {n:,} samples (b32); {cores} cores; work {work}")
    if not pool.exists():
        print(f"  pool written in {write_pool(pool, a):.1f}s", flush=True)
    runs = {}
    for parallel in values:
        home = work / f"home-{parallel}"
        shutil.rmtree(home, ignore_errors=True)
        config = work / f"settings-{parallel}.yaml"
        config.write_text(settings_yaml(a, parallel))
        res = run_dbprune(home, pool, config)
        runs[parallel] = ({g["group"]: g["seconds"] for g in res["groups"]}, res, digest(home))
        print(f"  parallel_shards {parallel}: {res['seconds']:.1f}s, peak RSS {res['peak_rss_mib']} MiB", flush=True)
    base_groups, _, base_digest = runs[values[0]]
    print(f"\n{'group':<40}" + "".join(f"{f'p={v} s':>10}{'samples/s':>11}{'speed-up':>9}" for v in values))
    for group in base_groups:
        if not any(g in group for g in PER_SHARD):
            continue
        line = f"{group:<40}"
        for v in values:
            sec = runs[v][0].get(group, float("nan"))
            line += f"{sec:>10.1f}{n / sec:>11,.0f}{base_groups[group] / sec:>8.2f}×"
        print(line)
    for v in values:
        _, res, dig = runs[v]
        print(f"parallel_shards {v}: total {res['seconds']:.1f}s "
              f"({runs[values[0]][1]['seconds'] / res['seconds']:.2f}× of {values[0]}), peak {res['peak_rss_mib']} MiB, "
              f"decisions {'identical' if dig == base_digest else 'DIFFER'} ({dig[:12]})")
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
