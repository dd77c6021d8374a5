"""Benchmark: the DBP core streaming over shards vs bare faiss.

Writes ``--n`` synthetic clustered embeddings (d=512, float16) as shard .npy
files (``--shard-rows`` per shard) into ``--dir`` (a temp dir by default), then
runs each stage in a fresh subprocess and prints its wall time and peak memory
(max RSS of that process):

DBP core
  sample    bounded uniform sample over the shards (memmapped, hash-ranked)
  kmeans    spherical_kmeans on the sample
  assign    per shard: nearest_centroid + cluster_partial_sums, assignments parquet per shard
  quotas    d_intra, d_inter, complexity, softmax, M, lower bounds, quotas
  select    DuckDB hardest-first selection over the assignments parquet
bare faiss (same sample, same threads)
  bare_kmeans   faiss.Kmeans(d, k, niter, seed, spherical=True).train(sample)
  bare_assign   chunked IndexFlatIP.search(k=1) of every shard

The issue's target: ``--n 10000000 --k 500``: peak under 3 GiB per stage and
the core within 2x bare faiss.  Prints figures only; asserts nothing.

    python benchmarks/bench_dbp_core.py --n 1000000 --k 500 --threads 2
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


def generate(work: Path, n: int, shard_rows: int, concepts: int, seed: int) -> None:
    """Clustered unit vectors: ``concepts`` random directions, each with its own
    spread (so cluster complexity varies), float16, plus 32-hex uids."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(concepts, D)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    spread = rng.uniform(0.02, 0.08, concepts).astype(np.float32)  # per-dimension noise
    weight = rng.dirichlet(np.full(concepts, 2.0))
    for s, a in enumerate(range(0, n, shard_rows)):
        m = min(shard_rows, n - a)
        r = np.random.default_rng([seed, s])
        lab = r.choice(concepts, size=m, p=weight)
        x = r.standard_normal((m, D), dtype=np.float32)
        x *= spread[lab, None]
        x += centers[lab]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        save_shard(work, s, x, r)


def load_uids(work: Path, name: str) -> np.ndarray:
    return np.load(shard_path(work, name, "uid")).astype(str)


def load_emb(work: Path, name: str, mmap: bool = True) -> np.ndarray:
    return np.load(shard_path(work, name, "emb"), mmap_mode="r" if mmap else None)


# ---------------------------------------------------------------------------
# stages (each runs in its own process)
# ---------------------------------------------------------------------------


def stage_sample(work: Path, a: argparse.Namespace) -> dict:
    from dbprune_assets.core.method.sample import UniformSample

    s = UniformSample(a.sample_size, a.seed)
    for name in shard_names(work):
        emb = load_emb(work, name)
        s.add(load_uids(work, name), lambda idx, emb=emb: emb[idx], name=f"shard {name}")
        del emb
    np.save(work / "sample.npy", s.embeddings)
    return {"rows": len(s)}


def stage_kmeans(work: Path, a: argparse.Namespace) -> dict:
    from dbprune_assets.core.method.kmeans import spherical_kmeans

    x = np.load(work / "sample.npy")
    c = spherical_kmeans(x, a.k, a.niter, a.seed, use_gpu=False, threads=a.threads)
    np.save(work / "centroids.npy", c)
    return {"train_rows": min(len(x), 256 * a.k)}


def stage_assign(work: Path, a: argparse.Namespace) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dbprune_assets.core.method.dbp import cluster_partial_sums
    from dbprune_assets.core.method.kmeans import nearest_centroid

    c = np.load(work / "centroids.npy")
    k = len(c)
    count = np.zeros(k, np.int64)
    total = np.zeros(k, np.float64)
    out = work / "assignments"
    out.mkdir(exist_ok=True)
    n = 0
    for name in shard_names(work):
        emb = load_emb(work, name)
        uids = load_uids(work, name)
        cl, dist = nearest_centroid(emb, c, chunk=a.chunk, use_gpu=False, threads=a.threads, what=f"shard {name}")
        cc, ss = cluster_partial_sums(cl, dist, k)
        count += cc
        total += ss
        pq.write_table(
            pa.table({"uid": uids, "shard": pa.array([name] * len(uids)), "row": np.arange(len(uids), dtype=np.int32),
                      "cluster": cl, "distance": dist}),
            out / f"{name}.parquet",
        )
        n += len(uids)
        del emb
    np.save(work / "count.npy", count)
    np.save(work / "sum.npy", total)
    return {"rows": n}


