"""What a strategy keeps, measured against a pool's ground truth.

The sample pools (both formats) plant their defects and record them in
``ground_truth.parquet`` (:mod:`dbprune_assets.samplepool`); a user pool may
bring a parquet in the same schema (``strategies.ground_truth``).  Given one
strategy's decisions, :func:`truth_quality` measures, without training
anything (so without training noise):

``duplicates_kept``
    the share of the planted redundant copies kept: over the duplicate groups
    ``g`` (``dup_group >= 0``, ``n_g`` rows, ``k_g`` of them kept),
    ``sum max(k_g - 1, 0) / sum (n_g - 1)`` (the first copy of a group is not
    redundant).
``mismatches_kept``
    the share of the mismatched pairs (a caption of another concept) kept.
``concepts_covered``, ``concepts_covered_10``
    concepts with at least 1 and at least 10 kept samples.
``budget_most_varied``, ``budget_least_varied``
    the share of the kept samples whose concept is among the ``ceil(n / 5)``
    concepts of highest (lowest) planted ``variability``, of the ``n`` concepts
    of the truth (ties by concept id).
``concept_entropy``
    the Shannon entropy (nats) of the kept samples' concept distribution,
    ``-sum p_c ln p_c``.

A truth row is a ``(shard, uid)``; it is matched to the decisions on the same
key (a uid repeated inside a shard is one sample: kept when any of its rows
is).  Rows of the truth that no decision names (a shard no longer in the
pool) are left out, and said.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from dbprune_assets.core.store.history import decisions_by_key

if TYPE_CHECKING:
    from dbprune_assets.core.store.layout import Layout

#: the metrics, in display order, and whether a higher value is better (None: neither)
METRICS: dict[str, bool | None] = {
    "duplicates_kept": False,
    "mismatches_kept": False,
    "concepts_covered": True,
    "concepts_covered_10": True,
    "budget_most_varied": None,
    "budget_least_varied": None,
    "concept_entropy": True,
}
#: the columns the truth needs
TRUTH_COLUMNS: tuple[str, ...] = ("uid", "shard", "concept", "variability", "dup_group", "mismatched")
#: the file a generated pool ships
POOL_FILE = "ground_truth.parquet"


def find_ground_truth(pool: Path, setting: str | None) -> Path | None:
    """The ground-truth parquet: ``strategies.ground_truth`` when set (it must
    exist), else the pool's own ``ground_truth.parquet``, else None."""
    if setting:
        path = Path(setting).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"strategies.ground_truth: {path} is not a file; give a parquet with the columns "
                                    f"{', '.join(TRUTH_COLUMNS)} or unset the setting")
        return path
    path = Path(pool) / POOL_FILE
    return path if path.is_file() else None


@dataclass(frozen=True)
class TruthQuality:
    """One strategy's metrics against the truth."""

    strategy: str
    values: dict[str, float]  #: metric -> value, every metric of :data:`METRICS`
    matched: int  #: truth rows (shard, uid) the decisions name
    unmatched: int  #: truth rows they do not (shards no longer in the pool)

    def rows(self) -> list[dict[str, Any]]:
        """The ``truth_quality`` catalog rows: strategy, metric, value."""
        return [{"strategy": self.strategy, "metric": m, "value": float(self.values[m])} for m in METRICS]


