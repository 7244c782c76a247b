"""Every fault injection of the simulated charger is detected by the REAL driver.

Each test starts the simulated charger from ``config/sim.toml`` (with shorter,
still valid timings, see :func:`_test_timings`), builds the real drivers through the registry
(:func:`agent.service.devices.build_devices`), injects one fault through
:meth:`agent.cli.sim.SimulatedCharger.inject` and checks what the driver reports
through its public HAL interface -- then clears the fault and checks the recovery.

Nothing here asserts on timing: conditions are polled with generous deadlines.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from agent.charging.config import DeviceSection
from agent.config import AgentConfig, SimVehicleConfig
from agent.cli.sim import SimulatedCharger
from tests.agent.sim_rig import eventually, running_sim
from hal.interfaces import (
    ContactorError,
    ContactorPosition,
    DeviceSet,
    HealthState,
    IsolationAlarm,
    ModuleStatus,
    PilotState,
)


T = TypeVar("T")

#: Power-module comm timeout used here (validation requires > 10 s; overridden below).
MODULE_COMM_TIMEOUT_S = 2.0


# ---------------------------------------------------------------------------------
# helpers


def when(value: T | None, predicate: Callable[[T], bool]) -> T | None:
    """``value`` if it is not None and satisfies ``predicate``, else None (for :func:`eventually`)."""
    return value if value is not None and predicate(value) else None


def _revalidate(section: DeviceSection | None, **updates: Any) -> None:
    """Replace a device section's driver options by a copy with ``updates``, validated
    by the driver's own options model (so the test timings are legal config values)."""
    assert section is not None
    opts = section.options
    section._options = type(opts).model_validate({**opts.model_dump(), **updates})


def _test_timings(cfg: AgentConfig, tmp_path: Path) -> None:
    """config/sim.toml with test-friendly (still valid) timings.

    Applied to the loaded model rather than the TOML text, so edits of the shipped
    file's layout or comments do not break the tests: shorter poll periods and
    staleness for meters/IMD/thermal, short freeze windows, a short fan grace,
    generous contactor confirmation timeouts (the physics steps every 50 ms; a
    loaded CI machine must not fail a healthy close), the vehicle plugged in at
    once, a second (AC) vehicle, a private CAN channel and state dir.
    """
    cfg.charger.state_dir = tmp_path / "state"
    for bus in cfg.can.values():
        bus.channel = f"fault-test-{uuid.uuid4().hex[:12]}"
    for name, link in cfg.modbus.items():
        timeout = 0.5 if link.transport == "rtu" else 0.3
        cfg.modbus[name] = type(link).model_validate(
            {**link.model_dump(), "timeout_s": timeout, "retries": 0}
        )
    for conn in cfg.connectors:
        if conn.power_modules is not None:
            _revalidate(conn.power_modules, poll_interval_s=0.5)
            # comm_timeout_s must exceed the modules' own 10 s watchdog by validation;
            # override the validated options, as the CAN driver tests do
            conn.power_modules._options = conn.power_modules.options.model_copy(
                update={"comm_timeout_s": MODULE_COMM_TIMEOUT_S}
            )
        _revalidate(
            conn.meter,
            poll_interval_s=0.5,
            stale_after_s=1.5,
            freeze_window_s=2.0,
            freeze_identical_polls=4,
        )
        _revalidate(conn.contactor, close_timeout_ms=1000.0, open_timeout_ms=1000.0)
    for section in cfg.imd.values():
        _revalidate(section, poll_interval_s=0.5, stale_after_s=1.5)
    assert cfg.thermal is not None
    fans = [{**fan, "grace_s": 1.0} for fan in cfg.thermal.options.model_dump()["fans"]]
    _revalidate(cfg.thermal, poll_interval_s=0.2, fans=fans)
    assert cfg.sim is not None
    for vehicle in cfg.sim.vehicles:
        vehicle.plug_in_after_s = 0.0
    if not any(v.connector == 2 for v in cfg.sim.vehicles):  # an AC car for the SDM630 freeze
        cfg.sim.vehicles = [
            *cfg.sim.vehicles,
            SimVehicleConfig(connector=2, plug_in_after_s=0.0, soc=40.0, ac_max_current=32.0),
        ]


