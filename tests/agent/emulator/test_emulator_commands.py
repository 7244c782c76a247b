"""Command delivery: long-poll, heartbeat piggyback, exactly-once, re-delivery."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from agent.channels.tellus.models import DeviceEndpoint, ErrorCode
from agent.emulator import (
    DeliveryChannel,
    Emulator,
    OperatorClient,
    OperatorRequestError,
    RequestKind,
)
from tests.agent.emulator.emu_testkit import DeviceClient, assert_error, assert_ok, register_device

# Generous bound for "returned without waiting for the timeout" (the polls use wait=10..30).
PROMPT = 5.0


async def _until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_long_poll_returns_pending_command_at_once(
    device: DeviceClient, operator: OperatorClient
) -> None:
    expiry = datetime(2025, 3, 15, 10, 35, tzinfo=UTC)
    command_id = await operator.queue_command(
        "set_power_limit", {"power_limit_percent": 50, "duration": 1800},
        connector_id=1, expiry=expiry,
    )
    started = time.monotonic()
    reply = await device.poll({"connector_id": "1", "wait": "30"})
    assert time.monotonic() - started < PROMPT
    assert_ok(reply)
    assert reply.data == {
        "command_id": command_id,
        "command": "set_power_limit",
        "params": {"power_limit_percent": 50, "duration": 1800},
        "expiry": "2025-03-15T10:35:00Z",
    }


async def test_long_poll_holds_until_command_is_queued(
    emulator: Emulator, device: DeviceClient, operator: OperatorClient
) -> None:
    started = time.monotonic()
    poll = asyncio.create_task(device.poll({"connector_id": "1", "wait": "30"}))
    await _until(lambda: emulator.context.broker.waiting == 1)
    assert not poll.done()
    command_id = await operator.queue_command("stop_charging", {"reason": "user_request"},
                                              connector_id=1)
    reply = await asyncio.wait_for(poll, PROMPT)
    assert time.monotonic() - started < PROMPT + 1
    assert_ok(reply)
    assert reply.data["command_id"] == command_id
    assert reply.data["params"] == {"reason": "user_request"}
    assert "expiry" not in reply.data
    view = await operator.command(command_id)
    assert [(d.channel, d.connector_id) for d in view.deliveries] == [
        (DeliveryChannel.LONG_POLL, 1)
    ]
    assert not view.pending


async def test_long_poll_times_out_with_data_null(device: DeviceClient) -> None:
    started = time.monotonic()
    reply = await device.poll({"connector_id": "1", "wait": "1"})
    elapsed = time.monotonic() - started
    assert_ok(reply)
    assert "data" in reply.body and reply.data is None
    assert 0.9 <= elapsed < PROMPT


@pytest.mark.parametrize(
    ("params", "code", "details"),
    [
        ({"wait": "1"}, ErrorCode.MISSING_PARAMETER, {"field": "connector_id"}),
        ({"connector_id": "0"}, ErrorCode.INVALID_PARAMETER,
         {"field": "connector_id", "value": 0}),
        ({"connector_id": "one"}, ErrorCode.INVALID_PARAMETER,
         {"field": "connector_id", "value": "one"}),
        ({"connector_id": "1", "wait": "0"}, ErrorCode.INVALID_PARAMETER,
         {"field": "wait", "value": 0}),
        ({"connector_id": "1", "wait": "61"}, ErrorCode.INVALID_PARAMETER,
         {"field": "wait", "value": 61}),
        ({"connector_id": "1", "wait": "1.5"}, ErrorCode.INVALID_PARAMETER,
         {"field": "wait", "value": "1.5"}),
    ],
)
async def test_long_poll_query_validation(
    device: DeviceClient, params: dict[str, str], code: ErrorCode, details: dict[str, Any]
) -> None:
    assert_error(await device.poll(params), code, **details)


async def test_connector_commands_go_only_to_their_connector(
    device: DeviceClient, operator: OperatorClient
) -> None:
    command_id = await operator.queue_command("start_charging", connector_id=2)
    other = await device.poll({"connector_id": "1", "wait": "1"})
    assert_ok(other)
    assert other.data is None
    mine = await device.poll({"connector_id": "2", "wait": "1"})
    assert mine.data["command_id"] == command_id


async def test_device_level_command_goes_to_any_connector(
    device: DeviceClient, operator: OperatorClient
) -> None:
    command_id = await operator.queue_command("firmware_upgrade",
                                              {"url": "https://x/fw.bin", "version": "2.2.0"})
    reply = await device.poll({"connector_id": "2", "wait": "1"})
    assert reply.data["command_id"] == command_id


async def test_commands_are_delivered_in_queue_order(
    device: DeviceClient, operator: OperatorClient
) -> None:
    first = await operator.queue_command("set_schedule", {"schedule_id": "a"}, connector_id=1)
    second = await operator.queue_command("start_charging", connector_id=1)
    got = [(await device.poll({"connector_id": "1", "wait": "1"})).data["command_id"]
           for _ in range(2)]
    assert got == [first, second]


async def test_heartbeat_piggybacks_device_level_commands_only(
    device: DeviceClient, operator: OperatorClient
) -> None:
    a = await operator.queue_command("start_charging", {"charge_power": 7}, connector_id=1)
    b = await operator.queue_command("firmware_upgrade", {"version": "2.2.0"})
    c = await operator.queue_command("set_power_limit", {"power_limit_percent": 50, "duration": 60})
    reply = await device.heartbeat()
    assert_ok(reply)
    # the connector-targeted command waits for connector 1's long-poll
    assert [x["command_id"] for x in reply.data["commands"]] == [b, c]
    assert (await device.heartbeat()).data == {"commands": []}
    polled = await device.poll({"connector_id": "1", "wait": "1"})
    assert polled.data == {"command_id": a, "command": "start_charging", "params": {"charge_power": 7}}
    view = await operator.command(b)
    assert [(d.channel, d.connector_id) for d in view.deliveries] == [(DeliveryChannel.HEARTBEAT, None)]


async def test_exactly_once_heartbeat_first(
    device: DeviceClient, operator: OperatorClient
) -> None:
    command_id = await operator.queue_command("reboot")
    assert [c["command_id"] for c in (await device.heartbeat()).data["commands"]] == [command_id]
    assert (await device.poll({"connector_id": "1", "wait": "1"})).data is None
    assert len((await operator.command(command_id)).deliveries) == 1


async def test_exactly_once_long_poll_first(
    device: DeviceClient, operator: OperatorClient
) -> None:
    command_id = await operator.queue_command("stop_charging", connector_id=1)
    assert (await device.poll({"connector_id": "1", "wait": "1"})).data["command_id"] == command_id
    assert (await device.heartbeat()).data == {"commands": []}
    assert len((await operator.command(command_id)).deliveries) == 1


async def test_exactly_once_with_concurrent_waiters(
    emulator: Emulator, device: DeviceClient, operator: OperatorClient
) -> None:
    polls = [asyncio.create_task(device.poll({"connector_id": str(c), "wait": "2"}))
             for c in (1, 2)]
    await _until(lambda: emulator.context.broker.waiting == 2)
    command_id = await operator.queue_command("firmware_upgrade", {"version": "2.2.0"})
    hb = await device.heartbeat()
    replies = await asyncio.gather(*polls)
    delivered = [r.data["command_id"] for r in replies if r.data is not None]
    delivered += [c["command_id"] for c in hb.data["commands"]]
    assert delivered == [command_id]
    assert len((await operator.command(command_id)).deliveries) == 1


async def test_commands_are_per_device(
    emulator: Emulator, http: aiohttp.ClientSession, device: DeviceClient,
    operator: OperatorClient,
) -> None:
    other = await register_device(http, emulator.api_url, sn="SN-OTHER")
    command_id = await operator.queue_command("stop_charging", device_id=other.device_id)
    assert (await device.heartbeat()).data == {"commands": []}
    assert [c["command_id"] for c in (await other.heartbeat()).data["commands"]] == [command_id]


async def test_redelivery_count_hands_out_same_id_on_both_channels(
    device: DeviceClient, operator: OperatorClient
) -> None:
    command_id = await operator.queue_command("reboot", deliveries=2, command_id="cmd_dup")
    assert command_id == "cmd_dup"
    assert [c["command_id"] for c in (await device.heartbeat()).data["commands"]] == ["cmd_dup"]
    assert (await device.poll({"connector_id": "1", "wait": "1"})).data["command_id"] == "cmd_dup"
    assert (await device.heartbeat()).data == {"commands": []}
    view = await operator.command("cmd_dup")
    assert [d.channel for d in view.deliveries] == [DeliveryChannel.HEARTBEAT,
                                                    DeliveryChannel.LONG_POLL]


async def test_redeliver_endpoint_wakes_a_waiting_poll(
    emulator: Emulator, device: DeviceClient, operator: OperatorClient
) -> None:
    command_id = await operator.queue_command("reboot")
    await device.heartbeat()
    poll = asyncio.create_task(device.poll({"connector_id": "1", "wait": "30"}))
    await _until(lambda: emulator.context.broker.waiting == 1)
    view = await operator.redeliver(command_id)
    assert view.remaining_deliveries in (0, 1)
    reply = await asyncio.wait_for(poll, PROMPT)
    assert reply.data["command_id"] == command_id
    assert len((await operator.command(command_id)).deliveries) == 2


async def test_disconnected_poll_does_not_swallow_a_command(
    emulator: Emulator, device: DeviceClient, operator: OperatorClient
) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await device.poll({"connector_id": "1", "wait": "30"}, timeout=0.3)
    await _until(lambda: emulator.context.broker.waiting == 0)
    command_id = await operator.queue_command("reboot")
    assert [c["command_id"] for c in (await device.heartbeat()).data["commands"]] == [command_id]
    (abandoned,) = await operator.received(RequestKind.COMMANDS)
    assert (abandoned.http_status, abandoned.accepted, abandoned.query) == (
        0, False, {"connector_id": "1", "wait": "30"})


async def test_reset_releases_held_polls(
    emulator: Emulator, device: DeviceClient, operator: OperatorClient
) -> None:
    poll = asyncio.create_task(device.poll({"connector_id": "1", "wait": "30"}))
    await _until(lambda: emulator.context.broker.waiting == 1)
    await operator.reset()
    reply = await asyncio.wait_for(poll, PROMPT)
    assert_ok(reply)
    assert reply.data is None
    assert await operator.devices() == []
    # Only the released poll itself finishes (and is logged) after the reset.
    assert [r.kind for r in await operator.received()] == [RequestKind.COMMANDS]


async def test_wait_for_status_helper(device: DeviceClient, operator: OperatorClient) -> None:
    command_id = await operator.queue_command("start_charging", connector_id=1)

    async def report_later() -> None:
        await asyncio.sleep(0.1)
        await device.post(DeviceEndpoint.COMMAND_STATUS, {
            "command_id": command_id, "status": "accepted", "timestamp": "2025-03-15T10:00:00Z"})

    task = asyncio.create_task(report_later())
    view = await operator.wait_for_status(command_id, "accepted", timeout=PROMPT)
    await task
    assert view.last_status == "accepted"
    with pytest.raises(TimeoutError):
        await operator.wait_for_status(command_id, "completed", timeout=0.2)


async def test_queue_command_operator_errors(
    emulator: Emulator, http: aiohttp.ClientSession, operator: OperatorClient
) -> None:
    with pytest.raises(OperatorRequestError) as no_device:
        await operator.queue_command("stop_charging")
    assert no_device.value.status == 400
    await register_device(http, emulator.api_url, sn="A")
    await register_device(http, emulator.api_url, sn="B")
    with pytest.raises(OperatorRequestError) as ambiguous:
        await operator.queue_command("stop_charging")
    assert ambiguous.value.status == 400
    with pytest.raises(OperatorRequestError) as unknown:
        await operator.queue_command("stop_charging", device_id="dvc_nope")
    assert unknown.value.status == 404
    device_id = (await operator.devices())[0].device_id
    await operator.queue_command("stop_charging", device_id=device_id, command_id="c1")
    with pytest.raises(OperatorRequestError) as duplicate:
        await operator.queue_command("stop_charging", device_id=device_id, command_id="c1")
    assert duplicate.value.status == 409
    with pytest.raises(OperatorRequestError) as missing:
        await operator.command("nope")
    assert missing.value.status == 404
    async with http.post(operator_url(emulator) + "/commands",
                         json={"command": "x", "bogus": 1}) as resp:
        assert resp.status == 400
        assert "bogus" in (await resp.json())["error"]


def operator_url(emulator: Emulator) -> str:
    return emulator.operator_url


async def test_expired_commands_are_still_delivered(
    device: DeviceClient, operator: OperatorClient
) -> None:
    past = datetime(2000, 1, 1, tzinfo=UTC)
    command_id = await operator.queue_command("start_charging", connector_id=1, expiry=past)
    reply = await device.poll({"connector_id": "1", "wait": "1"})
    assert reply.data == {"command_id": command_id, "command": "start_charging", "params": {},
                          "expiry": "2000-01-01T00:00:00Z"}
