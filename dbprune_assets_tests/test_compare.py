"""Comparison: mean / std / bootstrap CI by hand, verdicts only where the
intervals separate (including when dbp loses), the table and the plot."""

from __future__ import annotations

import itertools

import numpy as np
import polars as pl
import pytest

from dbprune_assets.core.models.compare import (
    SUMMARY_SCHEMA,
    bootstrap_ci,
    compare_intervals,
    detectable_difference,
    markdown_table,
    plot_panels,
    summarize,
    summary_metadata,
    verdicts,
)
from dbprune_assets.defs.plots import comparison_png


def _rows(scores: dict[str, dict[str, list[float]]]) -> pl.DataFrame:
    """{strategy: {metric: [value per seed]}} -> eval rows."""
    out = []
    for s, metrics in scores.items():
        for m, vals in metrics.items():
            task = "zeroshot" if m.startswith("acc") else "retrieval"
            for seed, v in enumerate(vals):
                out.append({"strategy": s, "seed": seed, "task": task, "metric": m, "value": v})
    return pl.DataFrame(out)


def test_bootstrap_ci_by_hand() -> None:
    v = np.array([0.1, 0.2, 0.6])
    # up to 6 seeds, the exact bootstrap distribution (all 27 equally likely resamples here): each
    # extreme has probability 1/27 > 2.5%, so with 3 seeds the 95% interval is the range of the seeds,
    # whatever n_boot and seed (equal scores, equal intervals)
    exact = np.array([v[list(c)].mean() for c in itertools.product(range(3), repeat=3)])
    assert np.quantile(exact, [0.025, 0.975], method="inverted_cdf") == pytest.approx([0.1, 0.6])
    assert bootstrap_ci(v, 500, 7) == bootstrap_ci(v, 200, 1) == pytest.approx((0.1, 0.6))
    assert bootstrap_ci(v[::-1], 0, 0) == bootstrap_ci(v, 500, 7)
    # 5 seeds: the exact quantiles, narrower than the range
    v5 = np.array([0.1, 0.2, 0.3, 0.4, 0.9])
    exact5 = np.array([v5[list(c)].mean() for c in itertools.product(range(5), repeat=5)])
    assert bootstrap_ci(v5, 10, 3) == pytest.approx(tuple(np.quantile(exact5, [0.025, 0.975], method="inverted_cdf")))
    assert v5.min() < bootstrap_ci(v5, 10, 3)[0] < v5.mean() < bootstrap_ci(v5, 10, 3)[1] < v5.max()
    # more seeds: the same procedure written out (resampled n_boot times)
    v8 = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.9])
    rng = np.random.default_rng(7)
    means = v8[rng.integers(0, 8, size=(500, 8))].mean(axis=1)
    assert bootstrap_ci(v8, 500, 7) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))
    assert np.isnan(bootstrap_ci(v8, 0, 7)[0])
    assert bootstrap_ci([0.4], 100, 0) == (0.4, 0.4)
    assert bootstrap_ci([0.3, 0.3, 0.3], 100, 0) == pytest.approx((0.3, 0.3))


def test_summarize_mean_std_ci() -> None:
    df = _rows({"dbp": {"acc1": [0.1, 0.2, 0.3], "acc5": [0.5, 0.5, 0.5]}, "full": {"acc1": [0.6]}})
    s = summarize(df, {"dbp": 700, "full": 2900}, {"dbp": 19968, "full": 19968}, n_boot=200, seed=0)
    assert s.schema == pl.Schema(SUMMARY_SCHEMA)
    assert s["strategy"].to_list() == ["dbp", "dbp", "full"]
    assert s["metric"].to_list() == ["acc1", "acc5", "acc1"]
    r = s.row(0, named=True)
    assert r["mean"] == pytest.approx(0.2) and r["std"] == pytest.approx(0.1) and r["n_seeds"] == 3
    assert 0.1 <= r["ci_lo"] < 0.2 < r["ci_hi"] <= 0.3
    assert r["subset_size"] == 700 and r["samples_seen"] == 19968
    assert r["values"] == [0.1, 0.2, 0.3] and r["seeds"] == [0, 1, 2]
    flat = s.row(1, named=True)
    assert flat["std"] == 0.0 and flat["ci_lo"] == pytest.approx(0.5) and flat["ci_hi"] == pytest.approx(0.5)
    one = s.row(2, named=True)
    assert one["std"] == 0.0 and one["n_seeds"] == 1 and (one["ci_lo"], one["ci_hi"]) == (0.6, 0.6)
    # deterministic and independent of row order
    s2 = summarize(df.reverse(), {"dbp": 700, "full": 2900}, {"dbp": 19968, "full": 19968}, n_boot=200, seed=0)
    assert s2.equals(s)


