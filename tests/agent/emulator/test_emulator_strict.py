"""The emulator as a strict oracle: each malformation the real platform refuses is refused
with its error code, per-endpoint faults, and heartbeat-only command delivery."""

from __future__ import annotations

from typing import Any

import pytest

from agent.channels.tellus.models import DeviceEndpoint, ErrorCode
from agent.emulator import DeliveryChannel, Emulator, FaultMode, OperatorClient, RequestKind
from tests.agent.emulator.emu_testkit import (
    CDR,
    EVENT,
    HEARTBEAT,
    TELEMETRY,
    DeviceClient,
    FakeClock,
    assert_error,
    assert_ok,
)

HEALTH = {
    "contactor_cycles": 12,
    "contactor_max_cycles": 100000,
    "cooling_fan_rpm": 1790,
    "cooling_fan_status": "ok",
    "internal_temps": {"power_module": 41.0, "control_board": 35.5, "ac_inlet": 30.1, "dc_outlet": 33.0},
    "relay_state": "open",
    "isolation_test_kohms": 5000.0,
    "last_isolation_test": "2025-03-15T10:00:00Z",
}


@pytest.mark.parametrize(
    ("endpoint", "body", "field"),
    [
        (DeviceEndpoint.TELEMETRY, {**TELEMETRY, "timestamp": "2025-03-15T12:30:05+02:00"}, "timestamp"),
        (DeviceEndpoint.TELEMETRY, {**TELEMETRY, "timestamp": "2025-03-15t10:30:05z"}, "timestamp"),
        (DeviceEndpoint.HEARTBEAT, {**HEARTBEAT, "timestamp": "2025-03-15T10:30:05z"}, "timestamp"),
        (DeviceEndpoint.CHARGING_RECORDS, {**CDR, "end_time": "2025-03-15T11:30:00+01:00"}, "end_time"),
        (DeviceEndpoint.TELEMETRY, {**TELEMETRY, "power": 7040.0}, "power"),  # W, not kW
        (DeviceEndpoint.TELEMETRY, {**TELEMETRY, "enrgy_delivered": 1.0}, "enrgy_delivered"),
        (DeviceEndpoint.HEARTBEAT, {**HEARTBEAT, "uptime": 5}, "uptime"),
        (DeviceEndpoint.EVENTS, {**EVENT, "severity": "high"}, "severity"),
        (DeviceEndpoint.CHARGING_RECORDS, {**CDR, "vehicle_info": {"vin": "X", "soc_begin": 2}},
         "vehicle_info.soc_begin"),
        (DeviceEndpoint.TELEMETRY, {**TELEMETRY, "component_health": {**HEALTH, "relay_state": "stuck"}},
         "component_health.relay_state"),
        (DeviceEndpoint.TELEMETRY, {**TELEMETRY, "component_health": {**HEALTH, "fan_rpm": 1}},
         "component_health.fan_rpm"),
        (DeviceEndpoint.TELEMETRY,
         {**TELEMETRY, "component_health": {k: v for k, v in HEALTH.items() if k != "last_isolation_test"}},
         "component_health"),
        (DeviceEndpoint.TELEMETRY, {**TELEMETRY, "component_health": "ok"}, "component_health"),
        (DeviceEndpoint.TELEMETRY, {**TELEMETRY, "ocpp": {"ocpp_version": "1.5"}}, "ocpp.ocpp_version"),
        (DeviceEndpoint.TELEMETRY, {**TELEMETRY, "ocpp": {"ocpp_csms_messages_per_minute": -1}},
         "ocpp.ocpp_csms_messages_per_minute"),
        (DeviceEndpoint.TELEMETRY, {**TELEMETRY, "ocpp": {"ocpp_csms_last_message_at": "2025-03-15T10:30:00+01:00"}},
         "ocpp"),
        (DeviceEndpoint.TELEMETRY, {**TELEMETRY, "ocpp": {"csms": "x"}}, "ocpp.csms"),
        (DeviceEndpoint.TELEMETRY, {**TELEMETRY, "connector_id": 3}, "connector_id"),
        (DeviceEndpoint.EVENTS, {**EVENT, "connector_id": 7}, "connector_id"),
        (DeviceEndpoint.CHARGING_RECORDS, {**CDR, "energy": -1.0}, "energy"),
        (DeviceEndpoint.CHARGING_RECORDS, {**CDR, "end_time": "2025-03-15T08:59:59Z"}, "end_time"),
    ],
)
async def test_malformed_bodies_are_refused_with_1001_naming_the_field(
    device: DeviceClient, endpoint: DeviceEndpoint, body: dict[str, Any], field: str
) -> None:
    assert_error(await device.post(endpoint, body), ErrorCode.INVALID_PARAMETER, field=field)


async def test_documented_extensions_are_accepted_unless_switched_off(
    emulator: Emulator, device: DeviceClient
) -> None:
    cdr = {**CDR, "stop_reason": "user_request", "transaction_id": "tx-1", "direction": "charge"}
    assert_ok(await device.post(DeviceEndpoint.CHARGING_RECORDS, cdr))
    assert_ok(await device.post(DeviceEndpoint.TELEMETRY, {**TELEMETRY, "component_health": HEALTH}))
    ocpp = {"ocpp_version": "1.6-J", "ocpp_csms_messages_per_minute": 2.4, "ocpp_csms_last_message_at": "2025-03-15T10:29:58Z",
            "ocpp_negotiated_features": ["Core", "SmartCharging"]}
    assert_ok(await device.post(DeviceEndpoint.TELEMETRY, {**TELEMETRY, "ocpp": ocpp}))
    emulator.context.store.settings.accept_extensions = False
    strict = await device.post(DeviceEndpoint.CHARGING_RECORDS, {**cdr, "record_id": "rec-2"})
    assert_error(strict, ErrorCode.INVALID_PARAMETER, field="stop_reason")
    assert_ok(await device.post(DeviceEndpoint.CHARGING_RECORDS, {**CDR, "record_id": "rec-2"}))


