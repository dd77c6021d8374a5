"""The pool-wide steps of the graph as plain functions: SemDeDup over the pool,
DBP's cluster table, and one strategy's decisions with their export.

Each reads and writes the contract paths of a :class:`~.layout.Layout` and
returns what the Dagster asset shows and checks; the asset only wires (see
``docs/design.md``, "The method, exactly" and "Strategies").  The formulas
themselves live in ``dbp.py``, ``semdedup.py`` and the ``strategies`` package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from dbprune_assets.core.store.atomic import atomic_path, scratch_dir, write_parquet
from dbprune_assets.core.method.embstore import MissingInput, cluster_sizes, read_centroids, shard_embeddings, summed_partials
from dbprune_assets.core.store.layout import Layout
from dbprune_assets.core.settings import DbpSettings, PipelineSettings
from dbprune_assets.core.store.state import stable_hash

if TYPE_CHECKING:
    import polars as pl

    from dbprune_assets.core.store.export import ExportSummary
    from dbprune_assets.core.strategies import DecisionSummary
    from dbprune_assets.core.store.subset_inputs import SubsetInputs
    from dbprune_assets.core.store.history import Provenance
    from dbprune_assets.core.strategies.truth import TruthQuality

#: how many (duplicate, original) pairs the UI shows
EXAMPLE_PAIRS = 6


# ---------------------------------------------------------------------------
# the pool manifest


def write_pool_manifest(layout: Layout, versions: Mapping[str, str | None]
                        ) -> tuple["pl.DataFrame", dict[str, int], "pl.DataFrame"]:
    """``tables/pool_manifest/all.parquet``: per shard its data version, rows and
    ok samples (from the ingest commit markers, with the uid rule applied across
    shards: :func:`~.uids.mark_cross_shard`); returns it, the samples per
    status and the cross-shard duplicate uids."""
    import polars as pl

    from dbprune_assets.core.store.state import read_state
    from dbprune_assets.core.pool.uids import mark_cross_shard

    cross = mark_cross_shard(layout, sorted(versions))
    per_shard = dict(cross.group_by("shard").len().iter_rows())
    rows = []
    status: dict[str, int] = {}
    for shard, version in versions.items():
        st = read_state(layout, "raw_metadata", shard)
        counts = dict((st.summary if st else {}).get("status", {}))
        if per_shard.get(shard):
            counts["ok"] = counts.get("ok", 0) - per_shard[shard]
            counts["duplicate_uid"] = counts.get("duplicate_uid", 0) + per_shard[shard]
        for name, n in counts.items():
            status[name] = status.get(name, 0) + int(n)
        rows.append({"shard": shard, "data_version": version, "rows": (st.summary if st else {}).get("rows", 0),
                     "ok": counts.get("ok", 0)})
    frame = pl.DataFrame(rows, schema={"shard": pl.Utf8, "data_version": pl.Utf8, "rows": pl.Int64, "ok": pl.Int64})
    write_parquet(layout.table("pool_manifest"), frame, layout.tmp)
    return frame, status, cross


# ---------------------------------------------------------------------------
# SemDeDup over the pool


@dataclass
class DedupOutcome:
    k: int
    ok: int  # ok samples (rows with an embedding)
    duplicates: int = 0
    per_cluster: dict[int, int] = field(default_factory=dict)  # duplicates per dedup cluster
    examples: list[tuple[str, str, str, str]] = field(default_factory=list)  # uid, shard, duplicate_of, its shard
    _similarities: list[np.ndarray] = field(default_factory=list)
    #: the shards added and removed since the previous pass when this one built on it
    #: (``semdedup_added.py``), else None
    added: list[str] | None = None
    removed: list[str] | None = None

    @property
    def similarities(self) -> np.ndarray:
        """Each duplicate's similarity to the member it duplicates."""
        return np.concatenate(self._similarities) if self._similarities else np.zeros(0, np.float32)

    @property
    def kept_fraction(self) -> float:
        return round(1 - self.duplicates / self.ok, 4) if self.ok else 1.0

    def add(self, frame: "pl.DataFrame") -> None:
        self.duplicates += frame.height
        for c, cnt in frame.group_by("cluster").len().iter_rows():
            self.per_cluster[int(c)] = self.per_cluster.get(int(c), 0) + int(cnt)
        if len(self.examples) < EXAMPLE_PAIRS:
            self.examples += list(frame.select("uid", "shard", "duplicate_of", "duplicate_of_shard")
                                  .head(EXAMPLE_PAIRS - len(self.examples)).iter_rows())
        self._similarities.append(frame["similarity"].to_numpy())


