"""agent.utctime: the one UTC clock and ISO 8601 'Z' formatter/parser."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest

from agent.utctime import file_stamp, iso_to_unix, now_iso, parse_iso, parse_rfc3339, to_iso, utc_now


def test_utc_now_is_aware_utc() -> None:
    now = utc_now()
    assert now.utcoffset() == timedelta(0)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", now_iso())


def test_to_iso_seconds_and_millis() -> None:
    assert to_iso(0) == "1970-01-01T00:00:00Z"
    assert to_iso(1.5) == "1970-01-01T00:00:01Z"
    assert to_iso(1.5, millis=True) == "1970-01-01T00:00:01.500Z"
    assert to_iso(2.0, millis=True) == "1970-01-01T00:00:02Z"
    plus_two = datetime(2025, 3, 15, 12, 30, 0, 250_000, tzinfo=timezone(timedelta(hours=2)))
    assert to_iso(plus_two) == "2025-03-15T10:30:00Z"
    assert to_iso(plus_two, millis=True) == "2025-03-15T10:30:00.250Z"


def test_file_stamp() -> None:
    assert file_stamp(0) == "19700101T000000Z"
    assert re.fullmatch(r"\d{8}T\d{6}Z", file_stamp())


def test_parse_iso_round_trips_and_keeps_naive() -> None:
    assert parse_iso("2025-03-15T10:30:00Z") == datetime(2025, 3, 15, 10, 30, tzinfo=UTC)
    assert parse_iso(to_iso(1_700_000_000)).timestamp() == 1_700_000_000
    assert parse_iso("2025-03-15T10:30:00").tzinfo is None
    with pytest.raises(ValueError):
        parse_iso("yesterday")


def test_parse_rfc3339_is_strict() -> None:
    assert parse_rfc3339("2025-03-15T10:30:00.123456789+01:00") == datetime(
        2025, 3, 15, 9, 30, 0, 123_456, tzinfo=UTC
    )
    for bad in ("2025-03-15T10:30:00", "2025-03-15 10:30:00Z", "2025-02-30T10:30:00Z"):
        with pytest.raises(ValueError):
            parse_rfc3339(bad)


def test_iso_to_unix_is_forgiving() -> None:
    assert iso_to_unix("1970-01-01T00:01:00Z") == 60.0
    assert iso_to_unix("1970-01-01T00:01:00") == 60.0
    assert iso_to_unix("nonsense") is None
    assert iso_to_unix(12) is None
    assert iso_to_unix("") is None
