"""The ``datacomp_image`` strategy: DataComp's image-based filter intersected
with the CLIP-score filter, their best baseline at medium, large and xlarge
(Gadre et al., "DataComp: In search of the next generation of multimodal
datasets", NeurIPS 2023, section 3.4 and appendix).

DataComp clusters the pool's image embeddings with k-means, finds for each
image of a target set (ImageNet-1k's training images) its nearest cluster
centre, and keeps the pool samples whose cluster is one of those; then it
intersects with the top CLIP scores.  Here:

* the clusters are SemDeDup's k-means (``dedup_centroids``: every ok sample's
  image embedding, ``semdedup.dedup_k`` clusters; DataComp used 100,000 on the
  12.8M small pool) and a sample's cluster is its ``dedup_assignments`` row;
* the targets come from :mod:`.targets` (``strategies.target_embeddings``, the
  pool's ``targets/``, or the evaluation images embedded by the encoder), each
  mapped to its nearest centroid exactly as the pool's samples are
  (``kmeans.nearest_centroid``, ties by the lowest cluster id);
* at DBP's budget M the intersection is the M dedup survivors of highest CLIP
  score among those in a target cluster (ties by uid).  When fewer than M are
  in target clusters the strategy keeps them all and says so
  (``may_fall_short``): the filter, not the budget, decides.

DataComp's English-caption pre-filter (fastText language id) is not applied:
it needs a model the pool does not bring.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from dbprune_assets.core.strategies.base import Prepared, Strategy, StrategyContext, StrategyUnavailable, scalar
from dbprune_assets.core.strategies.clip_score import keep_top, survivors_view
from dbprune_assets.core.strategies.targets import HOW, load_targets, target_source

if TYPE_CHECKING:
    from dbprune_assets.core.store.layout import Layout


def target_clusters(targets: np.ndarray, centroids: np.ndarray, threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The clusters nearest to at least one target (sorted ids, int32) and how
    many targets each is nearest to."""
    from dbprune_assets.core.method.kmeans import nearest_centroid

    if targets.shape[1] != centroids.shape[1]:
        raise ValueError(f"datacomp_image: the targets have {targets.shape[1]} dimensions but SemDeDup's centroids "
                         f"{centroids.shape[1]}; embed the targets with the pool's encoder")
    labels, _ = nearest_centroid(targets, centroids, use_gpu=False, threads=threads, what="target embeddings")
    ids, counts = np.unique(labels, return_counts=True)
    return ids.astype(np.int32), counts.astype(np.int64)


class DataCompImageStrategy(Strategy):
    """Keep the top M by CLIP score among the dedup survivors in a target cluster."""

    def unavailable(self, layout: Layout, settings: Any) -> str | None:
        try:
            found = target_source(layout, settings)
        except StrategyUnavailable as e:
            return str(e)
        return None if found is not None else f"no target images for datacomp_image: {HOW}"

    def prepare(self, ctx: StrategyContext) -> Prepared:
        import polars as pl

        from dbprune_assets.core.method.embstore import read_centroids

        targets = load_targets(ctx.layout, ctx.settings, ctx.embed_eval_images)
        centroids = read_centroids(ctx.layout, "dedup_centroids")
        ids, counts = target_clusters(targets.embeddings, centroids, ctx.threads or 0)
        path = ctx.work / "target_clusters.parquet"
        pl.DataFrame({"cluster": ids, "targets": counts}).write_parquet(path)
        note = (f"datacomp_image: {targets.source}; nearest to {len(ids)} of SemDeDup's {len(centroids)} clusters")
        return Prepared(views={"target_clusters": [path]}, notes=[note])

    def select(self, con: Any, M: int | None, quotas: np.ndarray | None, seed: int) -> int:
        assert M is not None
        survivors_view(con)
        con.execute("""CREATE TEMP VIEW on_target AS
                       SELECT v.* FROM survivors v
                       JOIN dedup_assignments a ON a.shard = v.shard AND a.row = v.row
                       SEMI JOIN target_clusters t ON t.cluster = a.cluster""")
        eligible = int(scalar(con, "SELECT count(*) FROM on_target"))
        keep_top(con, "on_target", "clip_score", min(M, eligible))
        return eligible


DATACOMP_IMAGE = DataCompImageStrategy(
    "datacomp_image", "DataComp's image-based filter ∩ CLIP score: the M dedup survivors of highest CLIP score whose "
                      "image cluster is the nearest to a target image",
    needs=("candidates", "duplicates", "scores", "dedup_assignments"), sized=True, may_fall_short=True,
    reference="Gadre et al., DataComp: In search of the next generation of multimodal datasets, NeurIPS 2023")