@dataclass
class Rig:
    sim: SimulatedCharger
    devices: DeviceSet
    cfg: AgentConfig


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    """The simulated charger plus every real driver, started; stopped afterwards."""
    async with running_sim(tmp_path, _test_timings, before="the injection") as (cfg, sim, devices):
        yield Rig(sim, devices, cfg)


def _module_rating(rig: Rig) -> tuple[float, float, float, float]:
    """(max V, min V, max A, rated W) of one simulated module, from ``[sim.module]``."""
    assert rig.cfg.sim is not None
    m = rig.cfg.sim.module
    return (m.max_voltage, m.min_voltage, m.max_current, m.rated_power_w)


def _module(rig: Rig, address: int, connector: int = 1) -> ModuleStatus:
    return next(m for m in rig.devices.power_modules[connector].modules() if m.address == address)


async def _make_dc_power_flow(rig: Rig, connector: int = 1) -> None:
    """Close the contactor, offer energy on the pilot (5 % = digital communication: the
    sim EV goes to C), switch the modules on above the battery voltage; wait for current."""
    vehicle = rig.devices.vehicles[connector]
    modules = rig.devices.power_modules[connector]
    await eventually(lambda: vehicle.status().plugged, "the sim vehicle plugged in")
    await vehicle.set_pwm_duty(5.0)
    await eventually(
        lambda: vehicle.status().pilot is PilotState.C, "pilot C", state=lambda: vehicle.status()
    )
    await rig.devices.contactors[connector].close()
    battery_v = rig.sim.world.connector(connector).vehicle.battery_voltage()
    await modules.set_output(battery_v + 100.0, 60.0)
    await modules.output_on()
    await eventually(
        lambda: (modules.measured_current() or 0.0) > 20.0,
        "module current flows into the battery",
        state=modules.measured_current,
    )


async def _stop_power_flow(rig: Rig, connector: int = 1) -> None:
    modules = rig.devices.power_modules.get(connector)
    if modules is not None:
        await modules.output_off()
        await eventually(lambda: (modules.measured_current() or 0.0) < 5.0, "current down")
    await rig.devices.vehicles[connector].set_pwm_duty(100.0)
    await rig.devices.contactors[connector].open()


# ---------------------------------------------------------------------------------
# power modules (InfyPower on CAN)


async def test_module_silence_goes_offline_degrades_the_group_and_recovers(rig: Rig) -> None:
    modules = rig.devices.power_modules[1]
    per_module = _module_rating(rig)[2]
    full = modules.capability()
    assert full is not None and full.max_current == pytest.approx(2 * per_module)

    rig.sim.inject("module_silence", connector=1, module=1)
    lost = await eventually(
        lambda: when(_module(rig, 1), lambda m: not m.online),
        "module 1 offline",
        state=lambda: _module(rig, 1),
    )
    assert lost.voltage is None and lost.current is None and lost.temperature is None
    assert lost.health.state is HealthState.STALE and lost.health.code == "comm_timeout"
    assert _module(rig, 0).online
    health = modules.health()
    assert health.state is HealthState.DEGRADED and health.code == "comm_timeout"
    assert "1" in (health.detail or "")
    reduced = modules.capability()
    assert reduced is not None and reduced.max_current == pytest.approx(per_module)

    rig.sim.clear("module_silence", connector=1, module=1)
    await eventually(lambda: _module(rig, 1).online, "module 1 back online")
    await eventually(lambda: modules.health().ok, "group healthy again", state=modules.health)
    back = modules.capability()
    assert back is not None and back.max_current == pytest.approx(2 * per_module)


