"""The Dagster code location: ``dagster dev -m dbprune_assets.definitions``
(or ``dbprune ui``).  Importing it is cheap: torch, open_clip and faiss are
imported inside the assets that use them."""

from __future__ import annotations

import dagster as dg

from functools import cache

from dbprune_assets.defs.common import DbpruneResource, Node, graph_nodes
from dbprune_assets.defs.dbp import centroids, cluster_assignments, cluster_complexity
from dbprune_assets.defs.dedup import candidates, dedup_assignments, dedup_centroids, semantic_dedup
from dbprune_assets.defs.embedding import embeddings, encoder
from dbprune_assets.defs.ingest import pool_manifest, pool_shards_sensor, raw_metadata
from dbprune_assets.defs.subsets import pruned_subset
from dbprune_assets.defs.training import comparison, eval_scores, trained_model

ASSETS = [
    raw_metadata, pool_manifest, encoder, embeddings,
    dedup_centroids, dedup_assignments, semantic_dedup, candidates,
    centroids, cluster_assignments, cluster_complexity,
    pruned_subset, trained_model, eval_scores, comparison,
]


def build_defs(dbprune: DbpruneResource | None = None) -> dg.Definitions:
    """The definitions, with the resource bound to a given home (``dbprune run``
    binds the home it works on; the code location reads the environment)."""
    return dg.Definitions(
        assets=ASSETS,
        sensors=[pool_shards_sensor],
        resources={"dbprune": dbprune or DbpruneResource()},
    )


defs = build_defs()


@cache
def asset_nodes() -> dict[str, Node]:
    """Every asset as dbprune sees it (parents, partitioning, settings, facts),
    in topological order: what the runner, the cluster's queues and the report
    derive their lists from."""
    return graph_nodes(defs.resolve_asset_graph())
