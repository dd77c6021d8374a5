"""The ``clip_score`` baseline: the M dedup survivors with the highest CLIP
score (ties by uid, then shard and row).

It selects from every ``ok`` sample that SemDeDup kept and that has a finite
score (a uid's highest when it has several), so with M above the candidate
count it reaches below the CLIP-score threshold of step 2.  The same pool
(:func:`survivors_view`) is what ``negclip`` and ``datacomp_image`` select from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dbprune_assets.core.strategies.base import Strategy, check_size, scalar

if TYPE_CHECKING:
    import numpy as np


def survivors_view(con: Any, name: str = "survivors") -> int:
    """Create the temp view ``name(shard, row, uid, clip_score)`` of the dedup
    survivors with a finite CLIP score (ok, not a SemDeDup duplicate) and
    return their count."""
    con.execute(
        f"""
        CREATE TEMP VIEW {name} AS
        SELECT s.shard, s.row, s.uid, sc.clip_score
        FROM samples s
        JOIN (SELECT shard, uid, max(clip_score) AS clip_score FROM scores
              WHERE clip_score IS NOT NULL AND NOT isnan(clip_score) GROUP BY shard, uid) sc
          ON sc.shard = s.shard AND sc.uid = s.uid
        ANTI JOIN (SELECT DISTINCT shard, uid FROM duplicates) d ON d.shard = s.shard AND d.uid = s.uid
        WHERE s.status = 'ok'
        """
    )
    return int(scalar(con, f"SELECT count(*) FROM {name}"))


def keep_top(con: Any, view: str, score: str, M: int) -> None:
    """Create ``sel(shard, row)``: the ``M`` rows of ``view`` with the highest
    ``score`` (an expression over its columns), ties by uid, then shard and row."""
    con.execute(
        f"""
        CREATE TEMP TABLE sel AS SELECT shard, row FROM {view}
        QUALIFY row_number() OVER (ORDER BY {score} DESC, uid ASC, shard ASC, row ASC) <= ?
        """,
        [int(M)],
    )


class ClipScoreStrategy(Strategy):
    """Keep the top M dedup survivors by CLIP score."""

    def select(self, con: Any, M: int | None, quotas: np.ndarray | None, seed: int) -> int:
        assert M is not None
        eligible = survivors_view(con)
        check_size(self.name, M, eligible, "dedup survivors with a CLIP score")
        keep_top(con, "survivors", "clip_score", M)
        return eligible


CLIP_SCORE = ClipScoreStrategy("clip_score", "the M dedup survivors with the highest CLIP score, ties by uid",
                               needs=("candidates", "duplicates", "scores"), sized=True,
                               reference="Radford et al. 2021 / DataComp (Gadre et al., NeurIPS 2023): CLIP score filtering")
