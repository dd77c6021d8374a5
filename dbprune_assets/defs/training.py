"""The payoff: ``trained_model`` (open_clip_train on each strategy's subset at
equal samples seen), ``eval_scores`` (zero-shot and retrieval) and
``comparison`` (mean ± std over seeds with bootstrap intervals)."""


import dagster as dg

from ..core.atomic import write_bytes, write_parquet
from ..core.state import read_state
from .common import GRAPH, DbpruneResource, strategy_partitions, torch_device
from .subsets import pruned_subset
from .ui import image_md, md_table

SEED_DIR = "seed{}"


@dg.asset(
    partitions_def=strategy_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    deps=[pruned_subset],
    group_name="train",
    kinds={"pytorch", "openclip"},
    code_version=GRAPH["trained_model"].code,
    pool="dbprune_gpu",
    description="An open_clip model trained from scratch with open_clip_train on the strategy's exported subset "
                "(--dataset-resampled), one per train seed, every strategy seeing the same number of samples "
                "(steps × global batch). Lands in models/<strategy>/seed<k>/; models/<strategy>/ is the first "
                "seed's model. Load with open_clip.create_model_and_transforms('local-dir:<path>').",
)
def trained_model(context: dg.AssetExecutionContext, dbprune: DbpruneResource) -> dg.MaterializeResult:
    from ..core.export import train_data_spec
    from ..core.train import loss_curve_png, train_clip

    s = dbprune.session(context)
    cfg = s.settings.train
    device = torch_device(s.settings.compute.device)
    n_gpus = 0
    if device == "cuda":
        import torch

        n_gpus = torch.cuda.device_count()
    rows, curves = [], {}
    for strategy in context.partition_keys:
        pattern, n = train_data_spec(s.layout.subset_dir(strategy))
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
        s.commit("trained_model", strategy, {"subset_size": n, "seeds": per_seed})
        rows += [{"strategy": strategy, "subset_size": n, **r} for r in per_seed]
    png = loss_curve_png(curves, title="open_clip_train loss per strategy and seed")
    return dg.MaterializeResult(metadata={
        "runs": dg.MetadataValue.md(md_table(rows)),
        "samples_seen": rows[0]["samples_seen"] if rows else 0,
        "loss_curves": image_md(png, "training loss", s.layout.artefact_dir("trained_model") /
                                f"loss-{'-'.join(context.partition_keys)}.png", s.layout.tmp),
        "models": dg.MetadataValue.path(str(s.layout.home / "models")),
        "seconds": s.elapsed(),
    })


def eval_splits(dbprune_layout, settings):
    """(zero-shot split, retrieval split): configured folders, else the sample pool's eval/."""
    from ..core.evaluate import load_eval_split

    default = dbprune_layout.eval_dir
    zs_path = settings.eval.zeroshot or (default if default.exists() else None)
    rt_path = settings.eval.retrieval or (default if default.exists() else None)
    if zs_path is None and rt_path is None:
        raise dg.Failure(f"no evaluation data: set eval.zeroshot and/or eval.retrieval (the pool has no {default})")
    zs = load_eval_split(zs_path) if zs_path else None
    rt = zs if rt_path == zs_path else (load_eval_split(rt_path) if rt_path else None)
    return zs, rt


