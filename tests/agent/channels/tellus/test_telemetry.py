"""Telemetry samples: the reported state while a session winds down, and component health
completeness from the first sample."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from agent.channels.tellus.telemetry import TelemetrySampler, sample
from agent.charging.connector import ConnectorState
from agent.maintenance.health import ComponentHealth
from agent.store import Store
from hal.interfaces import MeterReading
from tests.agent.health_fakes import FakeThermal, make_connector


def full_thermal() -> FakeThermal:
    thermal = FakeThermal(temps={"power_module": 41.0, "control_board": 35.0, "ac_inlet": 28.5, "dc_outlet": 30.0})
    thermal.set_fan("cabinet", 1790.0, duty=100.0)
    return thermal


class FlowingMeter:
    """A meter reading a fixed current (A) and power (kW)."""

    name = "meter"

    def __init__(self, current: float, power_kw: float) -> None:
        self.current, self.power_kw = current, power_kw

    def reading(self) -> MeterReading:
        return MeterReading(400.0, self.current, self.power_kw, 1000.0, 0.0, time.monotonic())


@pytest.mark.parametrize(
    ("current", "power", "expected"),
    [(50.0, 20.0, "charging"), (-50.0, -20.0, "discharging"), (0.2, 0.0, "idle")],
)
def test_finishing_reports_charging_while_current_still_flows(current: float, power: float, expected: str) -> None:
    connector = make_connector()
    connector.hw.meter = FlowingMeter(current, power)  # type: ignore[assignment]
    connector.state = ConnectorState.FINISHING
    body = sample(connector)
    assert body is not None and body["state"] == expected


async def test_first_sample_waits_until_the_health_block_is_complete(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "state")
    try:
        health = ComponentHealth(store.kv)
        await health.load()
        connector = make_connector(thermal=full_thermal())
        assert connector.hw.imd is not None
        imd: Any = connector.hw.imd
        imd.silent = True  # the IMD has not answered yet
        bodies: list[dict[str, Any]] = []

        async def put(body: dict[str, Any]) -> None:
            bodies.append(body)

        sampler = TelemetrySampler(
            connector, put, active_s=5, idle_s=60, component_health=health.build,
            health_missing=health.missing, first_sample_wait_s=5.0,
        )
        task = asyncio.create_task(sampler.run())
        await asyncio.sleep(0.6)
        assert bodies == []  # held: the isolation fields are not there yet
        imd.silent = False
        for _ in range(50):
            if bodies:
                break
            await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert bodies and "isolation_test_kohms" in bodies[0]["component_health"]
        assert health.missing(connector, bodies[0]["component_health"]) == []
    finally:
        await store.close()
