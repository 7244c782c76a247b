"""Per-device rate limits (429/5001) and injected outages."""

from __future__ import annotations

import aiohttp
import pytest

from agent.channels.tellus.models import DeviceEndpoint, ErrorCode
from agent.emulator import (
    Emulator,
    OperatorClient,
    OperatorRequestError,
    OutageMode,
    RequestKind,
)
from tests.agent.emulator.emu_testkit import (
    CDR,
    EVENT,
    FIRMWARE,
    HEARTBEAT,
    TELEMETRY,
    DeviceClient,
    FakeClock,
    assert_error,
    assert_ok,
    register_device,
)


async def test_heartbeat_and_telemetry_share_10_per_second(
    device: DeviceClient, clock: FakeClock, operator: OperatorClient
) -> None:
    for _ in range(5):
        assert_ok(await device.post(DeviceEndpoint.HEARTBEAT, HEARTBEAT))
        assert_ok(await device.post(DeviceEndpoint.TELEMETRY, TELEMETRY))
    limited = await device.post(DeviceEndpoint.TELEMETRY, TELEMETRY)
    assert_error(limited, ErrorCode.TOO_MANY_REQUESTS)
    assert limited.status == 429
    assert limited.details == {"retry_after_seconds": 1}
    assert limited.headers["Retry-After"] == "1"
    assert_error(await device.post(DeviceEndpoint.HEARTBEAT, HEARTBEAT),
                 ErrorCode.TOO_MANY_REQUESTS)
    (entry,) = [r for r in await operator.received(RequestKind.TELEMETRY) if not r.accepted]
    assert entry.code == ErrorCode.TOO_MANY_REQUESTS and entry.http_status == 429
    clock.advance(1.0)
    assert_ok(await device.post(DeviceEndpoint.TELEMETRY, TELEMETRY))


async def test_events_records_and_command_status_share_60_per_minute(
    device: DeviceClient, clock: FakeClock, operator: OperatorClient
) -> None:
    command_id = await operator.queue_command("stop_charging")
    status = {"command_id": command_id, "status": "accepted",
              "timestamp": "2025-03-15T10:00:00Z"}
    for i in range(20):
        assert_ok(await device.post(DeviceEndpoint.EVENTS, EVENT))
        assert_ok(await device.post(DeviceEndpoint.CHARGING_RECORDS,
                                    {**CDR, "record_id": f"rec_{i}"}))
        assert_ok(await device.post(DeviceEndpoint.COMMAND_STATUS, status))
    limited = await device.post(DeviceEndpoint.CHARGING_RECORDS, {**CDR, "record_id": "late"})
    assert_error(limited, ErrorCode.TOO_MANY_REQUESTS)
    assert limited.details == {"retry_after_seconds": 60}
    # the high-frequency class and unlimited endpoints are unaffected
    assert_ok(await device.post(DeviceEndpoint.HEARTBEAT, HEARTBEAT))
    assert_ok(await device.post(DeviceEndpoint.FIRMWARE_STATUS, FIRMWARE))
    clock.advance(45)
    again = await device.post(DeviceEndpoint.EVENTS, EVENT)
    assert again.details == {"retry_after_seconds": 15}
    clock.advance(15)
    await device.refresh_token()  # the fixture's 60 s token has expired meanwhile
    assert_ok(await device.post(DeviceEndpoint.CHARGING_RECORDS, {**CDR, "record_id": "late"}))


async def test_rate_limits_are_per_device(
    emulator: Emulator, http: aiohttp.ClientSession, device: DeviceClient
) -> None:
    for _ in range(10):
        assert_ok(await device.heartbeat())
    assert_error(await device.heartbeat(), ErrorCode.TOO_MANY_REQUESTS)
    other = await register_device(http, emulator.api_url, sn="SN-OTHER")
    assert_ok(await other.heartbeat())


async def test_long_poll_and_firmware_status_are_not_rate_limited(
    device: DeviceClient, operator: OperatorClient
) -> None:
    for _ in range(15):
        assert_ok(await device.post(DeviceEndpoint.FIRMWARE_STATUS, FIRMWARE))
    for _ in range(12):
        await operator.queue_command("stop_charging", connector_id=1)
        assert (await device.poll({"connector_id": "1", "wait": "1"})).data is not None


async def test_rate_limits_can_be_disabled_at_runtime(
    device: DeviceClient, operator: OperatorClient
) -> None:
    config = await operator.update_config(rate_limits_enabled=False)
    assert config.rate_limits_enabled is False
    for _ in range(25):
        assert_ok(await device.heartbeat())


async def test_outage_http_503_then_recovery(
    device: DeviceClient, operator: OperatorClient, clock: FakeClock
) -> None:
    view = await operator.start_outage(5, OutageMode.HTTP_503)
    assert view.active and view.mode is OutageMode.HTTP_503
    reply = await device.heartbeat()
    assert reply.status == 503
    assert reply.body is None  # plain text, like a load balancer
    assert (await device.refresh_token()).status == 503
    assert await operator.health()  # operator endpoints keep working
    entries = await operator.received()
    assert [(r.kind, r.http_status, r.code) for r in entries[-2:]] == [
        (RequestKind.HEARTBEAT, 503, None), (RequestKind.TOKEN, 503, None)
    ]
    clock.advance(5)
    assert not (await operator.outage()).active
    assert_ok(await device.heartbeat())


async def test_outage_drop_closes_connections(
    device: DeviceClient, operator: OperatorClient
) -> None:
    await operator.start_outage(60, "drop")
    with pytest.raises(aiohttp.ClientError):
        await device.heartbeat()
    last = (await operator.received())[-1]
    assert (last.kind, last.http_status, last.accepted) == (RequestKind.HEARTBEAT, 0, False)
    ended = await operator.end_outage()
    assert not ended.active
    assert_ok(await device.heartbeat())


async def test_operator_request_validation(
    emulator: Emulator, http: aiohttp.ClientSession, operator: OperatorClient
) -> None:
    with pytest.raises(ValueError):
        await operator.start_outage(0)
    with pytest.raises(ValueError):
        await operator.start_outage(1, "smoke")
    assert not (await operator.outage()).active
    with pytest.raises(ValueError):
        await operator.received("nonsense")
    async with http.get(emulator.operator_url + "/received", params={"kind": "x"}) as resp:
        assert resp.status == 400
    async with http.post(emulator.operator_url + "/outage", json={"seconds": -1}) as resp:
        assert resp.status == 400 and "seconds" in (await resp.json())["error"]
    async with http.post(emulator.operator_url + "/outage", data="{") as resp:
        assert resp.status == 400
    async with http.get(emulator.operator_url + "/nothing") as resp:
        assert resp.status == 404
    with pytest.raises(OperatorRequestError) as err:
        await operator.delete_device("dvc_nope")
    assert err.value.status == 404
