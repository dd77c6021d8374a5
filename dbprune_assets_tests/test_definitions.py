"""The code location: loads fast without torch, and the versioning that
`dbprune run` uses to skip up-to-date partitions reads its graph from the
Dagster definitions (only the settings each asset reads sit beside it)."""

import subprocess
import sys

import dagster as dg
import pytest

from dbprune_assets.core.settings import build_settings
from dbprune_assets.defs.common import graph_nodes, partitioning_of, settings_digest


def test_versioning_reads_the_dagster_graph():
    from dbprune_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    nodes = graph_nodes(graph)
    order = list(nodes)
    assert all(order.index(p) < order.index(k) for k, n in nodes.items() for p in n.parents)  # topological
    settings = build_settings({}, profile="sample")
    for key, node in nodes.items():
        dnode = graph.get(dg.AssetKey(key))
        assert node.parents == tuple(sorted(p.to_user_string() for p in dnode.parent_keys)), key
        assert dnode.code_version is not None and node.code == dnode.code_version, key
        settings_digest(settings, node.settings)  # every declared setting exists
    assert {k for k, n in nodes.items() if n.partitioning == "shard"} == {
        "raw_metadata", "embeddings", "dedup_assignments", "cluster_assignments"}
    assert {k for k, n in nodes.items() if n.partitioning == "strategy"} == {
        "pruned_subset", "trained_model", "eval_scores"}
    # the DBP knobs are read by the DBP assets alone, so changing dbp.tau redoes
    # cluster_complexity and what follows it, never the clustering before it
    assert [k for k, n in nodes.items() if any(s == "dbp" or s.startswith("dbp.") for s in n.settings)] == [
        "centroids", "cluster_complexity"]
    assert nodes["encoder"].parents == ()  # a model, not a product of the pool


def test_unknown_partitioning_is_an_error():
    with pytest.raises(ValueError, match="unexpected partitioning"):
        partitioning_of(dg.StaticPartitionsDefinition(["a"]))


def test_code_location_does_not_import_torch():
    code = "import sys, dbprune_assets.definitions; print('torch' in sys.modules, 'faiss' in sys.modules, 'open_clip' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False False False"