async def test_all_modules_silent_make_the_group_stale(rig: Rig) -> None:
    modules = rig.devices.power_modules[1]
    for address in (0, 1):
        rig.sim.inject("module_silence", connector=1, module=address)
    await eventually(
        lambda: modules.health().state is HealthState.STALE, "group STALE", state=modules.health
    )
    assert modules.health().code == "comm_timeout"
    assert modules.measured_voltage() is None and modules.measured_current() is None
    assert modules.capability() is None
    for address in (0, 1):
        rig.sim.clear("module_silence", connector=1, module=address)
    await eventually(lambda: modules.health().ok, "group healthy again", state=modules.health)


def _plausible(m: ModuleStatus, rating: tuple[float, float, float, float]) -> list[str]:
    """What is wrong with a published module status (empty: nothing)."""
    problems = []
    v_max, _v_min, i_max, _p = rating
    for field, low, high in (
        ("voltage", 0.0, v_max + 10.0),
        ("current", -1.0, i_max + 5.0),
        ("temperature", -40.0, 150.0),
    ):
        value = getattr(m, field)
        if value is not None and not (math.isfinite(value) and low <= value <= high):
            problems.append(f"{field}={value!r}")
    if (
        m.ratings is not None
        and (
            m.ratings.max_voltage,
            m.ratings.min_voltage,
            m.ratings.max_current,
            m.ratings.rated_power_w,
        )
        != rating
    ):
        problems.append(f"ratings={m.ratings!r}")
    return problems


async def test_garbage_frames_degrade_the_group_and_never_reach_published_values(rig: Rig) -> None:
    modules = rig.devices.power_modules[1]
    rating = _module_rating(rig)
    # output on (open circuit): the module voltages are non-zero, so a corrupted
    # value would be obvious
    await modules.set_output(300.0, 10.0)
    await modules.output_on()
    await eventually(
        lambda: (modules.measured_voltage() or 0.0) > 200.0,
        "output voltage up",
        state=modules.measured_voltage,
    )

    rig.sim.inject("garbage_frames", connector=1, module=0)
    codes: list[str | None] = []
    bad: list[str] = []

    def observe() -> bool:
        health = modules.health()
        if not codes or codes[-1] != health.code:
            codes.append(health.code)
        for m in modules.modules():
            bad.extend(f"module {m.address}: {p}" for p in _plausible(m, rating))
        for value in (modules.measured_voltage(), modules.measured_current()):
            if value is not None and not (
                math.isfinite(value) and -1.0 <= value <= rating[0] + 10.0
            ):
                bad.append(f"group value {value!r}")
        return health.code == "garbage_frames"

    health = await eventually(
        lambda: observe() and modules.health(),
        "group DEGRADED garbage_frames",
        state=modules.health,
    )
    assert health.state is HealthState.DEGRADED and "0" in (health.detail or "")
    # keep watching while garbage keeps coming (every corruption kind, several times):
    # no decoded garbage ever becomes a published value
    loop = asyncio.get_running_loop()
    until = loop.time() + 2.5
    while loop.time() < until:
        observe()
        await asyncio.sleep(0.02)
    assert not bad, bad
    garbage_counted = modules.describe()["garbage_frames"]  # type: ignore[attr-defined]
    assert garbage_counted >= 9, f"only {garbage_counted} garbage frames seen (codes {codes})"
    assert _module(rig, 1).online and _module(rig, 1).health.ok  # the healthy module is unaffected
    # a module that only ever answers garbage has given no valid answer for
    # comm_timeout_s: it is lost like a silent one (still DEGRADED, never a garbage value)
    assert modules.health().state is HealthState.DEGRADED

    rig.sim.clear("garbage_frames", connector=1, module=0)
    await eventually(lambda: _module(rig, 0).online, "module 0 answers validly again")
    await eventually(
        lambda: modules.health().ok, "group healthy again (garbage aged out)", state=modules.health
    )
    assert not _plausible(_module(rig, 0), rating)
    await modules.output_off()