@dg.asset(
    partitions_def=strategy_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    deps=[trained_model],
    group_name="train",
    kinds={"pytorch", "parquet"},
    code_version=GRAPH["eval_scores"].code,
    description="Zero-shot classification (acc1, acc5; open_clip's zero-shot classifier from class names and "
                "prompt templates) and image↔text retrieval recall@1/5/10 of every seed's model. Writes "
                "tables/eval/<strategy>.parquet (strategy, seed, task, metric, value).",
)
def eval_scores(context: dg.AssetExecutionContext, dbprune: DbpruneResource) -> dg.MaterializeResult:
    import polars as pl

    from ..core.evaluate import evaluate_model

    s = dbprune.session(context)
    device = torch_device(s.settings.compute.device)
    zs, rt = eval_splits(s.layout, s.settings)
    shown = []
    for strategy in context.partition_keys:
        rows = []
        for seed in s.settings.train.train_seeds:
            model = s.layout.model_dir(strategy) / SEED_DIR.format(seed)
            for r in evaluate_model(model, zs, rt, device, s.settings.eval.batch_size):
                rows.append({"strategy": strategy, "seed": int(seed), **r})
        frame = pl.DataFrame(rows).with_columns(pl.col("seed").cast(pl.Int32), pl.col("value").cast(pl.Float64))
        write_parquet(s.layout.table("eval", strategy), frame, s.layout.tmp)
        s.commit("eval_scores", strategy, {"rows": frame.height})
        means = frame.group_by("metric").agg(pl.col("value").mean()).sort("metric")
        shown.append({"strategy": strategy, **{m: round(v, 4) for m, v in means.iter_rows()}})
    s.refresh_catalog("eval")
    return dg.MaterializeResult(metadata={
        "mean_over_seeds": dg.MetadataValue.md(md_table(shown)),
        "zeroshot_data": str(zs.root) if zs is not None else "none",
        "retrieval_data": str(rt.root) if rt is not None else "none",
        "seconds": s.elapsed(),
    })


@dg.asset(
    deps=[dg.AssetDep(eval_scores, partition_mapping=dg.AllPartitionMapping()),
          dg.AssetDep(pruned_subset, partition_mapping=dg.AllPartitionMapping())],
    group_name="train",
    kinds={"python", "parquet"},
    code_version=GRAPH["comparison"].code,
    description="All strategies side by side: subset size, samples seen, and each metric as mean ± std over seeds "
                "with a bootstrap confidence interval; a plot; and plain verdicts that claim a difference only "
                "where the intervals separate.",
)
def comparison(context: dg.AssetExecutionContext, dbprune: DbpruneResource) -> dg.MaterializeResult:
    import polars as pl

    from ..core.compare import comparison_plot, markdown_table, summarize, verdicts
    from ..core.train import read_train_result

    s = dbprune.session(context)
    strategies = [st for st in s.settings.selection.strategies if s.layout.table("eval", st).exists()]
    if not strategies:
        raise dg.Failure("no eval scores yet: materialise eval_scores first")
    rows = pl.concat([pl.read_parquet(s.layout.table("eval", st)) for st in strategies], how="diagonal_relaxed")
    sizes, seen = {}, {}
    for st in strategies:
        state = read_state(s.layout, "pruned_subset", st)
        sizes[st] = int(state.summary.get("kept", 0)) if state else None
        seen[st] = int(read_train_result(s.layout.model_dir(st)).get("samples_seen", 0))
    summary = summarize(rows.select("strategy", "seed", "task", "metric", "value"), sizes, seen,
                        n_boot=s.settings.eval.bootstrap_samples, seed=0)
    table = markdown_table(summary)
    says = verdicts(summary, baseline="full", focus="dbp")
    text = "## comparison\n\n" + table + "\n\n" + "\n".join(f"- {v}" for v in says) + "\n"
    art = s.layout.artefact_dir("comparison")
    write_bytes(art / "comparison.md", text.encode(), s.layout.tmp)
    write_parquet(s.layout.table("comparison"), summary.drop([c for c in ("values", "seeds") if c in summary.columns]),
                  s.layout.tmp)
    st = s.commit("comparison", summary={"strategies": strategies})
    return dg.MaterializeResult(
        data_version=dg.DataVersion(st.data_version),
        metadata={
            "table": dg.MetadataValue.md(table),
            "verdicts": dg.MetadataValue.md("\n".join(f"- {v}" for v in says)),
            "plot": image_md(comparison_plot(summary), "scores per strategy (mean, 95% bootstrap interval)",
                             art / "comparison.png", s.layout.tmp),
            "subset_sizes": dg.MetadataValue.json(sizes),
            "samples_seen": dg.MetadataValue.json(seen),
        },
    )
