"""CLIP-score filter on the SemDeDup survivors (``docs/design.md`` step 2).

``clip_score = cos(image, text)`` from the score encoder.  A sample passes when
``clip_score >= threshold`` (ties at the threshold are kept).  The threshold is
either absolute (``clip_filter.threshold``) or, with ``clip_filter.fraction``
(DataComp's ``--fraction``), the global quantile that keeps the top fraction:

* ``K = ceil(fraction * n)`` samples are wanted (rounded **up**: a positive
  fraction of a non-empty pool keeps at least one sample; ``fraction`` is read
  as its shortest decimal representation, so ``0.3 * 10`` is exactly 3);
* the threshold is the K-th largest score, so exactly ``K`` samples pass when
  no other sample ties with it and every tied sample passes otherwise
  (``>= K``).

Exactness and memory: the fraction rule holds every score in memory once, one
float32 per survivor (10M samples = 40 MB), streamed shard by shard from
``scores_iter``; beyond a few hundred million survivors an approximate
quantile sketch would be needed instead.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Iterable

import numpy as np


def exact_fraction(x: float) -> Fraction:
    """A float setting read as the decimal a person wrote (``0.1`` -> 1/10)."""
    return Fraction(repr(float(x)))


def kept_count(n: int, fraction: float) -> int:
    """``ceil(fraction * n)``: how many samples the fraction rule keeps (before ties)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"clip_filter.fraction={fraction} must be in (0, 1]")
    return int(math.ceil(exact_fraction(fraction) * n))


def clip_threshold(
    scores_iter: Iterable[np.ndarray],
    threshold: float | None,
    fraction: float | None,
) -> float:
    """The CLIP-score threshold: keep ``score >= threshold``.

    Exactly one of ``threshold`` (returned as is; ``scores_iter`` is not read)
    or ``fraction`` must be set.  With ``fraction``, ``scores_iter`` yields the
    dedup survivors' scores shard by shard (any 1-D float arrays) and the
    result is the ``ceil(fraction * n)``-th largest score (see the module doc;
    ``+inf`` when there are no scores, so nothing passes).  NaN/inf scores are
    an error.
    """
    if (threshold is None) == (fraction is None):
        raise ValueError("set exactly one of clip_filter.threshold or clip_filter.fraction (the other null)")
    if threshold is not None:
        t = float(threshold)
        if not -1.0 <= t <= 1.0:
            raise ValueError(f"clip_filter.threshold={t} must be in [-1, 1] (a cosine similarity)")
        return t
    assert fraction is not None
    kept_count(0, fraction)  # validate
    parts = []
    for i, s in enumerate(scores_iter):
        a = np.asarray(s, dtype=np.float32).reshape(-1)
        if not np.isfinite(a).all():
            raise ValueError(f"clip scores of part {i}: {int((~np.isfinite(a)).sum())} NaN/inf values")
        parts.append(a)
    scores = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    n = len(scores)
    if n == 0:
        return math.inf
    kk = kept_count(n, fraction)
    # K-th largest = element n-K of the ascending order
    return float(np.partition(scores, n - kk)[n - kk])


def clip_keep_mask(scores: np.ndarray, threshold: float) -> np.ndarray:
    """``scores >= threshold`` (the tie rule: a score equal to the threshold
    passes), compared in float64 as SQL compares a REAL column with a DOUBLE."""
    return np.asarray(scores, dtype=np.float64) >= float(threshold)
