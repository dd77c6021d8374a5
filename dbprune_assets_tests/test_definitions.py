"""The code location: loads fast without torch, and its graph matches the
versioning table that `dbprune run` uses to skip up-to-date partitions."""

import subprocess
import sys

import dagster as dg

from dbprune_assets.defs.common import GRAPH


def test_graph_table_matches_dagster_graph():
    from dbprune_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys <= set(GRAPH)  # every Dagster asset is versioned
    for key in keys:
        node = graph.get(dg.AssetKey(key))
        parents = {p.to_user_string() for p in node.parent_keys}
        assert parents == set(GRAPH[key].parents), key
        expected = GRAPH[key].partitioning
        pd = node.partitions_def
        kind = None if pd is None else ("shard" if getattr(pd, "name", None) == "shards" else "strategy")
        assert kind == expected, key


def test_code_location_does_not_import_torch():
    code = "import sys, dbprune_assets.definitions; print('torch' in sys.modules, 'faiss' in sys.modules, 'open_clip' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False False False"
