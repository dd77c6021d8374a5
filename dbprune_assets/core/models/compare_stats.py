"""The comparison's statistics: per strategy x task x metric, mean ± std over
training seeds and a bootstrap confidence interval, for the ``eval`` rows and
for DataComp's aggregate scores.

:func:`summarize` reduces the ``eval`` table (strategy, seed, task, metric,
value) to one row per strategy x task x metric:

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

:func:`compare_intervals` says whether two such intervals separate.
:func:`aggregate_summary` gives DataComp's aggregate scores (ImageNet,
ImageNet dist. shifts, VTAB, Retrieval, Average of the main metrics over the
tasks present; :func:`.eval_metrics.aggregate_scores`) per strategy, from
each seed's ``eval_results.jsonl``, summarised over seeds the same way (task
``datacomp``, metric = the group).

Rows follow the strategy registry's order
(:func:`~dbprune_assets.core.strategies.registry.names`: dbp, ssp, random,
clip_score, semdedup, full, then any registered later), then any other
strategy name alphabetically.
"""

from __future__ import annotations

import itertools

import hashlib
from typing import Any, Mapping, Sequence

import numpy as np
import polars as pl

from dbprune_assets.core.strategies import registry

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


def strategy_key(name: str) -> tuple[int, str]:
    """Sort key of a strategy: the registry's order, then other names alphabetically."""
    order = registry.names()
    return (order.index(name), "") if name in order else (len(order), name)


def metric_key(task: str, metric: str) -> tuple[int, str, str]:
    """Sort key of a (task, metric): :data:`METRIC_ORDER`, then by task and name."""
    return (METRIC_ORDER.index(metric) if metric in METRIC_ORDER else len(METRIC_ORDER), task, metric)


def _stream_seed(seed: int, *parts: str) -> int:
    """A per-(strategy, task, metric) seed: results do not depend on row order."""
    h = hashlib.sha256("\x1f".join([str(int(seed)), *parts]).encode()).digest()
    return int.from_bytes(h[:8], "little")


#: up to this many seeds the bootstrap distribution is enumerated exactly (n**n resamples: 46,656 for 6)
EXACT_BOOTSTRAP_MAX = 6


def bootstrap_ci(values: Sequence[float], n_boot: int, seed: int, level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``.

    Up to :data:`EXACT_BOOTSTRAP_MAX` values, the exact one: the quantiles
    (``inverted_cdf``) of the means of all ``n**n`` equally likely
    resamples, so equal scores give equal intervals and, with 3 or fewer
    seeds, the interval is the range of the scores (each extreme has
    probability ``1/n**n`` ≥ 1/27 > 2.5%).  More values: resampled with
    replacement ``n_boot`` times (``numpy.random.default_rng(seed)``)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return (float("nan"), float("nan"))
    alpha = (1.0 - level) / 2.0
    if v.size <= EXACT_BOOTSTRAP_MAX:
        idx = np.array(list(itertools.product(range(v.size), repeat=v.size)))
        lo, hi = np.quantile(v[idx].mean(axis=1), [alpha, 1.0 - alpha], method="inverted_cdf")
        return float(lo), float(hi)
    if n_boot <= 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(int(n_boot), v.size))
    lo, hi = np.quantile(v[idx].mean(axis=1), [alpha, 1.0 - alpha])
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
    out.sort(key=lambda r: (strategy_key(r["strategy"]), metric_key(r["task"], r["metric"])))
    return pl.DataFrame(out, schema=SUMMARY_SCHEMA)


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


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


#: the power at which :func:`detectable_difference` detects a difference (with two-sided 5% tests)
POWER = 0.8


def detectable_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> float | None:
    """The smallest difference of means the two summary rows' seeds can
    detect: ``(t_{0.975, df} + t_{POWER, df}) * sqrt(s_a^2 / n_a + s_b^2 / n_b)``
    with ``df = n_a + n_b - 2`` (a two-sample t-test at 5%, two-sided, with 80%
    power, from the seed spreads ``s``); None with fewer than 2 seeds on a side."""
    from scipy.stats import t

    n_a, n_b = int(a["n_seeds"]), int(b["n_seeds"])
    if n_a < 2 or n_b < 2:
        return None
    df = n_a + n_b - 2
    se = (float(a["std"]) ** 2 / n_a + float(b["std"]) ** 2 / n_b) ** 0.5
    return float((t.ppf(0.975, df) + t.ppf(POWER, df)) * se)


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
        pl.col("strategy").map_elements(lambda x: strategy_key(x)[0], return_dtype=pl.Int64).alias("_s"),
        pl.col("metric").replace_strict(order, default=len(order), return_dtype=pl.Int64).alias("_g"),
    ).sort("_s", "strategy", "_g").drop("_s", "_g")
