"""Traffic shaping for the uplink: token buckets, backoff with jitter, the reconnect budget.

Clock-injectable (``clock`` returns monotonic seconds) so tests can run hours of
simulated time instantly.
"""

from __future__ import annotations

import random
import time
from collections import deque
from typing import Callable

Clock = Callable[[], float]


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` stored. ``delay()`` says how long to wait."""

    def __init__(self, rate: float, burst: float, clock: Clock = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = burst
        self.updated = clock()
        self.paused_until = 0.0

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def delay(self) -> float:
        """Seconds until one token is available (0 = now). Does not take the token."""
        self._refill()
        wait_pause = max(0.0, self.paused_until - self.clock())
        wait_token = 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate
        return max(wait_pause, wait_token)

    def take(self) -> None:
        self._refill()
        self.tokens -= 1.0

    def pause(self, seconds: float) -> None:
        """Stop the whole class for ``seconds`` (a 429 answer)."""
        self.paused_until = max(self.paused_until, self.clock() + seconds)


class Backoff:
    """``min(base * 2^attempt, ceiling)`` plus 0-30 % jitter (platform-api §3)."""

    def __init__(self, base: float = 1.0, ceiling: float = 30.0, rng: random.Random | None = None) -> None:
        self.base = base
        self.ceiling = ceiling
        self.attempt = 0
        self.rng = rng or random.Random()

    def next_delay(self) -> float:
        delay = min(self.base * (2**self.attempt), self.ceiling)
        self.attempt = min(self.attempt + 1, 16)
        return delay * (1.0 + self.rng.uniform(0.0, 0.3))

    def reset(self) -> None:
        self.attempt = 0


class ReconnectBudget:
    """At most ``limit`` reconnects per ``window`` seconds (F-0302: more than 5 in 10 min).

    ``wait_time()`` is how long to hold the next reconnect so the budget is kept;
    ``record()`` counts one.
    """

    def __init__(self, limit: int = 5, window: float = 600.0, clock: Clock = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self.events: deque[float] = deque()

    def _trim(self) -> None:
        now = self.clock()
        while self.events and now - self.events[0] >= self.window:
            self.events.popleft()

    def wait_time(self) -> float:
        self._trim()
        if len(self.events) < self.limit:
            return 0.0
        return self.window - (self.clock() - self.events[0]) + 0.001

    def record(self) -> None:
        self._trim()
        self.events.append(self.clock())

    def used(self) -> int:
        self._trim()
        return len(self.events)
