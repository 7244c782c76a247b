"""The Tellus bodies: documented examples validate and round-trip, envelopes parse, invalid bodies
fail naming the field, query ranges, event data shapes, secrets hidden, JSON schema constraints.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from agent.channels.tellus.models import (
    AccessTokenResponse,
    ApiEnvelope,
    ApiModel,
    ChargingRecordUpload,
    CommandPollQuery,
    DeviceCommandStatus,
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
    PendingCommand,
    PhaseDetails,
    TelemetryUpload,
    TokenType,
    VehicleInfo,
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
