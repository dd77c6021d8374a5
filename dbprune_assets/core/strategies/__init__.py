"""Selection strategies: a keep/drop decision with a reason for every sample.

The "Strategies" table of ``docs/design.md``, one module per strategy, each
behind the one interface of :mod:`.base` and listed, in table order, in
:mod:`.registry`; :func:`~.decide.decide` runs one:

==============  =================  ====  =========================================
strategy        selects from       size  rule (module)
==============  =================  ====  =========================================
``dbp``         candidates         M     per-cluster quotas ``N_j``, the ``N_j``
                                         members farthest from the centroid
                                         (:mod:`.by_quota`)
``ssp``         candidates         M     same, with the uniform quotas
``random``      candidates         M     the M smallest ``uid_hash(seed, uid)``
                                         (:mod:`.random_baseline`)
``clip_score``  dedup survivors    M     top-M by clip_score (:mod:`.clip_score`)
``semdedup``    candidates         all   every candidate (:mod:`.semdedup`)
``full``        ``ok`` samples     all   everything usable (:mod:`.full`)
==============  =================  ====  =========================================

Every ordering ends in a total tie-break (uid, then shard and row), so the
decisions are a pure function of the input tables, M, the quotas and the seed.

A dropped sample's ``reason`` is the first rule that removed it:
``corrupt`` (status != ok) > ``duplicate`` (in the SemDeDup duplicates) >
``low_clip_score`` (ok, not a duplicate, not a candidate) > ``pruned``
(eligible, not selected); every kept sample has reason ``kept``.

Inputs are the parquet tables under the tables root (``samples``, ``scores``,
``duplicates``, ``candidates``, ``assignments``: :data:`~.base.INPUTS`); a
sample's status is its pool-wide one (a uid seen in an earlier shard is
``duplicate_uid``, :mod:`dbprune_assets.core.pool.uids`); candidates and
assignments are joined to samples on ``(shard, row)`` (unique per parquet
row), duplicates and scores on ``(shard, uid)``.

Adding a strategy: one module here with a :class:`~.base.Strategy` subclass
and its instance, and one line in :mod:`.registry` (``docs/design.md``,
"Adding a strategy").
"""

from dbprune_assets.core.strategies.base import INPUTS, Strategy
from dbprune_assets.core.strategies.by_quota import select_by_quota
from dbprune_assets.core.strategies.decide import REASONS, DecisionSummary, decide
from dbprune_assets.core.strategies.quotas import kept_per_cluster, quota_table, strategy_quotas
from dbprune_assets.core.strategies.registry import get, names, register, unregister

__all__ = [
    "INPUTS",
    "REASONS",
    "DecisionSummary",
    "Strategy",
    "decide",
    "get",
    "kept_per_cluster",
    "names",
    "quota_table",
    "register",
    "select_by_quota",
    "strategy_quotas",
    "unregister",
]