def run_semdedup(layout: Layout, shards: list[str], eps: float, tile: int, device: str) -> DedupOutcome:
    """SemDeDup of every ok sample against its dedup cluster, streamed bucket by
    bucket into ``tables/duplicates/all.parquet`` (torch ``device``).  When
    shards were only added or removed since the last pass (same fit and eps,
    the other shards as they were: ``semdedup_added.changes_since``), only the
    clusters they change are scored, and only the pairs with a new member or a
    member whose target left; the table is the same as a full pass's."""
    import polars as pl
    import pyarrow.parquet as pq

    from dbprune_assets.core.method.semdedup import DedupShard, empty_duplicates, semdedup_pool
    from dbprune_assets.core.method.semdedup_added import DedupBasis, changes_since, semdedup_added
    from dbprune_assets.core.store.atomic import remove, write_bytes
    from dbprune_assets.core.store.layout import UNPARTITIONED
    from dbprune_assets.core.store.state import read_state

    k = len(read_centroids(layout, "dedup_centroids"))

    def load(name: str) -> DedupShard:
        meta, emb = shard_embeddings(layout, name)
        a = pl.read_parquet(layout.table("dedup_assignments", name))
        if a.height != meta.height:
            raise MissingInput(f"shard {name}: dedup_assignments out of date ({a.height} rows, embeddings "
                               f"{meta.height}); re-materialise dedup_assignments for it")
        keep = _usable_rows(layout, name, meta)
        if keep is not None:  # a uid an earlier shard has: not a sample of its own (core/pool/uids.py)
            meta, emb, a = meta.filter(keep), np.asarray(emb)[keep.to_numpy()], a.filter(keep)
        return DedupShard(name, meta["uid"].to_numpy(), emb, a["cluster"].to_numpy(), a["distance"].to_numpy())

    usable = {sh: _usable(layout, sh, pl.read_parquet(layout.emb_metadata(sh), columns=["row"])).height
              for sh in shards}
    out = DedupOutcome(k, sum(usable.values()))
    # no extra pass over the embeddings; less the rows whose uid an earlier shard has
    sizes = cluster_sizes(layout, shards, "dedup_assignments", k) - _superseded_per_cluster(layout, shards, k)
    fit, version = read_state(layout, "dedup_centroids", UNPARTITIONED), {}
    for sh in shards:
        st = read_state(layout, "dedup_assignments", sh)
        version[sh] = (st.data_version if st else "", usable[sh])
    basis, basis_path, previous = (DedupBasis(float(eps), k, fit.data_version if fit else "", version),
                                   layout.table_dir("duplicates") / ".basis.json", layout.table("duplicates"))
    changes = changes_since(DedupBasis.read(basis_path), basis) if previous.is_file() else None
    out.added, out.removed = changes or (None, None)
    frames = (semdedup_pool(shards, load, k, eps, tile, layout.tmp, device, cluster_sizes=sizes) if changes is None
              else semdedup_added(shards, *changes, load, previous, k, eps, tile, layout.tmp, device,
                                  cluster_sizes=sizes))
    remove(basis_path)  # first: a basis always describes the table beside it
    with atomic_path(previous, layout.tmp) as tmp:
        writer = None
        try:
            for frame in frames:
                if frame.height == 0:
                    continue
                table = frame.to_arrow()
                writer = writer or pq.ParquetWriter(tmp, table.schema, compression="zstd")
                writer.write_table(table)
                out.add(frame)
            if writer is None:
                empty_duplicates().write_parquet(tmp)
        finally:
            if writer is not None:
                writer.close()
    write_bytes(basis_path, basis.to_json().encode(), layout.tmp)
    return out


