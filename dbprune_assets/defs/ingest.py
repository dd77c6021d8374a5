"""Ingest: ``raw_metadata`` (one partition per pool shard), ``pool_manifest``,
and the sensor that registers shards as they appear in the pool folder."""


from collections import Counter
from typing import Any, Mapping, Sequence

import dagster as dg

from dbprune_assets.defs.automation import INTERVAL_S
from dbprune_assets.core.method import stages
from dbprune_assets.core.store.atomic import remove
from dbprune_assets.core.pool import reingest, shardgroups
from dbprune_assets.core.store.layout import UNPARTITIONED, Layout, list_pool_shards, typical_shard_rows
from dbprune_assets.core.pool.shardgroups import GroupSize
from dbprune_assets.core.running.parallel import ordered_map
from dbprune_assets.core.running.progress import progress
from dbprune_assets.core.pool.shards import STATUSES
from dbprune_assets.core.store.state import combine_versions, read_state
from dbprune_assets.defs.common import (ALL_PARTITIONS, PARTITION_METADATA_MAX, SHARDS, DbpruneResource, Facts, Node,
                                        Session, Versions, graph_nodes, shard_partitions, stage)
from dbprune_assets.defs.plots import md_table


def remove_shard_outputs(layout: Layout, shard: str, tables: Sequence[str], pool_wide: Sequence[str] = ()) -> None:
    """Delete every file and commit marker a shard left behind: its files of the
    per-shard ``tables`` (:func:`shard_tables`), its embeddings and markers; and
    the markers of the ``pool_wide`` assets that wrote some of those files
    (:func:`pool_wide_writers`): without their file of the shard they are not
    complete, even if the shard comes back as it was (same pool version)."""
    for asset in pool_wide:
        remove(layout.state(asset, UNPARTITIONED))
    for table in tables:
        remove(layout.table(table, shard))
    for path in (layout.img_emb(shard), layout.text_emb(shard), layout.emb_metadata(shard),
                 layout.staged_pairs(shard)):
        remove(path)
    marker = str(layout.state("*", shard).relative_to(layout.home))
    for path in (*layout.home.glob(marker), *layout.home.glob(marker + ".was")):  # of every asset
        remove(path)


def sync_shard_partitions(instance: dg.DagsterInstance, layout: Layout, nodes: Mapping[str, Node],
                          group: GroupSize = "auto") -> tuple[list[str], list[str]]:
    """Make the dynamic partitions equal the pool's shards, in groups of ``group``
    (``core/pool/shardgroups.py``); returns the partition keys (added, removed).

    A shard that left the pool loses its files (of the per-shard tables of
    ``nodes``, :func:`shard_tables`), rows and commit markers, and the
    pool-wide assets that wrote some of them their markers
    (:func:`remove_shard_outputs`).
    """
    added, removed, vanished = partition_changes(instance.get_dynamic_partitions(SHARDS), layout, group)
    if added:
        instance.add_dynamic_partitions(SHARDS, added)
    for key in removed:
        instance.delete_dynamic_partition(SHARDS, key)
    for shard in vanished:
        remove_shard_outputs(layout, shard, shard_tables(nodes), pool_wide_writers(nodes))
    return added, removed


def partition_changes(known: Sequence[str], layout: Layout, group: GroupSize
                      ) -> tuple[list[str], list[str], list[str]]:
    """(keys to add, keys to remove, shards that left the pool) for the pool as it is now."""
    on_disk = list_pool_shards(layout.pool)
    rows = (typical_shard_rows(layout.pool, on_disk)
            if group == "auto" and len(on_disk) > shardgroups.GROUP_FROM_SHARDS else None)
    keys = shardgroups.partition_keys(on_disk, shardgroups.group_size(len(on_disk), group, rows))
    known_set, key_set = set(known), set(keys)
    ingested = {p.stem for p in layout.state("raw_metadata", "x").parent.glob("*.json")}
    vanished = sorted(ingested - set(on_disk))
    return [k for k in keys if k not in known_set], sorted(known_set - key_set), vanished


def shard_tables(nodes: Mapping[str, Node]) -> list[str]:
    """Every table some asset writes one file per shard of."""
    return [t for node in nodes.values() for t in node.facts.shard_tables]


def pool_wide_writers(nodes: Mapping[str, Node]) -> list[str]:
    """The unpartitioned assets that write one file per shard (``candidates``)."""
    return [name for name, node in nodes.items() if node.partitioning is None and node.facts.shard_tables]


