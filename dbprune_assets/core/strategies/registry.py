"""The strategies, by name, in order: the one place that lists them.

The order is the order of every strategy listing: the comparison table and
plot, the Dagster strategy partitions, ``selection.strategies``' default.
Adding a strategy is one module under ``core/strategies/`` and one line in
``_BUILTIN`` (or a :func:`register` call at run time, as the tests do).
This module imports no settings: the settings validate names against it.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from dbprune_assets.core.strategies.base import INPUTS, Strategy
from dbprune_assets.core.strategies.by_quota import DBP, SSP
from dbprune_assets.core.strategies.balanced_kmeans import BALANCED_KMEANS
from dbprune_assets.core.strategies.clip_score import CLIP_SCORE
from dbprune_assets.core.strategies.datacomp_image import DATACOMP_IMAGE
from dbprune_assets.core.strategies.full import FULL
from dbprune_assets.core.strategies.negclip import NEGCLIP
from dbprune_assets.core.strategies.random_baseline import RANDOM
from dbprune_assets.core.strategies.semdedup import SEMDEDUP

#: the built-in strategies, in table order
_BUILTIN: tuple[Strategy, ...] = (DBP, SSP, RANDOM, CLIP_SCORE, SEMDEDUP, FULL, DATACOMP_IMAGE, NEGCLIP,
                                  BALANCED_KMEANS)
#: their names
BUILTIN_NAMES: tuple[str, ...] = tuple(s.name for s in _BUILTIN)
#: a strategy name is a partition key and a file name
_NAME = re.compile(r"[a-z][a-z0-9_]*")

_registry: dict[str, Strategy] = {s.name: s for s in _BUILTIN}


def names() -> tuple[str, ...]:
    """Every registered strategy's name, built-ins first, in registration order."""
    return tuple(_registry)


def get(name: str) -> Strategy:
    """The strategy called ``name``; ValueError listing the allowed names when there is none."""
    try:
        return _registry[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown strategy {name!r}; allowed: {', '.join(_registry)}") from None


def runnable(chosen: Sequence[str], layout: Any, settings: Any) -> tuple[list[str], dict[str, str]]:
    """Of the ``chosen`` strategy names (in registry order), those that can run
    on the pool, and why each other one cannot (one line saying what to
    provide: :meth:`~.base.Strategy.unavailable`)."""
    ok, left_out = [], {}
    for name in names():
        if name in chosen:
            why = _registry[name].unavailable(layout, settings)
            if why is None:
                ok.append(name)
            else:
                left_out[name] = why
    return ok, left_out


def quota_names() -> tuple[str, ...]:
    """The registered strategies that keep per-cluster quotas."""
    return tuple(n for n, s in _registry.items() if s.quota_based)


def register(strategy: Strategy) -> Strategy:
    """Add ``strategy`` after the registered ones; returns it.  ValueError when
    its name is taken or not a lower-case identifier, or when it needs a
    table that is not an input of decide."""
    if not isinstance(strategy, Strategy):
        raise TypeError(f"register takes a Strategy, not {type(strategy).__name__}")
    if not _NAME.fullmatch(strategy.name):
        raise ValueError(f"strategy name {strategy.name!r}: use lower-case letters, digits and _ (a letter first)")
    if strategy.name in _registry:
        raise ValueError(f"strategy {strategy.name!r} is already registered")
    unknown = [t for t in strategy.needs if t not in INPUTS or t == "samples"]
    if unknown:
        raise ValueError(f"strategy {strategy.name!r} needs {unknown}; the tables it can name are "
                         f"{', '.join(t for t in INPUTS if t != 'samples')}")
    if strategy.quota_based and not strategy.sized:
        raise ValueError(f"strategy {strategy.name!r}: a quota-based strategy keeps sum(quotas) = M, so it is sized")
    _registry[strategy.name] = strategy
    return strategy


def unregister(name: str) -> None:
    """Remove a strategy added with :func:`register` (the built-ins stay)."""
    if name in BUILTIN_NAMES:
        raise ValueError(f"{name!r} is a built-in strategy; it cannot be unregistered")
    get(name)
    del _registry[name]
