"""The centroid and assignment steps both clusterings share (SemDeDup's
``dedup_centroids``/``dedup_assignments`` and DBP's ``centroids``/
``cluster_assignments``): a k-means on the bounded sample, then each shard's
nearest centroid.  The work is in ``core/method/embstore.py``."""

from typing import Callable

import dagster as dg

from dbprune_assets.core.method import embstore, fitrecord
from dbprune_assets.core.running.device import kmeans_backend
from dbprune_assets.core.settings import DbpSettings, SemDedupSettings
from dbprune_assets.core.store.layout import UNPARTITIONED
from dbprune_assets.defs.common import Session, Versions
from dbprune_assets.defs.plots import artefact_md, drift_png


def fit_inputs(asset: str) -> Callable[[Versions, str], dict[str, object]]:
    """What decides whether the fit step of ``asset`` must run besides its
    parents: ``refit`` and the drift settings (a changed policy is applied at
    once), and with ``centroids_from`` the other home's files (its new fit is
    imported)."""

    def inputs(versions: Versions, partition: str) -> dict[str, object]:
        source = versions.settings.centroids_from
        return {"refit": versions.settings.refit, "drift": versions.settings.drift.model_dump(mode="json"),
                "centroids_from": fitrecord.import_signature(source, asset) if source else None}

    return inputs


def fit_asset(s: Session, asset: str, selection: str | None, cfg: SemDedupSettings | DbpSettings, k: int | str,
              what: str) -> dg.MaterializeResult:
    """Fit and commit a centroid asset (:func:`~..core.method.embstore.fit_centroids`) with
    the section's ``niter``, ``sample_size`` and ``seed``; ``k`` is the setting
    (a number or ``auto``), resolved for the rows by ``cfg.clusters``.  The
    resolved k is in the metadata and the commit summary, beside the setting.

    A fit made before is **kept** when ``refit`` says so
    (:func:`~..core.method.fitrecord.holds`): committed again as it is, so
    its data version, and every assignment made against it, stay.  With
    ``centroids_from`` set, the fit is another home's, copied.  A new fit
    writes its record (shards, drift profile) beside it; its data version is
    its centroids' digest."""
    table, fit_of = s.versions.nodes[asset].facts.fit, s.versions.fit_of(asset)
    if fitrecord.holds(s.layout, s.settings, asset, fit_of, s.shards, table):
        record = fitrecord.read_record(s.layout.home, asset)
        assert record is not None
        added = fitrecord.added_since(record, s.shards, fitrecord.shard_versions(s.layout, s.shards))
        metadata = {"kept": f"the fit of {len(record.shards)} shard(s) is kept ({len(added)} added since; refit: "
                            f"{s.settings.refit}{', centroids_from' if s.settings.centroids_from else ''})",
                    "k": record.k, "fitted_on_shards": len(record.shards), "added_since_fit": len(added)}
        return s.done(asset, summary={"k": record.k, "kept": True, "fit_id": record.fit_id}, metadata=metadata,
                      data_version=record.fit_id)
    source, encoder = s.settings.centroids_from, s.versions.data_version("encoder", UNPARTITIONED) or ""
    if source:
        try:
            record = fitrecord.import_fit(s.layout, source, asset, fit_of, encoder)
        except fitrecord.FitImportError as err:
            raise dg.Failure(str(err)) from None
        summary: dict[str, object] = {"k": record.k, "k_setting": k, "imported_from": str(source)}
        metadata = {"k": record.k, "imported_from": dg.MetadataValue.path(source), "fitted_on_shards": len(record.shards)}
    else:
        fitrecord.clear_record(s.layout, asset)  # first: new centroids never stand beside an old record
        fit = embstore.fit_centroids(s.layout, s.shards, asset, selection, cfg.clusters, cfg.niter, cfg.sample_size,
                                     cfg.seed, kmeans_backend(s.device), s.threads, what)
        versions = fitrecord.shard_versions(s.layout, s.shards)
        record = fitrecord.FitRecord(asset, fit.k, fit.profile, tuple(s.shards), None, fit.fit_id, fit_of, "",
                                     tuple(versions[sh] or "" for sh in s.shards), encoder, fit.profile_kind)
        fitrecord.write_record(s.layout, record)
        summary = {"k": fit.k, "k_setting": k, "sample": fit.sample, "rows": fit.seen}
        metadata = {"k": fit.k, "k_setting": str(k), "sample_size": fit.sample, "rows_sampled_from": fit.seen,
                    "fitted_on_shards": len(s.shards)}
    s.refresh_catalog(asset)  # DBP's centroids are a catalog view; SemDeDup's are not
    metadata.update({"fit_p99_distance": round(record.profile.p99, 5), "fit_mean_distance": round(record.profile.mean, 5),
                     "fit_profile_rows": f"{record.profile.rows} {record.profile_kind.replace('_', '-')} rows",
                     "refit": s.settings.refit})
    return s.done(asset, summary={**summary, "fit_id": record.fit_id}, metadata=metadata, data_version=record.fit_id)


