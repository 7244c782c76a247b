"""HwmonThermal against HwmonSimulator's hwmon-style files."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from hal import registry
from hal.context import BuildContext
from hal.interfaces import HealthState, Thermal
from hal.sim.hwmon_files import HwmonSimulator
from hal.sim.world import SimWorld
from hal.thermal.hwmon import HwmonThermal

POLL = 0.02


async def wait_until(predicate: Callable[[], bool], timeout: float = 1.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.world = SimWorld()
        self.sim = HwmonSimulator(tmp_path / "hwmon", self.world, interval_s=0.01)
        self.drivers: list[HwmonThermal] = []

    def thermal(
        self, extra_sensors: list[dict[str, Any]] | None = None, **fan_overrides: Any
    ) -> HwmonThermal:
        raw = self.sim.layout.driver_options(
            max_c={"power_module": 85.0, "control_board": 70.0},
            poll_interval_s=POLL,
            **fan_overrides,
        )
        raw["sensors"].extend(extra_sensors or [])
        t = HwmonThermal(
            "cabinet",
            HwmonThermal.Options(**raw),
            BuildContext(can={}, modbus={}, state_dir=self.tmp_path),
        )
        self.drivers.append(t)
        return t


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = Rig(tmp_path)
    await r.sim.start()
    yield r
    for t in r.drivers:
        await t.stop()
    await r.sim.stop()


async def test_temperatures_follow_the_world(rig: Rig) -> None:
    t = rig.thermal()
    assert isinstance(t, Thermal)
    assert t.health().state is HealthState.OFFLINE
    await t.start()
    temps = t.temperatures()
    assert set(temps) == {"power_module", "control_board", "ac_inlet", "dc_outlet"}
    assert temps["power_module"].celsius == 30.0 and temps["control_board"].celsius == 35.0
    assert all(r.health.ok for r in temps.values()) and t.health().ok
    assert (rig.sim.layout.directory / "temp1_input").read_text().strip() == "30000"

    rig.world.temperatures["ac_inlet"] = 41.25
    await wait_until(lambda: t.temperatures()["ac_inlet"].celsius == 41.25)


async def test_missing_sensor_is_none_and_others_still_read(rig: Rig) -> None:
    t = rig.thermal(
        extra_sensors=[
            {"name": "ghost", "path": str(rig.tmp_path / "nope" / "temp9_input"), "max_c": 80}
        ]
    )
    await t.start()
    ghost = t.temperatures()["ghost"]
    assert ghost.celsius is None and ghost.health.code == "sensor_missing"
    assert ghost.health.state is HealthState.FAULT
    assert t.temperatures()["power_module"].celsius == 30.0
    h = t.health()
    assert h.state is HealthState.DEGRADED and h.code == "sensor_missing"

    rig.sim.unplugged.add("dc_outlet")  # a sensor disappears at runtime and comes back
    await wait_until(lambda: t.temperatures()["dc_outlet"].celsius is None)
    assert t.temperatures()["dc_outlet"].health.code == "sensor_missing"
    rig.sim.unplugged.clear()
    await wait_until(lambda: t.temperatures()["dc_outlet"].celsius == 27.0)
    assert t.describe()["bad_reads"] >= 2


async def test_garbage_and_implausible_values_are_discarded(rig: Rig) -> None:
    await rig.sim.stop()  # freeze the files so the test owns them
    path = rig.sim.layout.sensors["ac_inlet"]
    t = rig.thermal()
    path.write_text("banana\n")
    await t.start()
    assert t.temperatures()["ac_inlet"].celsius is None
    path.write_text("-273000\n")
    await wait_until(lambda: "implausible" in (t.temperatures()["ac_inlet"].health.detail or ""))
    assert t.temperatures()["ac_inlet"].celsius is None
    path.write_text("29500\n")
    await wait_until(lambda: t.temperatures()["ac_inlet"].celsius == 29.5)


async def test_over_temperature_with_hysteresis(rig: Rig) -> None:
    t = rig.thermal()
    await t.start()
    rig.world.temperatures["power_module"] = 91.0
    await wait_until(lambda: t.health().code == "over_temperature")
    reading = t.temperatures()["power_module"]
    assert reading.celsius == 91.0 and reading.health.state is HealthState.FAULT
    assert t.health().state is HealthState.FAULT and "power_module" in (t.health().detail or "")
    rig.world.temperatures["power_module"] = (
        84.0  # below the limit but inside the 2 degC hysteresis
    )
    await wait_until(lambda: t.temperatures()["power_module"].celsius == 84.0)
    assert t.temperatures()["power_module"].health.code == "over_temperature"
    rig.world.temperatures["power_module"] = 82.5
    await wait_until(lambda: t.health().ok)
    assert t.temperatures()["power_module"].health.ok


async def test_fan_low_only_after_grace(rig: Rig) -> None:
    t = rig.thermal(grace_s=0.25)
    await t.start()
    await t.set_fan_duty("cabinet", 100.0)
    rig.world.fans["cabinet"].rpm = 1750.0
    await wait_until(lambda: t.fans()["cabinet"].rpm == 1750.0)
    assert t.fans()["cabinet"].health.ok

    rig.world.fans["cabinet"].rpm = 1000.0  # below 0.7 x 1800
    await wait_until(lambda: t.fans()["cabinet"].rpm == 1000.0)
    started = asyncio.get_running_loop().time()
    assert t.fans()["cabinet"].health.ok  # inside the grace period
    await wait_until(lambda: t.fans()["cabinet"].health.code == "fan_low")
    assert asyncio.get_running_loop().time() - started >= 0.2
    assert t.fans()["cabinet"].health.state is HealthState.DEGRADED
    assert t.health().code == "fan_low" and t.health().state is HealthState.DEGRADED

    rig.world.fans["cabinet"].rpm = 1790.0
    await wait_until(lambda: t.fans()["cabinet"].health.ok)
    assert t.health().ok


async def test_fan_stopped_while_commanded_is_a_fault(rig: Rig) -> None:
    t = rig.thermal(grace_s=0.1)
    await t.start()
    await t.set_fan_duty("cabinet", 50.0)
    rig.world.fans["cabinet"].rpm = 0.0
    await wait_until(lambda: t.fans()["cabinet"].health.code == "fan_stopped")
    assert t.health().state is HealthState.FAULT and t.health().code == "fan_stopped"
    await t.set_fan_duty("cabinet", 0.0)  # commanded off: a standing fan is fine
    await wait_until(lambda: t.fans()["cabinet"].health.ok)


async def test_pwm_write_reaches_the_world(rig: Rig) -> None:
    t = rig.thermal()
    await t.start()
    enable = rig.sim.layout.fans["cabinet"].enable
    assert enable.read_text().strip() == "1"  # manual control while running
    assert t.fans()["cabinet"].duty_percent == pytest.approx(40.0, abs=0.3)  # read back at start
    await t.set_fan_duty("cabinet", 60.0)
    pwm = rig.sim.layout.fans["cabinet"].pwm
    assert pwm.read_text().strip() == "153"
    assert t.fans()["cabinet"].duty_percent == pytest.approx(60.0)
    await wait_until(lambda: abs(rig.world.fans["cabinet"].duty_percent - 60.0) < 0.01)
    await t.set_fan_duty("cabinet", 140.0)
    assert pwm.read_text().strip() == "255"
    with pytest.raises(KeyError):
        await t.set_fan_duty("roof", 10.0)
    with pytest.raises(ValueError):
        await t.set_fan_duty("cabinet", float("nan"))
    await t.stop()
    assert enable.read_text().strip() == "2"  # control handed back


async def test_unwritable_pwm_degrades_the_fan(rig: Rig, tmp_path: Path) -> None:
    raw = rig.sim.layout.driver_options(poll_interval_s=POLL)
    raw["fans"][0]["pwm_path"] = str(tmp_path / "no-such-dir" / "pwm1")
    t = HwmonThermal(
        "c", HwmonThermal.Options(**raw), BuildContext(can={}, modbus={}, state_dir=tmp_path)
    )
    rig.drivers.append(t)
    await t.start()
    await t.set_fan_duty("cabinet", 30.0)
    h = t.fans()["cabinet"].health
    assert h.state is HealthState.DEGRADED and h.code == "transport_error"


def test_options_validation_and_registry() -> None:
    assert registry.lookup("thermal", "hwmon").cls is HwmonThermal
    with pytest.raises(ValidationError, match="duplicate sensor names"):
        HwmonThermal.Options.model_validate(
            {
                "sensors": [
                    {"name": "a", "path": "/x", "max_c": 1},
                    {"name": "a", "path": "/y", "max_c": 1},
                ]
            }
        )
    fan = HwmonThermal.Options.model_validate(
        {"fans": [{"name": "f", "rpm_path": "/r", "pwm_path": "/p"}]}
    ).fans[0]
    assert (fan.nominal_rpm, fan.low_fraction, fan.grace_s) == (1800.0, 0.7, 10.0)