# ---------------------------------------------------------------------------------
# energy meters (Modbus)


async def test_dc_meter_freeze_while_power_flows_is_a_fault_and_recovers(rig: Rig) -> None:
    meter = rig.devices.meters[1]
    modules = rig.devices.power_modules[1]
    await _make_dc_power_flow(rig)
    await eventually(
        lambda: (r := meter.reading()) is not None and r.power_kw > 5.0,
        "meter shows the power flow",
        state=meter.reading,
    )
    before = meter.reading()
    assert before is not None

    rig.sim.inject("meter_freeze", connector=1)
    await eventually(
        lambda: meter.health().code == "meter_frozen",
        "meter FAULT meter_frozen",
        state=meter.health,
    )
    assert meter.health().state is HealthState.FAULT
    assert meter.reading() is None
    assert (modules.measured_current() or 0.0) > 20.0  # power really is still flowing

    rig.sim.clear("meter_freeze", connector=1)
    after = await eventually(
        lambda: meter.health().ok and meter.reading(), "meter reading again", state=meter.health
    )
    assert after.power_kw > 5.0 and after.energy_import_kwh >= before.energy_import_kwh
    await _stop_power_flow(rig)


async def test_ac_meter_freeze_while_power_flows_is_a_fault_and_recovers(rig: Rig) -> None:
    meter = rig.devices.meters[2]
    vehicle = rig.devices.vehicles[2]
    await eventually(lambda: vehicle.status().plugged, "the AC car plugged in")
    await vehicle.set_pwm_duty(50.0)  # 30 A offered per phase
    await eventually(
        lambda: vehicle.status().pilot is PilotState.C, "pilot C", state=vehicle.status
    )
    await rig.devices.contactors[2].close()
    await eventually(
        lambda: (r := meter.reading()) is not None and r.power_kw > 5.0,
        "SDM630 shows the power flow",
        state=meter.reading,
    )

    rig.sim.inject("meter_freeze", connector=2)
    await eventually(
        lambda: meter.health().code == "meter_frozen",
        "meter FAULT meter_frozen",
        state=meter.health,
    )
    assert meter.health().state is HealthState.FAULT and meter.reading() is None

    rig.sim.clear("meter_freeze", connector=2)
    await eventually(
        lambda: meter.health().ok and meter.reading(), "meter reading again", state=meter.health
    )
    await vehicle.set_pwm_duty(100.0)
    await rig.devices.contactors[2].open()


@pytest.mark.parametrize("connector", [1, 2], ids=["dc-meter-tcp", "ac-meter-rtu"])
async def test_meter_silence_goes_stale_and_recovers(rig: Rig, connector: int) -> None:
    meter = rig.devices.meters[connector]
    assert meter.reading() is not None

    rig.sim.inject("meter_silence", connector=connector)
    await eventually(
        lambda: meter.health().state is HealthState.STALE, "meter STALE", state=meter.health
    )
    assert meter.health().code == "comm_timeout"
    assert meter.reading() is None
    # the other devices on their own links keep answering
    other = rig.devices.meters[3 - connector]
    assert other.health().ok and other.reading() is not None

    rig.sim.clear("meter_silence", connector=connector)
    await eventually(
        lambda: meter.health().ok and meter.reading(), "meter answering again", state=meter.health
    )


# ---------------------------------------------------------------------------------
# contactor (GPIO coil + mirror)