#: the asset check on both assignment assets that carries the drift alarm
DRIFT_CHECK = "new_shards_fit_the_clusters"


def drift_check_spec(asset: str) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(DRIFT_CHECK, asset=asset, description=(
        "The shards added since the k-means fit still fit its clusters: their share of samples beyond the fit's "
        "99th-percentile distance stays under drift.factor x the fit's own share (a warning otherwise; "
        "refit: auto then refits)"))


def assign_asset(context: dg.AssetExecutionContext, s: Session, asset: str, centroids: str, out_table: str,
                 selection: str | None, sums_table: str | None = None) -> dg.MaterializeResult:
    """Assign and commit each of the run's shards (:func:`~..core.method.embstore.assign_shards`),
    then check the shards added since the fit against it (:func:`drift_check`)."""
    total = 0
    shards = s.partition_shards(context.partition_keys)
    backend = kmeans_backend(s.device)
    parallel = 1 if backend.gpu else s.parallel_shards(len(shards))  # the GPU takes the shards one at a time
    for shard, rows in embstore.assign_shards(s.layout, shards, centroids, out_table, selection, backend,
                                              s.shard_threads(parallel), sums_table, parallel):
        s.commit(asset, shard, {"rows": rows}, metadata={"rows": rows})
        total += rows
    s.refresh_catalog(out_table)
    check = drift_check(s, asset, centroids, out_table)
    return dg.MaterializeResult(metadata={"step_rows": total, "step_shards": len(shards),
                                          "step_seconds": s.elapsed()}, check_results=[check])


def drift_check(s: Session, asset: str, fit: str, table: str) -> dg.AssetCheckResult:
    """The drift alarm of ``fit`` over the shards added since it (``core/method/drift.py``), with its plot."""
    record = fitrecord.read_record(s.layout.home, fit)
    if record is None:
        return dg.AssetCheckResult(check_name=DRIFT_CHECK, passed=True, metadata={
            "drift": f"{fit} has no fit record yet (a home fitted before fit records existed): nothing to compare"})
    cfg = s.settings.drift
    verdict, per = fitrecord.drift_of(s.layout, record, s.shards, table, cfg.factor, cfg.min_samples)
    metadata: dict[str, object] = {
        "drift": verdict.line(fit), "added_shards": verdict.shards, "added_samples": verdict.rows,
        "added_far_share": round(verdict.far_share, 5), "alarm_above": round(verdict.limit, 5),
        "fit_far_share": round(record.profile.far_share, 5), "fit_p99_distance": round(record.profile.p99, 5),
        "added_mean_distance": round(verdict.mean, 5), "fit_mean_distance": round(record.profile.mean, 5),
        "refit": s.settings.refit}
    if per:
        png = drift_png([d.shard for d in per], [d.far_share for d in per], record.profile.far_share, verdict.limit)
        metadata["drift_plot"] = artefact_md(s.layout, asset, "drift", png, f"shards added since the {fit} fit")
    return dg.AssetCheckResult(check_name=DRIFT_CHECK, passed=not verdict.fires, metadata=metadata,
                               severity=dg.AssetCheckSeverity.WARN, description=verdict.line(fit))