async def test_long_poll_for_a_connector_the_device_lacks_is_refused(device: DeviceClient) -> None:
    assert_error(await device.poll({"connector_id": "3", "wait": "1"}), ErrorCode.INVALID_PARAMETER,
                 field="connector_id")


async def test_no_status_after_a_terminal_one_unless_delivered_again(
    emulator: Emulator, device: DeviceClient, operator: OperatorClient
) -> None:
    command_id = emulator.queue_command(command="reboot")
    assert [c["command_id"] for c in (await device.heartbeat()).data["commands"]] == [command_id]

    def status(value: str) -> dict[str, Any]:
        return {"command_id": command_id, "status": value, "timestamp": "2025-03-15T10:00:00Z"}

    assert_ok(await device.post(DeviceEndpoint.COMMAND_STATUS, status("accepted")))
    assert_ok(await device.post(DeviceEndpoint.COMMAND_STATUS, status("completed")))
    assert_ok(await device.post(DeviceEndpoint.COMMAND_STATUS, status("completed")))  # a re-send
    assert_error(await device.post(DeviceEndpoint.COMMAND_STATUS, status("accepted")),
                 ErrorCode.INVALID_PARAMETER, field="status")
    assert_error(await device.post(DeviceEndpoint.COMMAND_STATUS, status("failed")),
                 ErrorCode.INVALID_PARAMETER, field="status")
    emulator.redeliver(command_id)  # a new delivery is a new attempt
    assert (await device.heartbeat()).data["commands"][0]["command_id"] == command_id
    assert_ok(await device.post(DeviceEndpoint.COMMAND_STATUS, status("accepted")))
    assert [s.status for s in (await operator.command(command_id)).statuses] == [
        "accepted", "completed", "completed", "accepted"]


@pytest.mark.parametrize(
    ("mode", "code", "status"),
    [
        (FaultMode.INTERNAL_ERROR, ErrorCode.INTERNAL_ERROR, 500),
        (FaultMode.FORBIDDEN, ErrorCode.PERMISSION_DENIED, 403),
        (FaultMode.RATE_LIMITED, ErrorCode.TOO_MANY_REQUESTS, 429),
    ],
)
async def test_a_fault_hits_one_endpoint_only_and_ends_on_time(
    emulator: Emulator, device: DeviceClient, clock: FakeClock,
    mode: FaultMode, code: ErrorCode, status: int,
) -> None:
    emulator.inject_fault(RequestKind.COMMAND_STATUS, mode, seconds=30)
    command_id = emulator.queue_command(command="reboot")
    await device.heartbeat()
    report = {"command_id": command_id, "status": "accepted", "timestamp": "2025-03-15T10:00:00Z"}
    failed = await device.post(DeviceEndpoint.COMMAND_STATUS, report)
    assert failed.status == status and failed.code == code
    assert "retry_after_seconds" not in (failed.details or {})  # a 429 without retry_after
    assert failed.headers.get("Retry-After") is None
    assert_ok(await device.post(DeviceEndpoint.TELEMETRY, TELEMETRY))
    assert_ok(await device.heartbeat())
    clock.advance(30.1)
    assert_ok(await device.post(DeviceEndpoint.COMMAND_STATUS, report))
    log = emulator.received(RequestKind.COMMAND_STATUS)
    assert [(r.http_status, r.accepted) for r in log] == [(status, False), (200, True)]


async def test_heartbeat_only_delivery_hands_out_a_connector_command_without_its_connector(
    emulator: Emulator, device: DeviceClient, operator: OperatorClient
) -> None:
    command_id = emulator.queue_command(
        command="stop_charging", connector_id=1, channel=DeliveryChannel.HEARTBEAT
    )
    assert (await device.poll({"connector_id": "1", "wait": "1"})).data is None
    commands = (await device.heartbeat()).data["commands"]
    assert commands == [{"command_id": command_id, "command": "stop_charging", "params": {}}]
    emulator.redeliver(command_id, channel=DeliveryChannel.LONG_POLL, connector_id=2)
    assert (await device.heartbeat()).data["commands"] == []
    assert (await device.poll({"connector_id": "2", "wait": "1"})).data["command_id"] == command_id
    channels = [d.channel for d in (await operator.command(command_id)).deliveries]
    assert channels == [DeliveryChannel.HEARTBEAT, DeliveryChannel.LONG_POLL]


async def test_operator_endpoints_for_faults_and_heartbeat_only_commands(
    emulator: Emulator, device: DeviceClient, operator: OperatorClient
) -> None:
    view = await operator.inject_fault("telemetry", "internal_error", 30)
    assert view.active and view.mode is FaultMode.INTERNAL_ERROR
    failed = await device.post(DeviceEndpoint.TELEMETRY, TELEMETRY)
    assert (failed.status, failed.code) == (500, ErrorCode.INTERNAL_ERROR)
    await operator.clear_faults()
    assert_ok(await device.post(DeviceEndpoint.TELEMETRY, TELEMETRY))
    command_id = await operator.queue_command("stop_charging", connector_id=2, channel="heartbeat")
    assert (await device.poll({"connector_id": "2", "wait": "1"})).data is None
    assert [c["command_id"] for c in (await device.heartbeat()).data["commands"]] == [command_id]
