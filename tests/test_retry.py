"""alignd.runtime.retry.Backoff: the capped exponential backoff with full jitter that the reward client SDK uses."""

from __future__ import annotations

import random

import pytest

from alignd.runtime.retry import Backoff


def test_cap_doubles_from_initial_up_to_maximum():
    b = Backoff(0.1, 0.5)
    assert [b.cap(k) for k in (1, 2, 3, 4, 9)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    assert Backoff(1.0, float("inf")).cap(10_000) == 2.0**62  # no float overflow for a long outage


def test_delay_is_full_jitter_from_the_injected_generator():
    b = Backoff(0.1, 0.5, rng=random.Random(7))
    expected = random.Random(7)
    for k in (1, 2, 3, 4, 9):
        assert b.delay(k) == expected.uniform(0.0, b.cap(k))
    # A generator passed for one pause is used instead of the policy's own.
    assert b.delay(3, random.Random(1)) == random.Random(1).uniform(0.0, 0.4)


def test_negative_bounds_are_refused():
    with pytest.raises(ValueError, match="initial >= 0 and maximum >= 0"):
        Backoff(-0.1, 1.0)
    with pytest.raises(ValueError, match="initial >= 0 and maximum >= 0"):
        Backoff(0.1, -1.0)
