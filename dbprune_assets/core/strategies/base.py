"""The strategy interface: what a selection strategy declares, and the one
signature every strategy selects with.

A strategy is an instance of a :class:`Strategy` subclass that implements
:meth:`Strategy.select`; :mod:`~dbprune_assets.core.strategies.registry` lists
them and :func:`~dbprune_assets.core.strategies.decide.decide` runs one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import polars as pl

#: the tables :func:`~dbprune_assets.core.strategies.decide.decide` reads and
#: the columns it needs of each (views of the same names, typed by
#: ``duck.TABLES``); a strategy's ``needs`` names some of them besides samples
INPUTS: dict[str, tuple[str, ...]] = {
    "samples": ("uid", "shard", "row", "status"),
    "scores": ("uid", "shard", "clip_score"),
    "duplicates": ("uid", "shard"),
    "candidates": ("uid", "shard", "row", "clip_score"),
    "assignments": ("uid", "shard", "row", "cluster", "distance"),
}


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
    count of every cluster).
    """

    name: str
    description: str
    needs: tuple[str, ...] = ()
    sized: bool = False
    quota_based: bool = False

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
        ``duplicates``, ``candidates`` and ``assignments`` (alias ``assign``);
        a table not in ``needs`` is an empty view.  ``M`` is the subset size
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