def ingest_inputs(versions: Versions, shard: str) -> dict[str, Any]:
    """What a shard's ingest reads besides settings: the files its embedding
    source names (its parquet and tar, and with stored embeddings the source's
    files, which decide no_/bad_embedding; ``EmbeddingSource.signature``)."""
    return {"files": versions.source.signature(versions.layout, versions.settings, shard, versions.memo)}


@stage(
    partitions=shard_partitions,
    group="ingest",
    kinds={"python", "parquet"},
    settings=["ingest", "embeddings"],
    facts=Facts(ingest=True, shard_tables=("samples", "problems")),
    inputs=ingest_inputs,
)
def raw_metadata(context: dg.AssetExecutionContext, s: Session) -> dg.MaterializeResult:
    """One row per parquet row of an img2dataset shard (failed downloads included) with its status: ok,
    failed_download, undecodable, missing_in_tar, empty_caption, truncated_tar or duplicate_uid. Writes
    tables/samples/<shard>.parquet and tables/problems/<shard>.parquet. A shard whose parquet has the wrong
    schema is recorded as failed (no samples rows, one problems row naming the column) and the others go on.
    A shard read again (its files touched or copied, a setting changed) that comes out the same (rows, tar
    bytes, stored pairs) keeps its data version, so nothing after it runs (metadata: unchanged)."""
    totals: Counter[str] = Counter()
    per_shard = []
    problems_preview = []
    failed: dict[str, str] = {}
    shards = s.partition_shards(context.partition_keys)
    unknown = [sh for sh in shards if not s.layout.shard_parquet(sh).is_file()]
    if unknown:  # a partition added by hand (the UI) for a shard the pool does not hold
        raise dg.Failure(f"no such shard in the pool {s.layout.pool}: {', '.join(unknown[:5])} (no "
                         f"{unknown[0]}.parquet there); the partitions are the pool's parquet files: delete these "
                         "partitions, or put the shards in the pool (the sensor and dbprune run register them)")
    def ingest_one(shard: str) -> reingest.Ingested:  # in a thread: no Dagster calls
        return reingest.ingest_and_write(s.layout, s.source, s.settings, shard)

    done = ordered_map(ingest_one, shards, s.parallel_shards(len(shards)))
    unchanged: list[str] = []
    for shard, one in progress(done, desc="ingest", unit="shard", total=len(shards)):
        result, counts = one.result, one.counts
        if one.same:
            unchanged.append(shard)
        if one.error is not None:
            failed[shard] = str(one.error)
            context.log.error(f"shard {shard} not ingested: {one.error}")
        totals.update(counts)
        per_shard.append({"shard": shard, "rows": result.samples.height, **{k: counts.get(k, 0) for k in STATUSES},
                          "problems": result.problems.height})
        if len(problems_preview) < 60:
            problems_preview.extend(result.problems.head(20).to_dicts())
        s.commit("raw_metadata", shard, {"rows": result.samples.height, "status": dict(counts),
                                         "problems": result.problems.height, **one.marker_summary(),
                                         **({"failed": failed[shard]} if shard in failed else {})},
                 data_version=one.data_version,
                 metadata={"rows": result.samples.height, "ok": counts.get("ok", 0), "unchanged": one.same,
                           "by_status": dg.MetadataValue.json(dict(counts)),
                           "problem_rows": result.problems.height,
                           "problems": dg.MetadataValue.md(md_table(result.problems.head(20).to_dicts(), 20)
                                                           if result.problems.height else "no problems"),
                           **({"failed": failed[shard]} if shard in failed else {})})
        if result.problems.height or len(shards) <= PARTITION_METADATA_MAX:
            # a line per shard only where it tells something: each is an event Dagster stores
            context.log.info(f"shard {shard}: {result.samples.height} rows, {dict(counts)}")
    if unchanged:
        context.log.info(f"{len(unchanged)} shard(s) read again are unchanged (the same rows, tar bytes and "
                         f"pairs): what follows them keeps its results ({', '.join(unchanged[:5])}"
                         f"{'…' if len(unchanged) > 5 else ''})")
    s.refresh_catalog("samples", "problems")
    return dg.MaterializeResult(
        metadata={
            "rows": sum(r["rows"] for r in per_shard),
            "ok": totals.get("ok", 0),
            "by_status": dg.MetadataValue.json(dict(totals)),
            "failed_shards": dg.MetadataValue.json(failed),
            "unchanged_shards": len(unchanged),
            # step_*: the step's own, beside each partition's numbers (docs: the UI)
            "step_shards": dg.MetadataValue.md(md_table(per_shard, s.table_rows)),
            "step_problems": dg.MetadataValue.md(md_table(problems_preview, s.table_rows) if problems_preview
                                                 else "no problems"),
            "seconds": s.elapsed(),
        }
    )


