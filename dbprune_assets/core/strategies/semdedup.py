"""The ``semdedup`` baseline: every candidate, i.e. SemDeDup and the CLIP-score
filter only, without DBP; its size is the candidate count (M is ignored)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dbprune_assets.core.strategies.base import Strategy, scalar

if TYPE_CHECKING:
    import numpy as np


class SemDedupStrategy(Strategy):
    """Keep every candidate."""

    def select(self, con: Any, M: int | None, quotas: np.ndarray | None, seed: int) -> int:
        n_cand = scalar(con, "SELECT count(*) FROM candidates")
        con.execute("CREATE TEMP TABLE sel AS SELECT shard, row FROM candidates")
        return n_cand


SEMDEDUP = SemDedupStrategy("semdedup", "every candidate: SemDeDup and the CLIP-score filter only, no DBP",
                            needs=("candidates", "duplicates"))
