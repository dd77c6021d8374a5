"""One ``pruned_subset`` step's inputs, read once and shared by its strategies.

The strategies (:func:`~.strategies.decide`), the export and its check
(:mod:`~.export`) read the per-shard tables under ``$DBPRUNE_HOME/tables/``
(``samples``, ``scores``, ``candidates``, ``assignments``: one parquet file per
shard).  Read in place, every query of every strategy opens every shard's
file, so at 10,000 shards the step spent minutes on parquet footers for a
pool of 100,000 rows.  :func:`subset_inputs` instead copies the columns they
need of each table into one file, ``<work>/tables/<table>/all.parquet``, once
per step (each shard's footer is read once, by one streaming DuckDB ``COPY``
that spills past its memory limit, so memory is bounded by the settings, not
the pool).  The copy is a tables root like the original, so ``decide`` and the
export read it unchanged and decide the same rows byte for byte.

It also records the pool-level facts every strategy asked for again: whether
the pool has images (else a metadata-only DataComp pool, exported as
``uids.npy``), each shard's tar size (for the free-space estimate), and the
samples' row and ``(shard, uid)`` counts (for the ``one_decision_per_sample``
check).  The copy lives in a scratch folder under the process's temp root and
is removed when the step ends.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Iterator, Mapping

from dbprune_assets.core.store.atomic import scratch_dir
from dbprune_assets.core.store.duck import connect, create_view, distinct_count, parquet_files
from dbprune_assets.core.store.export import SAMPLE_COLUMNS
from dbprune_assets.core.store.layout import Layout, list_pool_shards
from dbprune_assets.core.running.oserrors import MIN_FREE_BYTES, require_free_space
from dbprune_assets.core.strategies import INPUTS
from dbprune_assets.core.pool.uids import TABLE as DUPLICATE_UIDS, table_file


#: input tables copied only when a strategy of the step needs them (``Strategy.needs``)
ON_DEMAND = frozenset({"dedup_assignments"})


def copied_columns(caption: bool, needs: Collection[str] = ()) -> dict[str, tuple[str, ...]]:
    """The tables copied and their columns: what :func:`~.strategies.decide`
    reads (``strategies.INPUTS``; those of :data:`ON_DEMAND` only when in
    ``needs``), the samples' columns the export reads
    (``export.SAMPLE_COLUMNS``; the caption only with ``caption``, i.e. when
    the pool has images), and the cross-shard duplicate rows the effective
    status needs (:mod:`~.uids`)."""
    wanted = SAMPLE_COLUMNS if caption else tuple(c for c in SAMPLE_COLUMNS if c != "caption")
    out = {t: cols for t, cols in INPUTS.items() if t not in ON_DEMAND or t in needs}
    out["samples"] = INPUTS["samples"] + tuple(c for c in wanted if c not in INPUTS["samples"])
    out[DUPLICATE_UIDS] = ("shard", "row")
    return out


@dataclass(frozen=True)
class SubsetInputs:
    """The consolidated input tables of one step and the pool-level facts."""

    tables: Path  #: a tables root holding ``<table>/all.parquet`` for each input table that has files
    origin: Path  #: the tables root they were copied from (named in error messages)
    images: bool  #: the pool has images (else metadata only: the export is ``uids.npy``)
    samples: int  #: rows of ``samples``
    sample_ids: int  #: distinct ``(shard, uid)`` of ``samples``
    tar_sizes: Mapping[str, int] = field(default_factory=dict)  #: shard -> bytes of its tar, shards with a tar
    #: the input checks ``decide`` passed on this copy (samples, candidates, assignments): made once a step
    checked: set[str] = field(default_factory=set)

    @property
    def samples_dir(self) -> Path:
        """The consolidated ``samples`` folder (for ``export_subset`` / ``verify_export``)."""
        return self.tables / "samples"


def pool_tar_sizes(pool: Path) -> dict[str, int]:
    """``{shard: bytes}`` of every ``<shard>.tar`` at the pool's top level, from
    one directory listing (not a ``stat`` per shard per strategy)."""
    sizes: dict[str, int] = {}
    try:
        entries = os.scandir(pool)
    except (FileNotFoundError, NotADirectoryError):
        return sizes
    with entries:
        for e in entries:
            if e.name.endswith(".tar") and not e.name.startswith(".") and e.is_file():
                sizes[e.name[: -len(".tar")]] = e.stat().st_size
    return sizes


def consolidate(origin: Path, work: Path, *, caption: bool, memory_limit: str = "1GB",
                threads: int | None = None, needs: Collection[str] = ()) -> tuple[Path, int, int]:
    """Copy the needed columns of each input table under the tables root
    ``origin`` into ``work/tables/<table>/all.parquet`` (a table without files
    gets no folder, as in ``origin``); ``caption`` adds the samples' caption
    (the export of a pool with images writes it).  Returns the new root, the
    samples' rows and their distinct ``(shard, uid)``."""
    import duckdb

    origin, work = Path(origin), Path(work)
    root = work / "tables"
    dup = table_file(origin)
    sources = {t: ((([dup] if dup.is_file() else []) if t == DUPLICATE_UIDS else parquet_files(origin / t)), cols)
               for t, cols in copied_columns(caption, needs).items()}
    # the copy holds a subset of the columns: the sources' size bounds it
    need = sum(f.stat().st_size for files, _ in sources.values() for f in files)
    require_free_space(work, need + MIN_FREE_BYTES, f"copying the input tables of {origin} for pruned_subset")
    # no query of the copy relies on its row order (every ordering ends in a total tie-break), so
    # DuckDB may write it in parallel
    con = connect(work / "db", memory_limit, threads, ordered=False)
    try:
        for table, (files, columns) in sources.items():
            if not files:
                continue
            target = root / table / "all.parquet"
            target.parent.mkdir(parents=True, exist_ok=True)
            create_view(con, "src", files, table, columns)
            try:
                con.execute("COPY (SELECT * FROM src) TO ? (FORMAT parquet, COMPRESSION zstd)", [str(target)])
            except duckdb.Error as err:  # its message names the file; say which table and what to do
                raise ValueError(f"{origin / table}: cannot read the {table} table ({type(err).__name__}: {err}); "
                                 f"re-materialise the asset that writes it") from err
        n, ids = 0, 0
        if sources["samples"][0]:
            create_view(con, "s", [root / "samples" / "all.parquet"], "samples", ("uid", "shard"))
            n, ids = con.execute("SELECT count(*) FROM s").fetchall()[0][0], distinct_count(con, "shard, uid", "s")
    finally:
        con.close()
    return root, int(n), int(ids)


@contextlib.contextmanager
def subset_inputs(layout: Layout, *, memory_limit: str = "1GB", threads: int | None = None,
                  tables: Path | None = None, needs: Collection[str] = ()) -> Iterator[SubsetInputs]:
    """The step's :class:`SubsetInputs` (``tables``: the tables root to read,
    default ``$DBPRUNE_HOME/tables``; ``needs``: the tables its strategies
    need, for those copied on demand), in a scratch folder under ``layout.tmp``
    that is removed on exit."""
    from dbprune_assets.core.pool.poolkind import is_metadata_only

    origin = Path(tables) if tables is not None else layout.home / "tables"
    images = not is_metadata_only(layout.pool, list_pool_shards(layout.pool))
    tars = pool_tar_sizes(layout.pool) if images else {}
    with scratch_dir(layout.tmp, "subset-inputs-") as work:
        root, n, ids = consolidate(origin, Path(work), caption=images, memory_limit=memory_limit, threads=threads,
                                   needs=needs)
        yield SubsetInputs(tables=root, origin=origin, images=images, samples=n, sample_ids=ids, tar_sizes=tars)

