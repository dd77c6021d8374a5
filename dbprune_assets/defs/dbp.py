"""Density-Based Pruning: ``centroids``, ``cluster_assignments``,
``cluster_complexity`` (docs/design.md, method step 3).  The formulas live in
``core/method/dbp.py``, the pool-wide step in ``core/method/stages.py``; this module only
wires them and shows the result."""


import dagster as dg

from dbprune_assets.core.method import stages
from dbprune_assets.core.pool.poolkind import NO_EXAMPLES, is_metadata_only
from dbprune_assets.defs.common import ALL_PARTITIONS, Facts, Session, shard_partitions, stage
from dbprune_assets.defs.clustering import assign_asset, drift_check_spec, fit_asset, fit_inputs
from dbprune_assets.defs.plots import artefact_md, cluster_examples_png, cluster_pngs, table


@stage(
    deps=["pool_manifest", "candidates"],
    group="dbp",
    kinds={"faiss", "parquet"},
    settings=["dbp.k", "dbp.niter", "dbp.sample_size", "dbp.seed"],
    facts=Facts(fit="assignments"),
    inputs=fit_inputs("centroids"),
)
def centroids(context: dg.AssetExecutionContext, s: Session) -> dg.MaterializeResult:
    """DBP's spherical faiss k-means (dbp.k clusters, auto: scaled to the candidates; dbp.niter iterations) on
    a bounded uniform sample of the candidates' image embeddings. Writes tables/centroids/all.parquet and the fit
    record fits/centroids.json; kept across pool changes as dedup_centroids is (refit, centroids_from)."""
    cfg = s.settings.dbp
    return fit_asset(s, "centroids", "candidates", cfg, cfg.k, "candidate image embeddings")


@stage(group="dbp", kinds={"faiss", "parquet"}, partitions=shard_partitions, deps=["centroids", "candidates"],
       facts=Facts(shard_tables=("assignments", "cluster_sums")), check_specs=[drift_check_spec("cluster_assignments")])
def cluster_assignments(context: dg.AssetExecutionContext, s: Session) -> dg.MaterializeResult:
    """Nearest DBP centroid and cosine distance of each candidate, plus per-cluster partial sums (count, sum
    of distances) for d_intra. Writes tables/assignments/<shard>.parquet and
    tables/cluster_sums/<shard>.parquet."""
    return assign_asset(context, s, "cluster_assignments", "centroids", "assignments", "candidates", "cluster_sums")


@stage(
    deps=["pool_manifest", "centroids", dg.AssetDep("cluster_assignments", partition_mapping=ALL_PARTITIONS)],
    group="dbp",
    kinds={"python", "parquet"},
    settings=["dbp"],
    facts=Facts(plots=True),
    check_specs=[
        dg.AssetCheckSpec("quotas_sum_to_M", asset="cluster_complexity", description="Σ N_j = M exactly"),
        dg.AssetCheckSpec("quota_bounds_hold", asset="cluster_complexity", description="lb_j ≤ N_j ≤ |C_j| for every cluster"),
    ],
)
def cluster_complexity(context: dg.AssetExecutionContext, s: Session) -> dg.MaterializeResult:
    """Per DBP cluster: size, d_intra (mean 1 - x·c_j over members, from per-shard partial sums), d_inter
    (mean 1 - c_j·c_m over the l nearest other centroids), complexity C = d_inter·d_intra, P = softmax(C/tau),
    and the exact integer quota N_j. Writes tables/clusters/all.parquet."""
    out = stages.cluster_complexity(s.layout, s.shards, s.settings.dbp)
    s.refresh_catalog("clusters")
    metadata: dict[str, object] = {"k": out.k, "candidates": out.candidates, "M": out.M, "tau": s.settings.dbp.tau,
                                   "l": out.l, **out.counts()}
    for name, png in cluster_pngs(out.frame).items():
        metadata[name] = artefact_md(s.layout, "cluster_complexity", name, png, name.replace("_", " "))
    if is_metadata_only(s.layout.pool, s.shards):
        metadata["most_and_least_complex_clusters"] = NO_EXAMPLES
    else:
        try:  # pictures are a courtesy; never fail the asset over them
            metadata["most_and_least_complex_clusters"] = artefact_md(
                s.layout, "cluster_complexity", "examples", cluster_examples_png(s.layout, out),
                "most complex (top rows) and least complex (bottom rows) clusters")
        except Exception as err:
            context.log.warning(f"could not draw example images: {err}")
    metadata["clusters"] = table(out.frame.sort("complexity", descending=True).to_dicts(), 40)
    quota_sum, bad = int(out.column("quota").sum()), out.bound_violations()
    return s.done("cluster_complexity", summary={"k": out.k, "candidates": out.candidates, "M": out.M},
                  metadata=metadata, checks={
                      "quotas_sum_to_M": (quota_sum == out.M, {"sum": quota_sum, "M": out.M}),
                      "quota_bounds_hold": (not bad, {"violations": dg.MetadataValue.json(bad[:20])}),
                  })

