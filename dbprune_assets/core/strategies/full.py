"""The ``full`` baseline: every usable sample (status ``ok``), duplicates and
low CLIP scores included; it reads the samples table only (M is ignored)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dbprune_assets.core.strategies.base import Strategy, scalar

if TYPE_CHECKING:
    import numpy as np


class FullStrategy(Strategy):
    """Keep every ``ok`` sample."""

    def select(self, con: Any, M: int | None, quotas: np.ndarray | None, seed: int) -> int:
        eligible = scalar(con, "SELECT count(*) FROM samples WHERE status = 'ok'")
        con.execute("CREATE TEMP TABLE sel AS SELECT shard, row FROM samples WHERE status = 'ok'")
        return eligible


FULL = FullStrategy("full", "every usable (ok) sample: the unpruned pool")
