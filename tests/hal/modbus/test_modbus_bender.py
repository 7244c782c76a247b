"""Bender isoCHA425HV driver against its simulator over loopback TCP."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from hal.context import BuildContext
from hal.interfaces import HealthState, InsulationMonitor, IsolationAlarm
from hal.modbus.bender import BenderIsoCha425
from hal.sim.modbus_devices import BenderSimulator, ModbusSimServer
from hal.sim.world import SimWorld

ServeFn = Callable[..., Awaitable[ModbusSimServer]]
CtxFn = Callable[[ModbusSimServer], BuildContext]
Eventually = Callable[..., Awaitable[float]]


def imd(ctx: BuildContext, **options: Any) -> BenderIsoCha425:
    defaults: dict[str, Any] = {"poll_interval_s": 0.2, "stale_after_s": 1.0}
    return BenderIsoCha425(
        "imd", BenderIsoCha425.Options(link="bus", **{**defaults, **options}), ctx
    )


async def test_reads_resistance_and_voltage(
    world: SimWorld, serve: ServeFn, contexts: CtxFn, eventually: Eventually
) -> None:
    server = await serve([BenderSimulator(world.connector(2))])
    dev = imd(contexts(server))
    assert isinstance(dev, InsulationMonitor)
    await dev.start()
    try:
        await eventually(lambda: dev.reading() is not None, timeout=2.0)
        r = dev.reading()
        assert r is not None
        assert r.resistance_kohm == pytest.approx(5000.0)
        assert r.voltage == 400.0
        assert r.alarm is IsolationAlarm.NONE and not r.testing
        assert dev.health().ok
        assert dev.describe()["last_rf_channel"]["unit_code"] == 2
    finally:
        await dev.stop()


async def test_isolation_drop_thresholds(
    world: SimWorld, serve: ServeFn, contexts: CtxFn, eventually: Eventually
) -> None:
    """The driver's own kOhm thresholds, with the device's alarm relays set out of the way."""
    conn = world.connector(2)
    server = await serve([BenderSimulator(conn, r1_kohm=1.0, r2_kohm=0.5)])
    dev = imd(contexts(server), warning_kohm=500.0, alarm_kohm=100.0)
    await dev.start()
    try:
        await eventually(lambda: dev.health().ok, timeout=2.0)
        conn.isolation_drop_kohm = 300.0  # fault injection "isolation_drop"
        await eventually(lambda: dev.health().code == "isolation_warning", timeout=2.0)
        assert dev.health().state is HealthState.DEGRADED
        r = dev.reading()
        assert r is not None and r.resistance_kohm == pytest.approx(300.0)
        assert r.alarm is IsolationAlarm.NONE  # the device itself did not alarm
        conn.isolation_drop_kohm = 50.0
        await eventually(lambda: dev.health().code == "isolation_low", timeout=2.0)
        assert dev.health().state is HealthState.FAULT
        r = dev.reading()
        assert r is not None and r.resistance_kohm == pytest.approx(50.0)  # still published
        conn.isolation_drop_kohm = None
        await eventually(lambda: dev.health().ok, timeout=2.0)
    finally:
        await dev.stop()


async def test_device_alarm_bits_raise_health(
    world: SimWorld, serve: ServeFn, contexts: CtxFn, eventually: Eventually
) -> None:
    """The device's own alarm type counts even when the value is above the driver thresholds."""
    conn = world.connector(2)
    server = await serve([BenderSimulator(conn, r1_kohm=2000.0, r2_kohm=1000.0)])
    dev = imd(contexts(server), warning_kohm=200.0, alarm_kohm=100.0)
    await dev.start()
    try:
        conn.isolation_kohm = 1500.0
        await eventually(lambda: dev.health().code == "isolation_warning", timeout=2.0)
        r = dev.reading()
        assert r is not None and r.alarm is IsolationAlarm.WARNING
        conn.isolation_kohm = 800.0
        await eventually(lambda: dev.health().code == "isolation_low", timeout=2.0)
        r = dev.reading()
        assert r is not None and r.alarm is IsolationAlarm.ALARM
    finally:
        await dev.stop()


async def test_device_error_withholds_resistance(
    world: SimWorld, serve: ServeFn, contexts: CtxFn, eventually: Eventually
) -> None:
    sim = BenderSimulator(world.connector(2))
    server = await serve([sim])
    dev = imd(contexts(server))
    await dev.start()
    try:
        await eventually(lambda: dev.health().ok, timeout=2.0)
        sim.device_error = True
        await eventually(lambda: dev.health().code == "imd_device_error", timeout=2.0)
        assert dev.health().state is HealthState.FAULT
        r = dev.reading()
        assert r is not None and r.resistance_kohm is None
        assert r.alarm is IsolationAlarm.DEVICE_ERROR
    finally:
        await dev.stop()


async def test_self_test_passes_and_readings_hide_the_value_meanwhile(
    world: SimWorld, serve: ServeFn, contexts: CtxFn, eventually: Eventually
) -> None:
    sim = BenderSimulator(world.connector(2), world=world, self_test_duration_s=1.0)
    server = await serve([sim])
    dev = imd(contexts(server), poll_interval_s=0.2)
    await dev.start()
    seen: list[tuple[bool, float | None, float | None]] = []
    world_flag: list[float | None] = []

    async def watcher() -> None:
        while True:
            r = dev.reading()
            if r is not None:
                seen.append((r.testing, r.resistance_kohm, r.voltage))
            world_flag.append(world.connector(2).imd_self_test_until)
            await asyncio.sleep(0.05)

    try:
        task = asyncio.create_task(watcher())
        result = await dev.self_test()
        task.cancel()
        assert result.passed and result.detail == "passed"
        assert 0.8 <= result.duration_s < 3.0
        assert sim.self_tests_started == 1
        during = [s for s in seen if s[0]]
        assert during, "the poll task should have published readings taken during the test"
        assert all(res is None and volt is None for _, res, volt in during)
        assert 1.0 in world_flag  # world time 0 + 1 s duration, visible to the physics
        assert world.connector(2).imd_self_test_until is None  # cleared after the test
        await eventually(lambda: (x := dev.reading()) is not None and not x.testing, timeout=1.0)
        r = dev.reading()
        assert r is not None and r.resistance_kohm == pytest.approx(5000.0)
        assert dev.describe()["last_self_test"]["passed"] is True
    finally:
        await dev.stop()


