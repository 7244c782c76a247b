"""The charger-side wire models: documented examples validate, invalid bodies fail naming the
field, serialisation follows the API's conventions, and the facts tables are right."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from agent.channels.tellus.models import (
    ENDPOINTS,
    ERROR_CODES,
    RATE_LIMITS,
    AccessTokenResponse,
    ApiEnvelope,
    ApiModel,
    ChargingRecordUpload,
    CommandPollQuery,
    CommandReportStatus,
    ConnectorState,
    DeviceCommandStatus,
    DeviceEndpoint,
    DeviceRegisterRequest,
    DeviceRegisterResponse,
    DeviceTokenRequest,
    ErrorCode,
    EventReport,
    EventType,
    FaultEventData,
    FirmwareUpgradeStatus,
    GrantType,
    HeartbeatRequest,
    HeartbeatResponseData,
    HeartbeatStatus,
    PendingCommand,
    PhaseDetails,
    RateLimitClass,
    TelemetryUpload,
    TokenType,
    VehicleInfo,
    error_info,
    format_utc_timestamp,
    parse_utc_timestamp,
)

# Example bodies as the API documentation shows them.
EXAMPLES: list[tuple[type[ApiModel], dict[str, Any]]] = [
    (DeviceRegisterRequest, {"sn": "SN1234567890", "model": "AC-7kW-V2",
                             "manufacturer": "ChargeTech", "firmware_version": "2.1.0",
                             "mac": "00:1A:2B:3C:4D:5E"}),
    (DeviceRegisterResponse, {"device_id": "dvc_a1b2c3d4e5f6", "device_secret": "sk_7g8h9j0k1l2m",
                              "expires_in": 86400}),
    (DeviceTokenRequest, {"device_id": "dvc_a1b2c3d4e5f6", "device_secret": "sk_7g8h9j0k1l2m",
                          "grant_type": "client_credentials"}),
    (AccessTokenResponse, {"access_token": "eyJhbGciOi", "token_type": "Bearer",
                           "expires_in": 86400}),
    (HeartbeatRequest, {"timestamp": "2025-03-15T10:30:00Z", "status": "online",
                        "fault_code": 0}),
    (TelemetryUpload, {"timestamp": "2025-03-15T10:30:05Z", "connector_id": 1,
                       "state": "charging", "voltage": 220.5, "current": 32.0, "power": 7.04,
                       "energy_delivered": 12.3, "soc": 55, "temperature": 35.2}),
    (TelemetryUpload, {"timestamp": "2025-03-15T10:30:05Z", "connector_id": 1,
                       "state": "charging", "voltage": 230.1, "current": 16.0, "power": 11.04,
                       "energy_delivered": 3.2, "temperature": 31.5,
                       "phase_details": {"phase_a": {"voltage": 230.4, "current": 16.0},
                                         "phase_b": {"voltage": 229.8, "current": 15.9},
                                         "phase_c": {"voltage": 230.1, "current": 16.1}}}),
    (EventReport, {"timestamp": "2025-03-15T10:36:00Z", "event_type": "fault",
                   "connector_id": 1,
                   "data": {"fault_code": 1001, "fault_message": "Overcurrent protection",
                            "details": {"current": 40.5, "threshold": 32.0}}}),
    (ChargingRecordUpload, {"record_id": "rec_9x8y7z6w", "connector_id": 1,
                            "start_time": "2025-03-15T09:00:00Z",
                            "end_time": "2025-03-15T10:30:00Z", "energy": 15.2,
                            "max_power": 7.2, "avg_power": 6.8, "cost": 12.16,
                            "meter_start": 12345.6, "meter_end": 12360.8,
                            "vehicle_info": {"vin": "LVXFA394XJ1234567", "soc_start": 20,
                                             "soc_end": 90}}),
    (DeviceCommandStatus, {"command_id": "cmd_5678", "status": "completed",
                           "message": "Charging finished", "timestamp": "2025-03-15T11:05:00Z",
                           "details": {"energy_delivered": 7.0, "duration": 3600}}),
    (FirmwareUpgradeStatus, {"firmware_version": "2.2.0", "status": "downloading",
                             "progress": 45, "message": "Downloading..."}),
    (PendingCommand, {"command_id": "cmd_5678", "command": "set_power_limit",
                      "params": {"power_limit_percent": 50, "duration": 1800},
                      "expiry": "2025-03-15T10:35:00Z"}),
]


@pytest.mark.parametrize(("model", "example"), EXAMPLES,
                         ids=[f"{m.__name__}-{i}" for i, (m, _) in enumerate(EXAMPLES)])
def test_documented_examples_validate_and_round_trip(
    model: type[ApiModel], example: dict[str, Any]
) -> None:
    parsed = model.model_validate_json(json.dumps(example))
    assert parsed.to_wire() == example
    assert json.loads(parsed.to_json()) == example
    assert model.model_validate(example).to_wire() == example


def test_enveloped_responses_parse() -> None:
    heartbeat = ApiEnvelope[HeartbeatResponseData].model_validate_json(json.dumps({
        "code": 0, "message": "success",
        "data": {"commands": [{"command_id": "cmd_5678", "command": "set_power_limit",
                               "params": {"power_limit_percent": 50, "duration": 1800},
                               "expiry": "2025-03-15T10:35:00Z"}]}}))
    assert heartbeat.ok and heartbeat.data is not None
    assert heartbeat.data.commands[0].expiry == datetime(2025, 3, 15, 10, 35, tzinfo=UTC)
    timeout = ApiEnvelope[PendingCommand].model_validate_json(
        '{"code": 0, "message": "no command", "data": null}')
    assert timeout.ok and timeout.data is None
    empty = ApiEnvelope[HeartbeatResponseData].model_validate_json(
        '{"code": 0, "message": "success", "data": {}}')
    assert empty.data is not None and empty.data.commands == []
    reg = ApiEnvelope[DeviceRegisterResponse].model_validate_json(json.dumps({
        "code": 0, "message": "success",
        "data": {"device_id": "dvc_a", "device_secret": "sk_b", "expires_in": 86400}}))
    assert reg.data is not None and reg.data.device_secret == "sk_b"


def test_error_envelope_helpers() -> None:
    limited = ApiEnvelope[None].model_validate_json(
        '{"code": 5001, "message": "Too many requests", "details": {"retry_after_seconds": 3}}')
    assert not limited.ok
    assert limited.error_code is ErrorCode.TOO_MANY_REQUESTS
    assert limited.retry_after_seconds == 3
    invalid = ApiEnvelope[None].model_validate_json(
        '{"code": 1001, "message": "Parameter \'power\' must be positive",'
        ' "details": {"field": "power", "value": -5}}')
    assert invalid.error_field == "power" and invalid.retry_after_seconds is None
    odd = ApiEnvelope[None].model_validate_json('{"code": 7777, "message": "?", "data": null}')
    assert odd.error_code is None and not odd.ok
    assert ApiEnvelope[None](code=0, message="success").error_code is None
    with pytest.raises(ValidationError) as err:
        ApiEnvelope[None].model_validate_json('{"code": 0}')
    assert _locs(err.value) == [("message",)]


def _locs(err: ValidationError) -> list[tuple[Any, ...]]:
    return [tuple(e["loc"]) for e in err.errors()]


def _example(model: type[ApiModel]) -> dict[str, Any]:
    return next(dict(e) for m, e in EXAMPLES if m is model)


INVALID: list[tuple[type[ApiModel], dict[str, Any], tuple[Any, ...]]] = [
    (DeviceRegisterRequest, {"sn": None}, ("sn",)),
    (DeviceRegisterRequest, {"sn": ...}, ("sn",)),
    (DeviceTokenRequest, {"grant_type": "password"}, ("grant_type",)),
    (DeviceTokenRequest, {"grant_type": ...}, ("grant_type",)),
    (AccessTokenResponse, {"token_type": "bearer"}, ("token_type",)),
    (AccessTokenResponse, {"expires_in": "86400"}, ("expires_in",)),
    (HeartbeatRequest, {"status": "preparing"}, ("status",)),
    (HeartbeatRequest, {"fault_code": ...}, ("fault_code",)),
    (HeartbeatRequest, {"fault_code": True}, ("fault_code",)),
    (HeartbeatRequest, {"timestamp": "2025-03-15T10:30:00"}, ("timestamp",)),
    (HeartbeatRequest, {"timestamp": "2025-03-15 10:30:00Z"}, ("timestamp",)),
    (HeartbeatRequest, {"timestamp": "2025-02-30T10:30:00Z"}, ("timestamp",)),
    (HeartbeatRequest, {"timestamp": 1742034600}, ("timestamp",)),
    (TelemetryUpload, {"connector_id": 0}, ("connector_id",)),
    (TelemetryUpload, {"connector_id": 1.5}, ("connector_id",)),
    (TelemetryUpload, {"state": "unavailable"}, ("state",)),
    (TelemetryUpload, {"soc": 101}, ("soc",)),
    (TelemetryUpload, {"soc": -1}, ("soc",)),
    (TelemetryUpload, {"soc": None}, ("soc",)),
    (TelemetryUpload, {"power": "7"}, ("power",)),
    (TelemetryUpload, {"voltage": ...}, ("voltage",)),
    (TelemetryUpload, {"phase_details": {"phase_a": {"voltage": 1.0}}},
     ("phase_details", "phase_a", "current")),
    (TelemetryUpload, {"phase_details": {"phase_c": None}}, ("phase_details", "phase_c")),
    (EventReport, {"event_type": "auth_ok"}, ("event_type",)),
    (EventReport, {"data": ...}, ("data",)),
    (EventReport, {"data": None}, ("data",)),
    (ChargingRecordUpload, {"vehicle_info": {"soc_start": 120}},
     ("vehicle_info", "soc_start")),
    (ChargingRecordUpload, {"record_id": ...}, ("record_id",)),
    (ChargingRecordUpload, {"end_time": "soon"}, ("end_time",)),
    (DeviceCommandStatus, {"status": "queued"}, ("status",)),
    (DeviceCommandStatus, {"details": []}, ("details",)),
    (FirmwareUpgradeStatus, {"progress": 101}, ("progress",)),
    (FirmwareUpgradeStatus, {"status": "installed"}, ("status",)),
    (PendingCommand, {"params": ...}, ("params",)),
    (PendingCommand, {"expiry": None}, ("expiry",)),
]


@pytest.mark.parametrize(("model", "change", "loc"), INVALID,
                         ids=[f"{m.__name__}-{'.'.join(map(str, loc))}-{i}"
                              for i, (m, _, loc) in enumerate(INVALID)])
def test_invalid_bodies_fail_naming_the_field(
    model: type[ApiModel], change: dict[str, Any], loc: tuple[Any, ...]
) -> None:
    body = _example(model)
    for key, value in change.items():
        if value is ...:
            del body[key]
        else:
            body[key] = value
    with pytest.raises(ValidationError) as err:
        model.model_validate_json(json.dumps(body))
    assert _locs(err.value) == [loc]


def test_query_model_ranges() -> None:
    assert CommandPollQuery(connector_id=1).wait == 30
    for bad in ({"connector_id": 0}, {"connector_id": 1, "wait": 0},
                {"connector_id": 1, "wait": 61}, {}):
        with pytest.raises(ValidationError):
            CommandPollQuery.model_validate(bad)
    assert CommandPollQuery(connector_id=1, wait=60).wait == 60


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


def test_event_data_helpers_serialise_to_documented_shapes() -> None:
    data = FaultEventData(fault_code=101, fault_message="F-0101 Contactor weld detected",
                          details={"fault_id": "F-0101"}).to_wire()
    assert data == {"fault_code": 101, "fault_message": "F-0101 Contactor weld detected",
                    "details": {"fault_id": "F-0101"}}
    event = EventReport(timestamp=datetime(2025, 1, 1, tzinfo=UTC),
                        event_type=EventType.FAULT, connector_id=1, data=data)
    assert event.to_wire()["data"] == data


def test_secrets_are_not_in_repr() -> None:
    reg = DeviceRegisterResponse(device_id="dvc", device_secret="sk_SECRET", expires_in=1)
    tok = AccessTokenResponse(access_token="TOKEN123", token_type=TokenType.BEARER, expires_in=1)
    req = DeviceTokenRequest(device_id="dvc", device_secret="sk_SECRET",
                             grant_type=GrantType.CLIENT_CREDENTIALS)
    for obj in (reg, tok, req):
        assert "SECRET" not in repr(obj) and "TOKEN123" not in repr(obj)
        assert "SECRET" not in str(obj) and "TOKEN123" not in str(obj)
    assert reg.to_wire()["device_secret"] == "sk_SECRET"


# ------------------------------------------------------------------ timestamps


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


# ------------------------------------------------------------------ facts tables


def test_error_code_table() -> None:
    expected_http = {0: 200, 1001: 400, 1002: 400, 2001: 401, 2002: 401, 2003: 403, 3001: 404,
                     4001: 409, 5001: 429, 9001: 500}
    assert {int(c): i.http_status for c, i in ERROR_CODES.items()} == expected_http
    assert {int(c) for c, i in ERROR_CODES.items() if i.transient} == {5001, 9001}
    assert {int(c) for c, i in ERROR_CODES.items() if i.reauthenticate} == {2001, 2002}
    assert all(info.code == code and info.meaning for code, info in ERROR_CODES.items())
    info = error_info(2002)
    assert info is not None and info.http_status == 401
    assert error_info(1234) is None


def test_endpoint_table() -> None:
    assert {e.value for e in DeviceEndpoint} == {
        "/device/register", "/device/token", "/device/heartbeat", "/device/telemetry",
        "/device/events", "/device/charging-records", "/device/commands",
        "/device/command-status", "/device/firmware/status"}
    assert set(ENDPOINTS) == set(DeviceEndpoint)
    assert {e for e, s in ENDPOINTS.items() if not s.bearer_auth} == {
        DeviceEndpoint.REGISTER, DeviceEndpoint.TOKEN}
    assert {e for e, s in ENDPOINTS.items() if not s.enveloped} == {DeviceEndpoint.TOKEN}
    assert {e for e, s in ENDPOINTS.items() if s.method == "GET"} == {DeviceEndpoint.COMMANDS}
    assert {e for e, s in ENDPOINTS.items() if s.rate_limit is RateLimitClass.HIGH_FREQUENCY} \
        == {DeviceEndpoint.HEARTBEAT, DeviceEndpoint.TELEMETRY}
    assert {e for e, s in ENDPOINTS.items() if s.rate_limit is RateLimitClass.REPORTING} == {
        DeviceEndpoint.EVENTS, DeviceEndpoint.CHARGING_RECORDS, DeviceEndpoint.COMMAND_STATUS}
    assert (RATE_LIMITS[RateLimitClass.HIGH_FREQUENCY].requests,
            RATE_LIMITS[RateLimitClass.HIGH_FREQUENCY].per_seconds) == (10, 1.0)
    assert (RATE_LIMITS[RateLimitClass.REPORTING].requests,
            RATE_LIMITS[RateLimitClass.REPORTING].per_seconds) == (60, 60.0)


def test_json_schema_matches_the_documented_constraints() -> None:
    schema = TelemetryUpload.model_json_schema()
    props = schema["properties"]
    assert sorted(schema["required"]) == sorted(
        ["timestamp", "connector_id", "state", "voltage", "current", "power",
         "energy_delivered"])
    assert props["connector_id"] == {"minimum": 1, "title": "Connector Id", "type": "integer"}
    assert props["soc"]["minimum"] == 0 and props["soc"]["maximum"] == 100
    assert props["timestamp"] == {"type": "string", "format": "date-time", "title": "Timestamp"}
    assert "anyOf" not in props["soc"] and "default" not in props["soc"]
    assert schema["additionalProperties"] is True
    assert PhaseDetails.model_json_schema().get("required") is None
    assert VehicleInfo.model_json_schema().get("required") is None
    poll = CommandPollQuery.model_json_schema()["properties"]
    assert (poll["wait"]["minimum"], poll["wait"]["maximum"], poll["wait"]["default"]) == (
        1, 60, 30)
