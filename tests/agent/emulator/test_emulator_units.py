"""Unit tests of the emulator's building blocks (no HTTP)."""

from __future__ import annotations

import asyncio

import pytest

from agent.channels.tellus.models import (
    CommandPollQuery,
    DeviceRegisterRequest,
    ErrorCode,
    HeartbeatRequest,
    RateLimit,
    RateLimitClass,
    TelemetryUpload,
)
from agent.emulator import build_context
from agent.emulator.context import EmulatorContext
from agent.emulator.errors import ApiError
from agent.emulator.ratelimit import RateLimiter
from agent.emulator.validation import parse_json_body, parse_poll_query, validate_body
from tests.agent.emulator.emu_testkit import FakeClock


def test_sliding_window_admits_limit_then_reports_wait() -> None:
    clock = FakeClock(0.0)
    limiter = RateLimiter(clock, {RateLimitClass.REPORTING: RateLimit(3, 10.0)})
    for t in (0.0, 2.0, 4.0):
        clock.now = t
        assert limiter.check("d", RateLimitClass.REPORTING) is None
    clock.now = 4.5
    assert limiter.check("d", RateLimitClass.REPORTING) == 6  # oldest leaves at t=10
    assert limiter.check("other", RateLimitClass.REPORTING) is None
    clock.now = 10.0
    assert limiter.check("d", RateLimitClass.REPORTING) is None
    assert limiter.check("d", RateLimitClass.REPORTING) == 2
    assert limiter.check("d", RateLimitClass.HIGH_FREQUENCY) is None  # no limit configured
    limiter.reset()
    assert limiter.check("d", RateLimitClass.REPORTING) is None


def test_retry_after_is_at_least_one_second() -> None:
    clock = FakeClock(0.0)
    limiter = RateLimiter(clock, {RateLimitClass.HIGH_FREQUENCY: RateLimit(1, 1.0)})
    assert limiter.check("d", RateLimitClass.HIGH_FREQUENCY) is None
    clock.now = 0.999
    assert limiter.check("d", RateLimitClass.HIGH_FREQUENCY) == 1


@pytest.mark.parametrize("raw", [b"", b"{", b"[1,]", b'{"a": Infinity}', b"\xff"])
def test_parse_json_body_rejects_non_json(raw: bytes) -> None:
    with pytest.raises(ApiError) as err:
        parse_json_body(raw)
    assert err.value.code == ErrorCode.INVALID_PARAMETER
    assert err.value.http_status == 400


def test_validate_body_names_nested_fields() -> None:
    raw = (b'{"timestamp": "2025-03-15T10:30:05Z", "connector_id": 1, "state": "idle",'
           b' "voltage": 1, "current": 0, "power": 0, "energy_delivered": 0,'
           b' "phase_details": {"phase_b": {"voltage": "x", "current": 1}}}')
    with pytest.raises(ApiError) as err:
        validate_body(TelemetryUpload, raw)
    assert err.value.code == ErrorCode.INVALID_PARAMETER
    assert err.value.details == {"field": "phase_details.phase_b.voltage", "value": "x"}


def test_validate_body_returns_model() -> None:
    model = validate_body(HeartbeatRequest,
                          b'{"timestamp": "2025-03-15T10:30:00Z", "status": "fault",'
                          b' "fault_code": 411}')
    assert model.fault_code == 411


def test_parse_poll_query_defaults_and_conversion() -> None:
    assert parse_poll_query({"connector_id": "2"}) == CommandPollQuery(connector_id=2, wait=30)
    assert parse_poll_query({"connector_id": " 1 ", "wait": "60"}).wait == 60
    with pytest.raises(ApiError) as err:
        parse_poll_query({"connector_id": "-1"})
    assert err.value.details == {"field": "connector_id", "value": -1}


def _store_with_device() -> tuple[EmulatorContext, str]:
    ctx = build_context(clock=FakeClock())
    dev = ctx.store.register(DeviceRegisterRequest(sn="s", model="m", manufacturer="x",
                                                   firmware_version="1"))
    return ctx, dev.device_id


async def test_broker_hands_each_command_to_one_waiter() -> None:
    ctx, device_id = _store_with_device()
    waits = [asyncio.create_task(ctx.broker.wait_for_command(device_id, c, 0.3))
             for c in (1, 2)]
    await asyncio.sleep(0)
    assert ctx.broker.waiting == 2
    record = ctx.store.queue_command(command="x", params={}, device_id=device_id)
    results = await asyncio.gather(*waits)
    claimed = [r for r in results if r is not None]
    assert len(claimed) == 1 and claimed[0][0] is record
    assert ctx.broker.waiting == 0
    assert not record.pending


async def test_broker_skips_waiters_whose_client_is_gone() -> None:
    ctx, device_id = _store_with_device()
    dead = asyncio.create_task(
        ctx.broker.wait_for_command(device_id, 1, 0.2, is_alive=lambda: False))
    await asyncio.sleep(0)
    record = ctx.store.queue_command(command="x", params={}, device_id=device_id)
    assert ctx.broker.waiting == 0
    assert await dead is None
    assert record.pending and record.deliveries == []


async def test_cancelled_poll_gives_its_command_back() -> None:
    ctx, device_id = _store_with_device()
    poll = asyncio.create_task(ctx.broker.wait_for_command(device_id, 1, 5))
    await asyncio.sleep(0)
    record = ctx.store.queue_command(command="x", params={}, device_id=device_id)
    assert not record.pending  # claimed for the waiting poll ...
    poll.cancel()  # ... whose client goes away before the response is written
    with pytest.raises(asyncio.CancelledError):
        await poll
    assert record.pending and record.deliveries == []
    assert ctx.store.claim_for_heartbeat(device_id) == [record]