async def test_contactor_weld_is_detected_on_open_and_latched(rig: Rig) -> None:
    contactor = rig.devices.contactors[1]
    await contactor.close()
    assert contactor.status().position is ContactorPosition.CLOSED
    cycles = contactor.status().cycles

    rig.sim.inject("contactor_weld", connector=1)
    with pytest.raises(ContactorError) as excinfo:
        await contactor.open()
    assert excinfo.value.code == "contactor_welded"
    status = contactor.status()
    assert status.welded and not status.coil_energised
    assert status.position is ContactorPosition.FAULT and not status.mirror_says_open
    assert status.health.state is HealthState.FAULT and status.health.code == "contactor_welded"
    with pytest.raises(ContactorError) as refused:
        await contactor.close()  # never energise onto a welded contactor
    assert refused.value.code == "contactor_welded"
    assert not contactor.status().coil_energised

    # service: the weld is gone, the mirror follows, the latch stays until cleared
    rig.sim.clear("contactor_weld", connector=1)
    await eventually(
        lambda: contactor.status().mirror_says_open,
        "mirror reports open again",
        state=contactor.status,
    )
    assert contactor.status().welded and contactor.health().code == "contactor_welded"
    contactor.clear_weld()
    await eventually(
        lambda: contactor.health().ok, "healthy after clear_weld()", state=contactor.health
    )
    await contactor.close()
    await contactor.open()
    assert contactor.status().cycles == cycles + 1 and contactor.health().ok


async def test_contactor_fail_to_close_raises_and_releases_the_coil(rig: Rig) -> None:
    contactor = rig.devices.contactors[1]
    sim_contactor = rig.sim.world.connector(1).contactor
    cycles = contactor.status().cycles

    rig.sim.inject("contactor_fail_to_close", connector=1)
    with pytest.raises(ContactorError) as excinfo:
        await contactor.close()
    assert excinfo.value.code == "contactor_failed_to_close"
    status = contactor.status()
    assert not status.coil_energised and status.mirror_says_open and not status.welded
    assert status.cycles == cycles
    assert status.health.state is HealthState.FAULT
    assert status.health.code == "contactor_failed_to_close"
    # the coil line really is released (the hardware side sees it)
    await eventually(lambda: not sim_contactor.coil, "sim coil de-energised")
    assert not sim_contactor.closed

    rig.sim.clear("contactor_fail_to_close", connector=1)
    await contactor.close()
    assert contactor.health().ok and contactor.status().position is ContactorPosition.CLOSED
    assert sim_contactor.closed
    await contactor.open()
    assert contactor.status().cycles == cycles + 1


# ---------------------------------------------------------------------------------
# thermal (hwmon)


async def test_fan_slowdown_is_fan_low_after_its_grace_and_recovers(rig: Rig) -> None:
    thermal = rig.devices.thermal
    assert thermal is not None
    rig.sim.inject("fan_slowdown", sensor="cabinet", value=0.3)
    fan = await eventually(
        lambda: when(thermal.fans()["cabinet"], lambda f: f.health.code == "fan_low"),
        "fan cabinet fan_low",
        state=lambda: thermal.fans()["cabinet"],
    )
    assert fan.health.state is HealthState.DEGRADED
    assert fan.rpm is not None and fan.rpm < 0.7 * fan.nominal_rpm * fan.duty_percent / 100.0
    assert thermal.health().code == "fan_low"

    rig.sim.clear("fan_slowdown", sensor="cabinet")
    await eventually(
        lambda: thermal.fans()["cabinet"].health.ok,
        "fan healthy again",
        state=lambda: thermal.fans()["cabinet"],
    )
    assert thermal.health().ok


