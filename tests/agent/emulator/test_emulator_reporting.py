"""Heartbeat, telemetry, events, charging records, command status and firmware status."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from agent.channels.tellus.models import DeviceEndpoint, ErrorCode
from agent.emulator import Emulator, OperatorClient, RequestKind
from tests.agent.emulator.emu_testkit import (
    CDR,
    EVENT,
    FIRMWARE,
    HEARTBEAT,
    TELEMETRY,
    DeviceClient,
    assert_error,
    assert_ok,
    call,
    register_device,
)

_MISSING = object()


def _with(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """Copy of ``base`` with the dotted ``path`` set to ``value`` (or deleted for _MISSING)."""
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    parts = path.split(".")
    target = out
    for part in parts[:-1]:
        target[part] = dict(target[part])
        target = target[part]
    if value is _MISSING:
        del target[parts[-1]]
    else:
        target[parts[-1]] = value
    return out


async def test_heartbeat_returns_empty_commands_and_updates_device(
    device: DeviceClient, operator: OperatorClient
) -> None:
    reply = await device.heartbeat()
    assert_ok(reply)
    assert reply.data == {"commands": []}
    (view,) = await operator.devices()
    assert view.last_heartbeat == HEARTBEAT
    assert view.last_seen_at is not None


@pytest.mark.parametrize(
    ("body", "code", "details"),
    [
        (_with(HEARTBEAT, "fault_code", _MISSING), ErrorCode.MISSING_PARAMETER,
         {"field": "fault_code"}),
        (_with(HEARTBEAT, "status", "preparing"), ErrorCode.INVALID_PARAMETER,
         {"field": "status", "value": "preparing"}),
        (_with(HEARTBEAT, "fault_code", "0"), ErrorCode.INVALID_PARAMETER,
         {"field": "fault_code", "value": "0"}),
        (_with(HEARTBEAT, "timestamp", "2025-03-15T10:30:00"), ErrorCode.INVALID_PARAMETER,
         {"field": "timestamp", "value": "2025-03-15T10:30:00"}),
    ],
    ids=["no-fault-code", "bad-status", "fault-code-string", "naive-timestamp"],
)
async def test_heartbeat_validation(
    device: DeviceClient, body: dict[str, Any], code: ErrorCode, details: dict[str, Any]
) -> None:
    assert_error(await device.post(DeviceEndpoint.HEARTBEAT, body), code, **details)


async def test_telemetry_accepted_and_logged_in_order(
    device: DeviceClient, operator: OperatorClient
) -> None:
    three_phase = {
        **TELEMETRY,
        "phase_details": {
            "phase_a": {"voltage": 230.4, "current": 16.0},
            "phase_b": {"voltage": 229.8, "current": 15.9},
            "phase_c": {"voltage": 230.1, "current": 16.1},
        },
    }
    for body in (TELEMETRY, three_phase):
        reply = await device.post(DeviceEndpoint.TELEMETRY, body)
        assert_ok(reply)
        assert reply.data is None
    log = await operator.received(RequestKind.TELEMETRY, device_id=device.device_id)
    assert [r.body for r in log] == [TELEMETRY, three_phase]
    assert all(r.accepted and r.http_status == 200 and r.code == 0 for r in log)
    assert log[0].seq < log[1].seq and log[0].received_at <= log[1].received_at


@pytest.mark.parametrize(
    ("path", "value", "code", "details"),
    [
        ("connector_id", _MISSING, ErrorCode.MISSING_PARAMETER, {"field": "connector_id"}),
        ("energy_delivered", _MISSING, ErrorCode.MISSING_PARAMETER,
         {"field": "energy_delivered"}),
        ("connector_id", 0, ErrorCode.INVALID_PARAMETER, {"field": "connector_id", "value": 0}),
        ("connector_id", "1", ErrorCode.INVALID_PARAMETER,
         {"field": "connector_id", "value": "1"}),
        ("state", "preparing", ErrorCode.INVALID_PARAMETER,
         {"field": "state", "value": "preparing"}),
        ("soc", 101, ErrorCode.INVALID_PARAMETER, {"field": "soc", "value": 101}),
        ("soc", -1, ErrorCode.INVALID_PARAMETER, {"field": "soc", "value": -1}),
        ("soc", 55.5, ErrorCode.INVALID_PARAMETER, {"field": "soc", "value": 55.5}),
        ("soc", None, ErrorCode.INVALID_PARAMETER, {"field": "soc", "value": None}),
        ("power", "7.04", ErrorCode.INVALID_PARAMETER, {"field": "power", "value": "7.04"}),
        ("voltage", True, ErrorCode.INVALID_PARAMETER, {"field": "voltage", "value": True}),
        ("timestamp", 1742034605, ErrorCode.INVALID_PARAMETER,
         {"field": "timestamp", "value": 1742034605}),
        ("phase_details", {"phase_a": {"voltage": 230.0}}, ErrorCode.MISSING_PARAMETER,
         {"field": "phase_details.phase_a.current"}),
    ],
)
async def test_telemetry_validation(
    device: DeviceClient, path: str, value: Any, code: ErrorCode, details: dict[str, Any]
) -> None:
    reply = await device.post(DeviceEndpoint.TELEMETRY, _with(TELEMETRY, path, value))
    assert_error(reply, code, **details)


async def test_missing_field_wins_over_wrong_type(device: DeviceClient) -> None:
    body = _with(_with(TELEMETRY, "state", "bogus"), "voltage", _MISSING)
    assert_error(await device.post(DeviceEndpoint.TELEMETRY, body),
                 ErrorCode.MISSING_PARAMETER, field="voltage")


async def test_rejected_requests_are_logged_with_their_code(
    device: DeviceClient, operator: OperatorClient
) -> None:
    await device.post(DeviceEndpoint.TELEMETRY, raw="{oops")
    (entry,) = await operator.received(RequestKind.TELEMETRY)
    assert entry.body == "{oops"
    assert (entry.accepted, entry.http_status, entry.code) == (False, 400, 1001)
    assert entry.device_id == device.device_id


@pytest.mark.parametrize(
    "data",
    [{"vehicle_connected": True}, {"reason": "user_request"}, {}, EVENT["data"],
     {"fault_code": 411, "fault_message": "F-0411", "details": {"module": 3}, "extra": [1]}],
)
async def test_events_accept_documented_and_extra_payloads(
    device: DeviceClient, data: dict[str, Any]
) -> None:
    assert_ok(await device.post(DeviceEndpoint.EVENTS, {**EVENT, "data": data}))


@pytest.mark.parametrize(
    ("path", "value", "code", "details"),
    [
        ("data", _MISSING, ErrorCode.MISSING_PARAMETER, {"field": "data"}),
        ("data", [], ErrorCode.INVALID_PARAMETER, {"field": "data", "value": []}),
        ("event_type", "auth_ok", ErrorCode.INVALID_PARAMETER,
         {"field": "event_type", "value": "auth_ok"}),
        ("connector_id", 0, ErrorCode.INVALID_PARAMETER, {"field": "connector_id", "value": 0}),
    ],
)
async def test_event_validation(
    device: DeviceClient, path: str, value: Any, code: ErrorCode, details: dict[str, Any]
) -> None:
    assert_error(await device.post(DeviceEndpoint.EVENTS, _with(EVENT, path, value)),
                 code, **details)


async def test_charging_record_stored_once_duplicates_are_4001_and_recorded(
    device: DeviceClient, operator: OperatorClient
) -> None:
    body = {**CDR, "stop_reason": "ev_disconnected", "transaction_id": "tx-42"}
    assert_ok(await device.post(DeviceEndpoint.CHARGING_RECORDS, body))
    for _ in range(2):
        assert_error(await device.post(DeviceEndpoint.CHARGING_RECORDS, body),
                     ErrorCode.CONFLICT)
    (record,) = await operator.charging_records(device.device_id)
    assert record.record_id == CDR["record_id"]
    assert record.body["stop_reason"] == "ev_disconnected"
    assert record.body["transaction_id"] == "tx-42"
    assert record.duplicate_attempts == 2
    attempts = await operator.received(RequestKind.CHARGING_RECORDS)
    assert [(a.accepted, a.code) for a in attempts] == [(True, 0), (False, 4001), (False, 4001)]
    accepted_ids = [a.body["record_id"] for a in attempts if a.accepted]
    assert accepted_ids == [CDR["record_id"]]


async def test_charging_record_ids_are_per_record(device: DeviceClient) -> None:
    assert_ok(await device.post(DeviceEndpoint.CHARGING_RECORDS, CDR))
    assert_ok(await device.post(DeviceEndpoint.CHARGING_RECORDS, {**CDR, "record_id": "rec_2"}))


@pytest.mark.parametrize(
    ("path", "value", "code", "details"),
    [
        ("meter_end", _MISSING, ErrorCode.MISSING_PARAMETER, {"field": "meter_end"}),
        ("vehicle_info.soc_end", 120, ErrorCode.INVALID_PARAMETER,
         {"field": "vehicle_info.soc_end", "value": 120}),
        ("start_time", "yesterday", ErrorCode.INVALID_PARAMETER,
         {"field": "start_time", "value": "yesterday"}),
        ("cost", None, ErrorCode.INVALID_PARAMETER, {"field": "cost", "value": None}),
    ],
)
async def test_charging_record_validation(
    device: DeviceClient, operator: OperatorClient, path: str, value: Any, code: ErrorCode,
    details: dict[str, Any],
) -> None:
    reply = await device.post(DeviceEndpoint.CHARGING_RECORDS, _with(CDR, path, value))
    assert_error(reply, code, **details)
    assert await operator.charging_records() == []


async def test_command_status_for_unknown_command_is_3001(device: DeviceClient) -> None:
    body = {"command_id": "cmd_unknown", "status": "accepted",
            "timestamp": "2025-03-15T11:05:00Z"}
    assert_error(await device.post(DeviceEndpoint.COMMAND_STATUS, body), ErrorCode.NOT_FOUND)


async def test_command_status_of_another_devices_command_is_3001(
    emulator: Emulator, http: aiohttp.ClientSession, device: DeviceClient,
    operator: OperatorClient,
) -> None:
    other = await register_device(http, emulator.api_url, sn="SN-OTHER")
    command_id = await operator.queue_command("stop_charging", device_id=other.device_id)
    body = {"command_id": command_id, "status": "accepted", "timestamp": "2025-03-15T11:05:00Z"}
    assert_error(await device.post(DeviceEndpoint.COMMAND_STATUS, body), ErrorCode.NOT_FOUND)
    assert_ok(await other.post(DeviceEndpoint.COMMAND_STATUS, body))


async def test_command_status_history(device: DeviceClient, operator: OperatorClient) -> None:
    command_id = await operator.queue_command("start_charging", {"charge_power": 7.0},
                                              connector_id=1)
    reports = [
        {"command_id": command_id, "status": "accepted", "timestamp": "2025-03-15T10:00:00Z"},
        {"command_id": command_id, "status": "completed", "message": "Charging finished",
         "timestamp": "2025-03-15T10:05:00Z",
         "details": {"energy_delivered": 7.0, "duration": 3600}},
    ]
    for report in reports:
        assert_ok(await device.post(DeviceEndpoint.COMMAND_STATUS, report))
    view = await operator.command(command_id)
    assert [s.status for s in view.statuses] == ["accepted", "completed"]
    assert view.last_status == "completed"
    assert view.statuses[1].message == "Charging finished"
    assert view.statuses[1].details == {"energy_delivered": 7.0, "duration": 3600}
    assert view.statuses[1].timestamp.isoformat() == "2025-03-15T10:05:00+00:00"


@pytest.mark.parametrize(
    ("change", "code", "details"),
    [
        ({"status": "queued"}, ErrorCode.INVALID_PARAMETER, {"field": "status", "value": "queued"}),
        ({"timestamp": _MISSING}, ErrorCode.MISSING_PARAMETER, {"field": "timestamp"}),
        ({"details": "text"}, ErrorCode.INVALID_PARAMETER, {"field": "details", "value": "text"}),
    ],
)
async def test_command_status_validation(
    device: DeviceClient, change: dict[str, Any], code: ErrorCode, details: dict[str, Any]
) -> None:
    body: dict[str, Any] = {"command_id": "c", "status": "accepted",
                            "timestamp": "2025-03-15T10:00:00Z"}
    for key, value in change.items():
        body = _with(body, key, value)
    assert_error(await device.post(DeviceEndpoint.COMMAND_STATUS, body), code, **details)


async def test_firmware_status(device: DeviceClient, operator: OperatorClient) -> None:
    assert_ok(await device.post(DeviceEndpoint.FIRMWARE_STATUS, FIRMWARE))
    final = {"firmware_version": "2.2.0", "status": "success"}
    assert_ok(await device.post(DeviceEndpoint.FIRMWARE_STATUS, final))
    (view,) = await operator.devices()
    assert view.last_firmware_status == final


@pytest.mark.parametrize(
    ("path", "value", "code", "details"),
    [
        ("progress", 101, ErrorCode.INVALID_PARAMETER, {"field": "progress", "value": 101}),
        ("status", "done", ErrorCode.INVALID_PARAMETER, {"field": "status", "value": "done"}),
        ("status", _MISSING, ErrorCode.MISSING_PARAMETER, {"field": "status"}),
        ("firmware_version", _MISSING, ErrorCode.MISSING_PARAMETER,
         {"field": "firmware_version"}),
    ],
)
async def test_firmware_status_validation(
    device: DeviceClient, path: str, value: Any, code: ErrorCode, details: dict[str, Any]
) -> None:
    reply = await device.post(DeviceEndpoint.FIRMWARE_STATUS, _with(FIRMWARE, path, value))
    assert_error(reply, code, **details)


async def test_unknown_api_path_is_enveloped_3001(
    emulator: Emulator, http: aiohttp.ClientSession, device: DeviceClient,
    operator: OperatorClient,
) -> None:
    reply = await call(http, "POST", emulator.api_url + "/device/nothing", json_body={},
                       token=device.token)
    assert_error(reply, ErrorCode.NOT_FOUND)
    wrong_method = await call(http, "GET", emulator.api_url + "/device/heartbeat",
                              token=device.token)
    assert_error(wrong_method, ErrorCode.NOT_FOUND)
    assert [r.kind for r in await operator.received(RequestKind.UNKNOWN)] == [
        RequestKind.UNKNOWN, RequestKind.UNKNOWN
    ]


async def test_oversized_body_is_1001(device: DeviceClient) -> None:
    body = {**EVENT, "data": {"blob": "x" * (1024 * 1024 + 10)}}
    assert_error(await device.post(DeviceEndpoint.EVENTS, body), ErrorCode.INVALID_PARAMETER)
