"""Platform error type and the response-envelope builders used by the device API routes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.channels.tellus.models import ERROR_CODES, ErrorCode

__all__ = ["ApiError", "OperatorError", "envelope"]


def envelope(
    data: Any = None,
    *,
    code: int = ErrorCode.SUCCESS,
    message: str = "success",
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the ``{code, message, data[, details]}`` response body.

    ``details`` is included only when given (error responses).
    """
    body: dict[str, Any] = {"code": int(code), "message": message, "data": data}
    if details is not None:
        body["details"] = dict(details)
    return body


class ApiError(Exception):
    """A platform application error; the routes turn it into an enveloped error response.

    The HTTP status always comes from the error-code table, so status and ``code`` stay
    consistent.

    Attributes:
        code: application error code.
        message: human-readable text for the envelope.
        details: optional diagnostic object (``{field, value}``, ``{retry_after_seconds}``).
        headers: extra HTTP headers for the response (e.g. ``Retry-After``).
        device_id: the device the request was attributed to, when known (for the request log).
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        details: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        device_id: str | None = None,
    ) -> None:
        super().__init__(f"{int(code)}: {message}")
        self.code = code
        self.message = message
        self.details = dict(details) if details is not None else None
        self.headers = dict(headers) if headers is not None else {}
        self.device_id = device_id

    @property
    def http_status(self) -> int:
        """HTTP status paired with :attr:`code` in the error-code table."""
        return ERROR_CODES[self.code].http_status

    def body(self) -> dict[str, Any]:
        """The enveloped error body (``data`` null)."""
        return envelope(None, code=self.code, message=self.message, details=self.details)


class OperatorError(Exception):
    """A rejected operator-endpoint request; answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
