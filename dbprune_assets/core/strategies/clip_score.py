"""The ``clip_score`` baseline: the M dedup survivors with the highest CLIP
score (ties by uid, then shard and row).

It selects from every ``ok`` sample that SemDeDup kept and that has a finite
score (a uid's highest when it has several), so with M above the candidate
count it reaches below the CLIP-score threshold of step 2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dbprune_assets.core.strategies.base import Strategy, check_size, scalar

if TYPE_CHECKING:
    import numpy as np


class ClipScoreStrategy(Strategy):
    """Keep the top M dedup survivors by CLIP score."""

    def select(self, con: Any, M: int | None, quotas: np.ndarray | None, seed: int) -> int:
        assert M is not None
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
        eligible = scalar(con, "SELECT count(*) FROM survivors")
        check_size(self.name, M, eligible, "dedup survivors with a CLIP score")
        con.execute(
            """
            CREATE TEMP TABLE sel AS SELECT shard, row FROM survivors
            QUALIFY row_number() OVER (ORDER BY clip_score DESC, uid ASC, shard ASC, row ASC) <= ?
            """,
            [M],
        )
        return eligible


CLIP_SCORE = ClipScoreStrategy("clip_score", "the M dedup survivors with the highest CLIP score, ties by uid",
                               needs=("candidates", "duplicates", "scores"), sized=True)
