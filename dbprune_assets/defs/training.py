"""The payoff: ``trained_model`` (open_clip_train on each strategy's subset at
equal samples seen), ``eval_scores`` (zero-shot and retrieval) and
``comparison`` (mean ± std over seeds with bootstrap intervals)."""


from pathlib import Path
from typing import Any

import dagster as dg

from dbprune_assets.core.store.atomic import write_parquet
from dbprune_assets.core.running.device import torch_device
from dbprune_assets.core.store.layout import Layout
from dbprune_assets.core.running.progress import progress
from dbprune_assets.core.settings import PipelineSettings
from dbprune_assets.defs.common import ALL_PARTITIONS, Facts, Session, stage, strategy_partitions, with_fact
from dbprune_assets.defs.plots import artefact_md, comparison_png, loss_curve_png, report_metadata, table, truth_png

SEED_DIR = "seed{}"


@stage(
    partitions=strategy_partitions,
    deps=["pruned_subset"],
    group="train",
    kinds={"pytorch", "openclip"},
    settings=["train"],
    facts=Facts(gpu=True, needs_images=True, plots=True),
)
def trained_model(context: dg.AssetExecutionContext, s: Session) -> dg.MaterializeResult:
    """An open_clip model trained from scratch with open_clip_train on the strategy's exported subset
    (--dataset-resampled), one per train seed, every strategy seeing the same number of samples (steps ×
    global batch). Lands in models/<strategy>/seed<k>/; models/<strategy>/ is the first seed's model. Load
    with open_clip.create_model_and_transforms('local-dir:<path>')."""
    from dbprune_assets.core.store.export import train_data_spec
    from dbprune_assets.core.models.encoders import require_training_space
    from dbprune_assets.core.pool.poolkind import NEEDS_IMAGES, is_metadata_only
    from dbprune_assets.core.models.train import train_clip

    if is_metadata_only(s.layout.pool, s.shards):
        raise dg.Failure(NEEDS_IMAGES)
    cfg = s.settings.train
    device = torch_device(s.device)
    n_gpus = 0
    if device == "cuda":
        import torch

        n_gpus = torch.cuda.device_count()
    rows, curves = [], {}
    for strategy in progress(context.partition_keys, desc="trained_model", unit="strategy"):
        if (kept := _keep_unchanged(context, s, "trained_model", strategy, s.layout.model_dir(strategy))) is not None:
            rows += [{"strategy": strategy, "subset_size": kept.get("subset_size"), **r} for r in kept.get("seeds", [])]
            continue
        pattern, n = train_data_spec(s.layout.subset_dir(strategy))
        require_training_space(s.layout.model_dir(strategy), cfg.model, f"training on the {strategy} subset",
                               runs=len(cfg.train_seeds))
        per_seed = []
        for seed in cfg.train_seeds:
            out = s.layout.model_dir(strategy) / SEED_DIR.format(seed)
            res = train_clip(pattern, n, out, cfg, seed, device, s.layout.home / "logs" / "train" / strategy / f"seed{seed}",
                             s.layout.tmp, n_gpus=n_gpus, threads=s.settings.compute.threads)
            curves[f"{strategy} seed {seed}"] = res.loss_curve
            per_seed.append({"seed": seed, "steps": res.steps, "global_batch": res.global_batch,
                             "samples_seen": res.samples_seen, "seconds": round(res.seconds, 1),
                             "samples_per_s": round(res.samples_per_s, 1), "final_loss": res.final_loss})
            context.log.info(f"{strategy} seed {seed}: {res.steps} steps × {res.global_batch} = {res.samples_seen} "
                             f"samples seen on a subset of {n}, {res.seconds:.0f}s, final loss {res.final_loss}")
        s.commit("trained_model", strategy, {"subset_size": n, "seeds": per_seed}, metadata={
            "subset_size": n, "samples_seen": per_seed[0]["samples_seen"] if per_seed else 0,
            "final_loss": per_seed[0]["final_loss"] if per_seed else None, "runs": table(per_seed),
            "model": dg.MetadataValue.path(str(s.layout.model_dir(strategy)))})
        rows += [{"strategy": strategy, "subset_size": n, **r} for r in per_seed]
    png = loss_curve_png(curves, title="open_clip_train loss per strategy and seed") if curves else None
    return dg.MaterializeResult(metadata={
        "step_runs": table(rows),
        "samples_seen": rows[0]["samples_seen"] if rows else 0,
        **({"step_loss_curves": artefact_md(s.layout, "trained_model", f"loss-{'-'.join(context.partition_keys)}",
                                            png, "training loss")} if png else {}),
        "models": dg.MetadataValue.path(str(s.layout.home / "models")),
        "step_seconds": s.elapsed(),
    })


