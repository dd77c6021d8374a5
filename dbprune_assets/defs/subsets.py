"""``pruned_subset``: one decision per sample per strategy, and the export that
open_clip_train reads (docs/design.md, Strategies).  The work is
``core/method/stages.py:make_subset``."""


from datetime import datetime, timezone
from typing import Any

import dagster as dg

from dbprune_assets.core.method import stages
from dbprune_assets.core.models.target_images import embed_eval_images
from dbprune_assets.core.method.fitrecord import read_record
from dbprune_assets.core.store.history import Provenance
from dbprune_assets.core.running.progress import progress
from dbprune_assets.core.store.layout import UNPARTITIONED
from dbprune_assets.core.store.state import stable_hash
from dbprune_assets.core.store.subset_inputs import subset_inputs
from dbprune_assets.core.strategies import registry
from dbprune_assets.core.strategies.base import StrategyUnavailable
from dbprune_assets.defs.common import Facts, Session, stage, strategy_partitions
from dbprune_assets.defs.plots import artefact_md, reasons_png, table, truth_png

CHECKS = {
    "one_decision_per_sample": "every samples row has exactly one decision per strategy",
    "kept_equals_quota": "dbp/ssp: kept per cluster equals its quota; the total equals M",
    "export_matches_decisions": "the exported tars hold exactly the kept samples; sizes.json agrees",
}
#: the strategies table's columns, with short headers so that it fits its column in the UI
SHOWN = {"strategy": "strategy", "kept": "kept", "eligible": "eligible", "M": "M", "reason_pruned": "pruned",
         "reason_low_clip_score": "low clip", "reason_duplicate": "dup", "reason_corrupt": "corrupt",
         "export_shards": "tars", "redecided": "re-decided"}


def truth_metadata(s: Session, keys: list[str], found: list[Any]) -> dict[str, Any]:
    """The step's table, verdicts and plot of what each strategy keeps against
    the pool's ground truth (``core/strategies/truth.py``); empty without one."""
    from dbprune_assets.core.strategies.truth import truth_rows, truth_verdicts

    if not found:
        return {}
    values = {t.strategy: t.values for t in found}
    return {"step_truth_quality": table(truth_rows(values)),
            "step_truth_verdicts": dg.MetadataValue.md("\n".join(f"- {v}" for v in truth_verdicts(values))),
            "step_truth_plot": artefact_md(s.layout, "pruned_subset", f"truth-{'-'.join(keys)}", truth_png(values),
                                           "against the ground truth")}


def provenance(run_id: str, s: Session) -> Provenance:
    """This run, the fits in force (SemDeDup's and DBP's ``fit_id``) and now:
    what each decision row this run changes will name."""
    fits = [f"{label} {rec.fit_id}" for label, asset in (("semdedup", "dedup_centroids"), ("dbp", "centroids"))
            if (rec := read_record(s.layout.home, asset)) is not None]
    return Provenance(run_id, " ".join(fits), datetime.now(timezone.utc).isoformat(timespec="seconds"))


def subset_version(s: Session, kept_digest: str) -> str:
    """A subset's data version: what its trainings read, the kept set (as a
    digest), the export's settings and the pool's version (the images); not the
    decisions' inputs, so a strategy that keeps the same samples after, say,
    another ``dbp.tau`` keeps its trained models and scores."""
    return stable_hash({"kept": kept_digest, "export": s.settings.export.model_dump(mode="json"),
                        "pool": s.versions.data_version("pool_manifest", UNPARTITIONED)})