def test_summarize_rejects_duplicates_and_missing_columns() -> None:
    df = pl.DataFrame({"strategy": ["dbp", "dbp"], "seed": [0, 0], "task": ["zeroshot"] * 2, "metric": ["acc1"] * 2, "value": [0.1, 0.2]})
    with pytest.raises(ValueError, match="2 rows"):
        summarize(df, {}, {}, 10, 0)
    with pytest.raises(ValueError, match="lack columns"):
        summarize(df.drop("seed"), {}, {}, 10, 0)


SEP_HIGH = [0.80, 0.81, 0.82]
BASE = [0.50, 0.51, 0.52]
SEP_LOW = [0.20, 0.21, 0.22]
OVERLAP = [0.49, 0.53, 0.55]


def test_compare_intervals() -> None:
    a = {"n_seeds": 3, "ci_lo": 0.6, "ci_hi": 0.7}
    assert compare_intervals(a, {"n_seeds": 3, "ci_lo": 0.4, "ci_hi": 0.5}) == "higher"
    assert compare_intervals(a, {"n_seeds": 3, "ci_lo": 0.75, "ci_hi": 0.8}) == "lower"
    assert compare_intervals(a, {"n_seeds": 3, "ci_lo": 0.7, "ci_hi": 0.8}) == "same"  # touching = overlap
    assert compare_intervals(a, {"n_seeds": 1, "ci_lo": 0.1, "ci_hi": 0.1}) == "unknown"


def test_verdicts_separated_overlapping_and_dbp_loses() -> None:
    df = _rows({
        "dbp": {"acc1": SEP_HIGH, "acc5": OVERLAP, "image_retrieval_recall@1": SEP_LOW},
        "random": {"acc1": SEP_HIGH, "acc5": BASE, "image_retrieval_recall@1": SEP_HIGH},
        "full": {"acc1": BASE, "acc5": BASE, "image_retrieval_recall@1": BASE},
    })
    s = summarize(df, {}, {}, n_boot=1000, seed=0)
    v = verdicts(s)
    text = "\n".join(v)
    assert v[0] == "dbp vs full: higher on 1, lower on 1, no difference on 1 of 3 metrics (95% bootstrap intervals over seeds)."
    assert "coarse" in text
    acc1 = next(x for x in v if x.startswith("acc1: dbp 0.810"))
    assert "dbp is higher than full (the intervals separate)" in acc1
    acc5 = next(x for x in v if x.startswith("acc5: dbp"))
    assert "no difference (the intervals overlap)." in acc5
    # acc1: both seed spreads 0.01, 3 seeds each: (t_0.975,4 + t_0.8,4) * sqrt(2 * 0.01^2 / 3)
    assert acc1.endswith(f"These seeds detect a difference of {(2.776445 + 0.940965) * (2e-4 / 3) ** 0.5:.3f} or more.")
    assert any(x.startswith("The smallest difference the seeds can detect (dbp vs full") for x in v)
    ir = next(x for x in v if x.startswith("image_retrieval_recall@1: dbp 0.210"))
    assert "dbp is lower than full" in ir and "loses" in ir
    assert "acc1, dbp against the other strategies: no difference from random." in v
    assert "acc5, dbp against the other strategies: no difference from random." in v
    assert "image_retrieval_recall@1, dbp against the other strategies: lower than random." in v


def test_a_saturated_metric_is_said_to_be_unable_to_separate() -> None:
    s = summarize(_rows({"dbp": {"acc5": [1.0, 1.0, 1.0], "acc1": SEP_HIGH}, "full": {"acc5": [1.0, 1.0, 1.0],
                                                                                       "acc1": BASE}}), {}, {}, 200, 0)
    v = verdicts(s)
    acc5 = next(x for x in v if x.startswith("acc5: dbp"))
    assert acc5.endswith("The seeds score alike here (the metric is saturated or constant): it cannot separate.")
    span = next(x for x in v if x.startswith("The smallest difference"))
    assert "0.000" not in span  # the saturated metric is not counted as detecting everything


