"""Shards processed as they land: Dagster's declarative automation carries a
shard the pool sensor registered through to new decisions and exports.

* :func:`on_new_data`, the condition of every automated asset (set by
  :func:`with_automation` when the definitions are built): request it when
  its parent in the chain (:data:`TRIGGERS`) was updated since it was last
  requested or updated, once no parent is missing or being materialised.
  ``embeddings`` thus runs for a new shard as soon as the pool sensor has
  ingested it; ``dedup_centroids``, the head of the pool-wide chain, waits until
  every shard of the pool is embedded, so a burst of shards dropped together
  causes one pool-wide pass, each step after its parent.  It does not react to
  what is merely missing: on a home that ``dbprune run`` has never run,
  nothing starts.
* :data:`automation_sensor` evaluates it for :data:`AUTOMATED`: ``pruned_subset``
  and the assets upstream of it, less ``raw_metadata`` and ``pool_manifest``
  (the pool sensor's) and ``encoder``; training and evaluation stay manual.
  It runs under the Dagster daemon (``dbprune ui`` or ``dbprune daemon``) and
  is on by default; turn it off and on in the UI (Automation) or with
  ``dagster sensor stop|start dbprune_automation``.
"""

from __future__ import annotations

import os
from typing import Sequence

import dagster as dg

#: the sensor's name (``dagster sensor stop dbprune_automation``)
SENSOR = "dbprune_automation"
#: seconds between two evaluations of either sensor (``DBPRUNE_SENSOR_INTERVAL_S``: tests shorten it)
INTERVAL_S = int(os.environ.get("DBPRUNE_SENSOR_INTERVAL_S", "30"))

#: what requests each automated asset: the parents whose *update* does, then
#: those whose *new data version* does.  The pool-wide steps make one ordered
#: chain, so that a burst of shards makes one pass and no step runs ahead of a
#: parent about to change (Dagster's ``eager`` reacts to any parent: it would
#: run ``pruned_subset``, a child of ``pool_manifest``, as soon as the manifest
#: changes, before the new candidates exist, and again after).  A new shard's
#: ``dedup_assignments`` runs with its ``embeddings`` against the SemDeDup fit
#: in force; every shard's only when the fit changes (a refit), not when it is
#: kept and merely committed again.  ``pool_manifest`` starts the pass for
#: shards that left.
TRIGGERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "embeddings": (("raw_metadata",), ()),
    "dedup_assignments": (("embeddings",), ("dedup_centroids",)),
    "dedup_centroids": (("embeddings", "pool_manifest"), ()),
    "semantic_dedup": (("dedup_assignments", "pool_manifest"), ()),
    "candidates": (("semantic_dedup",), ()),
    "centroids": (("candidates",), ()),
    "cluster_assignments": (("centroids",), ()),
    "cluster_complexity": (("cluster_assignments",), ()),
    "pruned_subset": (("cluster_complexity",), ()),
}


def on_new_data(asset: str) -> dg.AutomationCondition:
    """Requested when one of its :data:`TRIGGERS` fired since it was last
    requested or updated, once no parent at all is missing or being
    materialised (nor the asset itself)."""
    updated, versioned = TRIGGERS[asset]
    trigger = dg.AutomationCondition.any_deps_updated().allow(dg.AssetSelection.assets(*updated))
    if versioned:
        trigger = trigger | dg.AutomationCondition.any_deps_match(
            dg.AutomationCondition.data_version_changed()).allow(dg.AssetSelection.assets(*versioned))
    label = " or ".join([*updated, *(f"{p}'s data version" for p in versioned)])
    return (
        trigger.since_last_handled()
        & ~dg.AutomationCondition.any_deps_missing()
        & ~dg.AutomationCondition.any_deps_in_progress()
        & ~dg.AutomationCondition.in_progress()
    ).with_label(f"{label} changed")


#: what the automation carries a new shard through
AUTOMATED = (dg.AssetSelection.assets("pruned_subset").upstream()
             - dg.AssetSelection.assets("raw_metadata", "pool_manifest", "encoder"))



def with_automation(assets: Sequence[dg.AssetsDefinition]) -> list[dg.AssetsDefinition]:
    """``assets`` with :func:`on_new_data` as the automation condition of those in :data:`AUTOMATED`."""
    keys = AUTOMATED.resolve(assets)
    return [a.map_asset_specs(lambda spec: spec.replace_attributes(
        automation_condition=on_new_data(spec.key.to_user_string())) if spec.key in keys else spec) for a in assets]


automation_sensor = dg.AutomationConditionSensorDefinition(
    SENSOR,
    target=AUTOMATED,
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=INTERVAL_S,
    # backfills (the default): a request over many shards is one run per range (single-run backfill policy);
    # as runs, it would be one run per shard.  The price: the backfill daemon wakes every 30 s
    emit_backfills=True,
    description="Carries shards the pool sensor registered (or dropped) through embeddings, both clusterings, "
                "the CLIP filter, complexity and every strategy's decisions and export, once no upstream "
                "partition is missing or in progress (one pool-wide pass per burst of shards). Training and "
                "evaluation stay manual.",
)
