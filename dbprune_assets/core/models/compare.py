"""All strategies side by side: verdicts, tables, plot panels and the
comparison step, from the statistics of :mod:`.compare_stats` (mean ± std
over training seeds, bootstrap CIs), whose names this module re-exports.

``verdicts`` turns the summary into plain sentences: two strategies differ
on a metric only where their intervals do not overlap (touching counts as
overlap); otherwise "no difference", whichever way the means point; with a
single seed there is no interval and no verdict.  The focus strategy (dbp)
losing is reported as such.

Rows follow the strategy registry's order (dbp, ssp, random, clip_score,
semdedup, full, then any registered later:
:func:`~dbprune_assets.core.strategies.registry.names`), then any other
strategy name alphabetically.

Beside it, DataComp's aggregate scores per strategy
(:func:`~.compare_stats.aggregate_summary`) get their own table and panels,
and :func:`samples_seen_sentence` says how many samples each model saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import polars as pl

from dbprune_assets.core.models.compare_stats import (AGGREGATE_TASK, CI_LEVEL, METRIC_ORDER, SUMMARY_SCHEMA,
                                                     aggregate_rows, aggregate_summary, bootstrap_ci,
                                                     compare_intervals, detectable_difference, metric_key,
                                                     strategy_key, summarize)
from dbprune_assets.core.store.layout import Layout

__all__ = [
    "AGGREGATE_TASK", "CI_LEVEL", "METRIC_ORDER", "SUMMARY_SCHEMA", "Comparison", "Panel", "aggregate_markdown",
    "aggregate_panels", "aggregate_rows", "aggregate_summary", "aggregate_table_rows", "bootstrap_ci",
    "compare_intervals", "compare_strategies", "markdown_table", "plot_panels", "samples_seen_sentence",
    "summarize", "summary_metadata", "table_rows", "verdicts",
]


# ---------------------------------------------------------------------------
# verdicts


def _fmt(r: Mapping[str, Any]) -> str:
    return f"{r['mean']:.3f} ± {r['std']:.3f} [{r['ci_lo']:.3f}, {r['ci_hi']:.3f}]"


def _metric_label(task: str, metric: str) -> str:
    return metric if task in ("zeroshot", "retrieval") else f"{task}/{metric}"


def _against_base(label: str, focus: str, f: Mapping[str, Any], base: str, b: Mapping[str, Any]
                  ) -> tuple[str, str, float | None]:
    """One metric's sentence of ``focus`` against ``base``: the interval
    comparison, its sentence and the difference the seeds can detect (None or
    0 when they cannot tell)."""
    c = compare_intervals(f, b)
    head = f"{label}: {focus} {_fmt(f)} vs {base} {_fmt(b)}: " + {
        "higher": f"{focus} is higher than {base} (the intervals separate).",
        "lower": f"{focus} is lower than {base} (the intervals separate): {focus} loses here.",
        "same": "no difference (the intervals overlap).",
        "unknown": "cannot tell (a single seed gives no interval)."}[c]
    d = detectable_difference(f, b)
    if d is not None and d > 0:
        head += f" These seeds detect a difference of {d:.3f} or more."
    elif d is not None:
        head += " The seeds score alike here (the metric is saturated or constant): it cannot separate."
    return c, head, d


def verdicts(summary: pl.DataFrame, baseline: str = "full", focus: str = "dbp") -> list[str]:
    """Plain sentences: per metric, ``focus`` against ``baseline`` and against
    every other strategy; a difference only where the 95% intervals separate.
    The first sentence is the overall count against the baseline."""
    rows = summary.to_dicts()
    by = {(r["strategy"], r["task"], r["metric"]): r for r in rows}
    strategies = sorted({r["strategy"] for r in rows}, key=strategy_key)
    metrics = sorted({(r["task"], r["metric"]) for r in rows}, key=lambda tm: metric_key(*tm))
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
    detectable: list[float] = []
    for task, metric in metrics:
        f = by.get((focus, task, metric))
        label = _metric_label(task, metric)
        if f is None:
            per_metric.append(f"{label}: {focus} has no score.")
            continue
        parts: list[str] = []
        if base is not None and (base, task, metric) in by:
            c, head, d = _against_base(label, focus, f, base, by[(base, task, metric)])
            counts[c] += 1
            detectable += [d] if d else []
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
    if detectable:
        out.append(f"The smallest difference the seeds can detect ({focus} vs {base}, two-sided 5% test, 80% power, "
                   f"from the seed spread) is {min(detectable):.3f} to {max(detectable):.3f} by metric: a smaller "
                   "true difference would not show here.")
    return out + per_metric


# ---------------------------------------------------------------------------
# table and plot


def _columns(summary: pl.DataFrame) -> list[tuple[str, str]]:
    return sorted({(r["task"], r["metric"]) for r in summary.select("task", "metric").to_dicts()}, key=lambda tm: metric_key(*tm))


def table_rows(summary: pl.DataFrame, digits: int = 3, intervals: bool = True) -> list[dict[str, str]]:
    """Strategies as rows (table order); subset size, samples seen, seeds, then
    one column per metric holding ``mean ± std [lo, hi]`` (``mean ± std``
    without ``intervals``), every cell a string."""
    cols = _columns(summary)
    rows = summary.to_dicts()
    by = {(r["strategy"], r["task"], r["metric"]): r for r in rows}
    out = []
    for s in sorted({r["strategy"] for r in rows}, key=strategy_key):
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
    return _markdown(header, rows)


def _markdown(header: list[str], rows: list[dict[str, str]]) -> str:
    """A markdown table: the ``header`` columns of ``rows``, numbers right-aligned."""
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
    strategies = sorted({r["strategy"] for r in rows}, key=strategy_key)
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
    for s in sorted({r["strategy"] for r in rows}, key=strategy_key):
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
    return _markdown(header, rows)


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
                      for s in sorted(samples_seen, key=strategy_key))
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
    from dbprune_assets.core.strategies.truth import read_truth, truth_markdown

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
    text += "\n" + truth_markdown(read_truth(layout.home / "tables", strategies))
    write_bytes(layout.artefact_dir("comparison") / "comparison.md", text.encode(), layout.tmp)
    write_parquet(layout.table("comparison"), summary.drop([c for c in ("values", "seeds") if c in summary.columns]),
                  layout.tmp)
    if agg is not None:
        write_parquet(layout.table("comparison", AGGREGATE_TASK), agg.drop("values", "seeds"), layout.tmp)
    else:
        layout.table("comparison", AGGREGATE_TASK).unlink(missing_ok=True)  # not a stale one from an earlier run
    return out
