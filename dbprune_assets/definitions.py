"""The Dagster code location: ``dagster dev -m dbprune_assets.definitions``
(or ``dbprune ui``).  Importing it is cheap: torch, open_clip and faiss are
imported inside the assets that use them.

Every asset of the ``defs`` package is in it, found by Dagster's own loader:
adding an asset is writing it in a ``defs`` module (``@stage(...)``, with its
:class:`~dbprune_assets.defs.common.Facts`), and no list elsewhere names it."""

from __future__ import annotations

from functools import cache

import dagster as dg

from dbprune_assets import defs as defs_package
from dbprune_assets.defs.automation import automation_sensor, with_automation
from dbprune_assets.defs.common import DbpruneResource, Node, graph_nodes
from dbprune_assets.defs.ingest import pool_shards_sensor

#: every asset, those the automation carries with its condition (``defs/automation.py``)
ASSETS = with_automation(dg.load_assets_from_package_module(defs_package))


def build_defs(dbprune: DbpruneResource | None = None) -> dg.Definitions:
    """The definitions, with the resource bound to a given home (``dbprune run``
    binds the home it works on; the code location reads the environment)."""
    return dg.Definitions(
        assets=ASSETS,
        sensors=[pool_shards_sensor, automation_sensor],
        resources={"dbprune": dbprune or DbpruneResource()},
    )


defs = build_defs()


@cache
def asset_nodes() -> dict[str, Node]:
    """Every asset as dbprune sees it (parents, partitioning, settings, facts),
    in topological order: what the runner, the cluster's queues and the report
    derive their lists from."""
    return graph_nodes(defs.resolve_asset_graph())