@pytest.mark.parametrize(("sensor", "extra"), [("power_module", 60.0), ("dc_outlet", 70.0)])
async def test_over_temperature_is_a_sensor_fault_and_clears(
    rig: Rig, sensor: str, extra: float
) -> None:
    thermal = rig.devices.thermal
    assert thermal is not None
    rig.sim.inject("over_temperature", sensor=sensor, value=extra)
    reading = await eventually(
        lambda: when(thermal.temperatures()[sensor], lambda t: t.health.code == "over_temperature"),
        f"{sensor} over_temperature",
        state=lambda: thermal.temperatures()[sensor],
    )
    assert reading.health.state is HealthState.FAULT
    limit = next(s.max_c for s in thermal.options.sensors if s.name == sensor)  # type: ignore[attr-defined]
    assert reading.celsius is not None and reading.celsius > limit
    health = thermal.health()
    assert health.state is HealthState.FAULT and health.code == "over_temperature"
    others = [t for name, t in thermal.temperatures().items() if name != sensor]
    assert all(t.health.ok for t in others)

    rig.sim.clear("over_temperature", sensor=sensor)
    await eventually(
        lambda: thermal.temperatures()[sensor].health.ok,
        f"{sensor} cooled down",
        state=lambda: thermal.temperatures()[sensor],
    )
    assert thermal.health().ok


# ---------------------------------------------------------------------------------
# insulation monitor (Bender on Modbus)


async def test_isolation_drop_warns_then_faults_and_recovers(rig: Rig) -> None:
    imd = rig.devices.imd[1]
    healthy = imd.reading()
    assert healthy is not None and healthy.resistance_kohm is not None
    assert healthy.resistance_kohm > 1000.0

    rig.sim.inject("isolation_drop", connector=1, value=300.0)  # between alarm 100 and warning 500
    reading = await eventually(
        lambda: when(
            imd.reading(), lambda r: r.resistance_kohm is not None and r.resistance_kohm < 1000.0
        ),
        "IMD reads the drop",
        state=imd.reading,
    )
    assert reading.resistance_kohm == pytest.approx(300.0, abs=1.0)
    assert reading.alarm is IsolationAlarm.WARNING
    await eventually(
        lambda: imd.health().code == "isolation_warning", "isolation_warning", state=imd.health
    )
    assert imd.health().state is HealthState.DEGRADED

    rig.sim.inject("isolation_drop", connector=1, value=50.0)  # below the alarm threshold
    await eventually(
        lambda: imd.health().code == "isolation_low", "isolation_low", state=imd.health
    )
    assert imd.health().state is HealthState.FAULT
    low = imd.reading()  # an IMD alarm is information: the reading stays published
    assert low is not None and low.resistance_kohm == pytest.approx(50.0, abs=1.0)
    assert low.alarm is IsolationAlarm.ALARM

    rig.sim.clear("isolation_drop", connector=1)
    await eventually(lambda: imd.health().ok, "IMD healthy again", state=imd.health)
    back = imd.reading()
    assert back is not None and back.resistance_kohm is not None and back.resistance_kohm > 1000.0
    assert back.alarm is IsolationAlarm.NONE


# ---------------------------------------------------------------------------------
# vehicle / control pilot


async def test_vehicle_unplug_mid_session_shows_pilot_a_and_replug_recovers(rig: Rig) -> None:
    vehicle = rig.devices.vehicles[1]
    modules = rig.devices.power_modules[1]
    await _make_dc_power_flow(rig)
    assert vehicle.status().ev_ready

    rig.sim.inject("vehicle_unplug", connector=1)
    status = await eventually(
        lambda: when(vehicle.status(), lambda s: s.pilot is PilotState.A),
        "pilot A",
        state=vehicle.status,
    )
    assert not status.plugged and not status.ev_ready
    assert status.soc is None  # no HLC data without a plugged EV
    # the sim breaks the circuit at once: the modules report the current gone
    await eventually(
        lambda: (modules.measured_current() or 0.0) < 1.0,
        "current stops",
        state=modules.measured_current,
    )

    rig.sim.clear("vehicle_unplug", connector=1)  # plugged back in, the offer (5 %) still stands
    status = await eventually(
        lambda: when(vehicle.status(), lambda s: s.pilot is PilotState.C),
        "pilot C again",
        state=vehicle.status,
    )
    assert status.plugged and status.ev_ready
    await _stop_power_flow(rig)
