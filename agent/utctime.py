"""Wall-clock time in UTC: the agent's one place for "now" and ISO 8601 ``Z`` timestamps.

Contract
--------
* :func:`utc_now` is the current time as an aware UTC datetime; :func:`now_iso` the same
  as a string.
* :func:`to_iso` writes ``2025-03-15T10:30:00Z``: UTC, ``Z`` suffix, whole seconds (a
  fraction is truncated). With ``millis=True`` a non-zero sub-second part is kept with
  millisecond precision (``2025-03-15T10:30:00.250Z``), the platform API's format. A float is
  Unix seconds; a naive datetime is taken as local time (``datetime.astimezone``).
* :func:`file_stamp` is the compact form used in file names (``20250315T103000Z``).
* :func:`parse_iso` reads any ISO 8601 date-time Python reads (``Z`` or an offset); a string
  without an offset gives a naive datetime, which callers reject or read as UTC.
  :func:`parse_rfc3339` is the strict form: an explicit offset is required, more than six
  fraction digits are truncated, the result is aware UTC. Both raise ``ValueError``.
* :func:`iso_to_unix` is the forgiving reader for stored snapshots: anything that is not an
  ISO 8601 string gives ``None``; no offset counts as UTC.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any, Final

_RFC3339_DATE_TIME: Final = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:[Zz]|[+-]\d{2}:\d{2})$"
)


def utc_now() -> datetime:
    """The current wall-clock time as a timezone-aware UTC datetime."""
    return datetime.now(UTC)


def now_iso() -> str:
    """The current time as :func:`to_iso` writes it (whole seconds)."""
    return to_iso(utc_now())


def to_iso(value: datetime | float, *, millis: bool = False) -> str:
    """``value`` (aware datetime or Unix seconds) as ISO 8601 UTC with a trailing ``Z``."""
    dt = datetime.fromtimestamp(value, UTC) if isinstance(value, (int, float)) else value.astimezone(UTC)
    timespec = "milliseconds" if millis and dt.microsecond else "seconds"
    return dt.replace(tzinfo=None).isoformat(timespec=timespec) + "Z"


def file_stamp(at: float | None = None) -> str:
    """``at`` (Unix seconds, default now) as ``YYYYMMDDTHHMMSSZ`` for file names."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(at))


def parse_iso(text: str) -> datetime:
    """An ISO 8601 date-time (``Z`` accepted); naive when the text names no offset."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def parse_rfc3339(value: str) -> datetime:
    """A strict RFC 3339 date-time (``Z`` or ``±HH:MM`` required) as an aware UTC datetime.

    Raises:
        ValueError: not an RFC 3339 date-time with an explicit offset, or an impossible date.
    """
    if not _RFC3339_DATE_TIME.match(value):
        raise ValueError("timestamp must be an ISO 8601 date-time with 'Z' or a UTC offset")
    text = value.upper()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    head, sep, frac_and_offset = text.partition(".")
    if sep:
        # datetime.fromisoformat accepts at most microseconds; truncate longer fractions.
        digits = re.match(r"\d+", frac_and_offset)
        assert digits is not None  # guaranteed by the regular expression above
        frac = digits.group(0)
        text = f"{head}.{frac[:6].ljust(6, '0')}{frac_and_offset[len(frac):]}"
    return datetime.fromisoformat(text).astimezone(UTC)


def iso_to_unix(value: Any) -> float | None:
    """ISO 8601 (``Z`` or offset; naive counts as UTC) -> Unix seconds; None if not a time."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = parse_iso(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()