@stage(
    partitions=strategy_partitions,
    deps=["pool_manifest", "cluster_complexity", "candidates", "semantic_dedup"],
    group="subsets",
    kinds={"duckdb", "webdataset"},
    settings=["selection.seed", "export", "strategies"],
    facts=Facts(plots=True),
    check_specs=[dg.AssetCheckSpec(name, asset="pruned_subset", description=text) for name, text in CHECKS.items()],
)
def pruned_subset(context: dg.AssetExecutionContext, s: Session) -> dg.MaterializeResult:
    """A decision (keep, reason) for every sample under the strategy: dbp, ssp, random, clip_score, semdedup,
    full, datacomp_image, negclip or balanced_kmeans (README, "Strategies"). On a pool with a ground truth,
    tables/truth_quality/<strategy>: what it keeps of the planted defects and concepts. Writes tables/decisions/<strategy>.parquet (each row names the run and fits that last changed it;
tables/decision_runs and tables/quota_moves: what this run added, removed and re-decided, the quotas that
moved), tables/quotas/<strategy> for dbp/ssp, and exports
    the kept samples' original bytes to subsets/<strategy>/ (equal shuffled tars + sizes.json + uids.npy) for
    open_clip_train."""
    rows, problems, truth, left_out = [], {name: [] for name in CHECKS}, [], {}
    # the input tables are read once for all the step's strategies (core/store/subset_inputs.py)
    who = provenance(context.run_id, s)
    needs = {t for name in context.partition_keys for t in registry.get(name).needs}
    with subset_inputs(s.layout, threads=s.settings.compute.threads or None, needs=needs) as inputs:
        for strategy in progress(context.partition_keys, desc="pruned_subset", unit="strategy"):
            try:
                out = stages.make_subset(s.layout, s.settings, strategy, inputs, who,
                                         lambda folders: embed_eval_images(s.layout, s.settings, folders))
            except StrategyUnavailable as e:  # dbprune run leaves it out before; the UI and automation get here
                context.log.warning(f"{strategy}: left out: {e}")
                left_out[strategy] = str(e)
                continue
            for note in out.summary.notes:
                context.log.info(note)
            if out.truth is not None:
                truth.append(out.truth)
            for name, found in out.problems.items():
                problems[name] += found
            meta = {**out.summary.metadata(), "export_shards": out.export.n_shards,
                    **{k: out.summary.changes.get(k, 0) for k in ("added", "removed", "redecided")}}
            s.commit("pruned_subset", strategy, {**meta, "exported": out.export.n_samples, "notes": out.summary.notes},
                     data_version=subset_version(s, out.kept_digest),
                     metadata={**meta, "exported": out.export.n_samples,
                               **({"notes": dg.MetadataValue.md("\n".join(f"- {n}" for n in out.summary.notes))}
                                  if out.summary.notes else {}),
                               **({f"truth/{m}": round(v, 4) for m, v in out.truth.values.items()}
                                  if out.truth is not None else {}),
                               "kept_fraction": round(out.summary.kept / max(out.summary.rows, 1), 4),
                               "subset": dg.MetadataValue.path(str(s.layout.subset_dir(strategy)))})
            rows.append(meta)
            context.log.info(f"{strategy}: kept {out.summary.kept} of {out.summary.rows} ({meta['added']} added, "
                             f"{meta['removed']} removed, {meta['redecided']} re-decided since the last run); "
                             f"exported {out.export.n_samples} in {out.export.n_shards} tars")
    s.refresh_catalog("decisions", "quotas", "decision_runs", "quota_moves", "truth_quality")
    return dg.MaterializeResult(
        metadata={
            "step_strategies": table([{SHOWN[k]: r[k] for k in SHOWN if k in r} for r in rows]),
            "step_reasons": artefact_md(s.layout, "pruned_subset", f"reasons-{'-'.join(context.partition_keys)}",
                                        reasons_png(rows), "decisions by reason"),
            **truth_metadata(s, context.partition_keys, truth),
            **({"left_out": dg.MetadataValue.json(left_out)} if left_out else {}),
            "subsets": dg.MetadataValue.path(str(s.layout.home / "subsets")),
            "step_seconds": s.elapsed(),
        },
        check_results=[dg.AssetCheckResult(check_name=name, passed=not found,
                                           metadata={"problems": dg.MetadataValue.json(found[:20])})
                       for name, found in problems.items()],
    )
