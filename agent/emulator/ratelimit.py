"""Per-device sliding-window rate limiter for the emulator's device endpoints."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping

from agent.channels.tellus.models import RATE_LIMITS, RateLimit, RateLimitClass

__all__ = ["RateLimiter"]


class RateLimiter:
    """Exact sliding-window limiter keyed by ``(device_id, class)``.

    A request is admitted when fewer than ``limit.requests`` admitted requests of the same
    device and class fall inside the last ``limit.per_seconds`` seconds. Rejected requests
    are not counted, so a client that honours ``retry_after_seconds`` is admitted when it
    comes back.

    Args:
        clock: monotonic clock in seconds.
        limits: the limit per class; defaults to the documented :data:`RATE_LIMITS`.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        limits: Mapping[RateLimitClass, RateLimit] = RATE_LIMITS,
    ) -> None:
        self._clock = clock
        self._limits = dict(limits)
        self._windows: dict[tuple[str, RateLimitClass], deque[float]] = {}

    def check(self, device_id: str, limit_class: RateLimitClass) -> int | None:
        """Admit or reject one request.

        Returns:
            ``None`` when admitted (and counted); otherwise the whole number of seconds
            (≥ 1) after which a request of this class would be admitted again.
        """
        limit = self._limits.get(limit_class)
        if limit is None:
            return None
        now = self._clock()
        window = self._windows.setdefault((device_id, limit_class), deque())
        while window and window[0] <= now - limit.per_seconds:
            window.popleft()
        if len(window) >= limit.requests:
            wait = window[0] + limit.per_seconds - now
            return max(1, math.ceil(wait))
        window.append(now)
        return None

    def reset(self) -> None:
        """Forget all counted requests."""
        self._windows.clear()
