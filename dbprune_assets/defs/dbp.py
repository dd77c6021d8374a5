"""Density-Based Pruning: ``centroids``, ``cluster_assignments``,
``cluster_complexity`` (DESIGN.md, method step 3).  The formulas live in
``core/dbp.py``; this module only moves data and shows it."""


import dagster as dg
import numpy as np

from ..core.atomic import write_parquet
from .common import GRAPH, DbpruneResource, shard_partitions
from .common import use_gpu
from .dedup import ALL_SHARDS, candidates, fit_centroids, read_centroids, shard_embeddings
from .ingest import pool_manifest
from .ui import image_grid, image_md, md_table, png_bytes


@dg.asset(
    deps=[pool_manifest, candidates],
    group_name="dbp",
    kinds={"faiss", "parquet"},
    code_version=GRAPH["centroids"].code,
    description="DBP's spherical faiss k-means (dbp.k clusters, dbp.niter iterations) on a bounded uniform "
                "sample of the candidates' image embeddings. Writes tables/centroids/all.parquet.",
)
def centroids(context: dg.AssetExecutionContext, dbprune: DbpruneResource) -> dg.MaterializeResult:
    s = dbprune.session(context)
    cfg = s.settings.dbp
    return fit_centroids(s, "centroids", "candidates", cfg.k, cfg.niter, cfg.sample_size, cfg.seed,
                         "candidate image embeddings")


@dg.asset(
    partitions_def=shard_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    deps=[centroids, candidates],
    group_name="dbp",
    kinds={"faiss", "parquet"},
    code_version=GRAPH["cluster_assignments"].code,
    description="Nearest DBP centroid and cosine distance of each candidate, plus per-cluster partial sums "
                "(count, sum of distances) for d_intra. Writes tables/assignments/<shard>.parquet and "
                "tables/cluster_sums/<shard>.parquet.",
)
def cluster_assignments(context: dg.AssetExecutionContext, dbprune: DbpruneResource) -> dg.MaterializeResult:
    import polars as pl

    from ..core.dbp import cluster_partial_sums
    from ..core.kmeans import nearest_centroid

    s = dbprune.session(context)
    cent = read_centroids(s.layout, "centroids")
    k = len(cent)
    total = 0
    for shard in context.partition_keys:
        _, emb = shard_embeddings(s.layout, shard)
        cand = pl.read_parquet(s.layout.table("candidates", shard))
        rows = cand["emb_row"].to_numpy().astype(np.int64)
        x = np.asarray(emb[rows]) if len(rows) else np.zeros((0, cent.shape[1]), np.float16)
        if len(rows):
            cluster, dist = nearest_centroid(x, cent, use_gpu=use_gpu(s.settings.compute.device),
                                             threads=s.settings.compute.threads, what=f"shard {shard} candidates",
                                             uids=cand["uid"].to_numpy())
        else:
            cluster, dist = np.zeros(0, np.int32), np.zeros(0, np.float32)
        frame = pl.DataFrame({"uid": cand["uid"], "shard": cand["shard"], "row": cand["row"].cast(pl.Int32),
                              "cluster": cluster.astype(np.int32), "distance": dist.astype(np.float32)},
                             schema={"uid": pl.Utf8, "shard": pl.Utf8, "row": pl.Int32, "cluster": pl.Int32,
                                     "distance": pl.Float32})
        count, sums = cluster_partial_sums(cluster, dist, k)
        partial = pl.DataFrame({"cluster": np.arange(k, dtype=np.int32), "count": count.astype(np.int64),
                                "sum_distance": sums.astype(np.float64)})
        write_parquet(s.layout.table("assignments", shard), frame, s.layout.tmp)
        write_parquet(s.layout.table("cluster_sums", shard), partial, s.layout.tmp)
        s.commit("cluster_assignments", shard, {"rows": frame.height})
        total += frame.height
    s.refresh_catalog("assignments")
    return dg.MaterializeResult(metadata={"candidates": total, "shards": len(context.partition_keys),
                                          "seconds": s.elapsed()})


