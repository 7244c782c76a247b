"""The Tellus wire conventions: integral floats count as integers, extra properties are kept,
Python None means absent, construction checks values, timestamps are UTC with a Z.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from agent.channels.tellus.models import (
    ChargingRecordUpload,
    CommandReportStatus,
    ConnectorState,
    DeviceCommandStatus,
    EventReport,
    EventType,
    HeartbeatRequest,
    HeartbeatStatus,
    TelemetryUpload,
    format_utc_timestamp,
    parse_utc_timestamp,
)
from tests.agent.channels.tellus.models.test_bodies import _example


def test_integral_float_counts_as_integer_like_json_schema() -> None:
    body = {**_example(TelemetryUpload), "connector_id": 2.0, "soc": 40.0}
    parsed = TelemetryUpload.model_validate_json(json.dumps(body))
    assert (parsed.connector_id, parsed.soc) == (2, 40)
    assert isinstance(parsed.connector_id, int)


def test_extra_properties_are_kept() -> None:
    body = {**_example(ChargingRecordUpload), "stop_reason": "ev_disconnected",
            "transaction_id": "tx-1", "currency": "GBP"}
    record = ChargingRecordUpload.model_validate_json(json.dumps(body))
    assert record.to_wire() == body
    assert record.model_extra == {"stop_reason": "ev_disconnected", "transaction_id": "tx-1",
                                  "currency": "GBP"}
    event = EventReport.model_validate_json(json.dumps({
        **_example(EventReport),
        "data": {"fault_code": 411, "fault_message": "F-0411", "details": {"module": 2},
                 "iso15118_code": "FAILED"}}))
    assert event.data["iso15118_code"] == "FAILED"
    nested = {**_example(TelemetryUpload),
              "phase_details": {"phase_a": {"voltage": 1.0, "current": 2.0, "pf": 0.99}}}
    assert TelemetryUpload.model_validate_json(json.dumps(nested)).to_wire() == nested


def test_python_none_means_absent_and_is_omitted() -> None:
    sample = TelemetryUpload(
        timestamp=datetime(2025, 3, 15, 10, 30, 5, tzinfo=UTC), connector_id=1,
        state=ConnectorState.IDLE, voltage=230, current=0, power=0, energy_delivered=0,
        soc=None, temperature=None, phase_details=None,
    )
    assert sample.to_wire() == {"timestamp": "2025-03-15T10:30:05Z", "connector_id": 1,
                                "state": "idle", "voltage": 230.0, "current": 0.0,
                                "power": 0.0, "energy_delivered": 0.0}
    status = DeviceCommandStatus(command_id="c", status=CommandReportStatus.REJECTED,
                                 timestamp=datetime(2025, 1, 1, tzinfo=UTC),
                                 message="expired", details={"reason": None})
    assert status.to_wire() == {"command_id": "c", "status": "rejected",
                                "timestamp": "2025-01-01T00:00:00Z", "message": "expired",
                                "details": {"reason": None}}


def test_python_construction_checks_values_too() -> None:
    with pytest.raises(ValidationError):  # naive datetime
        HeartbeatRequest(timestamp=datetime(2025, 1, 1), status=HeartbeatStatus.ONLINE,
                         fault_code=0)
    with pytest.raises(ValidationError):
        EventReport(timestamp=datetime(2025, 1, 1, tzinfo=UTC),
                    event_type=EventType.PLUG_IN, connector_id=0, data={})
    hb = HeartbeatRequest(timestamp=datetime(2025, 1, 1, tzinfo=UTC),
                          status=HeartbeatStatus.ONLINE, fault_code=0)
    with pytest.raises(ValidationError):
        hb.fault_code = "1"  # type: ignore[assignment]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (datetime(2025, 3, 15, 10, 30, tzinfo=UTC), "2025-03-15T10:30:00Z"),
        (datetime(2025, 3, 15, 18, 30, tzinfo=timezone(timedelta(hours=8))),
         "2025-03-15T10:30:00Z"),
        (datetime(2025, 3, 15, 10, 30, 0, 250000, tzinfo=UTC),
         "2025-03-15T10:30:00.250Z"),
        (datetime(2025, 3, 15, 10, 30, 0, 1, tzinfo=UTC), "2025-03-15T10:30:00.000Z"),
    ],
)
def test_format_utc_timestamp(value: datetime, expected: str) -> None:
    assert format_utc_timestamp(value) == expected


def test_format_rejects_naive() -> None:
    with pytest.raises(ValueError):
        format_utc_timestamp(datetime(2025, 3, 15, 10, 30))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-03-15T10:30:00Z", datetime(2025, 3, 15, 10, 30, tzinfo=UTC)),
        ("2025-03-15t10:30:00z", datetime(2025, 3, 15, 10, 30, tzinfo=UTC)),
        ("2025-03-15T12:30:00+02:00", datetime(2025, 3, 15, 10, 30, tzinfo=UTC)),
        ("2025-03-15T10:30:00.123456789Z",
         datetime(2025, 3, 15, 10, 30, 0, 123456, tzinfo=UTC)),
        ("2025-03-15T10:30:00.5-01:00",
         datetime(2025, 3, 15, 11, 30, 0, 500000, tzinfo=UTC)),
    ],
)
def test_parse_utc_timestamp(text: str, expected: datetime) -> None:
    parsed = parse_utc_timestamp(text)
    assert parsed == expected and parsed.tzinfo == UTC


@pytest.mark.parametrize("text", ["2025-03-15T10:30:00", "2025-03-15", "10:30:00Z",
                                  "2025-03-15T10:30Z", "2025-13-01T00:00:00Z", ""])
def test_parse_utc_timestamp_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_utc_timestamp(text)


def test_timestamps_are_normalised_to_utc_on_input() -> None:
    body = {**_example(HeartbeatRequest), "timestamp": "2025-03-15T12:30:00+02:00"}
    hb = HeartbeatRequest.model_validate_json(json.dumps(body))
    assert hb.timestamp == datetime(2025, 3, 15, 10, 30, tzinfo=UTC)
    assert hb.to_wire()["timestamp"] == "2025-03-15T10:30:00Z"
