"""Per-endpoint fault injection: one device endpoint misbehaves while the others work.

Unlike an outage (:meth:`agent.emulator.state.EmulatorStore.start_outage`, every endpoint
at once), a fault concerns one :class:`~agent.emulator.operator_models.RequestKind` and
answers with a real platform error envelope, so a test can reproduce "the platform's
``command-status`` handler is broken for 90 s" while heartbeats and telemetry go through:

* ``internal_error``: HTTP 500 with code ``9001``;
* ``forbidden``: HTTP 403 with code ``2003``;
* ``rate_limited``: HTTP 429 with code ``5001`` and *no* ``retry_after_seconds`` (nor a
  ``Retry-After`` header): the charger has to back off on its own.

A fault ends after ``seconds`` (on the emulator's clock) or when cleared; the request is
still read and logged, and is refused before authentication or validation, as a broken
platform component would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import structlog

from agent.channels.tellus.models import ErrorCode
from agent.emulator.errors import ApiError
from agent.emulator.operator_models import FaultMode, FaultView, RequestKind

__all__ = ["EndpointFaults"]

log = structlog.get_logger("agent.emulator.faults")

_ERRORS: dict[FaultMode, tuple[ErrorCode, str]] = {
    FaultMode.INTERNAL_ERROR: (ErrorCode.INTERNAL_ERROR, "internal server error (injected)"),
    FaultMode.FORBIDDEN: (ErrorCode.PERMISSION_DENIED, "permission denied (injected)"),
    FaultMode.RATE_LIMITED: (ErrorCode.TOO_MANY_REQUESTS, "too many requests (injected)"),
}


@dataclass
class _Fault:
    mode: FaultMode
    until: float


class EndpointFaults:
    """The active fault per endpoint kind (at most one each)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._faults: dict[RequestKind, _Fault] = {}

    def inject(self, kind: RequestKind, mode: FaultMode, seconds: float) -> FaultView:
        """Make requests of ``kind`` fail in ``mode`` for ``seconds`` seconds from now."""
        self._faults[kind] = _Fault(mode, self._clock() + seconds)
        log.warning("endpoint_fault_started", endpoint=kind.value, mode=mode.value, seconds=seconds)
        return self.view(kind)

    def clear(self, kind: RequestKind | None = None) -> None:
        """End the fault of ``kind`` (every fault when None)."""
        if kind is None:
            self._faults.clear()
        else:
            self._faults.pop(kind, None)
        log.info("endpoint_fault_cleared", endpoint=kind.value if kind else "all")

    def active(self, kind: RequestKind) -> FaultMode | None:
        fault = self._faults.get(kind)
        if fault is not None and self._clock() >= fault.until:
            del self._faults[kind]
            log.info("endpoint_fault_ended", endpoint=kind.value)
            return None
        return fault.mode if fault is not None else None

    def error(self, kind: RequestKind) -> ApiError | None:
        """The error a request of ``kind`` gets now, or None when it is served normally."""
        mode = self.active(kind)
        if mode is None:
            return None
        code, message = _ERRORS[mode]
        return ApiError(code, message)

    def view(self, kind: RequestKind) -> FaultView:
        mode = self.active(kind)
        fault = self._faults.get(kind)
        return FaultView(
            endpoint=kind,
            active=mode is not None,
            mode=mode,
            remaining_seconds=max(0.0, fault.until - self._clock()) if fault else 0.0,
        )
