"""The centroid and assignment steps both clusterings share (SemDeDup's
``dedup_centroids``/``dedup_assignments`` and DBP's ``centroids``/
``cluster_assignments``): a k-means on the bounded sample, then each shard's
nearest centroid.  The work is in ``core/method/embstore.py``."""

import dagster as dg

from dbprune_assets.core.method import embstore
from dbprune_assets.core.running.device import kmeans_backend
from dbprune_assets.core.settings import DbpSettings, SemDedupSettings
from dbprune_assets.defs.common import Session


def fit_asset(s: Session, asset: str, selection: str | None, cfg: SemDedupSettings | DbpSettings, k: int | str,
              what: str) -> dg.MaterializeResult:
    """Fit and commit a centroid asset (:func:`~..core.method.embstore.fit_centroids`) with
    the section's ``niter``, ``sample_size`` and ``seed``; ``k`` is the setting
    (a number or ``auto``), resolved for the rows by ``cfg.clusters``.  The
    resolved k is in the metadata and the commit summary, beside the setting."""
    fit = embstore.fit_centroids(s.layout, s.shards, asset, selection, cfg.clusters, cfg.niter, cfg.sample_size,
                                 cfg.seed, kmeans_backend(s.device), s.threads, what)
    s.refresh_catalog(asset)  # DBP's centroids are a catalog view; SemDeDup's are not
    return s.done(asset, summary={"k": fit.k, "k_setting": k, "sample": fit.sample, "rows": fit.seen},
                  metadata={"k": fit.k, "k_setting": str(k), "sample_size": fit.sample, "rows_sampled_from": fit.seen})


def assign_asset(context: dg.AssetExecutionContext, s: Session, asset: str, centroids: str, out_table: str,
                 selection: str | None, sums_table: str | None = None) -> dg.MaterializeResult:
    """Assign and commit each of the run's shards (:func:`~..core.method.embstore.assign_shards`)."""
    total = 0
    shards = s.partition_shards(context.partition_keys)
    backend = kmeans_backend(s.device)
    parallel = 1 if backend.gpu else s.parallel_shards(len(shards))  # the GPU takes the shards one at a time
    for shard, rows in embstore.assign_shards(s.layout, shards, centroids, out_table, selection, backend,
                                              s.shard_threads(parallel), sums_table, parallel):
        s.commit(asset, shard, {"rows": rows}, metadata={"rows": rows})
        total += rows
    s.refresh_catalog(out_table)
    return dg.MaterializeResult(metadata={"step_rows": total, "step_shards": len(shards),
                                          "step_seconds": s.elapsed()})
