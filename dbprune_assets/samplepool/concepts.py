"""Concepts of the sample pool: (shape, color) pairs with a planted
variability and a Zipf frequency, and the seeded random streams."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from dbprune_assets.core.settings import PoolSettings

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon")


COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 215, 40),
    "purple": (145, 60, 195),
    "orange": (245, 140, 30),
    "cyan": (40, 210, 220),
    "white": (242, 242, 242),
}
ZIPF_EXPONENT = 0.8


@dataclass(frozen=True)
class Concept:
    """One visual concept: a colored shape with a planted variability and frequency."""

    id: int
    shape: str
    color: str
    variability: float
    frequency: float  # planted share of the pool's base samples (Zipf weight)

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


def rng_stream(seed: int, *stream: int) -> np.random.Generator:
    """An independent random stream per part of the pool (concepts, rows,
    layout, images, eval, reference; the DataComp-format pool adds a shard and
    a model index), so changing one part's size leaves the others unchanged.
    Any integer seed works, negative ones included."""
    return np.random.default_rng([seed % 2**64, *stream])


def make_concepts(settings: PoolSettings) -> list[Concept]:
    """The concept table: distinct (shape, color) pairs, variability and frequency.

    Pairs follow a Latin-square pattern so shapes and colors are used equally
    often (a concept differs from many others in both).  Variability is spread
    evenly over [0, 1]; Zipf frequencies are dealt round-robin over three
    interleaved variability strata, so the two are not confounded.
    """
    n = settings.concepts
    rng = rng_stream(settings.seed, 1)
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))]
    colors = [list(COLORS)[i] for i in rng.permutation(len(COLORS))]
    pairs = [(shapes[i % 8], colors[(i + i // 8) % 8]) for i in range(n)]
    pairs = [pairs[i] for i in rng.permutation(n)]
    variability = np.linspace(0.0, 1.0, n)[rng.permutation(n)]
    weights = 1.0 / np.arange(1, n + 1) ** ZIPF_EXPONENT
    weights = weights / weights.sum()
    # frequency ranks dealt round-robin over three interleaved variability strata
    # (variability ranks 0, 3, 6, ...; 1, 4, 7, ...; 2, 5, 8, ...), each shuffled:
    # a random assignment in which every three consecutive frequency ranks take
    # one concept of each stratum, so frequency and variability are not confounded
    order = np.argsort(variability)  # concept ids by variability
    var_rank = np.argsort(order)
    best, best_corr = None, math.inf
    for _ in range(64):  # of 64 seeded deals, the one least rank-correlated with variability
        strata = [list(order[i::3]) for i in range(3)] if n >= 3 else [list(order)]
        for st in strata:
            rng.shuffle(st)
        dealt: list[int] = []
        while any(strata):
            for st in strata:
                if st:
                    dealt.append(int(st.pop()))
        ranks = np.empty(n, dtype=int)
        ranks[np.asarray(dealt)] = np.arange(n)  # concept i gets frequency rank ranks[i]
        corr = abs(float(np.corrcoef(var_rank, ranks)[0, 1]))
        if corr < best_corr:
            best, best_corr = ranks, corr
    assert best is not None
    return [
        Concept(id=i, shape=s, color=c, variability=round(float(variability[i]), 6), frequency=float(weights[best[i]]))
        for i, (s, c) in enumerate(pairs)
    ]


def concept_counts(concepts: Sequence[Concept], total: int) -> np.ndarray:
    """Integer rows per concept following the Zipf weights, with a small floor.

    The floor (up to 15 rows) keeps every concept clusterable; the rest is
    split by largest remainder so the counts sum to ``total`` exactly.
    """
    n = len(concepts)
    floor = min(15, max(2, total // (4 * n)))
    if floor * n > total:
        floor = total // n
    w = np.array([c.frequency for c in concepts])
    spare = total - floor * n
    raw = w * spare
    counts = np.floor(raw).astype(int)
    order = sorted(range(n), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: spare - int(counts.sum())]:
        counts[i] += 1
    return counts + floor
