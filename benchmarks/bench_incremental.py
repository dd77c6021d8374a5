"""Benchmark: adding shards to a pruned pool, against a full run of the grown pool.

Writes a DataComp-format pool (``--shards`` + ``--added`` shards of
``--samples-per-shard``, b32), holds the added shards aside, and runs
``dbprune run --select '*pruned_subset'`` (subprocesses, same settings):

  first        home A on the pool, from nothing
  incremental  the added shards put back, home A again (refit: auto: the
               fits are kept, the new shards assigned to them)
  full         a fresh home on the grown pool (its own fits), the same run's
               baseline: the ratio incremental / full is the figure
  fresh        a fresh home on the grown pool with --centroids-from A: its
               decisions must equal A's, byte for byte (the contract)
  removed      ``--removed`` of A's first shards taken out, home A again,
               and a fresh home with --centroids-from A to compare
  touched      every pool file touched (same bytes, a new mtime: ``touch``,
               ``cp`` without ``-p``, a restored backup), home A again: the
               shards are read again, found unchanged, and nothing after the
               ingest runs; its decisions must be the ones before
  current      nothing changed, home A again: what any ``dbprune run`` on
               this home costs before it does any work (the floor under an
               incremental run), beside 5% of the full run

and prints each run's seconds and peak RSS, the groups the incremental run
redid, the bytes it rewrote under the home (files changed, Dagster's own
storage aside), the samples each strategy added, removed and re-decided and
the DBP clusters whose quota moved (the catalog's history), and whether the
decisions match.  Asserts nothing.

    python benchmarks/bench_incremental.py --shards 100 --samples-per-shard 10000 --added 1 --removed 1
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pool_scale import run_dbprune, settings_yaml, write_pool  # noqa: E402


def decisions_digest(home: Path) -> tuple[str, int]:
    """sha256 over the sorted (strategy, shard, uid, keep, reason) rows, and their number."""
    import polars as pl

    files = sorted((home / "tables" / "decisions").glob("*.parquet"))
    frame = pl.concat([pl.read_parquet(f, columns=["strategy", "shard", "uid", "keep", "reason"]) for f in files])
    h = hashlib.sha256()
    for row in frame.sort(["strategy", "shard", "uid"]).iter_rows():
        h.update(("\t".join(map(str, row)) + "\n").encode())
    return h.hexdigest(), frame.height


def snapshot(home: Path) -> dict[str, tuple[int, int]]:
    """Every file under the home (Dagster's storage and temp files aside): size and mtime."""
    out = {}
    for p in home.rglob("*"):
        rel = p.relative_to(home)
        if p.is_file() and rel.parts[0] not in ("dagster", ".tmp", "logs"):
            st = p.stat()
            out[str(rel)] = (st.st_size, st.st_mtime_ns)
    return out


def rewritten(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """(files, bytes) new or changed between two snapshots."""
    changed = changed_files(before, after)
    return len(changed), sum(after[k][0] for k in changed)


def changed_files(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
    return [k for k, v in after.items() if before.get(k) != v]


def folders(paths: list[str]) -> str:
    """``state/raw_metadata ×4, catalog.duckdb``: the folders of ``paths`` with their counts."""
    from collections import Counter

    counts = Counter(str(Path(p).parent) if "/" in p else p for p in paths)
    return ", ".join(f"{k} ×{n}" if n > 1 else k for k, n in sorted(counts.items()))


def last_run(home: Path) -> list[str]:
    """The catalog's history of the home's last run: per strategy the samples
    added, removed and re-decided (``decision_runs``), and the DBP clusters whose
    quota moved (``quota_moves``)."""
    import polars as pl

    runs = pl.read_parquet(home / "tables" / "decision_runs" / "*.parquet")
    last = runs.filter(pl.col("at") == runs["at"].max()).sort("strategy")
    moves = home / "tables" / "quota_moves"
    moved = pl.read_parquet(moves / "*.parquet").filter(
        pl.col("run_id").is_in(last["run_id"].implode()) & (pl.col("strategy") == "dbp")) if moves.is_dir() else None
    out = [f"  {r['strategy']:<11} added {r['added']:>8,}  removed {r['removed']:>8,}  re-decided "
           f"{r['redecided']:>8,}  kept {r['kept']:>9,}" for r in last.iter_rows(named=True)]
    if moved is not None:
        out.append(f"  dbp clusters whose quota moved: {moved.filter(pl.col('move') != 0).height}, "
                   f"the largest move {int(moved['move'].abs().max() or 0)} samples")
    return out


def move(src: Path, dst: Path, stems: list[str]) -> None:
    dst.mkdir(exist_ok=True)
    for stem in stems:
        for ext in ("parquet", "npz"):
            shutil.move(str(src / f"{stem}.{ext}"), str(dst / f"{stem}.{ext}"))


def show(name: str, run: dict) -> None:
    print(f"{name:<12} {run['seconds']:>8.1f}s  peak RSS {run['peak_rss_mib']:>6} MiB")


#: the incremental run's groups whose work is the added shard alone or O(k) numbers: what they take is
#: mostly the fixed cost of a Dagster run and its step
ONE_SHARD = ("raw_metadata", "pool_manifest", "embeddings", "dedup_centroids", "dedup_assignments",
             "cluster_complexity")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=100)
    p.add_argument("--samples-per-shard", type=int, default=10_000)
    p.add_argument("--added", type=int, default=1, help="shards added after the first run")
    p.add_argument("--removed", type=int, default=1, help="shards removed after the incremental run")
    p.add_argument("--concepts", type=int, default=64)
    p.add_argument("--dedup-k", type=int, default=500)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--niter", type=int, default=20)
    p.add_argument("--sample-size", type=int, default=500_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--per-run", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--keep", action="store_true")
    a = p.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-incremental-", dir=os.environ.get("TMPDIR")))
    pool, aside = work / "pool", work / "aside"
    total = argparse.Namespace(**{**vars(a), "shards": a.shards + a.added})
    print(f"pool: {a.shards} shards × {a.samples_per_shard:,} + {a.added} added, then {a.removed} removed "
          f"(b32, dedup_k {a.dedup_k}, k {a.k}, niter {a.niter}, {a.threads} threads); work {work}", flush=True)
    if not pool.exists():
        print(f"  pool written in {write_pool(pool, total):.1f}s", flush=True)
    stems = sorted(q.stem for q in pool.glob("*.npz"))
    added, removed = stems[len(stems) - a.added:], stems[:a.removed]
    if not aside.exists():
        move(pool, aside, added)
    config = work / "settings.yaml"
    config.write_text(settings_yaml(a))
    homes = {n: work / n for n in ("a", "full", "fresh", "fresh_removed")}
    for h in homes.values():
        shutil.rmtree(h, ignore_errors=True)

    first = run_dbprune(homes["a"], pool, config)
    show("first", first)
    move(aside, pool, added)
    before = snapshot(homes["a"])
    inc = run_dbprune(homes["a"], pool, None)  # the saved settings
    show("incremental", inc)
    inc_history = last_run(homes["a"])
    files, size = rewritten(before, snapshot(homes["a"]))
    full = run_dbprune(homes["full"], pool, config)
    show("full", full)
    fresh = run_dbprune(homes["fresh"], pool, config, ("--centroids-from", str(homes["a"])))
    show("fresh", fresh)
    same_added = decisions_digest(homes["a"]) == decisions_digest(homes["fresh"])

    move(pool, aside, removed)
    rm = run_dbprune(homes["a"], pool, None)
    show("removed", rm)
    rm_history = last_run(homes["a"])
    fresh_rm = run_dbprune(homes["fresh_removed"], pool, config, ("--centroids-from", str(homes["a"])))
    same_removed = decisions_digest(homes["a"]) == decisions_digest(homes["fresh_removed"])

    before_touch, decided = snapshot(homes["a"]), decisions_digest(homes["a"])
    for f in pool.iterdir():
        os.utime(f)  # now
    touched = run_dbprune(homes["a"], pool, None)
    show("touched", touched)
    after_touch = snapshot(homes["a"])
    touched_files, touched_size = rewritten(before_touch, after_touch)
    touched_where = folders(changed_files(before_touch, after_touch))
    current = run_dbprune(homes["a"], pool, None)
    show("current", current)

    print(f"\nincremental / full: {inc['seconds'] / full['seconds']:.2f}× ({inc['seconds']:.1f}s / "
          f"{full['seconds']:.1f}s); peak RSS {inc['peak_rss_mib']} vs {full['peak_rss_mib']} MiB")
    print(f"removed / full:     {rm['seconds'] / full['seconds']:.2f}×")
    print(f"the incremental run rewrote {files} files, {size / 2**20:.1f} MiB under the home")
    print("its groups (seconds and peak RSS; the full run's beside):")
    full_by = {g["group"]: g for g in full["groups"]}
    for g in inc["groups"]:
        f = full_by.get(g["group"], {})
        print(f"  {g['group']:<45} {g['partitions']:>6} partition(s) {g['seconds']:>8.1f}s {g['peak_rss_mib']:>6} MiB"
              f"   full: {f.get('seconds', float('nan')):>7.1f}s {f.get('peak_rss_mib', '-'):>6} MiB")
    for line in inc["output"]:
        if line.startswith("  drift:") or line.startswith("  refitting") or line.startswith("  kept"):
            print("  " + line.rstrip())
    print("what the incremental run decided (decision_runs, quota_moves):", *inc_history, sep="\n")
    print("what the removal run decided:", *rm_history, sep="\n")
    print(f"decisions equal a fresh home with --centroids-from: after adding {same_added}, after removing "
          f"{same_removed} ({fresh_rm['seconds']:.1f}s)")
    print(f"\ntouched / full: {touched['seconds'] / full['seconds']:.2f}× ({touched['seconds']:.1f}s; peak RSS "
          f"{touched['peak_rss_mib']} MiB); groups that ran: "
          f"{', '.join(g['group'] for g in touched['groups'] if g['partitions']) or 'none'}")
    print(f"the touched run rewrote {touched_files} files ({touched_size / 2**20:.1f} MiB: {touched_where}); "
          f"decisions unchanged: {decisions_digest(homes['a']) == decided}")
    for line in touched["output"]:
        if "read again" in line:
            print("  " + line.strip())
    small = sum(g["seconds"] for g in inc["groups"] if g["partitions"] == 1 and g["group"] in ONE_SHARD)
    print(f"\nthe floor: a run with nothing to do took {current['seconds']:.1f}s "
          f"({current['seconds'] / full['seconds']:.1%} of the full run; 5% is {0.05 * full['seconds']:.1f}s); "
          f"the incremental run's groups that handled only the added shard or a few numbers "
          f"({', '.join(ONE_SHARD)}) took {small:.1f}s together")
    if not a.keep and a.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