def _usable_rows(layout: Layout, shard: str, meta: "pl.DataFrame") -> "pl.Series | None":
    """Mask of the embedded rows of ``shard`` that are samples of their own (not
    a uid an earlier shard has, :mod:`~.uids`); None when all are."""
    import polars as pl

    from dbprune_assets.core.pool.uids import superseded_rows

    rows = superseded_rows(layout.home / "tables", shard)
    return ~meta["row"].is_in(rows.implode()) if rows.len() else None  # type: ignore[return-value]


def _usable(layout: Layout, shard: str, meta: "pl.DataFrame") -> "pl.DataFrame":
    from dbprune_assets.core.pool.uids import drop_superseded

    return drop_superseded(layout.home / "tables", shard, meta)


def _superseded_per_cluster(layout: Layout, shards: list[str], k: int) -> np.ndarray:
    """Cross-shard duplicate uids (:mod:`~.uids`) per dedup cluster (k,)."""
    import polars as pl

    from dbprune_assets.core.pool.uids import table_file

    out = np.zeros(k, np.int64)
    path = table_file(layout.home / "tables")
    if not path.exists():
        return out
    dup = pl.read_parquet(path, columns=["shard", "row"]).filter(pl.col("shard").is_in(shards))
    for (shard,), rows in dup.group_by("shard"):
        a = pl.read_parquet(layout.table("dedup_assignments", str(shard)), columns=["row", "cluster"])
        out += np.bincount(a.filter(pl.col("row").is_in(rows["row"].implode()))["cluster"].to_numpy(), minlength=k)[:k]
    return out


def clip_scores(layout: Layout, shards: list[str]) -> np.ndarray:
    """Every ok sample's clip_score (for the histogram beside the filter)."""
    import polars as pl

    if not shards:
        return np.zeros(0, np.float32)
    return np.concatenate([_usable(layout, sh, pl.read_parquet(layout.emb_metadata(sh), columns=["row", "clip_score"]))
                           ["clip_score"].to_numpy() for sh in shards])


def drop_left_shards(layout: Layout, table: str, shards: list[str]) -> None:
    """Delete ``tables/<table>/<shard>.parquet`` of shards no longer in the pool."""
    keep = set(shards)
    for f in layout.table_dir(table).glob("*.parquet"):
        if f.stem not in keep:
            f.unlink()


# ---------------------------------------------------------------------------
# DBP's cluster table


@dataclass
class ComplexityOutcome:
    frame: "pl.DataFrame"  # the clusters table as written
    M: int
    l: int  # nearest other centroids d_inter averaged over (l capped at k-1)

    def column(self, name: str) -> np.ndarray:
        return self.frame[name].to_numpy()

    @property
    def k(self) -> int:
        return self.frame.height

    @property
    def candidates(self) -> int:
        return int(self.column("size").sum())

    def bound_violations(self) -> list[int]:
        """Clusters whose quota leaves ``lb_j ≤ N_j ≤ |C_j|``."""
        q, lb, size = self.column("quota"), self.column("lower_bound"), self.column("size")
        return [int(c) for c in np.flatnonzero((q < lb) | (q > size))]

    def counts(self) -> dict[str, int]:
        q, lb, size = self.column("quota"), self.column("lower_bound"), self.column("size")
        return {"empty_clusters": int((size == 0).sum()), "clusters_at_cap": int((q == size).sum()),
                "clusters_at_lower_bound": int(((q == lb) & (lb < size)).sum())}

    def extremes(self, n: int = 4) -> tuple[list[int], list[int]]:
        """(the ``n`` most complex, the ``n`` least complex) non-empty clusters."""
        order = np.argsort(-self.column("complexity"), kind="stable")
        size = self.column("size")
        return ([int(c) for c in order[:n] if size[c] > 0], [int(c) for c in order[::-1][:n] if size[c] > 0])