def stage_quotas(work: Path, a: argparse.Namespace) -> dict:
    from dbprune_assets.core.method.dbp import cluster_table, target_size

    c = np.load(work / "centroids.npy")
    count = np.load(work / "count.npy")
    M = target_size(int(count.sum()), keep_fraction=a.keep_fraction)
    t = cluster_table(c, count, np.load(work / "sum.npy"), l=20, tau=0.1, M=M, r=0.0)
    np.save(work / "quotas.npy", t["quota"].to_numpy())
    return {"M": M, "empty_clusters": int((count == 0).sum()), "max_quota": int(t["quota"].max())}


def stage_select(work: Path, a: argparse.Namespace) -> dict:
    from dbprune_assets.core.store.duck import connect, create_view
    from dbprune_assets.core.strategies import select_by_quota

    con = connect(work / "duckdb_tmp", a.duckdb_memory, a.threads)
    create_view(con, "assign", sorted((work / "assignments").glob("*.parquet")), "assignments")
    select_by_quota(con, np.load(work / "quotas.npy"))
    con.execute("COPY (SELECT a.uid, a.shard, a.cluster, s.row IS NOT NULL AS keep FROM assign a "
                "LEFT JOIN sel s USING (shard, row)) TO ? (FORMAT parquet)", [str(work / "decisions.parquet")])
    kept = con.execute("SELECT count(*) FILTER (WHERE keep), count(*) FROM read_parquet(?)",
                       [str(work / "decisions.parquet")]).fetchone()
    con.close()
    return {"kept": int(kept[0]), "rows": int(kept[1])}


def stage_bare_kmeans(work: Path, a: argparse.Namespace) -> dict:
    import faiss

    if a.threads:
        faiss.omp_set_num_threads(a.threads)
    x = np.load(work / "sample.npy").astype(np.float32)
    km = faiss.Kmeans(D, a.k, niter=a.niter, seed=a.seed, spherical=True)
    km.train(x)
    np.save(work / "bare_centroids.npy", km.centroids)
    return {}


def stage_bare_assign(work: Path, a: argparse.Namespace) -> dict:
    import faiss

    if a.threads:
        faiss.omp_set_num_threads(a.threads)
    index = faiss.IndexFlatIP(D)
    index.add(np.load(work / "bare_centroids.npy"))
    n = 0
    for name in shard_names(work):
        emb = load_emb(work, name)
        for s in range(0, len(emb), a.chunk):
            index.search(np.ascontiguousarray(emb[s : s + a.chunk], dtype=np.float32), 1)
        n += len(emb)
        del emb
    return {"rows": n}


def stage_imports(work: Path, a: argparse.Namespace) -> dict:
    """Baseline: the RSS of a process that only imports what the stages import."""
    import duckdb  # noqa: F401
    import faiss  # noqa: F401
    import polars  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    import dbprune_assets.core.method.dbp  # noqa: F401
    import dbprune_assets.core.method.kmeans  # noqa: F401

    return {}


STAGES = {
    "imports": stage_imports,
    "sample": stage_sample,
    "kmeans": stage_kmeans,
    "assign": stage_assign,
    "quotas": stage_quotas,
    "select": stage_select,
    "bare_kmeans": stage_bare_kmeans,
    "bare_assign": stage_bare_assign,
}
CORE = ["sample", "kmeans", "assign", "quotas", "select"]
BARE = ["bare_kmeans", "bare_assign"]