def _keep_unchanged(context: dg.AssetExecutionContext, s: Session, asset: str, strategy: str,
                    output: Path) -> dict[str, Any] | None:
    """When the partition's inputs are what its output was made from (a subset
    that keeps the same samples as before, the same settings: ``Session.unchanged``)
    and the output is there: commit it again as it is and return its summary;
    else None (make it)."""
    st = s.unchanged(asset, strategy)
    if st is None or not output.exists():
        return None
    context.log.info(f"{strategy}: its subset and settings are those its {asset} was made from: kept as it is")
    s.commit(asset, strategy, st.summary, data_version=st.data_version,
             metadata={"kept_unchanged": True, "output": dg.MetadataValue.path(str(output))})
    return dict(st.summary)


def eval_splits(layout: Layout, settings: PipelineSettings) -> list[Any]:
    """The evaluation datasets (``core.evaluate.EvalDataset``): eval.datasets (plus the old eval.zeroshot /
    eval.retrieval, still read), else the sample pool's eval/ sets."""
    from dbprune_assets.core.models.evaluate import EvalError, find_eval_datasets

    cfg = settings.eval
    folders = [*(cfg.datasets or ()), *(p for p in (cfg.zeroshot, cfg.retrieval) if p)]
    if not folders:
        if not layout.eval_dir.exists():
            raise dg.Failure(f"no evaluation data: set eval.datasets (the pool has no {layout.eval_dir})")
        folders = [layout.eval_dir]
    try:
        return find_eval_datasets(dict.fromkeys(str(f) for f in folders))
    except EvalError as e:
        raise dg.Failure(str(e)) from None


@stage(group="train", kinds={"pytorch", "parquet"}, settings=["eval"], partitions=strategy_partitions,
       deps=["trained_model"],
       facts=Facts(gpu=True, needs_images=True))
def eval_scores(context: dg.AssetExecutionContext, s: Session) -> dg.MaterializeResult:
    """Every seed's model on every evaluation dataset (CLIP_benchmark webdataset folders; the sample pool's
    eval/shapes and eval/shapes_retrieval by default), evaluated with CLIP_benchmark: zero-shot classification
    (acc1, acc5, mean_per_class_recall) or image↔text retrieval (recall@1/5/10, mean_recall@1). Writes
    tables/eval/<strategy>.parquet (strategy, seed, task = dataset, metric, value, n) and DataComp's
    eval_results.jsonl per seed under artefacts/eval_scores/<strategy>/seed<k>/."""
    import polars as pl

    from dbprune_assets.core.models.eval_metrics import aggregate_scores
    from dbprune_assets.core.models.evaluate import (
        EvalError,
        datacomp_rows,
        eval_results_path,
        eval_rows,
        evaluate_model,
        write_eval_results,
    )

    device = torch_device(s.device)
    datasets = eval_splits(s.layout, s.settings)
    context.log.info("evaluation datasets: " + "; ".join(f"{d.name} ({d.task}, {d.root})" for d in datasets))
    shown = []
    for strategy in progress(context.partition_keys, desc="eval_scores", unit="strategy"):
        if _keep_unchanged(context, s, "eval_scores", strategy, s.layout.table("eval", strategy)) is not None:
            continue
        rows, aggregates = [], []
        for seed in s.settings.train.train_seeds:
            model = s.layout.model_dir(strategy) / SEED_DIR.format(seed)
            try:
                results = evaluate_model(model, datasets, device, s.settings.eval.batch_size,
                                         workers=s.settings.compute.workers)
            except EvalError as e:
                raise dg.Failure(f"{strategy} seed {seed}: {e}") from None
            jsonl = datacomp_rows(results)
            write_eval_results(eval_results_path(s.layout, strategy, seed), jsonl, s.layout.tmp)
            aggregates.append({g: a.score for g, a in aggregate_scores(jsonl).items()})
            rows += [{"strategy": strategy, "seed": int(seed), **r} for r in eval_rows(results)]
        frame = pl.DataFrame(rows).with_columns(pl.col("seed").cast(pl.Int32), pl.col("value").cast(pl.Float64))
        write_parquet(s.layout.table("eval", strategy), frame, s.layout.tmp)
        means = frame.group_by("task", "metric", maintain_order=True).agg(pl.col("value").mean())
        mean = {f"{t}/{m}": round(v, 4) for t, m, v in means.iter_rows()}
        agg = {f"datacomp/{g}": round(sum(a[g] for a in aggregates) / len(aggregates), 4)
               for g in aggregates[0] if all(g in a for a in aggregates)} if aggregates else {}
        s.commit("eval_scores", strategy, {"rows": frame.height}, metadata={
            **mean, **agg,
            "eval_results": dg.MetadataValue.path(str(s.layout.artefact_dir("eval_scores") / strategy))})
        shown.append({"strategy": strategy, **mean, **agg})
    s.refresh_catalog("eval")
    return dg.MaterializeResult(metadata={
        "step_mean_over_seeds": table(shown),
        "datasets": table([{"dataset": d.name, "task": d.task, "main_metric": d.main_metric or "",
                            "folder": str(d.root)} for d in datasets]),
        "step_seconds": s.elapsed(),
    })