def cluster_complexity(layout: Layout, shards: list[str], cfg: DbpSettings) -> ComplexityOutcome:
    """d_intra, d_inter, complexity, P = softmax(C/tau) and the exact quotas of
    every DBP cluster from the per-shard partial sums
    (:func:`~dbprune_assets.core.method.dbp.cluster_table`); writes
    ``tables/clusters/all.parquet``."""
    from dbprune_assets.core.method import dbp

    cent = read_centroids(layout, "centroids")
    k = len(cent)
    count, sums = summed_partials(layout, shards, "cluster_sums", k)
    M = dbp.target_size(int(count.sum()), keep_fraction=cfg.keep_fraction, target_size=cfg.target_size)
    frame = dbp.cluster_table(cent, count, sums, l=cfg.l, tau=cfg.tau, M=M, r=cfg.r)
    write_parquet(layout.table("clusters"), frame, layout.tmp)
    return ComplexityOutcome(frame, M, min(cfg.l, max(k - 1, 0)))


# ---------------------------------------------------------------------------
# one strategy's subset


@dataclass
class SubsetOutcome:
    summary: "DecisionSummary"
    export: "ExportSummary"
    problems: dict[str, list[str]]  # check name -> problems found (empty = passed)
    kept_digest: str = ""  # of the kept (shard, uid) set: equal sets, equal digests (:func:`kept_digest`)
    truth: "TruthQuality | None" = None  # against the pool's ground truth, when it has one (strategies/truth.py)


#: an order-free digest of a decisions file's kept (shard, uid) set: its size and two
#: independent 64-bit combinations of the members' hashes
KEPT_DIGEST_SQL = """
    SELECT count(*), coalesce(bit_xor(hash(shard, uid)), 0), coalesce(sum(hash(uid, shard)::HUGEINT), 0)
    FROM decisions WHERE keep
"""


def kept_digest(layout: Layout, decisions: Path) -> str:
    """A digest of the samples ``decisions`` keeps, independent of their order:
    two decisions files that keep the same (shard, uid) set have the same one.
    A subset's data version is built on it, so a strategy whose kept set did
    not change (another ``dbp.tau``, say, changes only dbp's) keeps its models."""
    [row] = query_tables(layout, KEPT_DIGEST_SQL, {}, {"decisions": [decisions]})
    return stable_hash([str(v) for v in row])


def query_tables(layout: Layout, sql: str, params: Mapping[str, Any], views: Mapping[str, Sequence[Path]]
                 ) -> list[tuple]:
    """Rows of ``sql`` (with query ``params``) over typed views ``{table: files}``
    on a bounded DuckDB connection (``core/store/duck.py``)."""
    from dbprune_assets.core.store.duck import connect, create_view

    with scratch_dir(layout.tmp, "query-") as work:
        con = connect(Path(work))
        try:
            for name, files in views.items():
                create_view(con, name, list(files))
            return con.execute(sql, dict(params)).fetchall()
        finally:
            con.close()


def export_bytes(layout: Layout, decisions: Path, tar_sizes: Mapping[str, int] | None = None) -> int:
    """About the bytes an export of ``decisions`` writes: each shard's tar size
    times its kept fraction (the spool and the shards hold one copy at a time).
    ``tar_sizes`` (shard -> bytes, shards with a tar; :mod:`~.subset_inputs`
    lists them once per step) saves a ``stat`` per shard."""
    rows = query_tables(layout, "SELECT shard, count(*) FILTER (WHERE keep), count(*) FROM decisions GROUP BY shard",
                        {}, {"decisions": [decisions]})
    total = 0.0
    for shard, kept, n in rows:
        if not kept:
            continue
        if tar_sizes is not None:
            size = tar_sizes.get(shard)
        else:
            tar = layout.shard_tar(shard)
            size = tar.stat().st_size if tar.exists() else None
        if size is not None:
            total += size * kept / n
    return int(total)


