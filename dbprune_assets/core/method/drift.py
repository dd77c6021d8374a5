"""The drift alarm: do the shards added since a k-means fit still fit its clusters?

A fit (SemDeDup's ``dedup_centroids``, DBP's ``centroids``) records the
distribution of its own sample's distance to the nearest centroid
(:func:`fit_profile`: the 99th percentile, the mean, and the share beyond
that percentile, about 1% by construction).  Every shard assigned later
reports the same two numbers against the fit's percentile
(:func:`shard_drift`).  :func:`verdict` pools the shards added since the fit:
the alarm fires when their share beyond the fit's 99th percentile exceeds
``factor`` times the fit's own share (default 3×: 3% instead of 1%) over at
least ``min_samples`` samples (fewer say nothing: 1% of 100 samples is one).
Distances are ``1 - x·c`` of unit rows, as the assignments store them.
Nothing here knows of files or Dagster.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np

#: the fit's percentile a new sample is "far" beyond
PERCENTILE = 99.0


@dataclass(frozen=True)
class FitProfile:
    """A fit's own sample: its 99th-percentile distance, mean distance, the
    share beyond the percentile and the rows measured."""

    p99: float
    mean: float
    far_share: float
    rows: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ShardDrift:
    """One shard against a fit: rows assigned, rows beyond the fit's p99, mean distance."""

    shard: str
    rows: int
    far: int
    mean: float

    @property
    def far_share(self) -> float:
        return self.far / self.rows if self.rows else 0.0


@dataclass(frozen=True)
class Verdict:
    """The shards added since a fit, pooled."""

    fires: bool
    shards: int  #: shards added since the fit (with assignments)
    rows: int
    far_share: float  #: over those rows
    limit: float  #: factor × the fit's far share
    mean: float  #: their mean distance
    fit: FitProfile
    min_samples: int = 1000  #: added samples the alarm needs (``drift.min_samples``)

    def line(self, what: str) -> str:
        """One line for the console and the UI: what was measured and what it means."""
        if not self.rows:
            return f"{what}: no samples added since the fit"
        head = (f"{what}: {self.far_share:.1%} of the {self.rows:,} samples of the {self.shards} shard(s) added "
                f"since the fit lie beyond its 99th-percentile distance {self.fit.p99:.4f} (the fit: "
                f"{self.fit.far_share:.1%}; alarm above {self.limit:.1%})")
        if self.fires:
            return head + ": the new data no longer fits these clusters"
        if self.rows < self.min_samples:
            return head + f": too few to judge (the alarm waits for {self.min_samples:,}, drift.min_samples)"
        return head + ": they fit"


def fit_profile(distances: np.ndarray) -> FitProfile:
    """The profile of a fit's sample distances (n,): p99, mean, share beyond p99."""
    d = np.asarray(distances, dtype=np.float64)
    if len(d) == 0:
        return FitProfile(0.0, 0.0, 0.0, 0)
    p99 = float(np.percentile(d, PERCENTILE))
    return FitProfile(p99, float(d.mean()), float((d > p99).mean()), int(len(d)))


def shard_drift(shard: str, distances: np.ndarray, fit: FitProfile) -> ShardDrift:
    """One shard's rows, rows beyond the fit's p99 and mean distance."""
    d = np.asarray(distances, dtype=np.float64)
    return ShardDrift(shard, int(len(d)), int((d > fit.p99).sum()), float(d.mean()) if len(d) else 0.0)


def verdict(fit: FitProfile, added: Iterable[ShardDrift], factor: float = 3.0, min_samples: int = 1000) -> Verdict:
    """Pool the shards added since the fit (module docstring).  ``factor`` × the
    fit's far share is the limit; the fit's share is taken as at least 1/rows
    of its sample, so a fit whose sample had no row beyond its own p99 (tiny
    samples) still has a limit above zero."""
    added = [s for s in added if s.rows]  # a shard with no usable sample (damaged) says nothing
    rows = sum(s.rows for s in added)
    far = sum(s.far for s in added)
    share = far / rows if rows else 0.0
    base = max(fit.far_share, 1.0 / max(fit.rows, 1))
    limit = factor * base
    mean = sum(s.mean * s.rows for s in added) / rows if rows else 0.0
    return Verdict(bool(rows >= min_samples and share > limit), len(added), rows, share, limit, mean, fit,
                   min_samples)
