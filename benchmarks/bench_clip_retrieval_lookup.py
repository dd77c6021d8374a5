"""Benchmark: per-shard uid lookups into the clip-retrieval link index.

Writes a clip-retrieval output folder of ``--rows`` random 32-hex uids in
``--parts`` parts (``metadata/metadata_N.parquet`` with ``uid`` and
``image_path``, and real ``img_emb``/``text_emb`` arrays of width 8, float16),
builds the index (``source_index.ensure_index``: the sorted parquet and the
uid arrays), then times the lookups of ``--shards`` pool shards of
``--shard-rows`` uids each (random rows of the source, ``--absent`` of them
uids it lacks), each phase in a fresh subprocess:

  build   ``ensure_index`` from nothing (DuckDB sort, duplicate check, uid arrays)
  arrays  ``lookup`` on the index: ``np.searchsorted`` on the memory-mapped uids
  duckdb  ``lookup`` with the uid arrays left out: the DuckDB join against the
          sorted parquet (``WHERE id BETWEEN min AND max``), which for random
          uids reads every row group

and prints each phase's time and peak memory (max RSS), the per-shard ratio
(mean time per shard after one untimed warm-up lookup), and whether both
lookups gave the same answer.  Prints figures only.

    python benchmarks/bench_clip_retrieval_lookup.py
    python benchmarks/bench_clip_retrieval_lookup.py --rows 20000000 --parts 40 --shards 5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

import synth  # noqa: F401  (puts the repository on sys.path)

DIM = 8
_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)


def hex_strings(raw: np.ndarray) -> "object":
    """``(n, 16)`` uint8 -> a pyarrow string array of n 32-hex uids, built from buffers (no Python strings)."""
    import pyarrow as pa

    n = len(raw)
    chars = np.empty((n, 32), np.uint8)
    chars[:, 0::2], chars[:, 1::2] = _HEX[raw >> 4], _HEX[raw & 15]
    offsets = (np.arange(n + 1, dtype=np.int32) * 32)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(chars.tobytes())])


def source_uids(a: argparse.Namespace) -> np.ndarray:
    """The source's uids as ``(rows, 16)`` bytes, unique (the same for every phase: seeded)."""
    raw = np.random.default_rng(a.seed).integers(0, 256, (a.rows, 16), dtype=np.uint8)
    raw[:, 0] = raw[:, 0] & 0x7F  # bit 127 clear: the absent uids below set it, so they are absent for sure
    return raw


