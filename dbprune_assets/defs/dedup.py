"""SemDeDup and the CLIP-score filter: ``dedup_centroids``, ``dedup_assignments``,
``semantic_dedup``, ``candidates`` (docs/design.md, method steps 1 and 2).
The work is in ``core/method/embstore.py``, ``core/method/stages.py`` and
``core/method/candidates.py``; the centroid and assignment assets of both clusterings
are made by ``defs/clustering.py``."""


from typing import Sequence

import dagster as dg

from dbprune_assets.core.method import stages
from dbprune_assets.core.method.candidates import select_candidates
from dbprune_assets.core.pool.poolkind import NO_EXAMPLES, is_metadata_only
from dbprune_assets.core.running.device import torch_device
from dbprune_assets.defs.clustering import assign_asset, drift_check_spec, fit_asset, fit_inputs
from dbprune_assets.defs.common import ALL_PARTITIONS, Facts, Session, shard_partitions, stage
from dbprune_assets.defs.plots import artefact_md, duplicate_pairs_png, histogram_png, table



def draw_pairs(context: dg.AssetExecutionContext, s: Session, examples: Sequence[tuple[str, str, str, str]],
               metadata: dict[str, object]) -> None:
    """The example pairs' picture, when the tars can be read: pictures are a
    courtesy, so the asset never fails over them (a warning says why)."""
    try:
        grid = duplicate_pairs_png(s.layout, examples)
        if grid:
            metadata["example_pairs"] = artefact_md(s.layout, "semantic_dedup", "pairs", grid,
                                                    "removed duplicate (left) and the member it duplicates")
    except Exception as err:
        context.log.warning(f"could not draw duplicate examples: {err}")

@stage(
    deps=["pool_manifest", dg.AssetDep("embeddings", partition_mapping=ALL_PARTITIONS)],
    group="semdedup",
    kinds={"faiss", "parquet"},
    settings=["semdedup.dedup_k", "semdedup.niter", "semdedup.sample_size", "semdedup.seed"],
    facts=Facts(fit="dedup_assignments"),
    inputs=fit_inputs("dedup_centroids"),
)
def dedup_centroids(context: dg.AssetExecutionContext, s: Session) -> dg.MaterializeResult:
    """SemDeDup's spherical k-means (semdedup.dedup_k clusters; auto: scaled to the ok samples) on a bounded
    uniform sample of the ok samples' image embeddings. Writes tables/dedup_centroids/all.parquet and the fit
    record fits/dedup_centroids.json. Once made, the fit is kept when shards are added or removed (refit: auto
    refits when the drift alarm fires; always, on every pool change; centroids_from: another home's fit)."""
    cfg = s.settings.semdedup
    return fit_asset(s, "dedup_centroids", None, cfg, cfg.dedup_k, "ok image embeddings")


@stage(group="semdedup", kinds={"faiss", "parquet"}, partitions=shard_partitions, deps=["embeddings", "dedup_centroids"],
       facts=Facts(shard_tables=("dedup_assignments",)), check_specs=[drift_check_spec("dedup_assignments")])
def dedup_assignments(context: dg.AssetExecutionContext, s: Session) -> dg.MaterializeResult:
    """Each ok sample's SemDeDup cluster and cosine distance to its centroid. Writes
    tables/dedup_assignments/<shard>.parquet."""
    return assign_asset(context, s, "dedup_assignments", "dedup_centroids", "dedup_assignments", None)


@stage(
    deps=["pool_manifest", dg.AssetDep("dedup_assignments", partition_mapping=ALL_PARTITIONS)],
    group="semdedup",
    kinds={"pytorch", "parquet"},
    settings=["semdedup.eps"],
    facts=Facts(plots=True),
)
def semantic_dedup(context: dg.AssetExecutionContext, s: Session) -> dg.MaterializeResult:
    """SemDeDup duplicates: inside each dedup cluster, members in farthest-first order; member j is a
    duplicate when max_{i<j} cos(x_i, x_j) > 1 - eps (pairwise, computed in column tiles). Writes
    tables/duplicates/all.parquet (uid, shard, duplicate_of, similarity). After shards were added or removed
    (same fit and eps), only the pairs with a new member, or a member whose target left, are scored, with the
    same result as a full pass."""
    eps = s.settings.semdedup.eps
    out = stages.run_semdedup(s.layout, s.shards, eps, s.settings.compute.tile, torch_device(s.device))
    s.refresh_catalog("duplicates")
    top = sorted(out.per_cluster.items(), key=lambda kv: -kv[1])[:15]
    metadata: dict[str, object] = {
        "duplicates": out.duplicates, "ok_samples": out.ok, "kept_fraction": out.kept_fraction, "eps": eps,
        "dedup_k": out.k,
        "pass": ("full: every cluster scored" if out.added is None else
                 f"{len(out.added)} shard(s) added and {len(out.removed or [])} removed since the last pass: only "
                 "the pairs with a new member, or a member whose target left, scored, in the clusters they change"),
        "clusters_with_most_duplicates": table([{"cluster": c, "duplicates": n} for c, n in top]),
    }
    if out.duplicates:
        metadata["similarity_histogram"] = artefact_md(s.layout, "semantic_dedup", "similarity", histogram_png(
            out.similarities, "similarity to the member it duplicates", 1 - eps, f"1 - eps = {1 - eps:.3f}"),
            "duplicate similarities")
        if is_metadata_only(s.layout.pool, s.shards):
            metadata["example_pairs"] = NO_EXAMPLES
        else:
            draw_pairs(context, s, out.examples, metadata)
    return s.done("semantic_dedup", summary={"duplicates": out.duplicates, "ok": out.ok,
                                             "added_shards": None if out.added is None else len(out.added),
                                             "removed_shards": None if out.removed is None else len(out.removed)},
                  metadata=metadata)


@stage(
    deps=["pool_manifest", dg.AssetDep("embeddings", partition_mapping=ALL_PARTITIONS), "semantic_dedup"],
    group="semdedup",
    kinds={"duckdb", "parquet"},
    settings=["clip_filter"],
    facts=Facts(plots=True, shard_tables=("candidates",)),
)
def candidates(context: dg.AssetExecutionContext, s: Session) -> dg.MaterializeResult:
    """Candidates: dedup survivors whose clip_score passes the CLIP filter (an absolute clip_filter.threshold,
    or the top clip_filter.fraction as a global quantile). Writes tables/candidates/<shard>.parquet; the
    threshold used is in the metadata."""
    cfg = s.settings.clip_filter
    res = select_candidates({sh: s.layout.emb_metadata(sh) for sh in s.shards}, [s.layout.table("duplicates")],
                            s.layout.table_dir("candidates"), s.layout.tmp, cfg.threshold, cfg.fraction,
                            threads=s.threads)
    stages.drop_left_shards(s.layout, "candidates", s.shards)
    hist = histogram_png(stages.clip_scores(s.layout, s.shards), "clip_score = cos(image, text)", res.threshold,
                         f"threshold {res.threshold:.3f}", bins=50)
    return s.done("candidates", summary={"threshold": res.threshold, "candidates": res.candidates,
                                         "survivors": res.survivors, "ok": res.ok}, metadata={
        "threshold": res.threshold, "rule": "threshold" if cfg.threshold is not None else f"top {cfg.fraction}",
        "ok_samples": res.ok, "duplicates": res.duplicates, "dedup_survivors": res.survivors,
        "candidates": res.candidates, "removed_low_clip_score": res.survivors - res.candidates,
        "clip_score_histogram": artefact_md(s.layout, "candidates", "clip_scores", hist, "clip scores"),
    })
