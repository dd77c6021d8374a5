"""The ``random`` baseline: the M candidates with the smallest
``uid_hash(selection.seed, uid)`` (ties by uid, then shard and row).

``uid_hash`` is the project's one seeded 64-bit hash
(:func:`dbprune_assets.core.method.kmeans.uid_hash`, registered in DuckDB by
``duck.connect``), so the subset depends on the uids and the seed only, not on
the order of the rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dbprune_assets.core.strategies.base import Strategy, check_size, scalar

if TYPE_CHECKING:
    import numpy as np


class RandomStrategy(Strategy):
    """Keep the M candidates of smallest seeded uid hash."""

    def select(self, con: Any, M: int | None, quotas: np.ndarray | None, seed: int) -> int:
        assert M is not None
        n_cand = scalar(con, "SELECT count(*) FROM candidates")
        check_size(self.name, M, n_cand, "candidates")
        con.execute(
            """
            CREATE TEMP TABLE sel AS SELECT shard, row FROM candidates
            QUALIFY row_number() OVER (ORDER BY uid_hash(uid, CAST(? AS BIGINT)) ASC, uid ASC, shard ASC, row ASC) <= ?
            """,
            [int(seed), M],
        )
        return n_cand


RANDOM = RandomStrategy("random", "the M candidates with the smallest uid_hash(selection.seed, uid)",
                        needs=("candidates", "duplicates"), sized=True)
