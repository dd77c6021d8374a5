"""CLIP-score filter: absolute threshold, the top-fraction quantile, the tie
rule (keep score >= threshold) and the kept count ceil(fraction * n)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbprune_assets.core.method.clip_filter import clip_keep_mask, clip_threshold, kept_count


def _never():
    raise AssertionError("scores must not be read for an absolute threshold")
    yield  # pragma: no cover


def test_absolute_threshold_is_returned_without_reading_scores():
    assert clip_threshold(_never(), 0.28, None) == 0.28
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        clip_threshold([], 1.5, None)


def test_exactly_one_rule():
    with pytest.raises(ValueError, match="exactly one"):
        clip_threshold([], 0.3, 0.5)
    with pytest.raises(ValueError, match="exactly one"):
        clip_threshold([], None, None)
    for f in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError, match="fraction"):
            clip_threshold([np.ones(3)], None, f)


def test_fraction_streamed_in_parts_hand_example():
    scores = np.array([0.05, 0.31, 0.12, 0.40, 0.22, 0.18, 0.27, 0.09, 0.35, 0.15], dtype=np.float32)
    parts = [scores[:3], scores[3:4], scores[4:]]
    # 10 scores, fraction 0.3 -> K = 3 -> third largest = 0.31
    t = clip_threshold(iter(parts), None, 0.3)
    assert t == float(np.float32(0.31))
    assert clip_keep_mask(scores, t).sum() == 3
    # fraction 0.25 -> ceil(2.5) = 3 (rounded up)
    assert clip_threshold(parts, None, 0.25) == t
    # 0.1 * 10 is exactly 1 (not the float 1.0000000000000000555 -> 2)
    assert clip_keep_mask(scores, clip_threshold(parts, None, 0.1)).sum() == 1
    # fraction 1 keeps everything
    assert clip_keep_mask(scores, clip_threshold(parts, None, 1.0)).all()


def test_ties_at_the_threshold_are_kept():
    scores = np.array([0.1, 0.2, 0.2, 0.2, 0.3], dtype=np.float32)
    t = clip_threshold([scores], None, 0.4)  # K = 2 -> 2nd largest = 0.2
    assert t == float(np.float32(0.2))
    assert clip_keep_mask(scores, t).tolist() == [False, True, True, True, True]


def test_empty_and_nan():
    t = clip_threshold([np.zeros(0, np.float32)], None, 0.5)
    assert t == math.inf and not clip_keep_mask(np.array([1.0]), t).any()
    with pytest.raises(ValueError, match="NaN"):
        clip_threshold([np.array([0.1, np.nan])], None, 0.5)


def test_kept_count_rounds_up():
    assert [kept_count(10, f) for f in (0.01, 0.1, 0.25, 0.3, 0.5, 1.0)] == [1, 1, 3, 3, 5, 10]
    assert kept_count(100, 0.29) == 29 and kept_count(0, 0.5) == 0


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.floats(-1, 1, width=32), min_size=1, max_size=200),
    st.floats(0.001, 1.0),
    st.integers(1, 5),
)
def test_fraction_property(scores, fraction, nparts):
    s = np.array(scores, dtype=np.float32)
    parts = np.array_split(s, nparts)
    t = clip_threshold(parts, None, fraction)
    kk = kept_count(len(s), fraction)
    kept = clip_keep_mask(s, t)
    assert kept.sum() >= kk  # at least K pass (all ties at t pass too)
    assert (s > t).sum() < kk  # and t is the K-th largest: fewer than K strictly above
    assert t in s.astype(np.float64)