def _figure2(sizes, d_intra, d_inter, complexity, quota, prob) -> dict[str, bytes]:
    """The plots a person needs to judge the clustering and the quotas."""
    order = np.argsort(-complexity)

    def sizes_plot(fig):
        ax1, ax2 = fig.add_subplot(121), fig.add_subplot(122)
        ax1.hist(sizes, bins=min(40, max(5, len(sizes) // 2)))
        ax1.set_xlabel("cluster size")
        ax1.set_ylabel("clusters")
        ax2.hist(complexity[np.isfinite(complexity)], bins=min(40, max(5, len(sizes) // 2)), color="tab:orange")
        ax2.set_xlabel("complexity C = d_inter · d_intra")

    def quota_plot(fig):
        ax = fig.add_subplot(111)
        sc = ax.scatter(sizes, quota, c=complexity, cmap="viridis", s=18)
        lim = max(1, sizes.max() if len(sizes) else 1)
        ax.plot([0, lim], [0, lim], "k--", lw=0.7, label="keep all")
        ax.set_xlabel("cluster size |C_j|")
        ax.set_ylabel("quota N_j")
        ax.legend(loc="upper left")
        fig.colorbar(sc, ax=ax, label="complexity")

    def fig2(fig):
        ax = fig.add_subplot(111)
        sc = ax.scatter(d_intra, d_inter, c=prob, cmap="magma", s=18)
        ax.set_xlabel("d_intra (mean distance to centroid)")
        ax.set_ylabel("d_inter (mean distance to l nearest centroids)")
        ax.set_title("clusters (the paper's Figure 2); colour = keep probability")
        fig.colorbar(sc, ax=ax, label="P_j")

    def complexity_rank(fig):
        ax = fig.add_subplot(111)
        ax.bar(np.arange(len(order)), (quota / np.maximum(sizes, 1))[order], width=1.0)
        ax.set_xlabel("cluster, most complex first")
        ax.set_ylabel("kept fraction N_j / |C_j|")

    return {
        "size_complexity_distributions": png_bytes(sizes_plot, (8, 3)),
        "quota_vs_size": png_bytes(quota_plot, (6, 4)),
        "d_intra_vs_d_inter": png_bytes(fig2, (6, 4.5)),
        "kept_fraction_by_complexity": png_bytes(complexity_rank, (7, 3)),
    }


def _cluster_examples(layout, clusters: list[int], per_cluster: int = 8) -> list[tuple[int, list[bytes]]]:
    """Up to ``per_cluster`` images of each cluster (nearest to the centroid first)."""
    import duckdb

    from ..core.shards import iter_shard_images

    if not clusters:
        return []
    glob = str(layout.table_dir("assignments") / "*.parquet")
    ids = ",".join(str(int(c)) for c in clusters)
    con = duckdb.connect()
    try:
        rows = con.execute(
            f"""SELECT cluster, a.shard, s.key FROM (
                    SELECT *, row_number() OVER (PARTITION BY cluster ORDER BY distance, uid) AS r
                    FROM read_parquet('{glob}') WHERE cluster IN ({ids})) a
                JOIN read_parquet('{layout.table_dir("samples")}/*.parquet') s USING (uid)
                WHERE r <= {per_cluster}"""
        ).fetchall()
    finally:
        con.close()
    wanted: dict[str, set[str]] = {}
    for _, shard, key in rows:
        wanted.setdefault(shard, set()).add(key)
    images: dict[str, bytes] = {}
    for shard, keys in wanted.items():
        for key, data in iter_shard_images(layout.shard_tar(shard), keys):
            images[key] = data
    out = []
    for c in clusters:
        keys = [key for cc, _, key in rows if cc == c]
        out.append((c, [images[k] for k in sorted(keys) if k in images]))
    return out


@dg.asset(
    deps=[pool_manifest, centroids, dg.AssetDep(cluster_assignments, partition_mapping=ALL_SHARDS)],
    group_name="dbp",
    kinds={"python", "parquet"},
    code_version=GRAPH["cluster_complexity"].code,
    check_specs=[
        dg.AssetCheckSpec("quotas_sum_to_M", asset="cluster_complexity", description="Σ N_j = M exactly"),
        dg.AssetCheckSpec("quota_bounds_hold", asset="cluster_complexity", description="lb_j ≤ N_j ≤ |C_j| for every cluster"),
    ],
    description="Per DBP cluster: size, d_intra (mean 1 - x·c_j over members, from per-shard partial sums), "
                "d_inter (mean 1 - c_j·c_m over the l nearest other centroids), complexity C = d_inter·d_intra, "
                "P = softmax(C/tau), and the exact integer quota N_j. Writes tables/clusters/all.parquet.",
)
def cluster_complexity(context: dg.AssetExecutionContext, dbprune: DbpruneResource) -> dg.MaterializeResult:
    import polars as pl

    from ..core import dbp

    s = dbprune.session(context)
    cfg = s.settings.dbp
    cent = read_centroids(s.layout, "centroids")
    k = len(cent)
    count = np.zeros(k, np.int64)
    sums = np.zeros(k, np.float64)
    for shard in s.shards:
        part = pl.read_parquet(s.layout.table("cluster_sums", shard)).sort("cluster")
        if part.height != k:
            raise dg.Failure(f"shard {shard}: cluster_sums has {part.height} clusters, centroids {k}; "
                             "re-materialise cluster_assignments for it")
        count += part["count"].to_numpy()
        sums += part["sum_distance"].to_numpy()
    n = int(count.sum())
    intra = dbp.d_intra(sums, count)
    inter = dbp.d_inter(cent, cfg.l)
    comp = dbp.complexity(inter, intra)
    prob = dbp.softmax_probabilities(comp, cfg.tau)
    M = dbp.target_size(n, keep_fraction=cfg.keep_fraction, target_size=cfg.target_size)
    lb = dbp.lower_bounds(count, M, k, cfg.r)
    quota = dbp.solve_quotas(prob, count, M, lb)
    frame = pl.DataFrame({
        "cluster": np.arange(k, dtype=np.int32), "size": count, "d_intra": intra, "d_inter": inter,
        "complexity": comp, "probability": prob, "quota": quota.astype(np.int64), "lower_bound": lb.astype(np.int64),
    })
    write_parquet(s.layout.table("clusters"), frame, s.layout.tmp)
    s.refresh_catalog("clusters")

    plots = _figure2(count.astype(float), intra, inter, comp, quota.astype(float), prob)
    art = s.layout.artefact_dir("cluster_complexity")
    metadata: dict[str, object] = {
        "k": k, "candidates": n, "M": M, "tau": cfg.tau, "l": min(cfg.l, max(k - 1, 0)),
        "empty_clusters": int((count == 0).sum()),
        "clusters_at_cap": int((quota == count).sum()), "clusters_at_lower_bound": int(((quota == lb) & (lb < count)).sum()),
    }
    for name, png in plots.items():
        metadata[name] = image_md(png, name.replace("_", " "), art / f"{name}.png", s.layout.tmp)
    order = np.argsort(-comp, kind="stable")
    top = [int(c) for c in order[:4] if count[c] > 0]
    bottom = [int(c) for c in order[::-1][:4] if count[c] > 0]
    try:
        examples = _cluster_examples(s.layout, top + bottom)
        grid = image_grid([(f"#{c} C={comp[c]:.3f} n={count[c]}", imgs) for c, imgs in examples])
        metadata["most_and_least_complex_clusters"] = image_md(
            grid, "most complex (top 4 rows) and least complex (bottom 4 rows) clusters", art / "examples.png",
            s.layout.tmp)
    except Exception as err:  # pictures are a courtesy; never fail the asset over them
        context.log.warning(f"could not draw example images: {err}")
    metadata["clusters"] = dg.MetadataValue.md(md_table(frame.sort("complexity", descending=True).to_dicts(), 40))
    st = s.commit("cluster_complexity", summary={"k": k, "candidates": n, "M": M})
    bad = np.flatnonzero((quota < lb) | (quota > count))
    return dg.MaterializeResult(
        data_version=dg.DataVersion(st.data_version),
        metadata=metadata,
        check_results=[
            dg.AssetCheckResult(check_name="quotas_sum_to_M", passed=bool(quota.sum() == M),
                                metadata={"sum": int(quota.sum()), "M": M}),
            dg.AssetCheckResult(check_name="quota_bounds_hold", passed=len(bad) == 0,
                                metadata={"violations": dg.MetadataValue.json([int(b) for b in bad[:20]])}),
        ],
    )