@stage(
    deps=[dg.AssetDep("eval_scores", partition_mapping=ALL_PARTITIONS),
          dg.AssetDep("pruned_subset", partition_mapping=ALL_PARTITIONS)],
    group="train",
    kinds={"python", "parquet"},
    settings=["eval.bootstrap_samples"],
    facts=Facts(needs_images=True, plots=True),
)
def comparison(context: dg.AssetExecutionContext, s: Session) -> dg.MaterializeResult:
    """All strategies side by side: subset size, samples seen, and each dataset's metrics as mean ± std over
    seeds with a bootstrap confidence interval; DataComp's aggregate scores (ImageNet, distribution shifts, VTAB,
    retrieval, average over the tasks present) per strategy; a plot; and plain verdicts that claim a difference
    only where the intervals separate."""
    from dbprune_assets.core.models.compare import aggregate_panels, compare_strategies, plot_panels, summary_metadata, table_rows
    from dbprune_assets.core.report.page import write_report

    out = compare_strategies(s.layout, s.settings.selection.strategies, s.settings.eval.bootstrap_samples)
    if out is None:
        raise dg.Failure("no eval scores yet: materialise eval_scores first")
    panels = plot_panels(out.summary) + (aggregate_panels(out.aggregate) if out.aggregate is not None else [])
    plot = artefact_md(s.layout, "comparison", "comparison", comparison_png(panels),
                       "scores per strategy (mean, 95% bootstrap interval); last: DataComp's aggregate")
    report = write_report(s.layout, with_fact(s.nodes, "plots"), f"run-{context.run_id}")
    from dbprune_assets.core.strategies.truth import read_truth, truth_rows, truth_verdicts

    found = read_truth(s.layout.home / "tables", out.strategies)
    truth = {"truth_quality": table(truth_rows(found)),
             "truth_verdicts": dg.MetadataValue.md("\n".join(f"- {v}" for v in truth_verdicts(found))),
             "truth_plot": artefact_md(s.layout, "comparison", "truth", truth_png(found), "against the ground truth"),
             } if found else {}
    return s.done("comparison", summary={"strategies": out.strategies, "report": str(report)}, metadata={
        **report_metadata(report),
        "mean_over_seeds": table(table_rows(out.summary, intervals=False)),
        "table": dg.MetadataValue.md(out.samples_seen_text + "\n\n" + out.table),
        "datacomp_aggregate": dg.MetadataValue.md(out.aggregate_table or "(no eval_results.jsonl)"),
        "verdicts": dg.MetadataValue.md(out.verdicts_md),
        "plot": plot,
        "scores": dg.MetadataValue.json(summary_metadata(out.summary)),
        "subset_sizes": dg.MetadataValue.json(out.subset_sizes),
        "samples_seen": dg.MetadataValue.json(out.samples_seen),
        **truth,
    })