def truth_quality(strategy: str, decisions: Path, truth: Path, con: Any) -> TruthQuality:
    """The metrics of the module docstring for ``strategy``'s ``decisions``
    file against the ground-truth parquet ``truth``, computed on the DuckDB
    connection ``con`` (out of core).  ValueError when the truth lacks a
    column or names no sample of the decisions."""
    cols = {r[0] for r in con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [str(truth)]).fetchall()}
    missing = [c for c in TRUTH_COLUMNS if c not in cols]
    if missing:
        raise ValueError(f"{truth}: the ground truth lacks the column(s) {', '.join(missing)} "
                         f"(expected {', '.join(TRUTH_COLUMNS)}, the sample pool's schema)")
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE tq AS
        WITH t AS (SELECT shard, uid, any_value(concept) AS concept, any_value(variability) AS variability,
                          any_value(dup_group) AS dup_group, bool_or(coalesce(mismatched, false)) AS mismatched
                   FROM read_parquet($truth) GROUP BY shard, uid),
             d AS {decisions_by_key("$decisions")}
        SELECT t.*, d.k AS keep FROM t LEFT JOIN d ON d.shard = t.shard AND d.uid = t.uid
        """,
        {"truth": str(truth), "decisions": str(decisions)},
    )
    matched, unmatched = con.execute(
        "SELECT count(keep), count(*) FILTER (WHERE keep IS NULL) FROM tq").fetchall()[0]
    if not matched:
        raise ValueError(f"{truth}: no (shard, uid) of the ground truth is a sample of {decisions}; "
                         "the ground truth describes another pool")
    values = _metrics(con)
    con.execute("DROP TABLE tq")
    return TruthQuality(strategy, values, int(matched), int(unmatched))


def _metrics(con: Any) -> dict[str, float]:
    """The metrics over the temp table ``tq`` (truth columns and ``keep``, NULL when unmatched)."""
    nan = float("nan")
    redundant, kept_redundant = con.execute(
        """SELECT sum(n - 1), sum(greatest(k - 1, 0)) FROM (
             SELECT count(*) AS n, count(*) FILTER (WHERE keep) AS k FROM tq
             WHERE keep IS NOT NULL AND dup_group IS NOT NULL AND dup_group >= 0 GROUP BY dup_group)"""
    ).fetchall()[0]
    mismatched, kept_mismatched = con.execute(
        "SELECT count(*) FILTER (WHERE mismatched), count(*) FILTER (WHERE mismatched AND keep) "
        "FROM tq WHERE keep IS NOT NULL").fetchall()[0]
    concepts = con.execute(
        """SELECT concept, any_value(variability) AS v, count(*) FILTER (WHERE keep) AS k
           FROM tq WHERE keep IS NOT NULL AND concept IS NOT NULL GROUP BY concept"""
    ).fetchall()
    kept = sum(k for _, _, k in concepts)
    fifth = -(-len(concepts) // 5)  # ceil(n / 5)
    by_variability = sorted(concepts, key=lambda c: (-(c[1] if c[1] is not None else float("-inf")), c[0]))
    least = sorted(concepts, key=lambda c: ((c[1] if c[1] is not None else float("inf")), c[0]))

    def share(rows: list[tuple[Any, Any, int]]) -> float:
        return sum(k for _, _, k in rows) / kept if kept else nan

    import math

    entropy = -sum((k / kept) * math.log(k / kept) for _, _, k in concepts if k) if kept else nan
    return {
        "duplicates_kept": float(kept_redundant) / float(redundant) if redundant else nan,
        "mismatches_kept": kept_mismatched / mismatched if mismatched else nan,
        "concepts_covered": float(sum(1 for _, _, k in concepts if k >= 1)),
        "concepts_covered_10": float(sum(1 for _, _, k in concepts if k >= 10)),
        "budget_most_varied": share(by_variability[:fifth]),
        "budget_least_varied": share(least[:fifth]),
        "concept_entropy": entropy,
    }


def measure(strategy: str, decisions: Path, truth: Path, tmp_root: Path, threads: int | None = None) -> TruthQuality:
    """:func:`truth_quality` on a bounded DuckDB connection of its own (a
    scratch folder under ``tmp_root``)."""
    from dbprune_assets.core.store.atomic import scratch_dir
    from dbprune_assets.core.store.duck import connect

    Path(tmp_root).mkdir(parents=True, exist_ok=True)
    with scratch_dir(Path(tmp_root), f"truth-{strategy}-") as work:
        con = connect(Path(work), threads=threads)
        try:
            return truth_quality(strategy, Path(decisions), Path(truth), con)
        finally:
            con.close()


# ---------------------------------------------------------------------------
# the table, verdicts and plot data of every strategy's truth_quality rows

#: how each metric reads in a table head and a verdict
LABELS: dict[str, str] = {
    "duplicates_kept": "planted duplicate copies kept",
    "mismatches_kept": "mismatched captions kept",
    "concepts_covered": "concepts with >= 1 kept",
    "concepts_covered_10": "concepts with >= 10 kept",
    "budget_most_varied": "budget on the most varied fifth of concepts",
    "budget_least_varied": "budget on the least varied fifth of concepts",
    "concept_entropy": "entropy of the kept concepts (nats)",
}


def read_truth(tables: Path, strategies: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{strategy: {metric: value}}`` of the strategies (in the given order)
    that have a ``tables/truth_quality/<strategy>.parquet`` under ``tables``."""
    import polars as pl

    out: dict[str, dict[str, float]] = {}
    for s in strategies:
        path = Path(tables) / "truth_quality" / f"{s}.parquet"
        if path.is_file():
            out[s] = {m: float(v) for m, v in pl.read_parquet(path).select("metric", "value").iter_rows()}
    return out


