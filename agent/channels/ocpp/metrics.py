"""OCPP channel metadata: version, message rate, last CSMS message, negotiated profiles.

``messages_per_minute`` is the rolling five-minute average of frames in both directions
(every CALL, CALLRESULT and CALLERROR sent or received).
"""

from __future__ import annotations

import collections
import time
from datetime import datetime, timezone
from typing import Any, Callable

WINDOW_S = 300.0


class ChannelMetrics:
    def __init__(self, version: str, clock: Callable[[], float] = time.time) -> None:
        self.version = version
        self.clock = clock
        self._frames: collections.deque[float] = collections.deque()
        self.last_csms_message_at: float | None = None
        self.features: list[str] = []
        self.connected = False
        self.boot_status: str | None = None
        self.connects = 0
        self.upgrade_attempts = 0
        self.last_error: str | None = None
        self.dead_letters = 0
        self.queue_depth = 0

    def frame(self, *, received: bool) -> None:
        now = self.clock()
        self._frames.append(now)
        if received:
            self.last_csms_message_at = now
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._frames and self._frames[0] < now - WINDOW_S:
            self._frames.popleft()

    def messages_per_minute(self) -> float:
        self._trim(self.clock())
        return round(len(self._frames) / (WINDOW_S / 60.0), 2)

    def snapshot(self) -> dict[str, Any]:
        """The proposed device fields (``ocpp_*``) plus connection details for ``status``."""
        last = self.last_csms_message_at
        return {
            "ocpp_version": self.version,
            "ocpp_csms_messages_per_minute": self.messages_per_minute(),
            "ocpp_csms_last_message_at": None
            if last is None
            else datetime.fromtimestamp(last, timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
            "ocpp_negotiated_features": list(self.features),
            "connected": self.connected,
            "boot_status": self.boot_status,
            "connects": self.connects,
            "upgrade_attempts": self.upgrade_attempts,
            "last_error": self.last_error,
            "queue_depth": self.queue_depth,
            "dead_letters": self.dead_letters,
        }
