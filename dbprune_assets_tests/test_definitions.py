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


def test_an_assets_facts_are_declared_on_it_and_every_list_derives_from_them():
    """Adding an asset is writing it: the runner's ingest-first order, the
    images-only stages, the GPU queue, the report's plots, the tables a removed
    shard loses and the extra fingerprint inputs come from its @stage(...)."""
    from dbprune_assets.definitions import ASSETS, asset_nodes
    from dbprune_assets.defs.common import (_EXTRA_INPUTS, DbpruneResource, Facts, Session, shard_partitions, stage,
                                            with_fact)
    from dbprune_assets.defs.ingest import shard_tables
    from dbprune_assets.runner import ingest_first

    nodes = asset_nodes()
    assert with_fact(nodes, "gpu") == ["encoder", "embeddings", "trained_model", "eval_scores"]
    assert with_fact(nodes, "needs_images") == ["trained_model", "eval_scores", "comparison"]
    assert with_fact(nodes, "ingest") == ["raw_metadata", "pool_manifest"]
    assert with_fact(nodes, "plots") == ["encoder", "semantic_dedup", "candidates", "cluster_complexity",
                                         "pruned_subset", "trained_model", "comparison"]
    assert shard_tables(nodes) == ["samples", "problems", "scores", "dedup_assignments", "candidates",
                                   "assignments", "cluster_sums"]
    assert ingest_first(list(nodes), nodes)[:2] == ["raw_metadata", "pool_manifest"]

    @stage(group="toy", kinds={"python"}, partitions=shard_partitions, deps=["embeddings"],
           facts=Facts(gpu=True, plots=True, shard_tables=("toy_rows",)),
           inputs=lambda versions, shard: {"toy_file": shard})
    def toy_scores(context: dg.AssetExecutionContext, s: Session) -> dg.MaterializeResult:
        """A toy per-shard asset."""
        return dg.MaterializeResult()

    try:
        grown = graph_nodes(dg.Definitions(assets=[*ASSETS, toy_scores],
                                           resources={"dbprune": DbpruneResource()}).resolve_asset_graph())
        assert grown["toy_scores"].parents == ("embeddings",) and grown["toy_scores"].partitioning == "shard"
        assert "toy_scores" in with_fact(grown, "gpu") and "toy_scores" in with_fact(grown, "plots")
        assert "toy_rows" in shard_tables(grown)
        assert toy_scores.op.pools == {"dbprune_gpu"}  # gpu=True also puts it in Dagster's GPU pool
        assert _EXTRA_INPUTS["toy_scores"](None, "00001") == {"toy_file": "00001"}
    finally:
        _EXTRA_INPUTS.pop("toy_scores", None)
