"""``fetch_logs`` parameters: the 24 h default window, refusals naming the field."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest

from agent.commands.params import parse
from agent.maintenance.logbundle import FetchLogsParams
from tests.agent.maintenance.logbundle.helpers import SINCE, UNTIL


def test_params_default_to_the_last_24_hours() -> None:
    p = parse(FetchLogsParams, {"upload_url": "https://u.example/x"})
    assert isinstance(p, FetchLogsParams)
    since, until = p.window()
    assert abs(until.timestamp() - time.time()) < 5
    assert until - since == timedelta(hours=24)
    q = parse(
        FetchLogsParams,
        {"upload_url": "http://127.0.0.1:8/x", "until": "2025-03-16T01:00:00+01:00"},
    )
    assert isinstance(q, FetchLogsParams)
    assert q.window() == (SINCE, UNTIL)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "params.upload_url: required"),
        ({"upload_url": "ftp://h/x"}, "params.upload_url: an https:// URL with a host"),
        (
            {"upload_url": "http://upload.example.com/x?sig=1"},
            "params.upload_url: an https:// URL (plain http is accepted only to a loopback host",
        ),
        (
            {
                "upload_url": "https://h/x",
                "since": "2025-03-16T00:00:00Z",
                "until": "2025-03-15T00:00:00Z",
            },
            "params.until: must be after since (2025-03-16T00:00:00Z)",
        ),
        (
            {"upload_url": "https://h/x", "since": "2099-01-01T00:00:00Z"},
            "params.until: must be after since (2099-01-01T00:00:00Z); until defaults to now",
        ),
        (
            {"upload_url": "https://h/x", "since": "2025-03-15T00:00:00"},
            "params.since: a date-time with a time zone",
        ),
        ({"upload_url": "https://h/x", "until": "yesterday"}, "params.until: "),
    ],
)
def test_params_are_refused_naming_the_field(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse(FetchLogsParams, params)
    assert str(err.value).startswith(message), str(err.value)
