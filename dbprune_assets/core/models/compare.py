"""All strategies side by side: mean ± std over training seeds, bootstrap CIs, verdicts.

``summarize`` reduces the ``eval`` table (strategy, seed, task, metric, value)
to one row per strategy x task x metric:

* ``mean`` and ``std`` over seeds (``std`` with ddof=1; 0 for a single seed);
* ``ci_lo`` / ``ci_hi``: a 95% percentile bootstrap interval of the mean,
  resampling the *seeds* with replacement ``n_boot`` times.  With few seeds it
  is coarse: with 3 seeds the resampled mean takes at most 10 distinct values
  and each extreme (all three draws the same seed) has probability
  1/27 = 3.7% > 2.5%, so the 95% interval is the range [min, max] of the seed
  scores; two strategies then "separate" only when every seed of one beats
  every seed of the other.  From 4 seeds on (1/256 < 2.5%) it is narrower than
  the range; with 1 seed it is the point itself.  It reflects seed-to-seed
  variation of training only, not the sampling error of the finite
  evaluation set;
* ``subset_size`` and ``samples_seen`` of the strategy (training at equal
  compute: the latter should be one number for all).

``verdicts`` turns the summary into plain sentences: two strategies differ
on a metric only where their intervals do not overlap (touching counts as
overlap); otherwise "no difference", whichever way the means point; with a
single seed there is no interval and no verdict.  The focus strategy (dbp)
losing is reported as such.

Rows follow ``STRATEGIES`` order (dbp, ssp, random, clip_score, semdedup,
full), then any other strategy name alphabetically.

Beside it, :func:`aggregate_summary` gives DataComp's aggregate scores
(ImageNet, ImageNet dist. shifts, VTAB, Retrieval, Average of the main
metrics over the tasks present; :func:`.eval_metrics.aggregate_scores`) per
strategy, from each seed's ``eval_results.jsonl``, summarised over seeds the
same way (task ``datacomp``, metric = the group), and
:func:`samples_seen_sentence` says how many samples each model saw.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import polars as pl

from dbprune_assets.core.store.layout import Layout
from dbprune_assets.core.settings import STRATEGIES

CI_LEVEL = 0.95
SUMMARY_SCHEMA: dict[str, Any] = {
    "strategy": pl.Utf8,
    "task": pl.Utf8,
    "metric": pl.Utf8,
    "mean": pl.Float64,
    "std": pl.Float64,
    "n_seeds": pl.Int64,
    "ci_lo": pl.Float64,
    "ci_hi": pl.Float64,
    "subset_size": pl.Int64,
    "samples_seen": pl.Int64,
    "seeds": pl.List(pl.Int64),
    "values": pl.List(pl.Float64),
}
#: preferred metric order in tables and plots
METRIC_ORDER: tuple[str, ...] = (
    "acc1",
    "acc5",
    "mean_per_class_recall",
    "mean_average_precision",
    "image_retrieval_recall@1",
    "image_retrieval_recall@5",
    "image_retrieval_recall@10",
    "text_retrieval_recall@1",
    "text_retrieval_recall@5",
    "text_retrieval_recall@10",
    "mean_recall@1",
)
#: the ``task`` of DataComp's aggregate scores in :func:`aggregate_summary`
AGGREGATE_TASK = "datacomp"


def _strategy_key(name: str) -> tuple[int, str]:
    return (STRATEGIES.index(name), "") if name in STRATEGIES else (len(STRATEGIES), name)


def _metric_key(task: str, metric: str) -> tuple[int, str, str]:
    return (METRIC_ORDER.index(metric) if metric in METRIC_ORDER else len(METRIC_ORDER), task, metric)


def _stream_seed(seed: int, *parts: str) -> int:
    """A per-(strategy, task, metric) seed: results do not depend on row order."""
    h = hashlib.sha256("\x1f".join([str(int(seed)), *parts]).encode()).digest()
    return int.from_bytes(h[:8], "little")


def bootstrap_ci(values: Sequence[float], n_boot: int, seed: int, level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampled with
    replacement ``n_boot`` times, ``numpy.random.default_rng(seed)``)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return (float("nan"), float("nan"))
    if v.size == 1 or n_boot <= 0:
        return (float(v.mean()), float(v.mean())) if v.size == 1 else (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(int(n_boot), v.size))
    means = v[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def summarize(
    eval_rows: pl.DataFrame,
    subset_sizes: Mapping[str, int],
    samples_seen: Mapping[str, int],
    n_boot: int,
    seed: int,
) -> pl.DataFrame:
    """One row per strategy x task x metric (see the module docstring); columns
    ``SUMMARY_SCHEMA``.  ``eval_rows`` needs strategy, seed, task, metric,
    value; a (strategy, seed, task, metric) given twice is an error."""
    need = {"strategy", "seed", "task", "metric", "value"}
    missing = need - set(eval_rows.columns)
    if missing:
        raise ValueError(f"summarize: eval rows lack columns {sorted(missing)}")
    df = eval_rows.select(
        pl.col("strategy").cast(pl.Utf8),
        pl.col("seed").cast(pl.Int64),
        pl.col("task").cast(pl.Utf8),
        pl.col("metric").cast(pl.Utf8),
        pl.col("value").cast(pl.Float64),
    )
    dup = df.group_by(["strategy", "seed", "task", "metric"]).len().filter(pl.col("len") > 1)
    if dup.height:
        r = dup.row(0, named=True)
        raise ValueError(f"summarize: {r['len']} rows for strategy {r['strategy']}, seed {r['seed']}, {r['task']} {r['metric']}")
    out: list[dict[str, Any]] = []
    groups = df.sort(["strategy", "task", "metric", "seed"]).group_by(["strategy", "task", "metric"], maintain_order=True)
    for (strategy, task, metric), g in groups:
        vals = g["value"].to_numpy()
        n = int(vals.size)
        lo, hi = bootstrap_ci(vals, n_boot, _stream_seed(seed, str(strategy), str(task), str(metric)))
        out.append(
            {
                "strategy": strategy,
                "task": task,
                "metric": metric,
                "mean": float(vals.mean()),
                "std": float(vals.std(ddof=1)) if n > 1 else 0.0,
                "n_seeds": n,
                "ci_lo": lo,
                "ci_hi": hi,
                "subset_size": _opt_int(subset_sizes.get(str(strategy))),
                "samples_seen": _opt_int(samples_seen.get(str(strategy))),
                "seeds": [int(s) for s in g["seed"].to_list()],
                "values": [float(v) for v in vals],
            }
        )
    out.sort(key=lambda r: (_strategy_key(r["strategy"]), _metric_key(r["task"], r["metric"])))
    return pl.DataFrame(out, schema=SUMMARY_SCHEMA)


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


# ---------------------------------------------------------------------------
# verdicts


def compare_intervals(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """``"higher"`` / ``"lower"`` when a's interval lies entirely above / below
    b's, ``"same"`` when they overlap (or touch), ``"unknown"`` with < 2 seeds."""
    if int(a["n_seeds"]) < 2 or int(b["n_seeds"]) < 2:
        return "unknown"
    if a["ci_lo"] > b["ci_hi"]:
        return "higher"
    if a["ci_hi"] < b["ci_lo"]:
        return "lower"
    return "same"


