"""Drivers over Modbus RTU through the pty null-modem, and several devices on one link."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from hal import registry
from hal.config import ModbusLinkConfig
from hal.context import BuildContext
from hal.interfaces import HealthState, monotonic
from hal.modbus.bender import BenderIsoCha425
from hal.modbus.djsf1352 import Djsf1352Meter
from hal.modbus.link import ModbusLink
from hal.modbus.sdm630 import Sdm630Meter
from hal.sim.modbus_devices import (
    BenderSimulator,
    Djsf1352Simulator,
    ModbusSimServer,
    Sdm630Simulator,
)
from hal.sim.serial_pair import SerialPair
from hal.sim.world import SimWorld

ServeFn = Callable[..., Awaitable[ModbusSimServer]]
CtxFn = Callable[[ModbusSimServer], BuildContext]
Eventually = Callable[..., Awaitable[float]]


async def test_serial_pair_forwards_both_ways() -> None:
    async with SerialPair() as pair:
        a = os.open(pair.server_path, os.O_RDWR | os.O_NOCTTY)
        b = os.open(pair.client_path, os.O_RDWR | os.O_NOCTTY)
        try:
            os.write(b, b"\x01\x04\x00\x00")
            os.write(a, b"\xff\x00\x0d\x0a")  # raw mode: bytes pass unchanged, no echo
            await asyncio.sleep(0.05)
            assert os.read(a, 64) == b"\x01\x04\x00\x00"
            assert os.read(b, 64) == b"\xff\x00\x0d\x0a"
            assert pair.bytes_forwarded == 8
        finally:
            os.close(a)
            os.close(b)
    with pytest.raises(RuntimeError):
        _ = pair.client_path


async def test_meter_and_imd_share_one_rtu_line(
    physics: SimWorld, serve: ServeFn, contexts: CtxFn, eventually: Eventually
) -> None:
    """SDM630 (unit 1) and the Bender (unit 3) on one RS-485 line, one ModbusLink."""
    ac, dc = physics.connector(1), physics.connector(2)
    server = await serve([Sdm630Simulator(ac, 1), BenderSimulator(dc, 3)], transport="rtu")
    ctx = contexts(server)
    meter = Sdm630Meter(
        "ac-meter", Sdm630Meter.Options(link="bus", poll_interval_s=0.2, stale_after_s=1.0), ctx
    )
    imd = BenderIsoCha425(
        "imd",
        BenderIsoCha425.Options(link="bus", poll_interval_s=0.2, stale_after_s=1.0),
        ctx.for_connector(2),
    )
    link = ctx.modbus_link("bus")
    assert link.config.transport == "rtu" and link.config.port == server.client_path
    await meter.start()
    await imd.start()
    try:
        assert link.users == 2
        await eventually(lambda: meter.reading() is not None and imd.reading() is not None, 2.0)
        r = meter.reading()
        assert r is not None and r.power_kw == pytest.approx(10.35, rel=1e-5)
        i = imd.reading()
        assert i is not None and i.resistance_kohm == pytest.approx(5000.0)

        # the meter falls silent: only the meter goes stale, the IMD keeps its fresh readings
        ac.meter.silent = True
        await eventually(lambda: meter.health().state is HealthState.STALE, timeout=3.0)
        i = imd.reading()
        assert i is not None and monotonic() - i.taken_at < 1.0
        assert imd.health().ok

        # a self test on the shared line while the meter times out
        result = await imd.self_test()
        assert result.passed

        ac.meter.silent = False
        t = monotonic()
        await eventually(lambda: meter.health().ok, timeout=3.0)
        r = meter.reading()
        assert r is not None and r.taken_at > t
    finally:
        await meter.stop()
        assert link.connected  # the IMD still uses it
        await imd.stop()
    assert not link.connected


async def test_djsf1352_over_rtu(
    physics: SimWorld, serve: ServeFn, contexts: CtxFn, eventually: Eventually
) -> None:
    # 8N1 only: some kernels refuse parity settings on ptys (see hal.sim.serial_pair)
    server = await serve(
        [Djsf1352Simulator(physics.connector(2), unit_id=5)], transport="rtu", baudrate=19200
    )
    ctx = contexts(server)
    assert ctx.modbus_link("bus").endpoint.endswith("@19200 8N1")
    meter = Djsf1352Meter(
        "dc-meter",
        Djsf1352Meter.Options(link="bus", unit_id=5, poll_interval_s=0.2, stale_after_s=1.0),
        ctx,
    )
    await meter.start()
    try:
        await eventually(lambda: meter.reading() is not None, timeout=2.0)
        r = meter.reading()
        assert r is not None and (r.voltage, r.current, r.power_kw) == (400.0, 50.0, 20.0)
        physics.connector(2).meter.silent = True
        await eventually(lambda: meter.reading() is None, timeout=3.0)
        assert meter.health().code == "comm_timeout"
    finally:
        await meter.stop()


async def test_serial_line_settings_reach_pymodbus() -> None:
    cfg = ModbusLinkConfig(
        transport="rtu",
        port="/dev/ttyS1",
        host=None,
        tcp_port=502,
        baudrate=19200,
        parity="E",
        stopbits=2,
        bytesize=7,
        timeout_s=0.7,
        retries=2,
    )
    link = ModbusLink("imd-line", cfg)
    assert link.endpoint == "/dev/ttyS1@19200 7E2"
    client = link._make_client()  # white-box: what pymodbus is asked to open
    params = client.comm_params
    assert (params.host, params.baudrate, params.parity, params.stopbits, params.bytesize) == (
        "/dev/ttyS1",
        19200,
        "E",
        2,
        7,
    )
    assert params.timeout_connect == 0.7
    assert client.ctx.retries == 2
    assert not params.reconnect_delay  # reconnects are the link's job, not a pymodbus task


def test_registry_resolves_the_modbus_drivers(tmp_path: Path) -> None:
    expected = {
        ("meter", "eastron_sdm630"): Sdm630Meter,
        ("meter", "acrel_djsf1352"): Djsf1352Meter,
        ("imd", "bender_isocha425"): BenderIsoCha425,
    }
    for (kind, name), cls in expected.items():
        spec = registry.lookup(kind, name)
        assert spec.cls is cls
        assert spec.options_model is cls.Options
        assert cls.driver == name
    ctx = BuildContext(can={}, modbus={}, state_dir=tmp_path)
    with pytest.raises(ValueError):
        BenderIsoCha425("imd", BenderIsoCha425.Options(link="missing"), ctx)