async def test_self_test_failure_and_timeout(
    world: SimWorld, serve: ServeFn, contexts: CtxFn
) -> None:
    sim = BenderSimulator(world.connector(2), self_test_duration_s=0.5)
    server = await serve([sim])
    dev = imd(contexts(server), self_test_timeout_s=1.5)
    await dev.start()
    try:
        sim.fail_self_test = True
        result = await dev.self_test()
        assert not result.passed and "device error" in result.detail
        sim.fail_self_test = False
        sim.clear_self_test_failure()

        sim.stuck_self_test = True
        result = await dev.self_test()
        assert not result.passed and result.detail == "timeout"
        assert 1.4 <= result.duration_s < 2.5
    finally:
        await dev.stop()


async def test_self_test_that_never_starts_is_not_a_pass(
    world: SimWorld, serve: ServeFn, contexts: CtxFn
) -> None:
    sim = BenderSimulator(world.connector(2), self_test_duration_s=0.0)  # too fast to observe
    server = await serve([sim])
    dev = imd(contexts(server), self_test_start_s=0.5)
    await dev.start()
    try:
        result = await dev.self_test()
        assert sim.self_tests_started == 1
        assert not result.passed and result.detail == "self test did not start"
    finally:
        await dev.stop()


async def test_self_test_on_silent_device(
    world: SimWorld, serve: ServeFn, contexts: CtxFn, eventually: Eventually
) -> None:
    sim = BenderSimulator(world.connector(2))
    server = await serve([sim])
    dev = imd(contexts(server))
    await dev.start()
    try:
        sim.silent = True
        result = await dev.self_test()
        assert not result.passed and result.detail.startswith("could not start self test: timeout")
        await eventually(lambda: dev.health().state is HealthState.STALE, timeout=3.0)
        assert dev.reading() is None and dev.health().code == "comm_timeout"
        sim.silent = False
        await eventually(lambda: dev.reading() is not None, timeout=3.0)
    finally:
        await dev.stop()


def test_threshold_options_are_validated() -> None:
    with pytest.raises(ValueError):
        BenderIsoCha425.Options(link="bus", warning_kohm=100.0, alarm_kohm=100.0)
    opts = BenderIsoCha425.Options(link="bus")
    assert (opts.unit_id, opts.self_test_timeout_s, opts.poll_interval_s) == (3, 30.0, 1.0)


async def test_device_enable_written_at_start_up(
    world: SimWorld, serve: ServeFn, contexts: CtxFn, eventually: Eventually
) -> None:
    # a device left disabled (3026 = 0) reads "invalid" until the driver enables it
    sim = BenderSimulator(world.connector(2), device_enabled=False)
    server = await serve([sim])
    dev = imd(contexts(server))
    await dev.start()
    try:
        await eventually(lambda: (r := dev.reading()) is not None and r.resistance_kohm is not None, timeout=2.0)
        assert sim.enable_writes == [1] and sim.device_enabled
        assert dev.reading().resistance_kohm == pytest.approx(5000.0)  # type: ignore[union-attr]
    finally:
        await dev.stop()


async def test_device_enable_can_be_left_alone(
    world: SimWorld, serve: ServeFn, contexts: CtxFn, eventually: Eventually
) -> None:
    sim = BenderSimulator(world.connector(2), device_enabled=False)
    server = await serve([sim])
    dev = imd(contexts(server), device_enable=False)
    await dev.start()
    try:
        await eventually(lambda: dev.reading() is not None, timeout=2.0)
        await asyncio.sleep(0.5)
        assert sim.enable_writes == []
        assert dev.reading().resistance_kohm is None  # type: ignore[union-attr]
    finally:
        await dev.stop()


@pytest.mark.parametrize("mode", ["reserved", "device_error"])
async def test_alarm_code_2_during_self_test(
    world: SimWorld, serve: ServeFn, contexts: CtxFn, eventually: Eventually, mode: str
) -> None:
    # the simulated device reads alarm type 2 while its test runs (code_2_during_test)
    sim = BenderSimulator(world.connector(2), world=world, self_test_duration_s=1.0)
    server = await serve([sim])
    dev = imd(contexts(server), alarm_code_2_in_test=mode)
    await dev.start()
    states: list[tuple[bool, str | None]] = []

    async def watcher() -> None:
        while True:
            r = dev.reading()
            states.append((r is not None and r.testing, dev.health().code))
            await asyncio.sleep(0.05)

    try:
        await eventually(lambda: dev.health().ok, timeout=2.0)
        task = asyncio.create_task(watcher())
        result = await dev.self_test()
        task.cancel()
        assert result.passed  # judged after the test either way
        codes_during = {code for testing, code in states if testing}
        if mode == "reserved":
            assert "imd_device_error" not in codes_during
        else:
            assert "imd_device_error" in codes_during
        await eventually(lambda: dev.health().ok, timeout=2.0)
    finally:
        await dev.stop()
