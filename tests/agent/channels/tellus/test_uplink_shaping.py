"""Token buckets, backoff and the reconnect budget on a hand-moved clock."""

from __future__ import annotations

import itertools
import random

import pytest

from agent.channels.tellus.shaping import Backoff, ReconnectBudget, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def max_in_window(times: list[float], window: float) -> int:
    """The most events inside any half-open window ``[t, t + window)``."""
    best, j = 0, 0
    for i, start in enumerate(times):
        while j < len(times) and times[j] < start + window:
            j += 1
        best = max(best, j - i)
    return best


def drive_bucket(bucket: TokenBucket, clock: Clock, n: int) -> list[float]:
    """Send ``n`` requests as fast as the bucket allows."""
    sent: list[float] = []
    while len(sent) < n:
        delay = bucket.delay()
        if delay > 0:
            clock.now += delay
            continue
        bucket.take()
        sent.append(clock.now)
    return sent


@pytest.mark.parametrize(
    ("rate", "burst", "window", "limit"), [(8.0, 1.0, 1.0, 10), (50 / 60, 1.0, 60.0, 60)]
)
def test_bucket_stays_under_the_sliding_window_limit(
    rate: float, burst: float, window: float, limit: int
) -> None:
    clock = Clock()
    bucket = TokenBucket(rate, burst, clock)
    sent = drive_bucket(bucket, clock, 500)
    assert max_in_window(sent, window) <= bucket.max_in_window(window) <= limit
    # and it does drain at the configured rate
    assert (sent[-1] - sent[0]) == pytest.approx((len(sent) - burst) / rate, rel=0.01)


def test_bucket_pause_holds_the_class() -> None:
    clock = Clock()
    bucket = TokenBucket(8.0, 1.0, clock)
    bucket.pause(7.0)
    assert bucket.paused_for() == pytest.approx(7.0)
    assert bucket.delay() == pytest.approx(7.0)
    clock.now += 7.0
    assert bucket.delay() == 0.0 and bucket.paused_for() == 0.0


def test_backoff_doubles_to_the_ceiling_with_up_to_30_percent_jitter() -> None:
    backoff = Backoff(rng=random.Random(5))
    delays = [backoff.next_delay() for _ in range(10)]
    for attempt, delay in enumerate(delays):
        nominal = min(2.0**attempt, 30.0)
        assert nominal <= delay <= nominal * 1.3
    backoff.reset()
    assert backoff.next_delay() <= 1.3


def test_reconnect_budget_never_allows_more_than_5_in_10_minutes() -> None:
    clock = Clock()
    budget = ReconnectBudget(clock=clock)
    backoff = Backoff(rng=random.Random(3))
    attempts = []
    for _ in range(40):  # a platform that stays down for hours
        clock.now += max(backoff.next_delay(), budget.wait_time())
        budget.record()
        attempts.append(clock.now)
    assert max_in_window(attempts, 600.0) == 5
    assert attempts[1] - attempts[0] < 5  # two quick tries for a short blip...
    gaps = [b - a for a, b in itertools.pairwise(attempts[1:])]
    assert min(gaps) >= 119.99  # ...then paced two minutes apart
    assert max(gaps) <= 600.0 - 3 * 120.0 + 1  # never a long silence


def test_reconnect_budget_refills_after_a_quiet_window() -> None:
    clock = Clock()
    budget = ReconnectBudget(clock=clock)
    for _ in range(2):
        budget.record()
    assert budget.wait_time() == pytest.approx(120.0)
    clock.now += 601
    assert budget.used() == 0 and budget.wait_time() == 0.0