def run_stage(name: str, work: Path, argv: list[str]) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, __file__, "--stage", name, "--dir", str(work), *argv],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.stderr.write(p.stdout + p.stderr)
        raise SystemExit(f"stage {name} failed")
    info = json.loads(p.stdout.strip().splitlines()[-1])
    info["wall_incl_startup_s"] = wall
    info["children_maxrss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=500)
    ap.add_argument("--sample-size", type=int, default=None, help="k-means sample (default 256*k, faiss' own cap)")
    ap.add_argument("--niter", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="faiss/duckdb threads (0 = library default)")
    ap.add_argument("--dir", type=Path, default=None, help="working folder (default: a temp dir, removed at the end)")
    ap.add_argument("--shard-rows", type=int, default=100_000)
    ap.add_argument("--chunk", type=int, default=65536)
    ap.add_argument("--concepts", type=int, default=1000)
    ap.add_argument("--keep-fraction", type=float, default=0.25)
    ap.add_argument("--duckdb-memory", default="1GB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="run each stage this many times, report the fastest (noisy machines)")
    ap.add_argument("--keep", action="store_true", help="keep the working folder")
    ap.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.sample_size is None:
        a.sample_size = 256 * a.k

    if a.stage:  # child process
        if a.threads:
            os.environ["OMP_NUM_THREADS"] = str(a.threads)
        t0 = time.perf_counter()
        extra = STAGES[a.stage](a.dir, a)
        wall = time.perf_counter() - t0
        ru = resource.getrusage(resource.RUSAGE_SELF)
        print(json.dumps({"wall_s": wall, "maxrss_mib": ru.ru_maxrss / 1024, **extra}))
        return

    tmp = a.dir is None
    work = Path(tempfile.mkdtemp(prefix="bench_dbp_")) if tmp else a.dir
    work.mkdir(parents=True, exist_ok=True)
    argv = [
        "--k", str(a.k), "--sample-size", str(a.sample_size), "--niter", str(a.niter),
        "--threads", str(a.threads), "--chunk", str(a.chunk), "--keep-fraction", str(a.keep_fraction),
        "--duckdb-memory", a.duckdb_memory, "--seed", str(a.seed),
    ]  # fmt: skip
    try:
        if not shard_names(work) or sum(len(load_emb(work, s)) for s in shard_names(work)) != a.n:
            shutil.rmtree(work / "shards", ignore_errors=True)
            t0 = time.perf_counter()
            generate(work, a.n, a.shard_rows, a.concepts, a.seed)
            print(f"generated {a.n} x {D} float16 in {len(shard_names(work))} shards ({time.perf_counter() - t0:.1f} s) under {work}")
        import faiss

        print(
            f"n={a.n} k={a.k} sample={a.sample_size} niter={a.niter} threads={a.threads or 'default'} "
            f"(faiss {faiss.__version__}, omp max {faiss.omp_get_max_threads()}, cpus {os.cpu_count()})"
        )
        res = {}
        for name in CORE + BARE:
            runs = [run_stage(name, work, argv) for _ in range(a.repeat)]
            r = min(runs, key=lambda x: x["wall_s"])
            r["maxrss_mib"] = max(x["maxrss_mib"] for x in runs)
            res[name] = r
            extra = {k: v for k, v in r.items() if k not in ("wall_s", "maxrss_mib", "wall_incl_startup_s", "children_maxrss_mib")}
            print(f"  {name:<12} {r['wall_s']:9.2f} s   peak {r['maxrss_mib']:8.0f} MiB   {extra}", flush=True)
        core = sum(res[s]["wall_s"] for s in CORE)
        bare = sum(res[s]["wall_s"] for s in BARE)
        peak = max(res[s]["maxrss_mib"] for s in CORE)
        print(f"core total   {core:9.2f} s   peak {peak:8.0f} MiB ({peak / 1024:.2f} GiB)")
        print(f"bare faiss   {bare:9.2f} s   peak {max(res[s]['maxrss_mib'] for s in BARE):8.0f} MiB")
        print(f"ratio core / bare faiss: {core / bare:.2f}x  "
              f"(kmeans {res['kmeans']['wall_s'] / res['bare_kmeans']['wall_s']:.2f}x, "
              f"assign {res['assign']['wall_s'] / res['bare_assign']['wall_s']:.2f}x)")  # fmt: skip
        print(f"baseline RSS of a process importing faiss + duckdb + polars + pyarrow: {run_stage('imports', work, argv)['maxrss_mib']:.0f} MiB")
        print(f"max RSS of any child (RUSAGE_CHILDREN): {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MiB")
    finally:
        if tmp and not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