def write_source(folder: Path, a: argparse.Namespace) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = source_uids(a)
    bounds = np.linspace(0, a.rows, a.parts + 1).astype(np.int64)
    for sub in ("img_emb", "text_emb", "metadata"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([a.seed, 1])
    for p, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        m = int(hi - lo)
        x = rng.standard_normal((m, DIM), dtype=np.float32).astype(np.float16)
        np.save(folder / "img_emb" / f"img_emb_{p}.npy", x)
        np.save(folder / "text_emb" / f"text_emb_{p}.npy", x)
        keys = pa.array(np.char.zfill(np.arange(lo, hi).astype(str), 9))
        pq.write_table(pa.table({"image_path": keys, "uid": hex_strings(raw[lo:hi])}),
                       folder / "metadata" / f"metadata_{p}.parquet", compression="zstd")


def shard_queries(a: argparse.Namespace) -> list[list[str]]:
    raw = source_uids(a)
    rng = np.random.default_rng([a.seed, 2])
    out = []
    for _ in range(a.shards):
        present = raw[rng.choice(a.rows, a.shard_rows - int(a.absent * a.shard_rows), replace=False)]
        absent = rng.integers(0, 256, (int(a.absent * a.shard_rows), 16), dtype=np.uint8)
        absent[:, 0] |= 0x80
        q = np.vstack([present, absent])[rng.permutation(a.shard_rows)]
        out.append(hex_strings(q).to_pylist())  # a shard's uids as the pool hands them over: Python strings
    return out


def phase(name: str, work: Path, a: argparse.Namespace) -> dict:
    from dbprune_assets.core.pool.sources import clip_retrieval_index as source_index

    tmp = work / "tmp"
    t0 = time.perf_counter()
    idx = source_index.ensure_index(work / "cr", work / "idx", tmp)
    extra: dict = {}
    if name == "build":
        extra = {"built": idx.built, "uid_case": idx.uid_case,
                 "parquet_mib": idx.ids.stat().st_size / 2**20,
                 "arrays_mib": sum(f.stat().st_size for f in idx.uids.iterdir()) / 2**20 if idx.uids else 0}
    else:
        assert not idx.built, "build the index first"
        if name == "duckdb":
            idx = replace(idx, uids=None, uid_case=None)
        queries = shard_queries(a)
        source_index.lookup(idx, queries[0][:100], tmp)  # warm-up, untimed: imports and first reads
        t0 = time.perf_counter()
        per, found, digest = [], 0, hashlib.sha256()
        for q in queries:
            s = time.perf_counter()
            part, row = source_index.lookup(idx, q, tmp)
            per.append(time.perf_counter() - s)
            found += int((part >= 0).sum())
            digest.update(part.tobytes() + row.tobytes())
        extra = {"per_shard_ms": 1000 * float(np.mean(per)), "per_shard_ms_median": 1000 * float(np.median(per)),
                 "per_shard_ms_max": 1000 * float(np.max(per)),
                 "found": found, "answer_digest": digest.hexdigest()}
    return {"wall_s": time.perf_counter() - t0,
            "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}


def run_phase(name: str, work: Path, argv: list[str]) -> dict:
    p = subprocess.run([sys.executable, __file__, "--phase", name, "--dir", str(work), *argv],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"phase {name} failed:\n{p.stdout}\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--parts", type=int, default=8)
    ap.add_argument("--shard-rows", type=int, default=10_000)
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--absent", type=float, default=0.05, help="share of a shard's uids the source lacks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, help="work folder (default: a temp folder, removed after)")
    ap.add_argument("--phase", choices=["build", "arrays", "duckdb"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    argv = [f"--rows={a.rows}", f"--parts={a.parts}", f"--shard-rows={a.shard_rows}", f"--shards={a.shards}",
            f"--absent={a.absent}", f"--seed={a.seed}"]
    if a.phase:
        print(json.dumps(phase(a.phase, a.dir, a)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-cr-lookup-", dir=a.dir) as d:
        work = Path(d)
        t0 = time.perf_counter()
        write_source(work / "cr", a)
        print(f"source: {a.rows:,} uids in {a.parts} parts written in {time.perf_counter() - t0:.1f} s")
        build = run_phase("build", work, argv)
        print(f"build:  {build['wall_s']:.1f} s, peak RSS {build['maxrss_mib']:.0f} MiB (parquet "
              f"{build['parquet_mib']:.1f} MiB, uid arrays {build['arrays_mib']:.1f} MiB, case {build['uid_case']})")
        got = {}
        for name in ("arrays", "duckdb"):
            got[name] = r = run_phase(name, work, argv)
            print(f"{name:7s} {a.shards} shards × {a.shard_rows:,} uids: {r['per_shard_ms']:.1f} ms per shard "
                  f"(median {r['per_shard_ms_median']:.1f}, max {r['per_shard_ms_max']:.1f}), {r['found']:,} found, "
                  f"peak RSS {r['maxrss_mib']:.0f} MiB")
        ratio = got["duckdb"]["per_shard_ms"] / got["arrays"]["per_shard_ms"]
        same = got["duckdb"]["answer_digest"] == got["arrays"]["answer_digest"]
        print(f"ratio:  the arrays are {ratio:.1f}x faster per shard; same answers: {same}")


if __name__ == "__main__":
    main()