def record_history(layout: Layout, who: "Provenance", strategy: str, summary: Any) -> None:
    """Write the run's ``decision_runs`` row and, for a quota strategy, its
    ``quota_moves`` against the quotas it replaces (before they are replaced)."""
    import polars as pl

    from dbprune_assets.core.store.history import quota_moves, run_row

    name = f"{who.run_id}-{strategy}"
    write_parquet(layout.table("decision_runs", name), run_row(who, strategy, summary.changes), layout.tmp)
    if summary.quotas is not None:
        old = layout.table("quotas", strategy)
        before = pl.read_parquet(old) if old.is_file() else None
        write_parquet(layout.table("quota_moves", name), quota_moves(who, strategy, before, summary.quota_table()),
                      layout.tmp)


def make_subset(layout: Layout, settings: PipelineSettings, strategy: str,
                inputs: "SubsetInputs | None" = None, provenance: "Provenance | None" = None,
                embed_eval: Any = None) -> SubsetOutcome:
    """Decide every sample under ``strategy``, a name of the strategy registry
    (``tables/decisions/<strategy>``, and ``tables/quotas/<strategy>`` for a
    quota strategy: dbp, ssp), export the kept samples to
    ``subsets/<strategy>/`` and check both.

    ``provenance``: the run and fits deciding (``core/store/history.py``): each
    changed decision row names them, and the run's history rows are written.

    ``inputs``: the step's input tables, read once for all its strategies
    (:func:`~.subset_inputs.subset_inputs`); without it this call reads them itself.
    ``embed_eval``: see :func:`strategy_context` (``datacomp_image``'s fallback targets)."""
    import polars as pl

    from dbprune_assets.core.store.export import export_subset, verify_export
    from dbprune_assets.core.store.kept import kept_connection
    from dbprune_assets.core.running.oserrors import MIN_FREE_BYTES, require_free_space
    from dbprune_assets.core.strategies import decide, registry, strategy_quotas
    from dbprune_assets.core.store.subset_inputs import subset_inputs

    threads = settings.compute.threads or None
    if inputs is None:
        with subset_inputs(layout, threads=threads) as step_inputs:
            return make_subset(layout, settings, strategy, step_inputs, provenance, embed_eval)
    chosen = registry.get(strategy)
    quotas, M = strategy_quotas(chosen.name, pl.read_parquet(layout.table("clusters")))
    out = layout.table("decisions", strategy)
    with scratch_dir(layout.tmp, f"prepare-{strategy}-") as work:
        prepared = chosen.prepare(strategy_context(layout, settings, inputs, M if chosen.sized else None, Path(work),
                                                   embed_eval))
        summary = decide(chosen.name, inputs.tables, M, quotas, settings.selection.seed, out, layout.tmp,
                         threads=threads, origin=inputs.origin, provenance=provenance, prepared=prepared,
                         checked=inputs.checked)
    problems: dict[str, list[str]] = {"one_decision_per_sample": [], "kept_equals_quota": []}
    if provenance is not None:  # the run's history rows (core/store/history.py)
        record_history(layout, provenance, strategy, summary)
    if chosen.quota_based:
        write_parquet(layout.table("quotas", strategy), summary.quota_table(), layout.tmp)
        if not np.array_equal(summary.per_cluster_kept, quotas):
            bad = np.flatnonzero(summary.per_cluster_kept != quotas)
            problems["kept_equals_quota"].append(f"{strategy}: clusters {bad[:10].tolist()} kept != quota")
    require_free_space(layout.subset_dir(strategy), export_bytes(layout, out, inputs.tar_sizes) + MIN_FREE_BYTES,
                       f"exporting the {strategy} subset")
    # the export and its check read one ``kept`` table (core/store/kept.py), made once
    with kept_connection(out, inputs.samples_dir, layout.tmp, "1GB", images=inputs.images, threads=threads) as kept:
        exp = export_subset(out, layout.pool, layout.subset_dir(strategy), settings.export.shard_size,
                            settings.export.seed, layout.tmp, samples_dir=inputs.samples_dir, threads=threads,
                            images=inputs.images, kept=kept)
        problems["export_matches_decisions"] = [
            f"{strategy}: {p}" for p in verify_export(layout.subset_dir(strategy), out, samples_dir=inputs.samples_dir,
                                                      tmp_root=layout.tmp, images=inputs.images, kept=kept)]
    # a uid repeated inside a shard is one decision per row (duplicate_uid rows are corrupt), so the
    # decisions match the samples row for row and (shard, uid) for (shard, uid); the samples' counts
    # were taken once for the step (``inputs``)
    [(n_dec, n_distinct)] = query_tables(  # a grouped count: DuckDB spills it (duck.distinct_count)
        layout, "SELECT (SELECT count(*) FROM decisions), (SELECT count(*) FROM (SELECT shard, uid FROM decisions "
        "GROUP BY ALL))", {}, {"decisions": [out]})
    if not (inputs.samples == n_dec and n_distinct == inputs.sample_ids):
        problems["one_decision_per_sample"].append(
            f"{strategy}: {inputs.samples} samples ({inputs.sample_ids} distinct), {n_dec} decisions "
            f"({n_distinct} distinct)")
    return SubsetOutcome(summary, exp, problems, kept_digest(layout, out), measure_truth(layout, settings, strategy, out))


