"""Selection strategies: a keep/drop decision with a reason for every sample.

One function, :func:`decide`, implements the "Strategies" table of
``docs/design.md`` in DuckDB, out of core (a memory limit and a spill folder
under the temp root), so memory is bounded by the settings, not the pool:

==============  =================  ====  =========================================
strategy        selects from       size  rule
==============  =================  ====  =========================================
``dbp``         candidates         M     per-cluster quotas ``N_j``, the ``N_j``
                                         members farthest from the centroid
``ssp``         candidates         M     same, with the uniform quotas
``random``      candidates         M     the M smallest ``uid_hash(seed, uid)``
``clip_score``  dedup survivors    M     top-M by clip_score
``semdedup``    candidates         all   every candidate
``full``        ``ok`` samples     all   everything usable
==============  =================  ====  =========================================

Every ordering ends in a total tie-break (uid, then shard and row), so the
decisions are a pure function of the input tables, M, the quotas and the seed.

A dropped sample's ``reason`` is the first rule that removed it:
``corrupt`` (status != ok) > ``duplicate`` (in the SemDeDup duplicates) >
``low_clip_score`` (ok, not a duplicate, not a candidate) > ``pruned``
(eligible, not selected); every kept sample has reason ``kept``.

Inputs are the parquet tables under the tables root (``samples``, ``scores``,
``duplicates``, ``candidates``, ``assignments``); a sample's status is its
pool-wide one (a uid seen in an earlier shard is ``duplicate_uid``,
:mod:`dbprune_assets.core.pool.uids`); candidates and assignments
are joined to samples on ``(shard, row)`` (unique per parquet row), duplicates
and scores on ``(shard, uid)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from dbprune_assets.core.method import dbp
from dbprune_assets.core.store.atomic import atomic_path, scratch_dir
from dbprune_assets.core.store.duck import connect, create_view, parquet_files
from dbprune_assets.core.settings import STRATEGIES
from dbprune_assets.core.pool.uids import samples_view

if TYPE_CHECKING:
    import polars as pl

#: every value the ``reason`` column can take, in precedence order (kept last)
REASONS: tuple[str, ...] = ("corrupt", "duplicate", "low_clip_score", "pruned", "kept")
#: strategies whose subset size is M (the others keep every eligible sample)
SIZED_STRATEGIES: tuple[str, ...] = ("dbp", "ssp", "random", "clip_score")
#: strategies that keep per-cluster quotas
QUOTA_STRATEGIES: tuple[str, ...] = ("dbp", "ssp")
#: the tables :func:`decide` reads and the columns it needs of each (views of
#: the same names, typed by ``duck.TABLES``)
INPUTS: dict[str, tuple[str, ...]] = {
    "samples": ("uid", "shard", "row", "status"),
    "scores": ("uid", "shard", "clip_score"),
    "duplicates": ("uid", "shard"),
    "candidates": ("uid", "shard", "row", "clip_score"),
    "assignments": ("uid", "shard", "row", "cluster", "distance"),
}


def strategy_quotas(strategy: str, clusters: pl.DataFrame) -> tuple[np.ndarray | None, int | None]:
    """``(quotas, M)`` of ``strategy`` from the DBP ``clusters`` table.

    ``M`` is the sum of the DBP quotas (every sized strategy keeps as many
    samples as DBP).  dbp: the table's ``quota`` column, in cluster order; ssp:
    the same quota solve with uniform probabilities ``P_j = 1/k``
    (:func:`dbp.solve_quotas` with the table's sizes and lower bounds); the
    other strategies have no quotas: ``(None, M)``.
    """
    t = clusters.sort("cluster")
    M = int(t["quota"].sum())
    if strategy == "dbp":
        return t["quota"].to_numpy().astype(np.int64), M
    if strategy == "ssp":
        sizes = t["size"].to_numpy().astype(np.int64)
        lb = t["lower_bound"].to_numpy().astype(np.int64)
        return dbp.solve_quotas(dbp.ssp_probabilities(len(sizes)), sizes, M, lb), M
    return None, M


def _scalar(con: Any, sql: str) -> Any:
    return con.execute(sql).fetchall()[0][0]


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------
@dataclass
class DecisionSummary:
    """What :func:`decide` wrote."""

    strategy: str
    path: Path
    rows: int  #: decisions written (== samples rows)
    kept: int
    eligible: int  #: the pool the strategy selects from
    M: int | None  #: the requested size (None for semdedup / full)
    reasons: dict[str, int] = field(default_factory=dict)  #: count per reason, every reason present
    per_cluster_kept: np.ndarray | None = None  #: dbp / ssp: kept per cluster (index = cluster id)
    quotas: np.ndarray | None = None  #: dbp / ssp: the quotas used

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
        """The ``quotas`` rows of this run (dbp / ssp only)."""
        if self.quotas is None or self.per_cluster_kept is None:
            raise ValueError(f"strategy {self.strategy!r} has no per-cluster quotas")
        return quota_table(self.strategy, self.quotas, self.per_cluster_kept)


# ---------------------------------------------------------------------------
# quotas table
# ---------------------------------------------------------------------------
def quota_table(strategy: str, quotas: np.ndarray, kept_per_cluster: np.ndarray | Mapping[int, int]) -> Any:
    """The SQL catalog's ``quotas`` rows: strategy, cluster, quota, kept (pyarrow Table).

    ``kept_per_cluster`` is an array indexed by cluster id or a mapping
    cluster -> kept (clusters absent from the mapping kept 0); compute it from
    written decisions with :func:`kept_per_cluster`.
    """
    import pyarrow as pa

    if strategy not in QUOTA_STRATEGIES:
        raise ValueError(f"quotas exist for {', '.join(QUOTA_STRATEGIES)} only, not {strategy!r}")
    q = _as_quotas(quotas)
    k = len(q)
    if isinstance(kept_per_cluster, Mapping):
        kept = np.zeros(k, dtype=np.int64)
        for c, n in kept_per_cluster.items():
            if not 0 <= int(c) < k:
                raise ValueError(f"kept_per_cluster names cluster {c}, outside 0..{k - 1}")
            kept[int(c)] = int(n)
    else:
        kept = np.asarray(kept_per_cluster, dtype=np.int64)
        if kept.shape != (k,):
            raise ValueError(f"kept_per_cluster has shape {kept.shape}, quotas ({k},)")
    return pa.table(
        {
            "strategy": pa.array([strategy] * k, pa.string()),
            "cluster": pa.array(np.arange(k, dtype=np.int32), pa.int32()),
            "quota": pa.array(q, pa.int64()),
            "kept": pa.array(kept, pa.int64()),
        }
    )


def kept_per_cluster(
    decisions_path: Path,
    tables: Path,
    k: int,
    tmp_root: Path,
    memory_limit: str = "1GB",
    threads: int | None = None,
) -> np.ndarray:
    """Kept samples per DBP cluster, from a written decisions file (SQL join on
    ``(shard, uid)`` with ``tables/assignments``); an int64 array of length k."""
    with scratch_dir(tmp_root, "kept-per-cluster-") as work:
        con = connect(Path(work), memory_limit, threads)
        try:
            create_view(con, "assign", parquet_files(Path(tables) / "assignments"), "assignments",
                        INPUTS["assignments"])
            create_view(con, "dec", [Path(decisions_path)], "decisions")
            return _kept_per_cluster(con, "dec", k)
        finally:
            con.close()


def _kept_per_cluster(con: Any, decisions_view: str, k: int) -> np.ndarray:
    rows = con.execute(
        f"""
        SELECT a.cluster, count(*) FROM (SELECT DISTINCT shard, uid FROM {decisions_view} WHERE keep) d
        JOIN assign a ON a.shard = d.shard AND a.uid = d.uid
        GROUP BY a.cluster
        """
    ).fetchall()
    out = np.zeros(k, dtype=np.int64)
    for c, n in rows:
        if not 0 <= c < k:
            raise ValueError(f"assignments name cluster {c}, outside 0..{k - 1}")
        out[c] = n
    return out


def _as_quotas(quotas: Any) -> np.ndarray:
    q = np.asarray(quotas)
    if q.ndim != 1:
        raise ValueError(f"quotas must be a 1-d array (one per cluster), got shape {q.shape}")
    if q.size and not np.issubdtype(q.dtype, np.integer):
        if not np.all(np.isfinite(q)) or not np.all(q == np.floor(q)):
            raise ValueError("quotas must be integers")
    q = q.astype(np.int64)
    if q.size and q.min() < 0:
        c = int(np.argmin(q))
        raise ValueError(f"quota of cluster {c} is negative ({int(q[c])})")
    return q


# ---------------------------------------------------------------------------
# decide
# ---------------------------------------------------------------------------
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
) -> DecisionSummary:
    """Write ``out_path`` (``tables/decisions/<strategy>.parquet``): one row per
    samples row, columns strategy, uid, shard, keep, reason, ordered by
    (shard, row).  See the module docstring for the rules.

    ``M`` is the subset size of dbp / ssp / random / clip_score (for dbp / ssp it
    defaults to ``sum(quotas)`` and must equal it); semdedup and full ignore it.
    ``quotas`` (dbp / ssp) holds ``N_j`` per DBP cluster id.  ``seed`` seeds the
    random baseline's ``uid_hash`` (:func:`register_uid_hash`).  Raises ValueError on inconsistent
    inputs (M above the eligible count, quotas not summing to M or above a
    cluster's size, candidates that are not ok samples, ...).

    ``tables`` is a tables root: ``$DBPRUNE_HOME/tables`` or its one-file-per-table
    copy (:mod:`~.subset_inputs`, which a ``pruned_subset`` step reads once for
    all its strategies); ``origin`` is then the root it was copied from, the
    one error messages name.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")
    tables = Path(tables)
    out_path = Path(out_path)
    tmp_root = Path(tmp_root)
    q: np.ndarray | None = None
    if strategy in QUOTA_STRATEGIES:
        if quotas is None:
            raise ValueError(f"strategy {strategy!r} needs per-cluster quotas")
        q = _as_quotas(quotas)
        if M is None:
            M = int(q.sum())
    if strategy in SIZED_STRATEGIES:
        if M is None:
            raise ValueError(f"strategy {strategy!r} needs the subset size M")
        M = int(M)
        if M < 0:
            raise ValueError(f"subset size M must be >= 0, got {M}")
    else:
        M = None

    needs = {
        "dbp": ("candidates", "duplicates", "assignments"),
        "ssp": ("candidates", "duplicates", "assignments"),
        "random": ("candidates", "duplicates"),
        "clip_score": ("candidates", "duplicates", "scores"),
        "semdedup": ("candidates", "duplicates"),
        "full": (),
    }[strategy]
    files = {t: parquet_files(tables / t) for t in INPUTS}
    named = Path(origin) if origin is not None else tables
    if not files["samples"]:
        raise ValueError(f"no samples table under {named / 'samples'}: run ingest first")
    for t in needs:
        if not files[t]:
            raise ValueError(f"strategy {strategy!r} needs the {t} table, but {named / t} holds no parquet file")

    tmp_root.mkdir(parents=True, exist_ok=True)
    with scratch_dir(tmp_root, f"decide-{strategy}-") as work:
        con = connect(Path(work), memory_limit, threads)
        try:
            samples_view(con, "samples", files["samples"], tables, INPUTS["samples"])
            for t, cols in INPUTS.items():
                if t != "samples":
                    create_view(con, t, files[t] if t in needs else [], columns=cols)
            con.execute("CREATE OR REPLACE TEMP VIEW assign AS SELECT * FROM assignments")
            _validate_inputs(con, strategy)
            eligible = _select(con, strategy, M, q, seed)
            with atomic_path(out_path, tmp_root) as tmp:
                # uid and shard as nullable columns (parquet OPTIONAL), as DuckDB writes them from several
                # files; from one file (a one-shard pool, or core/store/subset_inputs.py's copy) it would infer NOT
                # NULL from the file's statistics and write them REQUIRED, so the decisions' bytes would depend
                # on how the input tables are split.  The CASE is the identity on values.
                con.execute(
                    """
                    COPY (
                      SELECT CAST(? AS VARCHAR) AS strategy,
                        CASE WHEN s.uid IS NULL THEN NULL ELSE s.uid END AS uid,
                        CASE WHEN s.shard IS NULL THEN NULL ELSE s.shard END AS shard,
                        (k.row IS NOT NULL) AS keep,
                        CASE WHEN k.row IS NOT NULL THEN 'kept'
                             WHEN s.status IS DISTINCT FROM 'ok' THEN 'corrupt'
                             WHEN d.uid IS NOT NULL THEN 'duplicate'
                             WHEN c.row IS NULL THEN 'low_clip_score'
                             ELSE 'pruned' END AS reason
                      FROM samples s
                      LEFT JOIN (SELECT DISTINCT shard, uid FROM duplicates) d ON d.shard = s.shard AND d.uid = s.uid
                      LEFT JOIN candidates c ON c.shard = s.shard AND c.row = s.row
                      LEFT JOIN sel k ON k.shard = s.shard AND k.row = s.row
                      ORDER BY s.shard, s.row
                    ) TO ? (FORMAT parquet, COMPRESSION zstd)
                    """,
                    [strategy, str(tmp)],
                )
                create_view(con, "dec", [tmp], "decisions")
                counts = dict(con.execute("SELECT reason, count(*) FROM dec GROUP BY reason").fetchall())
                rows = sum(counts.values())
                n_samples = _scalar(con, "SELECT count(*) FROM samples")
                if rows != n_samples:  # the joins are on unique keys, so this is a bug
                    raise RuntimeError(f"{strategy}: wrote {rows} decisions for {n_samples} samples")
                kept = int(counts.get("kept", 0))
                if M is not None and kept != M:
                    raise RuntimeError(f"{strategy}: kept {kept} samples, expected M = {M}")
                per_cluster = None
                if q is not None:
                    per_cluster = _kept_per_cluster(con, "dec", len(q))
                    if not np.array_equal(per_cluster, q):
                        bad = int(np.flatnonzero(per_cluster != q)[0])
                        raise RuntimeError(
                            f"{strategy}: cluster {bad} kept {int(per_cluster[bad])}, quota {int(q[bad])}"
                        )
                con.execute("DROP VIEW dec")
        finally:
            con.close()
    return DecisionSummary(
        strategy=strategy,
        path=out_path,
        rows=int(rows),
        kept=kept,
        eligible=int(eligible),
        M=M,
        reasons={r: int(counts.get(r, 0)) for r in REASONS},
        per_cluster_kept=per_cluster,
        quotas=q,
    )


def _validate_inputs(con: Any, strategy: str) -> None:
    """Fail early, naming the numbers, when the input tables disagree."""
    n, n_keys = con.execute("SELECT count(*), count(DISTINCT (shard, row)) FROM samples").fetchall()[0]
    if n != n_keys:
        raise ValueError(f"samples: {n} rows but {n_keys} distinct (shard, row); re-run ingest")
    if strategy == "full":
        return
    n_c, n_c_keys, n_c_uids, matched, not_ok, dup = con.execute(
        """
        SELECT count(*), count(DISTINCT (c.shard, c.row)), count(DISTINCT (c.shard, c.uid)),
               count(s.row), count(*) FILTER (WHERE s.row IS NOT NULL AND s.status IS DISTINCT FROM 'ok'),
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
    if strategy in QUOTA_STRATEGIES:
        n_a, n_a_keys, in_cand, bad_dist, bad_cluster = con.execute(
            """
            SELECT count(*), count(DISTINCT (a.shard, a.row)), count(c.row),
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


def _select(con: Any, strategy: str, M: int | None, q: np.ndarray | None, seed: int) -> int:
    """Create the temp table ``sel(shard, row)`` of kept samples; returns the
    size of the pool the strategy selects from."""
    if strategy == "full":
        eligible = _scalar(con, "SELECT count(*) FROM samples WHERE status = 'ok'")
        con.execute("CREATE TEMP TABLE sel AS SELECT shard, row FROM samples WHERE status = 'ok'")
        return eligible
    n_cand = _scalar(con, "SELECT count(*) FROM candidates")
    if strategy == "semdedup":
        con.execute("CREATE TEMP TABLE sel AS SELECT shard, row FROM candidates")
        return n_cand
    assert M is not None
    if strategy == "clip_score":
        con.execute(
            """
            CREATE TEMP VIEW survivors AS
            SELECT s.shard, s.row, s.uid, sc.clip_score
            FROM samples s
            JOIN (SELECT shard, uid, max(clip_score) AS clip_score FROM scores
                  WHERE clip_score IS NOT NULL AND NOT isnan(clip_score) GROUP BY shard, uid) sc
              ON sc.shard = s.shard AND sc.uid = s.uid
            ANTI JOIN (SELECT DISTINCT shard, uid FROM duplicates) d ON d.shard = s.shard AND d.uid = s.uid
            WHERE s.status = 'ok'
            """
        )
        eligible = _scalar(con, "SELECT count(*) FROM survivors")
        _check_m(strategy, M, eligible, "dedup survivors with a CLIP score")
        con.execute(
            """
            CREATE TEMP TABLE sel AS SELECT shard, row FROM survivors
            QUALIFY row_number() OVER (ORDER BY clip_score DESC, uid ASC, shard ASC, row ASC) <= ?
            """,
            [M],
        )
        return eligible
    _check_m(strategy, M, n_cand, "candidates")
    if strategy == "random":
        con.execute(
            """
            CREATE TEMP TABLE sel AS SELECT shard, row FROM candidates
            QUALIFY row_number() OVER (ORDER BY uid_hash(uid, CAST(? AS BIGINT)) ASC, uid ASC, shard ASC, row ASC) <= ?
            """,
            [int(seed), M],
        )
        return n_cand
    # dbp / ssp
    assert q is not None
    k = len(q)
    if int(q.sum()) != M:
        raise ValueError(f"{strategy}: quotas sum to {int(q.sum())}, but M = {M}")
    sizes = dict(con.execute("SELECT cluster, count(*) FROM assign GROUP BY cluster").fetchall())
    outside = sorted(c for c in sizes if c >= k)
    if outside:
        raise ValueError(f"{strategy}: assignments name cluster {outside[0]}, but there are {k} quotas (clusters 0..{k - 1})")
    size = np.zeros(k, dtype=np.int64)
    for c, n in sizes.items():
        size[c] = n
    over = np.flatnonzero(q > size)
    if over.size:
        c = int(over[0])
        raise ValueError(f"{strategy}: quota of cluster {c} is {int(q[c])}, above the cluster's size {int(size[c])}")
    select_by_quota(con, q)
    return n_cand


def select_by_quota(con: Any, quotas: np.ndarray) -> None:
    """DBP's selection: create the temp table ``sel(shard, row)`` holding, of
    every cluster ``c`` of the view ``assign`` (the assignments' columns),
    the ``quotas[c]`` members farthest from the centroid (ties by uid, then
    shard and row); clusters beyond ``quotas`` keep none.  The window's sort
    spills past the connection's memory limit (``duck.connect``).
    :func:`dbprune_assets.core.method.dbp.select_hardest` is the in-memory reference."""
    import pyarrow as pa

    q = np.asarray(quotas, dtype=np.int64)
    con.register("quota_in", pa.table({"cluster": pa.array(np.arange(len(q), dtype=np.int64)), "quota": pa.array(q)}))
    con.execute(
        """
        CREATE TEMP TABLE sel AS
        SELECT r.shard, r.row FROM (
          SELECT a.shard, a.row, a.cluster,
                 row_number() OVER (PARTITION BY a.cluster ORDER BY a.distance DESC, a.uid ASC, a.shard ASC, a.row ASC) AS rn
          FROM assign a
        ) r JOIN quota_in q ON q.cluster = r.cluster
        WHERE r.rn <= q.quota
        """
    )
    con.unregister("quota_in")


def _check_m(strategy: str, M: int, eligible: int, what: str) -> None:
    if M > eligible:
        raise ValueError(f"{strategy}: subset size M = {M} is above the {eligible} {what} it selects from")