def _fmt(r: Mapping[str, Any]) -> str:
    return f"{r['mean']:.3f} ± {r['std']:.3f} [{r['ci_lo']:.3f}, {r['ci_hi']:.3f}]"


def _metric_label(task: str, metric: str) -> str:
    return metric if task in ("zeroshot", "retrieval") else f"{task}/{metric}"


def verdicts(summary: pl.DataFrame, baseline: str = "full", focus: str = "dbp") -> list[str]:
    """Plain sentences: per metric, ``focus`` against ``baseline`` and against
    every other strategy; a difference only where the 95% intervals separate.
    The first sentence is the overall count against the baseline."""
    rows = summary.to_dicts()
    by = {(r["strategy"], r["task"], r["metric"]): r for r in rows}
    strategies = sorted({r["strategy"] for r in rows}, key=_strategy_key)
    metrics = sorted({(r["task"], r["metric"]) for r in rows}, key=lambda tm: _metric_key(*tm))
    if focus not in strategies:
        return [f"No scores for {focus}: nothing to compare."]
    others = [s for s in strategies if s != focus]
    if not others:
        return [f"Only {focus} was evaluated: nothing to compare it with."]
    base = baseline if baseline in strategies and baseline != focus else None
    n_seeds = sorted({int(r["n_seeds"]) for r in rows})
    out: list[str] = []
    counts = {"higher": 0, "lower": 0, "same": 0, "unknown": 0}
    per_metric: list[str] = []
    for task, metric in metrics:
        f = by.get((focus, task, metric))
        label = _metric_label(task, metric)
        if f is None:
            per_metric.append(f"{label}: {focus} has no score.")
            continue
        parts: list[str] = []
        if base is not None and (base, task, metric) in by:
            b = by[(base, task, metric)]
            c = compare_intervals(f, b)
            counts[c] += 1
            head = f"{label}: {focus} {_fmt(f)} vs {base} {_fmt(b)}: "
            if c == "higher":
                head += f"{focus} is higher than {base} (the intervals separate)."
            elif c == "lower":
                head += f"{focus} is lower than {base} (the intervals separate): {focus} loses here."
            elif c == "same":
                head += "no difference (the intervals overlap)."
            else:
                head += "cannot tell (a single seed gives no interval)."
            per_metric.append(head)
        for o in others:
            if o == base or (o, task, metric) not in by:
                continue
            c = compare_intervals(f, by[(o, task, metric)])
            parts.append(
                {"higher": f"higher than {o}", "lower": f"lower than {o}", "same": f"no difference from {o}",
                 "unknown": f"cannot tell against {o}"}[c]
            )
        if parts:
            per_metric.append(f"{label}, {focus} against the other strategies: " + "; ".join(parts) + ".")
    if base is not None:
        judged = counts["higher"] + counts["lower"] + counts["same"]
        if judged == 0:
            out.append(f"{focus} vs {base}: a single training seed gives no confidence interval, so no difference can be claimed.")
        elif counts["higher"] == 0 and counts["lower"] == 0:
            out.append(f"{focus} vs {base}: no difference on any of the {judged} metrics (every 95% interval overlaps).")
        else:
            out.append(
                f"{focus} vs {base}: higher on {counts['higher']}, lower on {counts['lower']}, "
                f"no difference on {counts['same']} of {judged} metrics (95% bootstrap intervals over seeds)."
            )
    else:
        out.append(f"No scores for the baseline {baseline}; {focus} is compared with the other strategies only.")
    seeds_note = (
        f"Intervals resample {n_seeds[0]} training seeds"
        if len(n_seeds) == 1 else f"Intervals resample {n_seeds[0]}-{n_seeds[-1]} training seeds"
    )
    if n_seeds and n_seeds[-1] <= 3:
        seeds_note += ", so they are coarse: with 3 or fewer seeds a 95% interval is the range of the seed scores"
    elif n_seeds and n_seeds[-1] < 5:
        seeds_note += ", so they are coarse"
    out.append(seeds_note + "; they do not include the evaluation set's own sampling error.")
    return out + per_metric