@stage(
    deps=[dg.AssetDep(raw_metadata, partition_mapping=ALL_PARTITIONS)],
    group="ingest",
    kinds={"python", "parquet"},
    facts=Facts(ingest=True),
)
def pool_manifest(context: dg.AssetExecutionContext, s: Session) -> dg.MaterializeResult:
    """The set of shards and their versions. Its data version changes when a shard is added, removed or
    re-ingested with other contents (one read again the same keeps its version: a touched file changes
    nothing), which marks every global asset downstream stale, also for pools of more than 100 shards
    (where Dagster stops tracking partition-level staleness). It applies the uid rule across shards: an ok
    row whose uid an earlier shard has is duplicate_uid (tables/duplicate_uids/all.parquet, with its problems
    row); the first occurrence in shard order keeps the uid."""
    versions = {shard: s.versions.data_version("raw_metadata", shard) for shard in s.shards}
    missing = [k for k, v in versions.items() if v is None]
    if missing:
        raise dg.Failure(
            f"pool_manifest: {len(missing)} shard(s) not ingested yet ({', '.join(missing[:5])}…): "
            "materialise raw_metadata for them first (dbprune run does)"
        )
    had_duplicates = s.layout.table("duplicate_uids").exists()
    frame, status, cross = stages.write_pool_manifest(s.layout, versions)
    if had_duplicates or cross.height:  # the file came or went (problems and samples views are globs)
        s.refresh_catalog("duplicate_uids")
    failed = {shard: st.summary["failed"] for shard in s.shards
              if (st := read_state(s.layout, "raw_metadata", shard)) and "failed" in st.summary}
    for shard, cause in failed.items():
        context.log.error(f"shard {shard} is not in the pool's samples: {cause}")
    version = combine_versions(versions)
    return s.done("pool_manifest", summary={"shards": frame.height, "status": status, "failed_shards": sorted(failed)},
                  data_version=version, metadata={
        "shards": frame.height, "rows": int(frame["rows"].sum()), "ok": int(frame["ok"].sum()),
        "by_status": dg.MetadataValue.json(status), "pool": dg.MetadataValue.path(str(s.layout.pool)),
        "failed_shards": dg.MetadataValue.json(failed),
        "cross_shard_duplicate_uids": cross.height,
    })


@dg.sensor(
    minimum_interval_seconds=INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
    asset_selection=[raw_metadata, pool_manifest],
    description="Registers new pool shards as partitions (and drops vanished ones), then ingests the new ones; "
                "once every shard is ingested, re-materialises pool_manifest when the set of shards or their "
                "versions changed, which marks every global asset stale (at any number of shards).",
)
def pool_shards_sensor(context: dg.SensorEvaluationContext, dbprune: DbpruneResource) -> dg.SensorResult:
    layout = dbprune.layout()
    on_disk = list_pool_shards(layout.pool)
    added, removed, vanished = partition_changes(context.instance.get_dynamic_partitions(SHARDS), layout,
                                                 dbprune.settings().partitions.shards_per_partition)
    nodes = graph_nodes(context.repository_def.asset_graph)
    for shard in vanished:
        remove_shard_outputs(layout, shard, shard_tables(nodes), pool_wide_writers(nodes))
    requests = [dg.RunRequest(partition_key=s, asset_selection=[raw_metadata.key]) for s in added]
    # Dagster stops tracking staleness across an edge with >= 100 upstream partitions, so
    # pool_manifest (whose data version is the combined shard versions) is refreshed here
    manifest = read_state(layout, "pool_manifest", UNPARTITIONED)
    versions = {s: (st.data_version if (st := read_state(layout, "raw_metadata", s)) else None) for s in on_disk}
    if not added and manifest is not None and None not in versions.values():
        current = combine_versions(versions)
        if current != manifest.data_version:
            requests.append(dg.RunRequest(run_key=f"pool_manifest:{current}", asset_selection=[pool_manifest.key]))
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[
            *([shard_partitions.build_add_request(added)] if added else []),
            *([shard_partitions.build_delete_request(removed)] if removed else []),
        ],
    )
