"""The two ways the charging core says no."""

from __future__ import annotations

from typing import Any


class Rejected(Exception):
    """A request the connector will not take; the message is for the platform."""


class SessionAbort(Exception):
    """Ends preparation or a session early: ``stop_reason``, optional fault to raise."""

    def __init__(self, stop_reason: str, message: str, fault_id: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.stop_reason = stop_reason
        self.message = message
        self.fault_id = fault_id
        self.details = details
