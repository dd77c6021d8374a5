"""Benchmark: what Dagster itself costs per shard partition, against the bare load of a shard.

Issue 19 asks the load stage (``raw_metadata``, ``pool_manifest``, ``encoder``,
``embeddings``) to stay within 1.5x of the bare libraries reading the same npz
files.  DESIGN.md makes ``raw_metadata`` and ``embeddings`` per-shard assets
(one dynamic partition per shard), so each shard pays Dagster's own
bookkeeping twice, whatever dbprune does inside the step.  This script
measures that floor with no dbprune code at all:

  floor   two no-op assets on one dynamic partitions definition, each
          materialised over ``--partitions`` partitions in one single-run
          backfill (``BackfillPolicy.single_run``, a partition-range run),
          executed in process on a SQLite instance with the console logger
          silenced: exactly how ``dbprune run`` executes the load steps.
          Again with one ``add_asset_metadata`` call per partition (what
          shows each shard's own numbers in the UI), and again with one
          more materialisation per partition carrying its own data version
          (what ``defs/dataversions.py`` adds over a range); then the plain
          and data-version cases through the storage ``dbprune`` configures
          (``cluster/sqlite_events.py``), beside Dagster's default.
  bare    the bare load of ``benchmarks/bench_pool_scale.py`` (every npz
          read once, the CLIP score of each pair, the image rows written to a
          float16 scratch file) over ``--shards`` generated DataComp shards.

and prints milliseconds per shard, the 1.5x budget that leaves beyond the bare
load, and how much of it Dagster's floor takes.  In a single-run backfill the
per-partition events are stored on the step's thread after the compute
returns, so this time adds to the step's wall time; it is not spread over the
cores.  Asserts nothing.

    python benchmarks/bench_dagster_floor.py --partitions 1000 --shards 20
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def dagster_floor(partitions: int, metadata: bool = False, versions: bool = False, dbprune: bool = False
                  ) -> list[float]:
    """Seconds per partition of each of two no-op per-shard assets, one range run each.

    ``dbprune``: the instance's storage as ``dbprune`` configures it
    (``cluster/sqlite_events.py``: the event log keeps its engines), else
    Dagster's default SQLite storage.
    ``metadata``: one ``add_asset_metadata`` call per partition; ``versions``:
    after the result, one more materialisation per partition carrying that
    partition's own data version, as ``defs/dataversions.py`` yields over a range
    (Dagster gives a range step one data version: dagster-io/dagster#34013)."""
    import dagster as dg

    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    parts = dg.DynamicPartitionsDefinition(name="shards")
    policy = dg.BackfillPolicy.single_run()

    def body(context):  # annotated below: Dagster reads the types, not the strings of __future__
        if metadata:
            for key in context.partition_keys:
                context.add_asset_metadata({"rows": 1}, partition_key=key)
        yield dg.MaterializeResult(metadata={"partitions": len(context.partition_keys)})
        if versions:
            for key in context.partition_keys:
                yield dg.AssetMaterialization(asset_key=context.asset_key, partition=key,
                                              tags={"dagster/data_version": key,
                                                    "dagster/data_version_is_user_provided": "true"})

    body.__annotations__ = {"context": dg.AssetExecutionContext}
    first = dg.asset(name="first", partitions_def=parts, backfill_policy=policy)(body)
    second = dg.asset(name="second", partitions_def=parts, backfill_policy=policy, deps=[first])(body)
    defs = dg.Definitions(assets=[first, second])
    keys = [f"{i:08d}" for i in range(partitions)]
    quiet = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
    out = []
    with tempfile.TemporaryDirectory(prefix="floor-") as home:
        if dbprune:
            from dbprune_assets.cluster import instance_yaml

            Path(home, "dagster.yaml").write_text(instance_yaml({}, dagster_home=home))
        instance = dg.DagsterInstance.from_config(home)  # SQLite storage, as the embedded default
        instance.add_dynamic_partitions("shards", keys)
        for name in ("first", "second"):
            job = defs.resolve_implicit_global_asset_job_def().get_subset(asset_selection={dg.AssetKey(name)})
            t0 = time.perf_counter()
            result = job.execute_in_process(instance=instance, run_config=quiet, tags={
                "dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]})
            if not result.success:
                raise SystemExit(f"the no-op run of {name} failed")
            out.append((time.perf_counter() - t0) / partitions)
    return out


def bare_load(shards: int, samples: int) -> float:
    """Seconds per shard of the bare load over ``shards`` generated DataComp shards."""
    from bench_pool_scale import _bare_load, write_pool

    a = argparse.Namespace(shards=shards, samples_per_shard=samples, concepts=64, seed=0, sample_size=50_000,
                           lean_disk=False)
    work = Path(tempfile.mkdtemp(prefix="floor-pool-"))
    try:
        write_pool(work / "pool", a)
        scratch = work / "scratch"
        scratch.mkdir()
        _bare_load(work / "pool", a, scratch)  # once to warm the page cache, as in the pool benchmark
        t0 = time.perf_counter()
        _bare_load(work / "pool", a, scratch)
        return (time.perf_counter() - t0) / shards
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--partitions", type=int, default=1000, help="partitions of each no-op asset")
    p.add_argument("--shards", type=int, default=20, help="generated shards the bare load reads")
    p.add_argument("--samples-per-shard", type=int, default=10_000)
    a = p.parse_args()

    plain = dagster_floor(a.partitions)
    with_meta = dagster_floor(a.partitions, metadata=True)
    with_versions = dagster_floor(a.partitions, versions=True)
    own = dagster_floor(a.partitions, dbprune=True)
    own_versions = dagster_floor(a.partitions, versions=True, dbprune=True)
    bare = bare_load(a.shards, a.samples_per_shard)
    ms = [x * 1000 for x in plain]
    ms_meta = [x * 1000 for x in with_meta]
    ms_versions = [x * 1000 for x in with_versions]
    ms_own, ms_own_versions = [x * 1000 for x in own], [x * 1000 for x in own_versions]
    print(f"Dagster's own cost per partition ({a.partitions:,} dynamic partitions, one range run per asset, "
          "SQLite instance, in process):")
    print(f"  no-op asset:                          {ms[0]:6.1f} / {ms[1]:6.1f} ms (first / second asset)")
    print(f"  with one add_asset_metadata call:     {ms_meta[0]:6.1f} / {ms_meta[1]:6.1f} ms")
    print(f"  with a data-version materialisation:  {ms_versions[0]:6.1f} / {ms_versions[1]:6.1f} ms "
          "(dbprune's per-partition data versions over a range)")
    print(f"  dbprune's storage, no-op asset:       {ms_own[0]:6.1f} / {ms_own[1]:6.1f} ms "
          f"({sum(ms_own) / sum(ms):.2f}× Dagster's default)")
    print(f"  dbprune's storage, with data versions: {ms_own_versions[0]:5.1f} / {ms_own_versions[1]:6.1f} ms "
          f"({sum(ms_own_versions) / sum(ms_versions):.2f}×)")
    floor, with_own = sum(ms_own), sum(ms_own_versions)
    print(f"  two per-shard load assets through dbprune's storage, no metadata: {floor:.1f} ms per shard")
    print(f"bare load ({a.shards} shards × {a.samples_per_shard:,}, b32): {bare * 1000:.1f} ms per shard")
    budget = 0.5 * bare * 1000
    print(f"the 1.5× budget beyond the bare load: {budget:.1f} ms per shard; Dagster's floor alone: {floor:.1f} ms "
          f"({floor / budget:.0%} of it), {with_own:.1f} ms with per-partition data versions ({with_own / budget:.0%}), "
          "before any of dbprune's own work (validation, tables, markers)")


if __name__ == "__main__":
    main()