def _fmt(metric: str, v: float) -> str:
    if v != v:  # NaN: the truth has none of it
        return "n/a"
    return f"{v:.0f}" if metric.startswith("concepts_covered") else f"{v:.3f}"


def truth_rows(found: Mapping[str, Mapping[str, float]]) -> list[dict[str, str]]:
    """One row per strategy: its metrics, formatted."""
    return [{"strategy": s, **{m: _fmt(m, v.get(m, float("nan"))) for m in METRICS}} for s, v in found.items()]


def truth_verdicts(found: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Plain lines on what differs: each metric's order (best first where one
    direction is better), then the paper's mechanisms where their strategies ran."""
    lines = []
    for m, higher in METRICS.items():
        have = [(s, v[m]) for s, v in found.items() if m in v and v[m] == v[m]]
        if len(have) < 2:
            continue
        have.sort(key=lambda sv: (-sv[1] if higher else sv[1]) if higher is not None else -sv[1])
        order = "best first" if higher is not None else "highest first"
        lines.append(f"{LABELS[m]} ({order}): " + ", ".join(f"{s} {_fmt(m, v)}" for s, v in have))

    def get(s: str, m: str) -> float | None:
        v = found.get(s, {}).get(m)
        return v if v is not None and v == v else None

    if (a := get("dbp", "budget_most_varied")) is not None and (b := get("random", "budget_most_varied")) is not None:
        lines.append(f"DBP's mechanism: dbp spends {a:.1%} of its budget on the most varied fifth of concepts, "
                     f"random {b:.1%} ({'more' if a > b else 'NOT more'} than random)")
    if (full := get("full", "duplicates_kept")) is not None:
        dedup = {s: v for s in found if s not in ("full",) and (v := get(s, "duplicates_kept")) is not None}
        if dedup:
            lines.append(f"SemDeDup: the strategies after it keep {min(dedup.values()):.1%} to "
                         f"{max(dedup.values()):.1%} of the planted redundant copies; full keeps {full:.0%}")
    return lines


def truth_markdown(found: Mapping[str, Mapping[str, float]]) -> str:
    """The section ``comparison.md`` and ``dbprune run``'s summary print: a
    table (a row per strategy) and the verdicts; empty without rows."""
    if not found:
        return ""
    rows = truth_rows(found)
    head = ["strategy", *METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r[h] for h in head) + " |" for r in rows]
    return ("### What each strategy keeps, against the ground truth\n\nMeasured on the pool's planted truth, not "
            "trained (core/strategies/truth.py; catalog view truth_quality):\n\n" + "\n".join(lines) + "\n\n"
            + "\n".join(f"- {v}" for v in truth_verdicts(found)) + "\n")


def summary_lines(layout: Layout, shown: bool) -> list[str]:
    """``dbprune run``'s summary lines on the strategies: what their steps
    said (targets used, fewer than M kept, ...) and, unless the comparison
    already ``shown`` it, the ground-truth table."""
    from dbprune_assets.core.store.state import read_state
    from dbprune_assets.core.strategies import registry

    notes = [n for s in registry.names() if (st := read_state(layout, "pruned_subset", s)) is not None
             for n in st.summary.get("notes") or []]
    truth = "" if shown else truth_markdown(read_truth(layout.home / "tables", registry.names()))
    return ([""] + notes if notes else []) + (["", truth.rstrip()] if truth else [])
