"""Traffic shaping for the uplink: token buckets, backoff with jitter, the reconnect budget.

Clock-injectable (``clock`` returns monotonic seconds) so tests can run hours of
simulated time instantly.

* :class:`TokenBucket` -- ``rate`` requests/s with at most ``burst`` stored. Over any
  window of ``T`` seconds it admits at most ``burst + rate * T`` requests, so it stays
  under a server's sliding-window limit of ``L`` per ``T`` exactly when
  ``burst + rate * T <= L`` (:meth:`TokenBucket.max_in_window`).
* :class:`Backoff` -- ``min(base * 2^attempt, ceiling)`` plus 0-30 % jitter.
* :class:`ReconnectBudget` -- never more than ``limit`` reconnects in any ``window``
  (F-0302: more than 5 in 10 minutes is a reconnect storm). The first ``quick``
  reconnects of a window may follow each other as fast as the backoff allows (a short
  blip recovers in seconds); after that, reconnects are paced ``window / limit`` apart,
  so a long outage is probed every two minutes instead of five times in the first
  half-minute and then not at all for nine and a half.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable

Clock = Callable[[], float]


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` stored. ``delay()`` says how long to wait."""

    def __init__(self, rate: float, burst: float, clock: Clock = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = burst
        self.updated = clock()
        self.paused_until = 0.0

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.updated) * self.rate)
        self.updated = now

    def paused_for(self) -> float:
        """Seconds left of a :meth:`pause` (0 = not paused)."""
        return max(0.0, self.paused_until - self.clock())

    def delay(self) -> float:
        """Seconds until one token is available (0 = now). Does not take the token."""
        self._refill()
        wait_token = 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate
        return max(self.paused_for(), wait_token)

    def take(self) -> None:
        self._refill()
        self.tokens -= 1.0

    def pause(self, seconds: float) -> None:
        """Stop the whole class for ``seconds`` (a 429 answer)."""
        self.paused_until = max(self.paused_until, self.clock() + seconds)

    def max_in_window(self, window: float) -> float:
        """The most requests this bucket can let through in any ``window`` seconds."""
        return self.burst + self.rate * window


class Backoff:
    """``min(base * 2^attempt, ceiling)`` plus 0-30 % jitter (platform-api §3)."""

    def __init__(
        self, base: float = 1.0, ceiling: float = 30.0, rng: random.Random | None = None
    ) -> None:
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

    ``wait_time()`` is how long to hold the next reconnect so the budget is kept (and,
    after ``quick`` reconnects in the window, so reconnects stay ``window / limit``
    apart); ``record()`` counts one; ``used()`` is how many the current window holds.
    """

    def __init__(
        self,
        limit: int = 5,
        window: float = 600.0,
        clock: Clock = time.monotonic,
        *,
        quick: int = 2,
    ) -> None:
        if limit < 1 or window <= 0 or not 1 <= quick <= limit:
            raise ValueError("need limit >= 1, window > 0 and 1 <= quick <= limit")
        self.limit = limit
        self.window = window
        self.quick = quick
        self.spacing = window / limit
        self.clock = clock
        self.events: deque[float] = deque()

    def _trim(self) -> None:
        now = self.clock()
        while self.events and now - self.events[0] >= self.window:
            self.events.popleft()

    def wait_time(self) -> float:
        self._trim()
        now = self.clock()
        wait = 0.0
        if len(self.events) >= self.limit:
            wait = self.events[0] + self.window - now + 0.01
        if len(self.events) >= self.quick:
            wait = max(wait, self.events[-1] + self.spacing - now)
        return max(0.0, wait)

    def record(self) -> None:
        self._trim()
        self.events.append(self.clock())

    def used(self) -> int:
        self._trim()
        return len(self.events)