def strategy_context(layout: Layout, settings: PipelineSettings, inputs: "SubsetInputs", M: int | None,
                     work: Path, embed_eval: Any = None) -> Any:
    """The :class:`~dbprune_assets.core.strategies.base.StrategyContext` of one
    strategy in a ``pruned_subset`` step: the shards are those of the samples
    table; ``embed_eval(folders)`` embeds evaluation images with the pool's encoder."""
    from dbprune_assets.core.strategies.base import StrategyContext

    import duckdb

    from dbprune_assets.core.store.duck import parquet_files

    files = [str(f) for f in parquet_files(inputs.samples_dir)]
    con = duckdb.connect()
    try:
        [(names,)] = con.execute("SELECT list(DISTINCT shard ORDER BY shard) FROM read_parquet(?)", [files]).fetchall()
    finally:
        con.close()
    return StrategyContext(layout=layout, tables=inputs.tables, shards=tuple(names or ()), settings=settings,
                           work=work, M=M, seed=settings.selection.seed, threads=settings.compute.threads or None,
                           device=settings.compute.device, embed_eval_images=embed_eval)


def measure_truth(layout: Layout, settings: PipelineSettings, strategy: str, decisions: Path) -> "TruthQuality | None":
    """The strategy's ``truth_quality`` rows (``tables/truth_quality/<strategy>``)
    when the pool has a ground truth (``strategies.ground_truth`` or the
    pool's own file), else None (and no such file)."""
    import polars as pl

    from dbprune_assets.core.strategies.truth import find_ground_truth, measure

    target = layout.table("truth_quality", strategy)
    truth = find_ground_truth(layout.pool, settings.strategies.ground_truth)
    if truth is None:
        target.unlink(missing_ok=True)
        return None
    found = measure(strategy, decisions, truth, layout.tmp, settings.compute.threads or None)
    write_parquet(target, pl.DataFrame(found.rows(), schema={"strategy": pl.String, "metric": pl.String,
                                                             "value": pl.Float64}), layout.tmp)
    return found