# ---------------------------------------------------------------------------
# table and plot


def _columns(summary: pl.DataFrame) -> list[tuple[str, str]]:
    return sorted({(r["task"], r["metric"]) for r in summary.select("task", "metric").to_dicts()}, key=lambda tm: _metric_key(*tm))


def table_rows(summary: pl.DataFrame, digits: int = 3, intervals: bool = True) -> list[dict[str, str]]:
    """Strategies as rows (table order); subset size, samples seen, seeds, then
    one column per metric holding ``mean ± std [lo, hi]`` (``mean ± std``
    without ``intervals``), every cell a string."""
    cols = _columns(summary)
    rows = summary.to_dicts()
    by = {(r["strategy"], r["task"], r["metric"]): r for r in rows}
    out = []
    for s in sorted({r["strategy"] for r in rows}, key=_strategy_key):
        any_row = next(r for r in rows if r["strategy"] == s)
        row = {
            "strategy": s,
            "subset size": "" if any_row["subset_size"] is None else f"{any_row['subset_size']:,}",
            "samples seen": "" if any_row["samples_seen"] is None else f"{any_row['samples_seen']:,}",
            "seeds": str(max(int(r["n_seeds"]) for r in rows if r["strategy"] == s)),
        }
        for t, m in cols:
            r = by.get((s, t, m))
            cell = "" if r is None else f"{r['mean']:.{digits}f} ± {r['std']:.{digits}f}"
            if r is not None and intervals:
                cell += f" [{r['ci_lo']:.{digits}f}, {r['ci_hi']:.{digits}f}]"
            row[_metric_label(t, m)] = cell
        out.append(row)
    return out


