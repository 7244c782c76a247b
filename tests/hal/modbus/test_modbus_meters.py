"""SDM630 and DJSF1352 drivers against their simulators over loopback TCP."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from hal.context import BuildContext
from hal.interfaces import EnergyMeter, HealthState, monotonic
from hal.modbus.djsf1352 import Djsf1352Meter
from hal.modbus.sdm630 import Sdm630Meter
from hal.sim.modbus_devices import Djsf1352Simulator, ModbusSimServer, Sdm630Simulator
from hal.sim.world import SimWorld

ServeFn = Callable[..., Awaitable[ModbusSimServer]]
CtxFn = Callable[[ModbusSimServer], BuildContext]
Eventually = Callable[..., Awaitable[float]]

FAST = {"poll_interval_s": 0.2, "stale_after_s": 1.0}


def sdm(ctx: BuildContext, **options: Any) -> Sdm630Meter:
    return Sdm630Meter("ac-meter", Sdm630Meter.Options(link="bus", **{**FAST, **options}), ctx)


def djsf(ctx: BuildContext, **options: Any) -> Djsf1352Meter:
    return Djsf1352Meter("dc-meter", Djsf1352Meter.Options(link="bus", **{**FAST, **options}), ctx)


async def test_sdm630_reads_the_world(
    physics: SimWorld, serve: ServeFn, contexts: CtxFn, eventually: Eventually
) -> None:
    m = physics.connector(1).meter
    server = await serve([Sdm630Simulator(physics.connector(1))])
    meter = sdm(contexts(server))
    assert isinstance(meter, EnergyMeter)
    assert meter.health().state is HealthState.OFFLINE
    await meter.start()
    try:
        await eventually(lambda: meter.reading() is not None, timeout=2.0)
        r = meter.reading()
        assert r is not None
        assert r.power_kw == pytest.approx(10.35, rel=1e-5)
        assert r.frequency_hz == pytest.approx(50.02, rel=1e-5)
        assert r.energy_export_kwh == 12.5
        assert r.energy_import_kwh == pytest.approx(m.energy_import_kwh, abs=0.01)
        assert r.phases is not None
        assert [p.current for p in r.phases] == [16.0, 15.0, 14.0]
        assert r.phases[1].voltage == pytest.approx(231.0, abs=0.06)  # sim ripple <= 0.05 V
        assert sum(p.power_kw or 0.0 for p in r.phases) == pytest.approx(10.35, rel=1e-4)
        assert r.current == pytest.approx(15.0)
        assert monotonic() - r.taken_at < 1.0
        assert meter.health().ok
        # export (V2G): negative power is published with its sign
        m.power_kw = -7.0
        await eventually(lambda: (x := meter.reading()) is not None and x.power_kw < 0, timeout=2.0)
        d = meter.describe()
        assert d["unit_id"] == 1 and d["register_blocks"] == ["0x0000x18", "0x0034x2", "0x0046x6"]
        assert d["counters"]["answers"] >= 2
    finally:
        await meter.stop()
    assert meter.reading() is None
    assert meter.health().state is HealthState.OFFLINE


async def test_sdm630_silence_goes_stale_and_recovers(
    physics: SimWorld, serve: ServeFn, contexts: CtxFn, eventually: Eventually
) -> None:
    m = physics.connector(1).meter
    server = await serve([Sdm630Simulator(physics.connector(1))])
    meter = sdm(contexts(server))
    await meter.start()
    try:
        await eventually(lambda: meter.reading() is not None, timeout=2.0)
        m.silent = True  # fault injection "meter_silence"
        silenced_at = monotonic()
        took = await eventually(lambda: meter.reading() is None, timeout=3.0)
        assert 0.5 < took < 2.0  # stale_after_s = 1.0 counted from the last answer
        h = meter.health()
        assert h.state is HealthState.STALE and h.code == "comm_timeout"
        assert h.detail is not None and "timeout" in h.detail
        m.silent = False
        resumed_at = monotonic()
        await eventually(lambda: meter.reading() is not None, timeout=5.0)
        r = meter.reading()
        assert r is not None and r.taken_at > resumed_at > silenced_at  # never an old value
        assert meter.health().ok
    finally:
        await meter.stop()


async def test_meter_polls_slowly_while_the_charger_is_idle_and_at_once_when_busy(
    physics: SimWorld, serve: ServeFn, contexts: CtxFn, eventually: Eventually
) -> None:
    server = await serve([Sdm630Simulator(physics.connector(1))])
    ctx = contexts(server)
    meter = sdm(ctx, stale_after_s=0.5, idle_poll_interval_s=1.0)
    ctx.pace.report(1, False)  # connector 1 idle: the charger is idle
    await meter.start()
    try:
        await asyncio.sleep(1.1)
        polls = meter.describe()["counters"]["polls"]
        seen_none = False
        for _ in range(41):  # 2 s
            seen_none = seen_none or meter.reading() is None
            await asyncio.sleep(0.05)
        assert 1 <= meter.describe()["counters"]["polls"] - polls <= 3  # 1 s apart, not 0.2 s
        # a poll a second, a 0.5 s stale_after_s, yet never stale: two idle periods apply
        assert not seen_none and meter.health().ok
        assert meter.describe()["polling_now_s"] == 1.0
        before = meter.describe()["counters"]["polls"]
        ctx.pace.report(1, True)
        took = await eventually(lambda: meter.describe()["counters"]["polls"] > before, timeout=0.5, step=0.01)
        assert took < 0.1  # the first fast poll goes out at once, not at the next idle slot
        await asyncio.sleep(1.0)
        assert meter.describe()["counters"]["polls"] - before >= 4
        # busy again: silence is stale after stale_after_s, as before
        physics.connector(1).meter.silent = True
        took = await eventually(lambda: meter.reading() is None, timeout=3.0)
        assert took < 1.0
    finally:
        await meter.stop()


async def test_sdm630_frozen_registers(
    physics: SimWorld, serve: ServeFn, contexts: CtxFn, eventually: Eventually
) -> None:
    m = physics.connector(1).meter
    server = await serve([Sdm630Simulator(physics.connector(1))])
    meter = sdm(contexts(server), freeze_identical_polls=10, freeze_window_s=60.0)
    await meter.start()
    try:
        await eventually(lambda: meter.reading() is not None, timeout=2.0)
        m.frozen = True  # fault injection "meter_freeze": answers, registers stand still
        await eventually(lambda: meter.health().code == "meter_frozen", timeout=4.0)
        h = meter.health()
        assert h.state is HealthState.FAULT and "identical" in (h.detail or "")
        assert meter.reading() is None
        m.frozen = False
        await eventually(lambda: meter.health().ok, timeout=3.0)
        assert meter.reading() is not None
    finally:
        await meter.stop()


async def test_sdm630_no_freeze_without_power(
    world: SimWorld, serve: ServeFn, contexts: CtxFn, eventually: Eventually
) -> None:
    """A meter standing still at zero power is normal, not frozen."""
    m = world.connector(1).meter
    m.power_kw = 0.0
    m.phase_current = (0.0, 0.0, 0.0)
    sim = Sdm630Simulator(world.connector(1), voltage_noise_v=0.0)  # bit-identical registers
    server = await serve([sim])
    image_before = sim.image("i")
    meter = sdm(contexts(server), freeze_identical_polls=10)
    await meter.start()
    try:
        await eventually(lambda: meter.describe()["counters"]["answers"] >= 14, timeout=5.0)
        assert sim.image("i") == image_before  # nothing moved, yet not frozen: no power
        assert meter.health().ok
        assert meter.reading() is not None
    finally:
        await meter.stop()


async def test_djsf1352_reads_the_world(
    physics: SimWorld, serve: ServeFn, contexts: CtxFn, eventually: Eventually
) -> None:
    m = physics.connector(2).meter
    server = await serve([Djsf1352Simulator(physics.connector(2), unit_id=2)])
    meter = djsf(contexts(server), unit_id=2)
    await meter.start()
    try:
        await eventually(lambda: meter.reading() is not None, timeout=2.0)
        r = meter.reading()
        assert r is not None
        assert r.voltage == 400.0
        assert r.current == 50.0
        assert r.power_kw == 20.0
        assert r.temperature == pytest.approx(33.3)
        assert r.energy_export_kwh == pytest.approx(3.25)
        assert r.energy_import_kwh == pytest.approx(m.energy_import_kwh, abs=0.01)
        assert r.phases is None
        # discharge: signed current and power
        m.current, m.power_kw = -30.0, -12.0
        await eventually(
            lambda: (x := meter.reading()) is not None and x.current == -30.0, timeout=2.0
        )
        r = meter.reading()
        assert r is not None and r.power_kw == -12.0
        assert meter.health().ok
    finally:
        await meter.stop()


async def test_djsf1352_energy_unit_option(
    world: SimWorld, serve: ServeFn, contexts: CtxFn, eventually: Eventually
) -> None:
    world.connector(2).meter.power_kw = 0.0
    server = await serve([Djsf1352Simulator(world.connector(2), energy_unit_kwh=0.0001)])
    meter = djsf(contexts(server), energy_unit_kwh=0.0001)
    await meter.start()
    try:
        await eventually(lambda: meter.reading() is not None, timeout=2.0)
        r = meter.reading()
        assert r is not None and r.energy_import_kwh == pytest.approx(1234.567)
        assert "verified" in meter.describe()["energy_unit_note"]
    finally:
        await meter.stop()


async def test_djsf1352_broken_wire_is_a_fault(
    physics: SimWorld, serve: ServeFn, contexts: CtxFn, eventually: Eventually
) -> None:
    sim = Djsf1352Simulator(physics.connector(2))
    server = await serve([sim])
    meter = djsf(contexts(server))
    await meter.start()
    try:
        await eventually(lambda: meter.reading() is not None, timeout=2.0)
        sim.broken_wire = True
        await eventually(lambda: meter.health().code == "meter_broken_wire", timeout=2.0)
        assert meter.health().state is HealthState.FAULT
        assert meter.reading() is None
        sim.broken_wire = False
        await eventually(lambda: meter.health().ok, timeout=2.0)
    finally:
        await meter.stop()


async def test_djsf1352_energy_not_advancing_is_frozen(
    world: SimWorld, serve: ServeFn, contexts: CtxFn, eventually: Eventually
) -> None:
    """Registers keep changing (voltage moves) but the energy counter does not while 20 kW flow."""
    m = world.connector(2).meter
    server = await serve([Djsf1352Simulator(world.connector(2))])
    meter = djsf(contexts(server), freeze_window_s=1.0, freeze_identical_polls=50)
    await meter.start()
    try:
        await eventually(lambda: meter.reading() is not None, timeout=2.0)

        def wobble() -> bool:
            m.voltage = 400.0 if m.voltage != 400.0 else 401.0
            return meter.health().code == "meter_frozen"

        took = await eventually(wobble, timeout=4.0, step=0.1)
        assert took >= 0.8
        assert "energy registers unchanged" in (meter.health().detail or "")
        assert meter.reading() is None
        m.energy_import_kwh += 0.5
        await eventually(lambda: meter.health().ok, timeout=2.0)
        r = meter.reading()
        assert r is not None and r.energy_import_kwh == pytest.approx(1235.067)
    finally:
        await meter.stop()


async def test_djsf1352_silence_stale_and_garbage_counted(
    physics: SimWorld, serve: ServeFn, contexts: CtxFn, eventually: Eventually
) -> None:
    m = physics.connector(2).meter
    server = await serve([Djsf1352Simulator(physics.connector(2))])
    meter = djsf(contexts(server))
    await meter.start()
    try:
        await eventually(lambda: meter.reading() is not None, timeout=2.0)
        m.silent = True
        await eventually(lambda: meter.health().state is HealthState.STALE, timeout=3.0)
        assert meter.reading() is None and meter.health().code == "comm_timeout"
        m.silent = False
        await eventually(lambda: meter.health().ok, timeout=5.0)
        # an impossible voltage is discarded and counted, never published
        m.voltage = 6000.0
        await eventually(
            lambda: meter.describe()["counters"]["garbage"] >= 1, timeout=3.0, step=0.01
        )
        r = meter.reading()
        assert r is not None and r.voltage == 400.0  # the last good reading, still fresh
        assert meter.health().code == "garbage_frames"
        assert meter.health().state is HealthState.DEGRADED
        await eventually(lambda: meter.reading() is None, timeout=3.0)
        h = meter.health()
        assert h.state is HealthState.STALE and "bad data" in (h.detail or "")
    finally:
        await meter.stop()


async def test_probe_polls_once_without_starting(
    world: SimWorld, serve: ServeFn, contexts: CtxFn
) -> None:
    server = await serve([Sdm630Simulator(world.connector(1))])
    ctx = contexts(server)
    meter = sdm(ctx)
    result = await meter.probe()
    assert result["ok"] is True and result["unit_id"] == 1
    assert result["reading"]["power_kw"] == pytest.approx(10.35, rel=1e-5)
    assert meter.reading() is None  # a probe publishes nothing
    assert not ctx.modbus_link("bus").connected  # and leaves the port closed
    world.connector(1).meter.silent = True
    result = await meter.probe()
    assert result["ok"] is False and result["error"].startswith("timeout")


def test_options_are_validated() -> None:
    with pytest.raises(ValueError):
        Sdm630Meter.Options(link="bus", poll_interval_s=1.0, stale_after_s=1.0)
    with pytest.raises(ValueError):
        Sdm630Meter.Options(link="bus", poll_interval_s=0.1)
    with pytest.raises(ValueError):
        Sdm630Meter.Options(link="bus", unit_id=248)
    with pytest.raises(ValueError):
        Sdm630Meter.Options(link="bus", poll_interval_s=0.2, freeze_identical_polls=5)
    with pytest.raises(ValueError):
        Djsf1352Meter.Options(link="bus", energy_unit_kwh=0.0)
    with pytest.raises(ValueError):
        Djsf1352Meter.Options.model_validate({"link": "bus", "unknown": 1})
    opts = Djsf1352Meter.Options(link="bus")
    assert (opts.unit_id, opts.poll_interval_s, opts.energy_unit_kwh) == (1, 1.0, 0.001)


def test_unknown_link_is_a_readable_error(tmp_path: Any) -> None:
    ctx = BuildContext(can={}, modbus={}, state_dir=tmp_path)
    with pytest.raises(ValueError, match="modbus link 'rs485' is not configured"):
        Sdm630Meter("m", Sdm630Meter.Options(link="rs485"), ctx)