def test_detectable_difference_by_hand() -> None:
    a = {"n_seeds": 3, "std": 0.02}
    b = {"n_seeds": 5, "std": 0.01}
    # df = 6: t_0.975 = 2.446912, t_0.8 = 0.905697
    expected = (2.446912 + 0.905697) * (0.02**2 / 3 + 0.01**2 / 5) ** 0.5
    assert detectable_difference(a, b) == pytest.approx(expected, rel=1e-5)
    assert detectable_difference(a, {"n_seeds": 1, "std": 0.0}) is None


def test_verdicts_all_overlap_and_single_seed() -> None:
    s = summarize(_rows({"dbp": {"acc1": OVERLAP}, "full": {"acc1": BASE}}), {}, {}, 500, 0)
    assert verdicts(s)[0] == "dbp vs full: no difference on any of the 1 metrics (every 95% interval overlaps)."
    s1 = summarize(_rows({"dbp": {"acc1": [0.9]}, "full": {"acc1": [0.1]}}), {}, {}, 500, 0)
    v = verdicts(s1)
    assert "no difference can be claimed" in v[0]
    assert any("cannot tell" in x for x in v)
    assert verdicts(summarize(_rows({"full": {"acc1": BASE}}), {}, {}, 10, 0)) == ["No scores for dbp: nothing to compare."]


def test_markdown_table_and_plot() -> None:
    df = _rows({
        "full": {"acc1": BASE, "text_retrieval_recall@5": BASE},
        "dbp": {"acc1": [0.1, 0.2, 0.3], "text_retrieval_recall@5": SEP_HIGH},
    })
    s = summarize(df, {"dbp": 1234, "full": 5678}, {"dbp": 19968, "full": 19968}, 300, 0)
    md = markdown_table(s)
    lines = md.strip().splitlines()
    assert lines[0] == "| strategy | subset size | samples seen | seeds | acc1 | text_retrieval_recall@5 |"
    assert lines[2].startswith("| dbp | 1,234 | 19,968 | 3 | 0.200 ± 0.100 [")
    assert lines[3].startswith("| full | 5,678 | 19,968 | 3 | 0.510 ± 0.010 [")
    png = comparison_png(plot_panels(s))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    meta = summary_metadata(s)
    assert meta["dbp/acc1"].startswith("0.200 ± 0.100 [") and meta["dbp/acc1"].endswith("(n=3)")


# ---------------------------------------------------------------------------
# DataComp's aggregate and samples seen


def _jsonl(main: dict[str, float]) -> list[dict]:
    return [{"key": d, "dataset": d, "metrics": {"main_metric": v}} for d, v in main.items()]


