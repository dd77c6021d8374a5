"""The strategy interface: what a selection strategy declares, and the one
signature every strategy selects with.

A strategy is an instance of a :class:`Strategy` subclass that implements
:meth:`Strategy.select`; :mod:`~dbprune_assets.core.strategies.registry` lists
them and :func:`~dbprune_assets.core.strategies.decide.decide` runs one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import numpy as np
    import polars as pl

    from dbprune_assets.core.store.layout import Layout

#: the tables :func:`~dbprune_assets.core.strategies.decide.decide` reads and
#: the columns it needs of each (views of the same names, typed by
#: ``duck.TABLES``); a strategy's ``needs`` names some of them besides samples
INPUTS: dict[str, tuple[str, ...]] = {
    "samples": ("uid", "shard", "row", "status"),
    "scores": ("uid", "shard", "clip_score"),
    "duplicates": ("uid", "shard"),
    "candidates": ("uid", "shard", "row", "clip_score"),
    "assignments": ("uid", "shard", "row", "cluster", "distance"),
    "dedup_assignments": ("uid", "shard", "row", "cluster", "distance"),
}


class StrategyUnavailable(ValueError):
    """A strategy cannot run on this pool; the message says what to provide."""


@dataclass(frozen=True)
class StrategyContext:
    """What a strategy's :meth:`Strategy.prepare` may read besides decide's
    tables: the home's layout (embeddings, fitted centroids), the pool's
    shards, the settings and a scratch folder (removed after decide).  Plain
    paths and values: no Dagster."""

    layout: Layout
    tables: Path  #: the tables root decide reads (``samples``, ``candidates``, ... as in :data:`INPUTS`)
    shards: tuple[str, ...]
    settings: Any  #: the run's ``PipelineSettings``
    work: Path  #: a scratch folder for the strategy's own files
    M: int | None  #: the subset size (None unless the strategy is sized)
    seed: int  #: ``selection.seed``
    threads: int | None = None
    device: str = "auto"  #: ``compute.device``: auto, cpu or cuda
    log: Callable[[str], None] = print
    #: embeds the images of evaluation set folders with the pool's encoder (unit rows, the sets' names);
    #: None where no encoder is at hand (``core/models/target_images.py``)
    embed_eval_images: Callable[[list[Path]], tuple[Any, list[str]]] | None = None


@dataclass
class Prepared:
    """What :meth:`Strategy.prepare` made: more tables for :meth:`Strategy.select`
    (view name -> parquet files) and lines for the output (where targets came from, ...)."""

    views: dict[str, list[Path]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Strategy(ABC):
    """One selection strategy: which samples a subset keeps.

    ``name`` is its partition key and file name (``tables/decisions/<name>``);
    ``description`` says in one line what it keeps (docs, UI); ``needs`` names
    the input tables it reads beyond ``samples`` (of :data:`INPUTS`: their
    files must exist, and decide checks candidates and assignments against
    the samples when named); ``sized``: it keeps exactly M samples (else every
    eligible one, and M is ignored); ``quota_based``: it keeps per-cluster
    quotas (:meth:`quotas`; M is then their sum, and decide checks the kept
    count of every cluster); ``may_fall_short``: a sized strategy whose
    eligible pool may hold fewer than M samples keeps them all then (decide
    checks ``min(M, eligible)``, and the summary says so).
    """

    name: str
    description: str
    needs: tuple[str, ...] = ()
    sized: bool = False
    quota_based: bool = False
    may_fall_short: bool = False
    #: the paper the rule comes from (README, docs, UI)
    reference: str = ""

    def unavailable(self, layout: Layout, settings: Any) -> str | None:
        """Why this strategy cannot run on the pool (one line saying what to
        provide), or None.  Cheap: file checks only, called when a run lists
        its strategies."""
        return None

    def prepare(self, ctx: StrategyContext) -> Prepared | None:
        """Compute what :meth:`select` needs beyond decide's tables (scores
        from the embeddings, a table of target clusters, ...), as parquet
        files under ``ctx.work``; None when the tables suffice."""
        return None

    def quotas(self, clusters: pl.DataFrame) -> np.ndarray | None:
        """The per-cluster quotas ``N_j`` (int64, index = cluster id) from
        DBP's ``clusters`` table (rows in any order); None for a strategy
        that is not quota-based."""
        return None

    @abstractmethod
    def select(self, con: Any, M: int | None, quotas: np.ndarray | None, seed: int) -> int:
        """Create the DuckDB temp table ``sel(shard, row)`` of the kept
        samples on ``con`` and return the size of the pool it selects from.

        ``con`` holds the views ``samples`` (pool-wide status), ``scores``,
        ``duplicates``, ``candidates``, ``assignments`` (alias ``assign``)
        and ``dedup_assignments``; a table not in ``needs`` is an empty view;
        the views :meth:`prepare` made are there under their names.  ``M`` is the subset size
        (None unless ``sized``), ``quotas`` the per-cluster quotas (None
        unless ``quota_based``), ``seed`` the selection seed.  Every ordering
        must end in a total tie-break, so that the selection is a pure
        function of the tables, M, the quotas and the seed.  Raise ValueError
        when the inputs cannot give what is asked (M above the eligible count).
        """


def scalar(con: Any, sql: str) -> Any:
    """The single value ``sql`` returns on ``con``."""
    return con.execute(sql).fetchall()[0][0]


def check_size(strategy: str, M: int, eligible: int, what: str) -> None:
    """A sized strategy cannot keep more than the ``eligible`` ``what`` it selects from."""
    if M > eligible:
        raise ValueError(f"{strategy}: subset size M = {M} is above the {eligible} {what} it selects from")


def table_rows(ctx: StrategyContext, sql: str, tables: dict[str, tuple[str, ...]]) -> list[tuple]:
    """Rows of ``sql`` over views of decide's input tables (name -> the columns
    used), on a bounded DuckDB connection in the strategy's scratch folder."""
    from dbprune_assets.core.store.atomic import scratch_dir
    from dbprune_assets.core.store.duck import connect, create_view, parquet_files

    with scratch_dir(ctx.work, "query-") as work:
        con = connect(Path(work), threads=ctx.threads)
        try:
            for name, columns in tables.items():
                create_view(con, name, parquet_files(Path(ctx.tables) / name), columns=columns)
            return con.execute(sql).fetchall()
        finally:
            con.close()
