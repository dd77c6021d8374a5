"""The engine: one strategy's keep/drop decision, with a reason, for every sample.

:func:`decide` checks the arguments and the input tables, lets the strategy
create ``sel(shard, row)`` (:meth:`~dbprune_assets.core.strategies.base.Strategy.select`),
writes one decision per samples row with the reason precedence below, and
checks what it wrote (one row per sample, M kept, every cluster at its quota).
It runs in DuckDB, out of core (a memory limit and a spill folder under the
temp root), so memory is bounded by the settings, not the pool.

A dropped sample's ``reason`` is the first rule that removed it:
``corrupt`` (status != ok) > ``duplicate`` (in the SemDeDup duplicates) >
``low_clip_score`` (ok, not a duplicate, not a candidate) > ``pruned``
(eligible, not selected); every kept sample has reason ``kept``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dbprune_assets.core.pool.uids import samples_view
from dbprune_assets.core.store.atomic import atomic_path, scratch_dir
from dbprune_assets.core.store.duck import connect, create_view, distinct_count, parquet_files
from dbprune_assets.core.store.history import Provenance, has_provenance, provenance_sql, run_changes
from dbprune_assets.core.strategies.base import INPUTS, Prepared, Strategy, scalar
from dbprune_assets.core.strategies.quotas import as_quotas, count_kept, quota_table
from dbprune_assets.core.strategies.registry import get

#: every value the ``reason`` column can take, in precedence order (kept last)
REASONS: tuple[str, ...] = ("corrupt", "duplicate", "low_clip_score", "pruned", "kept")


@dataclass
class DecisionSummary:
    """What :func:`decide` wrote."""

    strategy: str
    path: Path
    rows: int  #: decisions written (== samples rows)
    kept: int
    eligible: int  #: the pool the strategy selects from
    M: int | None  #: the requested size (None for a strategy that is not sized: semdedup, full)
    reasons: dict[str, int] = field(default_factory=dict)  #: count per reason, every reason present
    per_cluster_kept: np.ndarray | None = None  #: quota strategies (dbp / ssp): kept per cluster (index = cluster id)
    quotas: np.ndarray | None = None  #: quota strategies (dbp / ssp): the quotas used
    #: against the decisions this file replaced: samples, kept, added, removed, redecided, ... (history.py)
    changes: dict[str, int] = field(default_factory=dict)
    #: lines for the output: what the strategy's prepare step used, why it kept fewer than M
    notes: list[str] = field(default_factory=list)

    def metadata(self) -> dict[str, Any]:
        """Plain values for asset metadata / logs."""
        out: dict[str, Any] = {
            "strategy": self.strategy,
            "rows": self.rows,
            "kept": self.kept,
            "eligible": self.eligible,
            "M": self.M,
            **{f"reason_{r}": int(self.reasons.get(r, 0)) for r in REASONS},
        }
        if self.per_cluster_kept is not None:
            out["clusters"] = int(len(self.per_cluster_kept))
            out["clusters_with_kept"] = int(np.count_nonzero(self.per_cluster_kept))
        return out

    def quota_table(self) -> Any:
        """The ``quotas`` rows of this run (quota strategies only)."""
        if self.quotas is None or self.per_cluster_kept is None:
            raise ValueError(f"strategy {self.strategy!r} has no per-cluster quotas")
        return quota_table(self.strategy, self.quotas, self.per_cluster_kept)


def decide(
    strategy: str,
    tables: Path,
    M: int | None,
    quotas: np.ndarray | None,
    seed: int,
    out_path: Path,
    tmp_root: Path,
    memory_limit: str = "1GB",
    threads: int | None = None,
    *,
    origin: Path | None = None,
    provenance: Provenance | None = None,
    prepared: Prepared | None = None,
    checked: set[str] | None = None,
) -> DecisionSummary:
    """Write ``out_path`` (``tables/decisions/<strategy>.parquet``): one row per
    samples row, columns strategy, uid, shard, keep, reason, ordered by
    (shard, row).  See the package docstring for the rules.

    ``strategy`` is a registered name (:mod:`~.registry`).  ``M`` is the subset
    size of a sized strategy (dbp / ssp / random / clip_score; for the quota
    strategies dbp / ssp it defaults to ``sum(quotas)`` and must equal it);
    the others ignore it.  ``quotas`` (dbp / ssp) holds ``N_j`` per DBP cluster
    id.  ``seed`` seeds the random baseline's ``uid_hash``.  Raises ValueError
    on inconsistent inputs (M above the eligible count, quotas not summing to
    M or above a cluster's size, candidates that are not ok samples, ...).

    ``provenance``: the run and fits deciding, on each row this call changes
    (``core/store/history.py``); rows decided as before keep theirs.

    ``prepared``: what the strategy's :meth:`~.base.Strategy.prepare` made
    (its views are opened beside the input tables, its notes reported).

    ``checked``: the input checks (``samples``, ``candidates``,
    ``assignments``) already passed on these ``tables``; this call skips them
    and adds the ones it passes (a ``pruned_subset`` step checks its copy
    once for all its strategies).

    ``tables`` is a tables root: ``$DBPRUNE_HOME/tables`` or its one-file-per-table
    copy (:mod:`~.subset_inputs`, which a ``pruned_subset`` step reads once for
    all its strategies); ``origin`` is then the root it was copied from, the
    one error messages name.
    """
    strat = get(strategy)
    tables, out_path, tmp_root = Path(tables), Path(out_path), Path(tmp_root)
    M, q = _size_and_quotas(strat, M, quotas)
    files = _input_files(strat, tables, Path(origin) if origin is not None else tables)
    tmp_root.mkdir(parents=True, exist_ok=True)
    with scratch_dir(tmp_root, f"decide-{strat.name}-") as work:
        con = connect(Path(work), memory_limit, threads)
        try:
            _open_inputs(con, files, tables, strat.needs)
            for name, view_files in (prepared.views if prepared is not None else {}).items():
                create_view(con, name, view_files)
            _validate_inputs(con, strat, checked if checked is not None else set())
            eligible = strat.select(con, M, q, seed)
            expected = min(M, eligible) if M is not None and strat.may_fall_short else M
            who = provenance or Provenance("", "", "")
            previous = out_path if has_provenance(con, out_path) else None
            with atomic_path(out_path, tmp_root) as tmp:
                _write_decisions(con, strat.name, tmp, previous, who)
                counts, per_cluster = _check_written(con, strat.name, tmp, expected, q)
                changes = run_changes(con, tmp, out_path if out_path.is_file() else None)
        finally:
            con.close()
    return DecisionSummary(
        strategy=strat.name,
        path=out_path,
        rows=sum(counts.values()),
        kept=int(counts.get("kept", 0)),
        eligible=int(eligible),
        M=M,
        reasons={r: int(counts.get(r, 0)) for r in REASONS},
        per_cluster_kept=per_cluster,
        quotas=q,
        changes=changes,
        notes=[*(prepared.notes if prepared is not None else []),
               *([f"{strat.name}: kept all {eligible} eligible samples, fewer than M = {M}"]
                 if expected is not None and M is not None and expected < M else [])],
    )


def _size_and_quotas(strategy: Strategy, M: int | None, quotas: Any) -> tuple[int | None, np.ndarray | None]:
    """The subset size (None unless sized) and the checked quotas (None unless quota-based)."""
    q: np.ndarray | None = None
    if strategy.quota_based:
        if quotas is None:
            raise ValueError(f"strategy {strategy.name!r} needs per-cluster quotas")
        q = as_quotas(quotas)
        if M is None:
            M = int(q.sum())
    if not strategy.sized:
        return None, q
    if M is None:
        raise ValueError(f"strategy {strategy.name!r} needs the subset size M")
    M = int(M)
    if M < 0:
        raise ValueError(f"subset size M must be >= 0, got {M}")
    return M, q


def _input_files(strategy: Strategy, tables: Path, named: Path) -> dict[str, list[Path]]:
    """The parquet files of every input table; ValueError (naming the root
    ``named``) when samples or a table the strategy needs has none."""
    files = {t: parquet_files(tables / t) for t in INPUTS}
    if not files["samples"]:
        raise ValueError(f"no samples table under {named / 'samples'}: run ingest first")
    for t in strategy.needs:
        if not files[t]:
            raise ValueError(f"strategy {strategy.name!r} needs the {t} table, but {named / t} holds no parquet file")
    return files


def _open_inputs(con: Any, files: dict[str, list[Path]], tables: Path, needs: tuple[str, ...]) -> None:
    """A typed view per input table (samples with its pool-wide status; an
    empty view for a table the strategy does not need), and ``assign`` for
    ``assignments``."""
    samples_view(con, "samples", files["samples"], tables, INPUTS["samples"])
    for t, cols in INPUTS.items():
        if t != "samples":
            create_view(con, t, files[t] if t in needs else [], columns=cols)
    con.execute("CREATE OR REPLACE TEMP VIEW assign AS SELECT * FROM assignments")


# ---------------------------------------------------------------------------
# the input tables agree
# ---------------------------------------------------------------------------
def _validate_inputs(con: Any, strategy: Strategy, checked: set[str]) -> None:
    """Fail early, naming the numbers, when the input tables disagree: samples
    always, candidates and assignments when the strategy reads them; those in
    ``checked`` passed before on the same tables, and the ones that pass now
    are added to it."""
    if "samples" not in checked:
        n, n_keys = scalar(con, "SELECT count(*) FROM samples"), distinct_count(con, "shard, row", "samples")
        if n != n_keys:
            raise ValueError(f"samples: {n} rows but {n_keys} distinct (shard, row); re-run ingest")
        checked.add("samples")
    for table, check in (("candidates", _check_candidates), ("assignments", _check_assignments)):
        if table in strategy.needs and table not in checked:
            check(con)
            checked.add(table)


def _check_candidates(con: Any) -> None:
    """Candidates are unique, ok samples and not SemDeDup duplicates."""
    n_c_keys, n_c_uids = distinct_count(con, "shard, row", "candidates"), distinct_count(con, "shard, uid", "candidates")
    n_c, matched, not_ok, dup = con.execute(
        """
        SELECT count(*), count(s.row), count(*) FILTER (WHERE s.row IS NOT NULL AND s.status IS DISTINCT FROM 'ok'),
               count(d.uid)
        FROM candidates c
        LEFT JOIN samples s ON s.shard = c.shard AND s.row = c.row AND s.uid = c.uid
        LEFT JOIN (SELECT DISTINCT shard, uid FROM duplicates) d ON d.shard = c.shard AND d.uid = c.uid
        """
    ).fetchall()[0]
    if n_c != n_c_keys or n_c != n_c_uids:
        raise ValueError(f"candidates: {n_c} rows but {n_c_keys} distinct (shard, row) and {n_c_uids} distinct (shard, uid)")
    if matched != n_c:
        ex = con.execute(
            """SELECT c.shard, c.row, c.uid FROM candidates c ANTI JOIN samples s
               ON s.shard = c.shard AND s.row = c.row AND s.uid = c.uid ORDER BY 1, 2 LIMIT 1"""
        ).fetchall()[0]
        raise ValueError(
            f"candidates: {n_c - matched} of {n_c} rows match no samples row (shard, row, uid), e.g. "
            f"shard {ex[0]} row {ex[1]} uid {ex[2]}; the tables are out of date"
        )
    if not_ok:
        raise ValueError(f"candidates: {not_ok} rows are samples whose status is not ok; the tables are out of date")
    if dup:
        raise ValueError(f"candidates: {dup} rows are SemDeDup duplicates; the tables are out of date")


def _check_assignments(con: Any) -> None:
    """Assignments cover the candidates one to one, with a distance and a cluster id each."""
    n_c = scalar(con, "SELECT count(*) FROM candidates")
    n_a_keys = distinct_count(con, "shard, row", "assign")
    n_a, in_cand, bad_dist, bad_cluster = con.execute(
        """
        SELECT count(*), count(c.row),
               count(*) FILTER (WHERE a.distance IS NULL OR isnan(a.distance)),
               count(*) FILTER (WHERE a.cluster IS NULL OR a.cluster < 0)
        FROM assign a LEFT JOIN candidates c ON c.shard = a.shard AND c.row = a.row AND c.uid = a.uid
        """
    ).fetchall()[0]
    if n_a != n_a_keys:
        raise ValueError(f"assignments: {n_a} rows but {n_a_keys} distinct (shard, row)")
    if in_cand != n_a or n_a != n_c:
        raise ValueError(
            f"assignments ({n_a} rows, {in_cand} of them candidates) do not cover the {n_c} candidates "
            "one to one; re-run cluster_assignments"
        )
    if bad_dist:
        raise ValueError(f"assignments: {bad_dist} rows have a NULL or NaN distance")
    if bad_cluster:
        raise ValueError(f"assignments: {bad_cluster} rows have a NULL or negative cluster id")


# ---------------------------------------------------------------------------
# writing and checking the decisions
# ---------------------------------------------------------------------------
def _write_decisions(con: Any, strategy: str, path: Path, previous: Path | None, who: Provenance) -> None:
    """COPY one decision per samples row to ``path``: kept when in ``sel``,
    else the first reason that removed it (the precedence of the docstring);
    then the row's provenance, carried from ``previous`` where it decided the
    same (``core/store/history.py``)."""
    # uid and shard as nullable columns (parquet OPTIONAL), as DuckDB writes them from several
    # files; from one file (a one-shard pool, or core/store/subset_inputs.py's copy) it would infer NOT
    # NULL from the file's statistics and write them REQUIRED, so the decisions' bytes would depend
    # on how the input tables are split.  The CASE is the identity on values.
    select = """
          SELECT CAST(? AS VARCHAR) AS strategy,
            CASE WHEN s.uid IS NULL THEN NULL ELSE s.uid END AS uid,
            CASE WHEN s.shard IS NULL THEN NULL ELSE s.shard END AS shard,
            (k.row IS NOT NULL) AS keep,
            CASE WHEN k.row IS NOT NULL THEN 'kept'
                 WHEN s.status IS DISTINCT FROM 'ok' THEN 'corrupt'
                 WHEN d.uid IS NOT NULL THEN 'duplicate'
                 WHEN c.row IS NULL THEN 'low_clip_score'
                 ELSE 'pruned' END AS reason,
            s.row AS _order
          FROM samples s
          LEFT JOIN (SELECT DISTINCT shard, uid FROM duplicates) d ON d.shard = s.shard AND d.uid = s.uid
          LEFT JOIN candidates c ON c.shard = s.shard AND c.row = s.row
          LEFT JOIN sel k ON k.shard = s.shard AND k.row = s.row"""
    query, _ = provenance_sql(select, previous)
    # stored first, then sorted: each spills past the memory limit (provenance_sql).  The CASEs are the
    # identity on values: they keep the columns nullable (parquet OPTIONAL) as the rows came, where the
    # stored table's statistics would have them written REQUIRED
    con.execute(f"CREATE OR REPLACE TABLE decided AS {query}", [who.run_id, who.fit_id, strategy])
    columns = ", ".join(c if c in ("strategy", "reason") else f"CASE WHEN {c} IS NULL THEN NULL ELSE {c} END AS {c}"
                        for c in ("strategy", "uid", "shard", "keep", "reason", "run_id", "fit_id"))
    con.execute(f"COPY (SELECT {columns} FROM decided ORDER BY shard, _order) TO ? (FORMAT parquet, COMPRESSION zstd)",
                [str(path)])
    con.execute("DROP TABLE decided")


def _check_written(con: Any, strategy: str, path: Path, M: int | None, q: np.ndarray | None
                   ) -> tuple[dict[str, int], np.ndarray | None]:
    """The written decisions' count per reason and, with quotas, kept per
    cluster; RuntimeError when they are not one per sample, M kept and every
    cluster at its quota (a bug: the selection guarantees them)."""
    create_view(con, "dec", [path], "decisions")
    counts = dict(con.execute("SELECT reason, count(*) FROM dec GROUP BY reason").fetchall())
    rows = sum(counts.values())
    n_samples = scalar(con, "SELECT count(*) FROM samples")
    if rows != n_samples:  # the joins are on unique keys, so this is a bug
        raise RuntimeError(f"{strategy}: wrote {rows} decisions for {n_samples} samples")
    kept = int(counts.get("kept", 0))
    if M is not None and kept != M:
        raise RuntimeError(f"{strategy}: kept {kept} samples, expected M = {M}")
    per_cluster = None
    if q is not None:
        per_cluster = count_kept(con, "dec", len(q))
        if not np.array_equal(per_cluster, q):
            bad = int(np.flatnonzero(per_cluster != q)[0])
            raise RuntimeError(f"{strategy}: cluster {bad} kept {int(per_cluster[bad])}, quota {int(q[bad])}")
    con.execute("DROP VIEW dec")
    return counts, per_cluster
