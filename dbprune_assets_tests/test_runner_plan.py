"""The run planner: groups by partitioning in dependency order; ranges."""

from dbprune_assets.runner import contiguous_ranges, ingest_first, plan_groups


def test_groups_follow_the_graph():
    from dbprune_assets.definitions import asset_nodes

    nodes = asset_nodes()
    keys = ingest_first(list(nodes), nodes)  # as dbprune run orders them
    groups = plan_groups(keys, {k: set(nodes[k].parents) for k in keys}, {k: nodes[k].partitioning for k in keys})
    assert groups == [
        ["raw_metadata"],
        ["pool_manifest", "encoder"],
        ["embeddings"],
        ["dedup_centroids"],
        ["dedup_assignments"],
        ["semantic_dedup", "candidates", "centroids"],
        ["cluster_assignments"],
        ["cluster_complexity"],
        ["pruned_subset", "trained_model", "eval_scores"],
        ["comparison"],
    ]


def test_contiguous_ranges():
    keys = ["a", "b", "c", "d", "e"]
    assert contiguous_ranges(keys, ["a", "b", "d"]) == [("a", "b"), ("d", "d")]
    assert contiguous_ranges(keys, keys) == [("a", "e")]
    assert contiguous_ranges(keys, []) == []
    assert contiguous_ranges(keys, ["e", "c"]) == [("c", "c"), ("e", "e")]
