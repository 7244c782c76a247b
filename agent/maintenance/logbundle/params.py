"""``fetch_logs`` parameters and the bundle's errors.

See :mod:`agent.maintenance.logbundle` for the contract (window defaults, URL rules).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Final
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator

from agent.commands.params import Params
from agent.netaddr import is_loopback_host
from agent.redaction import safe_url
from agent.utctime import to_iso, utc_now

DEFAULT_MAX_BYTES: Final = 50 * 1024 * 1024


DEFAULT_WINDOW: Final = timedelta(hours=24)


DEFAULT_UPLOAD_TIMEOUT_S: Final = 900.0


class UploadError(Exception):
    """The bundle could not be uploaded; ``str(exc)`` is a reason fit for a command status.

    ``status`` is the HTTP status when the server answered; ``details`` is filled by
    :func:`collect_and_upload` with the bundle's :meth:`Bundle.details`."""

    def __init__(self, reason: str, *, status: int | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.details: dict[str, Any] | None = None


class BundleError(Exception):
    """The bundle could not be built (e.g. it cannot be made to fit ``max_bytes``)."""


def check_upload_url(url: str) -> None:
    """Raise ``ValueError`` unless ``url`` is ``https://host/...`` or ``http://`` to a loopback
    host (``localhost``, ``127.0.0.0/8``, ``::1``). The message never echoes the query."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError:
        raise ValueError("an https:// URL (could not parse it)") from None
    if any(c.isspace() for c in url):
        raise ValueError("an https:// URL without white space")
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"an https:// URL with a host (got {safe_url(url)!r})")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ValueError(
            f"an https:// URL (plain http is accepted only to a loopback host, "
            f"got {safe_url(url)!r})"
        )


def _aware_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("a date-time with a time zone (e.g. 2025-03-15T10:30:00Z)")
    return value.astimezone(UTC)


class FetchLogsParams(Params):
    """``fetch_logs`` parameters. After validation ``since`` and ``until`` are always set
    (UTC): ``until`` defaults to now, ``since`` to ``until - 24 h``."""

    upload_url: str = Field(..., min_length=1, max_length=4096)
    since: datetime | None = None
    until: datetime | None = Field(None, validate_default=True)

    @field_validator("upload_url")
    @classmethod
    def _upload_target(cls, value: str) -> str:
        check_upload_url(value)
        return value

    @field_validator("since")
    @classmethod
    def _since_aware(cls, value: datetime | None) -> datetime | None:
        return _aware_utc(value)

    @field_validator("until")
    @classmethod
    def _until_after_since(cls, value: datetime | None, info: ValidationInfo) -> datetime:
        defaulted = value is None
        until = utc_now() if value is None else _aware_utc(value)
        assert until is not None
        since = info.data.get("since")
        if isinstance(since, datetime) and until <= since:
            if defaulted:
                raise ValueError(
                    f"must be after since ({to_iso(since.timestamp(), millis=True)}); until defaults to "
                    f"now ({to_iso(until.timestamp(), millis=True)})"
                )
            raise ValueError(f"must be after since ({to_iso(since.timestamp(), millis=True)})")
        return until

    @model_validator(mode="after")
    def _default_since(self) -> FetchLogsParams:
        if self.since is None and self.until is not None:
            self.since = self.until - DEFAULT_WINDOW
        return self

    def window(self) -> tuple[datetime, datetime]:
        """``(since, until)``, both set and in UTC once the model is validated."""
        if self.since is None or self.until is None:
            raise RuntimeError("FetchLogsParams was not validated")
        return self.since, self.until
