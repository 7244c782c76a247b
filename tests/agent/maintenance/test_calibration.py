"""Sensor calibration: sensor list, bounds, persistence, the thermal wrapper and the gains."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.maintenance.calibration import (
    CalibratedThermal,
    Calibration,
    CalibrationConfig,
    CalibrationEntry,
    CalibrationError,
)
from agent.store import Store
from hal.interfaces import Health, HealthState, Thermal
from tests.agent.fakes import FakeModules
from tests.agent.health_fakes import FakeThermal


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path / "state")
    yield s
    await s.close()


def thermal() -> FakeThermal:
    t = FakeThermal(temps={"power_module": 40.0, "control_board": 30.0, "dc_outlet": None})
    t.set_fan("cabinet", 1800.0)
    return t


def calibration(store: Store, **cfg: float) -> Calibration:
    modules = FakeModules(on=True, voltage_set=400.0)
    return Calibration(
        store.kv,
        CalibrationConfig(**cfg),
        thermal=thermal(),
        modules={2: modules},
    )


async def test_sensors_lists_thermal_and_dc_gains_but_never_the_meter(store: Store) -> None:
    cal = calibration(store)
    assert cal.sensors() == [
        "control_board",
        "dc_outlet",
        "power_module",
        "dc_voltage:2",
        "dc_current:2",
    ]
    assert not any("meter" in s or "energy" in s for s in cal.sensors())


async def test_unknown_sensor_message_names_it_and_the_choices(store: Store) -> None:
    cal = calibration(store)
    for bad in ("meter", "dc_voltage:1", "dc_voltage:x", "ambient"):
        with pytest.raises(CalibrationError) as info:
            await cal.calibrate(bad, 20.0, 19.0)
        message = str(info.value)
        assert repr(bad) in message and "dc_current:2" in message and "power_module" in message
    assert await store.kv.items("calibration/") == {}


async def test_temperature_offset_bounds(store: Store) -> None:
    cal = calibration(store)
    entry = await cal.calibrate("power_module", 49.5, 40.0)
    assert (entry.kind, entry.value) == ("offset", pytest.approx(9.5))
    entry = await cal.calibrate("power_module", 30.0, 40.0)
    assert entry.value == pytest.approx(-10.0)  # the bound itself is allowed
    with pytest.raises(CalibrationError, match=r"offset \+10\.50 degC .*'power_module'.*10 degC"):
        await cal.calibrate("power_module", 50.5, 40.0)
    with pytest.raises(CalibrationError, match="outside"):
        await cal.calibrate("power_module", 29.0, 40.0)
    assert cal.offset("power_module") == pytest.approx(-10.0)  # refused ones changed nothing
    with pytest.raises(CalibrationError, match="no current measurement"):
        await cal.calibrate("dc_outlet", 30.0, cal.raw_value("dc_outlet"))
    with pytest.raises(CalibrationError, match="not a number"):
        await cal.calibrate("control_board", float("nan"), 30.0)


async def test_gain_bounds_and_minimum_measurement(store: Store) -> None:
    cal = calibration(store)
    assert cal.raw_value("dc_voltage:2") == 400.0
    entry = await cal.calibrate("dc_voltage:2", 404.0, 400.0)
    assert (entry.kind, entry.value) == ("gain", pytest.approx(1.01))
    assert cal.voltage(2, 500.0) == pytest.approx(505.0)
    assert cal.voltage(2, None) is None
    assert cal.voltage(1, 500.0) == 500.0  # other connector uncalibrated

    with pytest.raises(CalibrationError, match=r"gain 1\.0600 .*0\.95\.\.1\.05"):
        await cal.calibrate("dc_voltage:2", 424.0, 400.0)
    with pytest.raises(CalibrationError, match="outside"):
        await cal.calibrate("dc_current:2", 9.4, 10.0)
    with pytest.raises(CalibrationError, match=r"measures 8 V; .* at least 10 V"):
        await cal.calibrate("dc_voltage:2", 8.0, 8.0)
    with pytest.raises(CalibrationError, match=r"at least 2 A"):
        await cal.calibrate("dc_current:2", 1.5, 1.5)
    assert cal.gain("dc_voltage:2") == pytest.approx(1.01)
    entry = await cal.calibrate("dc_current:2", 97.0, 100.0)
    assert cal.current(2, 50.0) == pytest.approx(48.5)


async def test_recalibration_replaces_rather_than_stacks(store: Store) -> None:
    cal = calibration(store)
    await cal.calibrate("control_board", 32.0, 30.0)
    await cal.calibrate("control_board", 31.0, 30.0)  # measured is the raw value again
    assert cal.offset("control_board") == pytest.approx(1.0)
    await cal.calibrate("control_board", 30.0, 30.0)
    assert cal.offset("control_board") == 0.0


async def test_calibrations_persist_across_instances(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = await Store.open(state)
    try:
        cal = calibration(store)
        await cal.calibrate("power_module", 42.0, 40.0)
        await cal.calibrate("dc_voltage:2", 398.0, 400.0)
    finally:
        await store.close()

    store = await Store.open(state)
    try:
        again = calibration(store)
        assert again.offset("power_module") == 0.0  # not loaded yet
        await again.load()
        assert again.offset("power_module") == pytest.approx(2.0)
        assert again.gain("dc_voltage:2") == pytest.approx(0.995)
        entry = again.entry("power_module")
        assert entry is not None and entry.reference == 42.0 and entry.calibrated_at.endswith("Z")
        assert CalibrationEntry.from_dict(entry.to_dict()) == entry

        narrower = calibration(store, min_gain=0.999)  # a stored gain now out of bounds
        await narrower.load()
        assert narrower.gain("dc_voltage:2") == 1.0 and narrower.offset(
            "power_module"
        ) == pytest.approx(2.0)

        await store.kv.set(
            "calibration/control_board", {"sensor": "control_board", "kind": "bogus"}
        )
        tolerant = calibration(store)
        await tolerant.load()
        assert tolerant.offset("control_board") == 0.0
    finally:
        await store.close()


async def test_calibrated_thermal_applies_offsets_and_passes_the_rest(store: Store) -> None:
    raw = thermal()
    raw.temps["power_module"] = 40.0
    cal = Calibration(store.kv, thermal=raw)
    wrapped = CalibratedThermal(raw, cal)
    assert isinstance(wrapped, Thermal)
    assert wrapped.name == raw.name
    await cal.calibrate("power_module", 43.25, cal.raw_value("power_module"))

    temps = wrapped.temperatures()
    assert temps["power_module"].celsius == pytest.approx(43.25)
    assert temps["control_board"].celsius == 30.0
    assert temps["dc_outlet"].celsius is None
    raw.temps["power_module"] = 50.0  # follows the live raw value
    assert wrapped.temperatures()["power_module"].celsius == pytest.approx(53.25)
    assert cal.raw_value("power_module") == 50.0  # calibration reads the raw driver

    assert wrapped.fans() == raw.fans()
    await wrapped.set_fan_duty("cabinet", 60.0)
    assert raw.duty_calls == [("cabinet", 60.0)]
    await wrapped.start()
    assert raw.started
    await wrapped.stop()
    assert not raw.started
    assert wrapped.health() == Health(HealthState.OK)
    assert wrapped.describe()["calibration_offsets_c"] == {"power_module": pytest.approx(3.25)}
