"""What Dagster records as a partition's data version: the one its commit
marker holds, however the step was launched (``dbprune run``, the UI, a
backfill), so the UI's staleness is ``dbprune run``'s.

Dagster derives a data version from the code version and the inputs' versions
unless the asset reports one, and a step over a range of partitions can report
only one, which Dagster copies onto every partition of the step
(dagster-io/dagster#34013).  So a step reports its data version itself when it
covers one partition (or none), and over several partitions it follows the
materialisations Dagster records with one more per partition: the same
metadata and provenance (code version, inputs' versions and events), and that
partition's own data version.  Dagster's staleness reads a partition's latest
materialisation, so it sees the marker's version: a partition re-materialised
with the same output keeps its version, and its dependents stay up to date.
"""

from __future__ import annotations

from typing import Iterator, Mapping, Protocol

import dagster as dg

from dbprune_assets.core.store.layout import UNPARTITIONED, Layout
from dbprune_assets.core.store.state import combine_versions, read_state

#: the tags of an asset materialisation that carry its data version (Dagster's own
#: names; ``test_dagster_private`` checks them against Dagster's constants)
DATA_VERSION_TAG = "dagster/data_version"
DATA_VERSION_IS_USER_PROVIDED_TAG = "dagster/data_version_is_user_provided"


class Session(Protocol):
    """What this module reads of a step's ``defs.common.Session``."""

    layout: Layout

    def shards_of(self, key: str) -> list[str]: ...


def with_data_version(tags: dict[str, str], version: str) -> dict[str, str]:
    """``tags`` of an asset materialisation (its provenance: code version,
    inputs' data versions and events) with its data version set to
    ``version``, given by the asset rather than derived by Dagster."""
    return {**tags, DATA_VERSION_TAG: version, DATA_VERSION_IS_USER_PROVIDED_TAG: "true"}

#: partitions per query when reading back the step's materialisations
_QUERY_CHUNK = 500


def marker_version(s: "Session", asset: str, key: str) -> str | None:
    """The data version of partition ``key`` of ``asset`` as the commit markers
    hold it: a shard's or a strategy's own, a shard group's combined over its
    shards; None without any marker."""
    shards = s.shards_of(key) if key != UNPARTITIONED else [key]
    versions = {sh: (st.data_version if (st := read_state(s.layout, asset, sh)) else None) for sh in shards}
    if shards == [key]:
        return versions[key]
    return combine_versions(versions) if any(versions.values()) else None


def reported(context: dg.AssetExecutionContext, s: "Session", asset: str, result: dg.MaterializeResult,
             partitioned: bool) -> Iterator[dg.MaterializeResult | dg.AssetMaterialization]:
    """A stage's ``result``, and what makes Dagster record the markers' data
    versions (see the module docstring): the events the step yields."""
    keys = list(context.partition_keys) if partitioned else [UNPARTITIONED]
    versions = {k: marker_version(s, asset, k) for k in keys}
    if len(keys) == 1:
        yield with_version(result, versions[keys[0]])
        return
    yield result  # Dagster records it now, one materialisation per partition
    yield from per_partition(context, versions)


def with_version(result: dg.MaterializeResult, version: str | None) -> dg.MaterializeResult:
    """``result`` reporting data version ``version`` (unless it reports one already)."""
    if version is None or result.data_version is not None:
        return result
    return dg.MaterializeResult(asset_key=result.asset_key, metadata=result.metadata,
                                check_results=result.check_results, data_version=dg.DataVersion(version),
                                tags=result.tags, value=result.value)


def per_partition(context: dg.AssetExecutionContext,
                  versions: Mapping[str, str | None]) -> Iterator[dg.AssetMaterialization]:
    """For each partition of ``versions`` (key -> the marker's data version),
    the materialisation this step's run just recorded for it, again, with that
    version: its latest, so the one Dagster's staleness reads."""
    keys = [k for k, v in versions.items() if v is not None]
    for i in range(0, len(keys), _QUERY_CHUNK):
        chunk = keys[i:i + _QUERY_CHUNK]
        records = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=context.asset_key, asset_partitions=chunk), limit=len(chunk)).records
        for record in sorted(records, key=lambda r: r.storage_id):
            mat = record.asset_materialization
            if record.run_id != context.run_id or mat is None or mat.partition not in versions:
                continue
            yield dg.AssetMaterialization(asset_key=mat.asset_key, partition=mat.partition,
                                          description=mat.description, metadata=mat.metadata,
                                          tags=with_data_version(dict(mat.tags or {}), str(versions[mat.partition])))