def test_aggregate_summary_table_and_panels() -> None:
    from dbprune_assets.core.models.compare import (
        aggregate_markdown,
        aggregate_panels,
        aggregate_rows,
        aggregate_summary,
        aggregate_table_rows,
    )

    results = {
        ("full", 0): _jsonl({"ImageNet 1k": 0.5, "CIFAR-100": 0.4, "shapes": 0.9}),
        ("full", 1): _jsonl({"ImageNet 1k": 0.7, "CIFAR-100": 0.6, "shapes": 0.8}),
        ("dbp", 0): _jsonl({"ImageNet 1k": 0.6, "CIFAR-100": 0.2, "shapes": 1.0}),
    }
    rows = aggregate_rows(results)
    assert set(rows["task"]) == {"datacomp"}
    agg = aggregate_summary(rows, {"dbp": 10, "full": 20}, {"dbp": 12800, "full": 12800}, n_boot=200, seed=0)
    assert agg["strategy"].to_list() == ["dbp"] * 3 + ["full"] * 3
    assert agg["metric"].to_list() == ["ImageNet", "VTAB", "Average"] * 2  # DataComp's group order
    by = {(r["strategy"], r["metric"]): r for r in agg.to_dicts()}
    # full: ImageNet 0.5, 0.7 -> 0.6 ± 0.1414; Average per seed (0.5+0.4+0.9)/3 = 0.6, (0.7+0.6+0.8)/3 = 0.7 -> 0.65
    assert by[("full", "ImageNet")]["mean"] == pytest.approx(0.6)
    assert by[("full", "ImageNet")]["std"] == pytest.approx(0.2 / np.sqrt(2))
    assert by[("full", "Average")]["mean"] == pytest.approx(0.65)
    assert by[("dbp", "VTAB")]["mean"] == pytest.approx(0.2) and by[("dbp", "VTAB")]["n_seeds"] == 1
    assert (by[("dbp", "VTAB")]["n_tasks"], by[("dbp", "VTAB")]["n_group"]) == (1, 13)
    assert by[("dbp", "Average")]["n_tasks"] == 3
    table = aggregate_table_rows(agg)
    assert list(table[0]) == ["strategy", "samples seen", "seeds", "ImageNet", "VTAB (1 of 13)", "Average (3 tasks)"]
    assert table[0]["strategy"] == "dbp" and table[0]["samples seen"] == "12,800"
    assert table[1]["Average (3 tasks)"].startswith("0.650 ± 0.071 [")
    md = aggregate_markdown(agg).splitlines()
    assert md[0] == "| strategy | samples seen | seeds | ImageNet | VTAB (1 of 13) | Average (3 tasks) |"
    assert [p.title for p in aggregate_panels(agg)] == ["DataComp ImageNet", "DataComp VTAB", "DataComp Average"]


def test_samples_seen_sentence() -> None:
    from dbprune_assets.core.models.compare import samples_seen_sentence

    assert samples_seen_sentence({"dbp": 12800, "full": 12800}) == (
        "Every model saw 12,800 training samples (steps × global batch), at equal compute.")
    s = samples_seen_sentence({"full": 25600, "dbp": 12800})
    assert "dbp 12,800; full 25,600" in s and "not at equal compute" in s
    assert "unknown" in samples_seen_sentence({"dbp": None})  # type: ignore[dict-item]


def test_compare_strategies_writes_the_aggregate(tmp_path) -> None:
    import json

    from dbprune_assets.core.models.compare import compare_strategies
    from dbprune_assets.core.models.evaluate import eval_results_path, write_eval_results
    from dbprune_assets.core.store.layout import Layout
    from dbprune_assets.core.models.train import RESULT_FILE

    layout = Layout.from_env(tmp_path / "home", tmp_path / "pool")
    for strategy, acc in (("dbp", [0.3, 0.5]), ("full", [0.2, 0.4])):
        layout.table("eval", strategy).parent.mkdir(parents=True, exist_ok=True)
        pl.DataFrame({"strategy": [strategy] * 2, "seed": [0, 1], "task": ["shapes"] * 2, "metric": ["acc1"] * 2,
                      "value": acc}).write_parquet(layout.table("eval", strategy))
        layout.model_dir(strategy).mkdir(parents=True)
        (layout.model_dir(strategy) / RESULT_FILE).write_text(json.dumps({"samples_seen": 12800}))
        for seed, v in enumerate(acc):
            write_eval_results(eval_results_path(layout, strategy, seed), _jsonl({"shapes": v, "ImageNet 1k": v / 2}))
    out = compare_strategies(layout, ["dbp", "full"], n_boot=100)
    assert out is not None and out.aggregate is not None
    text = (layout.artefact_dir("comparison") / "comparison.md").read_text()
    assert "Every model saw 12,800 training samples" in text
    assert "### DataComp-style aggregate" in text and "| dbp | 12,800 | 2 | 0.200 ± 0.071 [" in text
    assert pl.read_parquet(layout.table("comparison", "datacomp"))["metric"].to_list() == ["ImageNet", "Average"] * 2
    for p in (layout.artefact_dir("eval_scores")).rglob("eval_results.jsonl"):
        p.unlink()
    out = compare_strategies(layout, ["dbp", "full"], n_boot=100)
    assert out is not None and out.aggregate is None and not layout.table("comparison", "datacomp").exists()
    assert "DataComp" not in (layout.artefact_dir("comparison") / "comparison.md").read_text()