def markdown_table(summary: pl.DataFrame, digits: int = 3) -> str:
    """Strategies as rows; subset size, samples seen, seeds, then one column per
    metric holding ``mean ± std [lo, hi]``."""
    rows = table_rows(summary, digits)
    header = ["strategy", "subset size", "samples seen", "seeds"] + [_metric_label(t, m) for t, m in _columns(summary)]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    lines += ["| " + " | ".join(row[h] for h in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Panel:
    """One metric of the comparison plot: a bar per strategy at its mean with the
    95% bootstrap interval as error bar, and the seed scores as dots."""

    title: str
    strategies: list[str]  # every strategy of the summary, in table order (the x axis)
    x: list[int]  # positions (into ``strategies``) of those with this metric
    means: list[float]
    err_lo: list[float]
    err_hi: list[float]
    seed_values: list[list[float]]
    y_max: float


def plot_panels(summary: pl.DataFrame) -> list[Panel]:
    """The comparison plot's data, one :class:`Panel` per metric (drawn by the
    Dagster layer, ``defs/plots.py``)."""
    rows = summary.to_dicts()
    by = {(r["strategy"], r["task"], r["metric"]): r for r in rows}
    strategies = sorted({r["strategy"] for r in rows}, key=_strategy_key)
    panels = []
    for t, m in _columns(summary):
        found = [(j, by[(s, t, m)]) for j, s in enumerate(strategies) if (s, t, m) in by]
        panels.append(Panel(
            title=_metric_label(t, m), strategies=strategies, x=[j for j, _ in found],
            means=[r["mean"] for _, r in found],
            err_lo=[max(0.0, r["mean"] - r["ci_lo"]) for _, r in found],
            err_hi=[max(0.0, r["ci_hi"] - r["mean"]) for _, r in found],
            seed_values=[list(r["values"]) for _, r in found],
            y_max=max(1e-6, max((r["ci_hi"] for _, r in found), default=1.0)) * 1.15,
        ))
    return panels


def summary_metadata(summary: pl.DataFrame) -> dict[str, Any]:
    """Flat ``{"<strategy>/<metric>": "mean ± std [lo, hi]"}`` for UI metadata."""
    return {
        f"{r['strategy']}/{_metric_label(r['task'], r['metric'])}": f"{_fmt(r)} (n={r['n_seeds']})"
        for r in summary.to_dicts()
    }


# ---------------------------------------------------------------------------
# DataComp's aggregate and samples seen


def aggregate_rows(results: Mapping[tuple[str, int], Sequence[Mapping[str, Any]]]) -> pl.DataFrame:
    """Rows (strategy, seed, task ``datacomp``, metric = group, value, n_tasks,
    n_group) of DataComp's aggregate scores of each (strategy, seed)'s
    ``eval_results.jsonl`` rows; groups with no task present have no row."""
    from dbprune_assets.core.models.eval_metrics import aggregate_scores

    out = [
        {"strategy": st, "seed": int(seed), "task": AGGREGATE_TASK, "metric": g, "value": a.score,
         "n_tasks": a.n_present, "n_group": a.n_group}
        for (st, seed), rows in results.items() for g, a in aggregate_scores(rows).items()
    ]
    schema = {"strategy": pl.Utf8, "seed": pl.Int64, "task": pl.Utf8, "metric": pl.Utf8, "value": pl.Float64,
              "n_tasks": pl.Int64, "n_group": pl.Int64}
    return pl.DataFrame(out, schema=schema)


def aggregate_summary(rows: pl.DataFrame, subset_sizes: Mapping[str, int], samples_seen: Mapping[str, int],
                      n_boot: int, seed: int) -> pl.DataFrame:
    """:func:`summarize` of :func:`aggregate_rows` (one row per strategy x
    group, groups in DataComp's order), with ``n_tasks`` / ``n_group``: how
    many of the group's tasks the score averages (most over seeds) and how many
    DataComp's group has."""
    from dbprune_assets.core.models.eval_metrics import AGGREGATE_GROUPS

    if rows.height == 0:
        return pl.DataFrame(schema={**SUMMARY_SCHEMA, "n_tasks": pl.Int64, "n_group": pl.Int64})
    summary = summarize(rows, subset_sizes, samples_seen, n_boot, seed)
    counts = rows.group_by("strategy", "metric").agg(pl.col("n_tasks").max(), pl.col("n_group").max())
    order = {g: i for i, g in enumerate(AGGREGATE_GROUPS)}
    out = summary.join(counts, on=["strategy", "metric"], how="left")
    return out.with_columns(
        pl.col("strategy").map_elements(lambda x: _strategy_key(x)[0], return_dtype=pl.Int64).alias("_s"),
        pl.col("metric").replace_strict(order, default=len(order), return_dtype=pl.Int64).alias("_g"),
    ).sort("_s", "strategy", "_g").drop("_s", "_g")


def _group_label(group: str, n_tasks: int, n_group: int) -> str:
    if group == "Average":
        return f"{group} ({n_tasks} task{'s' if n_tasks != 1 else ''})"
    if group == "ImageNet":
        return group
    return f"{group} ({n_tasks} of {n_group})"


def aggregate_table_rows(agg: pl.DataFrame, digits: int = 3) -> list[dict[str, str]]:
    """Strategies as rows (table order): samples seen, seeds, then one column per
    aggregate group (``mean ± std [lo, hi]``), headed with how many of the
    group's tasks it averages."""
    from dbprune_assets.core.models.eval_metrics import AGGREGATE_GROUPS

    rows = agg.to_dicts()
    by = {(r["strategy"], r["metric"]): r for r in rows}
    groups = [g for g in AGGREGATE_GROUPS if any(r["metric"] == g for r in rows)]
    n = {g: max(int(r["n_tasks"]) for r in rows if r["metric"] == g) for g in groups}
    size = {g: max(int(r["n_group"]) for r in rows if r["metric"] == g) for g in groups}
    out = []
    for s in sorted({r["strategy"] for r in rows}, key=_strategy_key):
        any_row = next(r for r in rows if r["strategy"] == s)
        row = {"strategy": s,
               "samples seen": "" if any_row["samples_seen"] is None else f"{any_row['samples_seen']:,}",
               "seeds": str(max(int(r["n_seeds"]) for r in rows if r["strategy"] == s))}
        for g in groups:
            r = by.get((s, g))
            row[_group_label(g, n[g], size[g])] = "" if r is None else (
                f"{r['mean']:.{digits}f} ± {r['std']:.{digits}f} [{r['ci_lo']:.{digits}f}, {r['ci_hi']:.{digits}f}]")
        out.append(row)
    return out


def aggregate_markdown(agg: pl.DataFrame, digits: int = 3) -> str:
    """The aggregate as a markdown table (:func:`aggregate_table_rows`)."""
    rows = aggregate_table_rows(agg, digits)
    if not rows:
        return "(no eval_results.jsonl with a main metric)\n"
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    lines += ["| " + " | ".join(row[h] for h in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def aggregate_panels(agg: pl.DataFrame) -> list[Panel]:
    """The aggregate's plot panels (one per group, in DataComp's order), titled ``DataComp <group>``."""
    from dataclasses import replace

    from dbprune_assets.core.models.eval_metrics import AGGREGATE_GROUPS

    panels = [replace(p, title=f"DataComp {p.title.split('/', 1)[-1]}") for p in plot_panels(agg)]
    order = {f"DataComp {g}": i for i, g in enumerate(AGGREGATE_GROUPS)}
    return sorted(panels, key=lambda p: order.get(p.title, len(order)))


def samples_seen_sentence(samples_seen: Mapping[str, int | None]) -> str:
    """How many samples each model saw (training steps x global batch)."""
    known = {s: int(n) for s, n in samples_seen.items() if n}
    if not known:
        return "Samples seen in training: unknown (no training result found)."
    if len(set(known.values())) == 1 and len(known) == len(samples_seen):
        n = next(iter(known.values()))
        return f"Every model saw {n:,} training samples (steps × global batch), at equal compute."
    parts = "; ".join(f"{s} {known[s]:,}" if s in known else f"{s} unknown"
                      for s in sorted(samples_seen, key=_strategy_key))
    return f"Training samples seen per model (steps × global batch): {parts}; not all equal, so not at equal compute."


# ---------------------------------------------------------------------------
# the comparison step


@dataclass(frozen=True)
class Comparison:
    strategies: list[str]
    summary: pl.DataFrame
    table: str  # markdown
    verdicts: list[str]
    subset_sizes: dict[str, int | None]
    samples_seen: dict[str, int]
    aggregate: pl.DataFrame | None = None  # aggregate_summary (None: no eval_results.jsonl)
    aggregate_table: str = ""  # markdown
    samples_seen_text: str = ""

    @property
    def verdicts_md(self) -> str:
        return "\n".join(f"- {v}" for v in self.verdicts)


def compare_strategies(layout: Layout, strategies: Sequence[str], n_boot: int) -> Comparison | None:
    """Summarise the ``eval`` tables of the strategies that have one (None when
    none has) and DataComp's aggregate of their ``eval_results.jsonl``; write
    ``tables/comparison/all.parquet``, ``tables/comparison/datacomp.parquet``
    (when there is an aggregate) and ``artefacts/comparison/comparison.md``
    (samples seen, the table, the verdicts and the aggregate)."""
    from dbprune_assets.core.store.atomic import write_bytes, write_parquet
    from dbprune_assets.core.models.evaluate import eval_results_path, read_eval_results
    from dbprune_assets.core.store.state import read_state
    from dbprune_assets.core.models.train import read_train_result

    have = [st for st in strategies if layout.table("eval", st).exists()]
    if not have:
        return None
    rows = pl.concat([pl.read_parquet(layout.table("eval", st)) for st in have], how="diagonal_relaxed")
    sizes: dict[str, int | None] = {}
    seen: dict[str, int] = {}
    for st in have:
        state = read_state(layout, "pruned_subset", st)
        sizes[st] = int(state.summary.get("kept", 0)) if state else None
        seen[st] = int(read_train_result(layout.model_dir(st)).get("samples_seen", 0))
    summary = summarize(rows.select("strategy", "seed", "task", "metric", "value"), sizes, seen, n_boot=n_boot, seed=0)
    pairs = sorted({(str(st), int(sd)) for st, sd in rows.select("strategy", "seed").iter_rows()})
    jsonl = {(st, sd): read_eval_results(eval_results_path(layout, st, sd)) for st, sd in pairs}
    agg_rows = aggregate_rows(jsonl)
    agg = aggregate_summary(agg_rows, sizes, seen, n_boot=n_boot, seed=0) if agg_rows.height else None
    out = Comparison(have, summary, markdown_table(summary), verdicts(summary, baseline="full", focus="dbp"), sizes,
                     seen, agg, aggregate_markdown(agg) if agg is not None else "", samples_seen_sentence(seen))
    text = "## comparison\n\n" + out.samples_seen_text + "\n\n" + out.table + "\n\n" + out.verdicts_md + "\n"
    if agg is not None:
        text += ("\n### DataComp-style aggregate\n\nMean over seeds of DataComp's aggregate scores (main metric per "
                 "task, averaged per group over the tasks present; a column head says how many of the group's tasks "
                 "are present):\n\n"
                 + out.aggregate_table)
    write_bytes(layout.artefact_dir("comparison") / "comparison.md", text.encode(), layout.tmp)
    write_parquet(layout.table("comparison"), summary.drop([c for c in ("values", "seeds") if c in summary.columns]),
                  layout.tmp)
    if agg is not None:
        write_parquet(layout.table("comparison", AGGREGATE_TASK), agg.drop("values", "seeds"), layout.tmp)
    else:
        layout.table("comparison", AGGREGATE_TASK).unlink(missing_ok=True)  # not a stale one from an earlier run
    return out
