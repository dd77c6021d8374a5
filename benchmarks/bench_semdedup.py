"""Benchmark: streaming SemDeDup vs a plain per-cluster torch implementation.

Writes ``--n`` synthetic embeddings (d=512, float16; ``--clusters`` concepts,
by default ``--n // --cluster-size``; ``--dup-rate`` of the samples planted as
near or exact copies of another sample of the same concept) as shard files,
clusters them with ``spherical_kmeans`` + ``nearest_centroid`` (not timed),
then runs, each in a fresh subprocess:

  semdedup  ``semdedup_pool``: one pass over memmapped shards into buckets
            (the first bucket's worth of rows in memory, the rest on disk),
            then tiled SemDeDup per cluster, small clusters packed (float32
            tiles, exact re-scoring of the near-maximal candidates)
  plain     everything in memory; per cluster the full similarity matrix
            ``S = E Eᵀ`` (float32 torch), lower triangle masked, column max

and prints throughput and peak memory (max RSS) of each, and whether they flag
the same duplicates.  Prints figures only; asserts nothing.

    python benchmarks/bench_semdedup.py --n 1000000 --threads 2
    python benchmarks/bench_semdedup.py --n 1000000 --clusters 500   # smaller clusters
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from synth import D, save_shard, shard_names, shard_path  # also puts the repository on sys.path


def generate(work: Path, a: argparse.Namespace) -> dict:
    from dbprune_assets.core.method.kmeans import nearest_centroid, spherical_kmeans
    from dbprune_assets.core.method.sample import UniformSample

    concepts = a.clusters or max(1, a.n // a.cluster_size)
    rng = np.random.default_rng(a.seed)
    centers = rng.normal(size=(concepts, D)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    for s, start in enumerate(range(0, a.n, a.shard_rows)):
        m = min(a.shard_rows, a.n - start)
        r = np.random.default_rng([a.seed, s])
        lab = r.integers(0, concepts, m)
        x = r.standard_normal((m, D), dtype=np.float32) * np.float32(0.04) + centers[lab]
        # planted duplicates: copies of another row of the same shard and concept
        nd = int(a.dup_rate * m)
        src = r.integers(0, m, nd)
        dst = r.choice(m, nd, replace=False)
        keep = src != dst
        src, dst = src[keep], dst[keep]
        lab[dst] = lab[src]
        noise = r.uniform(0, 0.012, len(dst)).astype(np.float32)  # 0 = exact copy
        noise[: len(dst) // 4] = 0
        x[dst] = x[src] + noise[:, None] * r.standard_normal((len(dst), D), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        save_shard(work, s, x, r)
    # dedup clustering (not timed)
    names = shard_names(work)
    samp = UniformSample(min(a.n, 256 * concepts), a.seed)
    for name in names:
        emb = np.load(shard_path(work, name, "emb"), mmap_mode="r")
        samp.add(np.load(shard_path(work, name, "uid")), lambda i, e=emb: e[i])
    c = spherical_kmeans(samp.embeddings, concepts, niter=10, seed=a.seed, use_gpu=False, threads=a.threads)
    for name in names:
        cl, dist = nearest_centroid(np.load(shard_path(work, name, "emb"), mmap_mode="r"), c, use_gpu=False, threads=a.threads)
        np.save(shard_path(work, name, "cluster"), cl)
        np.save(shard_path(work, name, "dist"), dist)
    return {"concepts": concepts}


def _load(work: Path, name: str, mmap: bool):
    from dbprune_assets.core.method.semdedup import DedupShard

    return DedupShard(
        name=name,
        uids=np.load(shard_path(work, name, "uid")).astype(str),
        emb=np.load(shard_path(work, name, "emb"), mmap_mode="r" if mmap else None),
        cluster=np.load(shard_path(work, name, "cluster")),
        distance=np.load(shard_path(work, name, "dist")),
    )


def stage_semdedup(work: Path, a: argparse.Namespace) -> dict:
    import polars as pl

    from dbprune_assets.core.method.semdedup import empty_duplicates, semdedup_pool

    names = shard_names(work)
    k = int(max(np.load(shard_path(work, n, "cluster")).max() for n in names)) + 1
    sizes = sum(np.bincount(np.load(shard_path(work, n, "cluster")), minlength=k) for n in names)
    frames = list(
        semdedup_pool(names, lambda n: _load(work, n, True), k, a.eps, a.tile, work / "tmp", a.device, cluster_sizes=sizes)
    )
    df = pl.concat(frames) if frames else empty_duplicates()
    df.write_parquet(work / "dups_semdedup.parquet")
    return {"duplicates": len(df), "clusters": k, "largest_cluster": int(sizes.max()), "pairs": float((sizes.astype(float) ** 2).sum() / 2)}


def stage_plain(work: Path, a: argparse.Namespace) -> dict:
    import polars as pl
    import torch

    names = shard_names(work)
    shards = [_load(work, n, False) for n in names]
    emb = np.concatenate([s.emb for s in shards])
    uids = np.concatenate([s.uids for s in shards])
    cl = np.concatenate([s.cluster for s in shards])
    dist = np.concatenate([s.distance for s in shards])
    del shards
    dev = torch.device(a.device)
    out = []
    order_all = np.argsort(cl, kind="stable")
    bounds = np.searchsorted(cl[order_all], np.arange(cl.max() + 2))
    with torch.no_grad():
        for c in range(len(bounds) - 1):
            m = order_all[bounds[c] : bounds[c + 1]]
            if len(m) < 2:
                continue
            m = m[np.lexsort((uids[m], -dist[m].astype(np.float64)))]  # farthest first, ties by uid
            E = torch.from_numpy(emb[m]).to(dev).float()
            S = E @ E.T
            S.masked_fill_(torch.ones_like(S, dtype=torch.bool).tril_(), float("-inf"))
            mx = S.max(dim=0).values
            dup = (mx > 1 - a.eps).cpu().numpy()
            out.append(uids[m[dup]])
    dups = np.concatenate(out) if out else np.zeros(0, dtype=str)
    pl.DataFrame({"uid": dups}).write_parquet(work / "dups_plain.parquet")
    return {"duplicates": len(dups)}


def stage_imports(work: Path, a: argparse.Namespace) -> dict:
    """Baseline: the RSS of a process that only imports what the stages import."""
    import polars  # noqa: F401
    import torch  # noqa: F401

    import dbprune_assets.core.method.semdedup  # noqa: F401

    return {}


STAGES = {"semdedup": stage_semdedup, "plain": stage_plain, "imports": stage_imports}


def run_stage(name: str, work: Path, argv: list[str]) -> dict:
    p = subprocess.run([sys.executable, __file__, "--stage", name, "--dir", str(work), *argv], capture_output=True, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stdout + p.stderr)
        raise SystemExit(f"stage {name} failed")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--cluster-size", type=int, default=4000, help="mean dedup cluster size (n // this = dedup_k)")
    ap.add_argument("--clusters", type=int, default=0, help="dedup_k (0 = n // --cluster-size)")
    ap.add_argument("--dup-rate", type=float, default=0.1)
    ap.add_argument("--eps", type=float, default=0.07)
    ap.add_argument("--tile", type=int, default=4096)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch/faiss threads (0 = library default)")
    ap.add_argument("--shard-rows", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=1, help="run each stage this many times, report the fastest")
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.stage:
        if a.threads:
            import torch

            torch.set_num_threads(a.threads)
        t0 = time.perf_counter()
        extra = STAGES[a.stage](a.dir, a)
        wall = time.perf_counter() - t0
        print(json.dumps({"wall_s": wall, "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}))
        return

    tmp = a.dir is None
    work = Path(tempfile.mkdtemp(prefix="bench_semdedup_")) if tmp else a.dir
    work.mkdir(parents=True, exist_ok=True)
    argv = ["--eps", str(a.eps), "--tile", str(a.tile), "--device", a.device, "--threads", str(a.threads)]
    try:
        stamp = work / "generated.json"
        want = {"n": a.n, "cluster_size": a.cluster_size, "dup_rate": a.dup_rate, "seed": a.seed, "shard_rows": a.shard_rows}
        if a.clusters:
            want = {**want, "cluster_size": None, "clusters": a.clusters}
        if not stamp.exists() or json.loads(stamp.read_text()) != want:
            shutil.rmtree(work / "shards", ignore_errors=True)
            t0 = time.perf_counter()
            info = generate(work, a)
            stamp.write_text(json.dumps(want))
            print(f"generated and clustered {a.n} x {D} float16 into {info['concepts']} dedup clusters ({time.perf_counter() - t0:.1f} s)")
        print(f"n={a.n} eps={a.eps} tile={a.tile} device={a.device} threads={a.threads or 'default'} cpus={os.cpu_count()}")
        res = {}
        for name in ("semdedup", "plain"):
            runs = [run_stage(name, work, argv) for _ in range(a.repeat)]
            r = min(runs, key=lambda x: x["wall_s"])
            r["maxrss_mib"] = max(x["maxrss_mib"] for x in runs)
            res[name] = r
            extra = {k: v for k, v in r.items() if k not in ("wall_s", "maxrss_mib")}
            print(
                f"  {name:<9} {r['wall_s']:8.2f} s  {a.n / r['wall_s']:10.0f} samples/s  "
                f"peak {r['maxrss_mib']:7.0f} MiB  {extra}",
                flush=True,
            )
        base = run_stage("imports", work, argv)["maxrss_mib"]
        print(f"  (baseline RSS of importing torch + polars: {base:.0f} MiB; working memory = peak - baseline)")
        import polars as pl

        s1 = set(pl.read_parquet(work / "dups_semdedup.parquet")["uid"])
        s2 = set(pl.read_parquet(work / "dups_plain.parquet")["uid"])
        pairs = res["semdedup"]["pairs"]
        print(f"pair similarities/s: semdedup {pairs / res['semdedup']['wall_s']:.3g}, plain {pairs / res['plain']['wall_s']:.3g}")
        print(f"speed semdedup / plain: {res['plain']['wall_s'] / res['semdedup']['wall_s']:.2f}x")
        print(
            f"identical duplicate sets: {s1 == s2} ({len(s1)} duplicates = {len(s1) / a.n:.1%}; "
            f"only semdedup {len(s1 - s2)}, only plain {len(s2 - s1)})"
        )
    finally:
        if tmp:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
