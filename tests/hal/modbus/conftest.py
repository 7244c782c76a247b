"""Helpers for the Modbus driver tests: a world, simulated servers, a build context."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Literal

import pytest

from hal.context import BuildContext
from hal.sim.modbus_devices import DeviceSimulator, ModbusSimServer
from hal.sim.world import SimConnector, SimMeter, SimWorld

# Short timings used throughout the directory.
POLL = 0.2
STALE = 1.0
LINK_TIMEOUT = 0.2


def make_world() -> SimWorld:
    """Connector 1: AC (SDM630). Connector 2: DC (DJSF1352 + Bender)."""
    return SimWorld(
        connectors={
            1: SimConnector(
                1,
                kind="ac",
                meter=SimMeter(
                    kind="ac",
                    phase_voltage=(230.0, 231.0, 229.0),
                    phase_current=(16.0, 15.0, 14.0),
                    power_kw=10.35,
                    energy_import_kwh=1000.0,
                    energy_export_kwh=12.5,
                    frequency_hz=50.02,
                ),
            ),
            2: SimConnector(
                2,
                kind="dc",
                meter=SimMeter(
                    kind="dc",
                    voltage=400.0,
                    current=50.0,
                    power_kw=20.0,
                    energy_import_kwh=1234.567,
                    energy_export_kwh=3.25,
                    temperature=33.3,
                ),
            ),
        }
    )


@pytest.fixture
def world() -> SimWorld:
    return make_world()


async def _tick(world: SimWorld, period: float) -> None:
    """A minimal stand-in for the physics: energy advances with power, voltages jitter."""
    n = 0
    while True:
        await asyncio.sleep(period)
        n += 1
        for c in world.connectors.values():
            m = c.meter
            if m.frozen:
                continue
            kwh = abs(m.power_kw) * period / 3600.0
            if m.power_kw >= 0:
                m.energy_import_kwh += kwh
            else:
                m.energy_export_kwh += kwh
            jitter = 0.1 if n % 2 else 0.0
            m.phase_voltage = (230.0 + jitter, 231.0, 229.0 - jitter)


@pytest.fixture
async def physics(world: SimWorld) -> AsyncIterator[SimWorld]:
    task = asyncio.create_task(_tick(world, 0.05))
    yield world
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


ServeFn = Callable[..., Awaitable[ModbusSimServer]]


@pytest.fixture
async def serve() -> AsyncIterator[ServeFn]:
    """``await serve([sims...], transport="tcp"|"rtu")`` -> a started server, stopped at teardown."""
    servers: list[ModbusSimServer] = []

    async def _serve(
        devices: Sequence[DeviceSimulator], transport: Literal["tcp", "rtu"] = "tcp", **kw: object
    ) -> ModbusSimServer:
        server = ModbusSimServer(devices, transport=transport, **kw)  # type: ignore[arg-type]
        await server.start()
        servers.append(server)
        return server

    yield _serve
    for s in servers:
        await s.stop()


@pytest.fixture
async def contexts() -> AsyncIterator[Callable[[ModbusSimServer], BuildContext]]:
    """``ctx = contexts(server)``: a BuildContext with link "bus" to ``server``; closed at teardown."""
    made: list[BuildContext] = []

    def _make(
        server: ModbusSimServer, timeout_s: float = LINK_TIMEOUT, retries: int = 0
    ) -> BuildContext:
        ctx = BuildContext(
            can={},
            modbus={"bus": server.link_config(timeout_s=timeout_s, retries=retries)},
            state_dir=Path("/nonexistent-state-dir"),
        )
        made.append(ctx)
        return ctx

    yield _make
    for ctx in made:
        await ctx.close()


async def _eventually(
    predicate: Callable[[], bool], timeout: float = 5.0, step: float = 0.05
) -> float:
    """Wait until ``predicate()`` is true and return the seconds it took; fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not predicate():
        if loop.time() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(step)
    return loop.time() - start


@pytest.fixture
def eventually() -> Callable[..., Awaitable[float]]:
    """``await eventually(lambda: cond, timeout=5.0)``."""
    return _eventually
