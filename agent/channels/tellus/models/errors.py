"""The Tellus application error codes and what each means for a client (HTTP status, transient,
re-authenticate).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from types import MappingProxyType


class ErrorCode(IntEnum):
    """Application ``code`` values of the response envelope."""

    SUCCESS = 0
    INVALID_PARAMETER = 1001
    MISSING_PARAMETER = 1002
    UNAUTHENTICATED = 2001
    TOKEN_EXPIRED = 2002
    PERMISSION_DENIED = 2003
    NOT_FOUND = 3001
    CONFLICT = 4001
    TOO_MANY_REQUESTS = 5001
    INTERNAL_ERROR = 9001


@dataclass(frozen=True)
class ErrorCodeInfo:
    """One row of the error-code table.

    Attributes:
        code: the application code.
        http_status: the HTTP status the platform sends with it.
        meaning: short description.
        transient: ``True`` when the same request may succeed if retried later unchanged
            (with backoff). ``False`` means permanent for this request as sent.
        reauthenticate: ``True`` when the remedy is a new access token followed by one retry.
    """

    code: ErrorCode
    http_status: int
    meaning: str
    transient: bool
    reauthenticate: bool = False


ERROR_CODES: Mapping[ErrorCode, ErrorCodeInfo] = MappingProxyType(
    {
        info.code: info
        for info in (
            ErrorCodeInfo(ErrorCode.SUCCESS, 200, "success", transient=False),
            ErrorCodeInfo(
                ErrorCode.INVALID_PARAMETER, 400, "invalid request parameters", transient=False
            ),
            ErrorCodeInfo(
                ErrorCode.MISSING_PARAMETER, 400, "missing required parameter", transient=False
            ),
            ErrorCodeInfo(
                ErrorCode.UNAUTHENTICATED,
                401,
                "unauthenticated or invalid token",
                transient=False,
                reauthenticate=True,
            ),
            ErrorCodeInfo(
                ErrorCode.TOKEN_EXPIRED, 401, "token expired", transient=False, reauthenticate=True
            ),
            ErrorCodeInfo(ErrorCode.PERMISSION_DENIED, 403, "permission denied", transient=False),
            ErrorCodeInfo(ErrorCode.NOT_FOUND, 404, "resource not found", transient=False),
            ErrorCodeInfo(
                ErrorCode.CONFLICT,
                409,
                "resource conflict (e.g. device already registered)",
                transient=False,
            ),
            ErrorCodeInfo(ErrorCode.TOO_MANY_REQUESTS, 429, "too many requests", transient=True),
            ErrorCodeInfo(ErrorCode.INTERNAL_ERROR, 500, "internal server error", transient=True),
        )
    }
)
"""Every documented application code → HTTP status, meaning, transient/permanent."""


def error_info(code: int) -> ErrorCodeInfo | None:
    """Return the table row for ``code``, or ``None`` for a code the document does not list."""
    try:
        return ERROR_CODES[ErrorCode(code)]
    except ValueError:
        return None
