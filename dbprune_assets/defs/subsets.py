"""``pruned_subset``: one decision per sample per strategy, and the export that
open_clip_train reads (DESIGN.md, Strategies)."""


import dagster as dg
import numpy as np

from ..core.atomic import write_parquet
from ..core.settings import PipelineSettings
from .common import GRAPH, DbpruneResource, strategy_partitions
from .dbp import cluster_complexity
from .dedup import candidates, semantic_dedup
from .ingest import pool_manifest
from .ui import image_md, md_table, png_bytes


def quotas_for(strategy: str, layout, settings: PipelineSettings) -> tuple[np.ndarray | None, int | None]:
    """(quotas, M) of a strategy from the clusters table (dbp: as solved there;
    ssp: the same solve with P_j = 1/k)."""
    import polars as pl

    from ..core import dbp

    clusters = pl.read_parquet(layout.table("clusters")).sort("cluster")
    M = int(clusters["quota"].sum())
    if strategy == "dbp":
        return clusters["quota"].to_numpy().astype(np.int64), M
    if strategy == "ssp":
        sizes = clusters["size"].to_numpy().astype(np.int64)
        P = dbp.ssp_probabilities(len(sizes))
        return dbp.solve_quotas(P, sizes, M, clusters["lower_bound"].to_numpy().astype(np.int64)), M
    return None, M


def _reason_plot(rows: list[dict]) -> bytes:
    reasons = ["kept", "pruned", "low_clip_score", "duplicate", "corrupt"]
    colors = ["tab:green", "tab:gray", "tab:orange", "tab:purple", "tab:red"]

    def draw(fig):
        ax = fig.add_subplot(111)
        left = np.zeros(len(rows))
        for r, c in zip(reasons, colors):
            vals = np.array([row.get(f"reason_{r}", 0) for row in rows], dtype=float)
            ax.barh([row["strategy"] for row in rows], vals, left=left, color=c, label=r)
            left += vals
        ax.set_xlabel("samples")
        ax.legend(loc="lower right", fontsize=8)

    return png_bytes(draw, (7, 0.5 + 0.5 * len(rows) + 1))


@dg.asset(
    partitions_def=strategy_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    deps=[pool_manifest, cluster_complexity, candidates, semantic_dedup],
    group_name="subsets",
    kinds={"duckdb", "webdataset"},
    code_version=GRAPH["pruned_subset"].code,
    check_specs=[
        dg.AssetCheckSpec("one_decision_per_sample", asset="pruned_subset",
                          description="every samples row has exactly one decision per strategy"),
        dg.AssetCheckSpec("kept_equals_quota", asset="pruned_subset",
                          description="dbp/ssp: kept per cluster equals its quota; the total equals M"),
        dg.AssetCheckSpec("export_matches_decisions", asset="pruned_subset",
                          description="the exported tars hold exactly the kept samples; sizes.json agrees"),
    ],
    description="A decision (keep, reason) for every sample under the strategy: dbp, ssp, random, clip_score, "
                "semdedup or full. Writes tables/decisions/<strategy>.parquet (and tables/quotas/<strategy> for "
                "dbp/ssp) and exports the kept samples' original bytes to subsets/<strategy>/ (equal shuffled "
                "tars + sizes.json + uids.npy) for open_clip_train.",
)
def pruned_subset(context: dg.AssetExecutionContext, dbprune: DbpruneResource) -> dg.MaterializeResult:
    import duckdb

    from ..core.export import export_subset, verify_export
    from ..core.strategies import decide

    s = dbprune.session(context)
    rows = []
    checks = {"one": [], "quota": [], "export": []}
    for strategy in context.partition_keys:
        quotas, M = quotas_for(strategy, s.layout, s.settings)
        out = s.layout.table("decisions", strategy)
        summary = decide(strategy, s.layout.home / "tables", M, quotas, s.settings.selection.seed, out, s.layout.tmp,
                         threads=s.settings.compute.threads or None)
        if quotas is not None:
            write_parquet(s.layout.table("quotas", strategy), summary.quota_table(), s.layout.tmp)
            if not np.array_equal(summary.per_cluster_kept, quotas):
                bad = np.flatnonzero(summary.per_cluster_kept != quotas)
                checks["quota"].append(f"{strategy}: clusters {bad[:10].tolist()} kept != quota")
        exp = export_subset(out, s.layout.pool, s.layout.subset_dir(strategy), s.settings.export.shard_size,
                            s.settings.export.seed, s.layout.tmp)
        problems = verify_export(s.layout.subset_dir(strategy), out, tmp_root=s.layout.tmp)
        checks["export"] += [f"{strategy}: {p}" for p in problems]
        con = duckdb.connect()
        n_samples, n_dec, n_distinct = con.execute(
            f"SELECT (SELECT count(*) FROM read_parquet('{s.layout.table_dir('samples')}/*.parquet')), "
            f"count(*), count(DISTINCT (shard, uid)) FROM read_parquet('{out}')").fetchone()
        con.close()
        if not (n_samples == n_dec == n_distinct):
            checks["one"].append(f"{strategy}: {n_samples} samples, {n_dec} decisions, {n_distinct} distinct")
        meta = summary.metadata()
        s.commit("pruned_subset", strategy, {**meta, "export_shards": exp.shards, "exported": exp.samples})
        rows.append({**meta, "export_shards": exp.shards})
        context.log.info(f"{strategy}: kept {summary.kept} of {summary.rows}; exported {exp.samples} in {exp.shards} tars")
    s.refresh_catalog("decisions", "quotas")
    table = [{k: r[k] for k in ("strategy", "kept", "eligible", "M", "reason_kept", "reason_pruned",
                                "reason_low_clip_score", "reason_duplicate", "reason_corrupt", "export_shards")
              if k in r} for r in rows]
    return dg.MaterializeResult(
        metadata={
            "strategies": dg.MetadataValue.md(md_table(table)),
            "reasons": image_md(_reason_plot(rows), "decisions by reason",
                                s.layout.artefact_dir("pruned_subset") / f"reasons-{'-'.join(context.partition_keys)}.png",
                                s.layout.tmp),
            "subsets": dg.MetadataValue.path(str(s.layout.home / "subsets")),
            "seconds": s.elapsed(),
        },
        check_results=[
            dg.AssetCheckResult(check_name="one_decision_per_sample", passed=not checks["one"],
                                metadata={"problems": dg.MetadataValue.json(checks["one"][:20])}),
            dg.AssetCheckResult(check_name="kept_equals_quota", passed=not checks["quota"],
                                metadata={"problems": dg.MetadataValue.json(checks["quota"][:20])}),
            dg.AssetCheckResult(check_name="export_matches_decisions", passed=not checks["export"],
                                metadata={"problems": dg.MetadataValue.json(checks["export"][:20])}),
        ],
    )
