"""The remote self test against the REAL drivers on the simulated charger.

Each test starts the simulated charger from ``config/sim.toml`` with short, still
valid driver timings and no vehicle plugged in, builds the real drivers through the
registry, optionally injects one fault, runs :func:`run_self_test` with shortened
self-test timings and checks the report -- and that the hardware was left safe.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from agent.charging.config import DeviceSection
from agent.config import AgentConfig, load_config
from agent.charging.connector import ConnectorHardware
from agent.service.devices import build_devices, make_context
from agent.maintenance.selftest import (
    CheckResult,
    Outcome,
    SelfTestConfig,
    SelfTestProgress,
    SelfTestReport,
    run_self_test,
)
from agent.cli.sim import SimulatedCharger
from hal.interfaces import DeviceSet, FanStatus, Health, PilotState, TemperatureReading

ROOT = Path(__file__).resolve().parents[3]
SIM_TOML = ROOT / "config/sim.toml"
DEADLINE_S = 15.0

T = TypeVar("T")

#: Every check the sim config yields, in run order.
ALL_CHECKS = [
    "temperature_sensors",
    "connector1.meter",
    "connector1.power_modules.communication",
    "connector1.power_modules.output",
    "connector1.contactor",
    "connector1.weld",
    "connector1.imd",
    "connector2.meter",
    "connector2.contactor",
    "connector2.weld",
    "fan.cabinet",
]

#: Short self-test timings; every wait still has several poll periods of margin.
FAST = SelfTestConfig(
    check_timeout_s=20.0,
    module_answer_timeout_s=1.5,
    module_settle_timeout_s=5.0,
    discharge_timeout_s=5.0,
    contactor_hold_s=0.2,
    weld_confirm_s=0.6,
    imd_reading_timeout_s=3.0,
    meter_reading_timeout_s=1.5,
    fan_spinup_timeout_s=3.0,
)


async def eventually(probe: Callable[[], T | None | bool], what: str, timeout: float = DEADLINE_S) -> T:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = probe()
        if value:
            return value  # type: ignore[return-value]
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}; last seen {value!r}")
        await asyncio.sleep(0.02)


def _revalidate(section: DeviceSection | None, **updates: Any) -> None:
    assert section is not None
    opts = section.options
    section._options = type(opts).model_validate({**opts.model_dump(), **updates})


def _fast_driver_timings(cfg: AgentConfig, tmp_path: Path) -> None:
    """Short poll periods (valid option values), a private CAN channel and state dir, no EV."""
    cfg.charger.state_dir = tmp_path / "state"
    for bus in cfg.can.values():
        bus.channel = f"selftest-{uuid.uuid4().hex[:12]}"
    for name, link in cfg.modbus.items():
        cfg.modbus[name] = type(link).model_validate(
            {**link.model_dump(), "timeout_s": 0.5 if link.transport == "rtu" else 0.3, "retries": 0}
        )
    for conn in cfg.connectors:
        if conn.power_modules is not None:
            _revalidate(conn.power_modules, poll_interval_s=0.2)
        _revalidate(conn.meter, poll_interval_s=0.2, stale_after_s=1.0)
        _revalidate(conn.contactor, close_timeout_ms=1000.0, open_timeout_ms=500.0)
    for section in cfg.imd.values():
        _revalidate(section, poll_interval_s=0.2, stale_after_s=1.0)
    assert cfg.thermal is not None
    _revalidate(cfg.thermal, poll_interval_s=0.2)
    assert cfg.sim is not None
    cfg.sim.vehicles = []  # nobody plugged in: the contactor may be switched


@dataclass
class Rig:
    sim: SimulatedCharger
    devices: DeviceSet

    def hardware(self) -> dict[int, ConnectorHardware]:
        d = self.devices
        return {
            cid: ConnectorHardware(
                meter=d.meters[cid],
                contactor=d.contactors[cid],
                vehicle=d.vehicles[cid],
                modules=d.power_modules.get(cid),
                imd=d.imd.get(cid),
                thermal=d.thermal,
            )
            for cid in d.meters
        }

    async def run(self, **kwargs: Any) -> SelfTestReport:
        return await run_self_test(self.hardware(), self.devices.thermal, FAST, **kwargs)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    loaded = load_config(SIM_TOML, sim_root=tmp_path / "sim")
    cfg = loaded.model
    assert loaded.sim_root is not None
    _fast_driver_timings(cfg, tmp_path)
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(SimulatedCharger(cfg, loaded.sim_root))
        ctx = make_context(cfg)
        stack.push_async_callback(ctx.close)
        devices = build_devices(cfg, ctx)
        for device in devices.all():
            await device.start()
            stack.push_async_callback(device.stop)
        await eventually(
            lambda: all(d.health().ok for d in devices.all()),
            "every device healthy before the self test",
        )
        yield Rig(sim, devices)


def _outcomes(report: SelfTestReport) -> dict[str, Outcome]:
    return {c.name: c.result for c in report.checks}


def _failing(report: SelfTestReport) -> set[str]:
    return {c.name for c in report.failed()}


def _modules_off(rig: Rig, cid: int) -> Callable[[], bool]:
    modules = rig.sim.world.connector(cid).modules
    return lambda: not any(m.on for m in modules)


async def _assert_left_safe(rig: Rig, fan_duty: float) -> None:
    """Coils released, modules commanded off (and off on the sim side), fan duty restored."""
    for cid, contactor in rig.devices.contactors.items():
        assert not contactor.status().coil_energised, f"connector {cid} coil energised"
        sim_contactor = rig.sim.world.connector(cid).contactor
        await eventually(lambda: not sim_contactor.coil, f"connector {cid} coil released on the sim side")
    for cid, modules in rig.devices.power_modules.items():
        assert modules.describe()["output_on"] is False  # type: ignore[attr-defined]
        await eventually(_modules_off(rig, cid), f"connector {cid} modules off")
    thermal = rig.devices.thermal
    assert thermal is not None
    assert thermal.fans()["cabinet"].duty_percent == pytest.approx(fan_duty)
    await eventually(
        lambda: abs(rig.sim.world.fans["cabinet"].duty_percent - fan_duty) < 0.5,
        "sim fan back at its previous duty",
    )


def _fan_duty(rig: Rig) -> float:
    assert rig.devices.thermal is not None
    return rig.devices.thermal.fans()["cabinet"].duty_percent


# ---------------------------------------------------------------------------------


async def test_a_healthy_charger_passes_every_check_and_reports_progress(rig: Rig) -> None:
    duty = _fan_duty(rig)
    events: list[SelfTestProgress] = []
    cycles_before = rig.sim.world.connector(1).contactor.cycles

    report = await rig.run(progress=events.append)

    bad = [c.to_dict() for c in report.checks if c.result is not Outcome.PASS]
    assert report.passed and not bad, bad
    assert [c.name for c in report.checks] == ALL_CHECKS
    assert [(e.name, e.phase) for e in events] == [
        (name, phase) for name in ALL_CHECKS for phase in ("started", "finished")
    ]
    assert all(e.total == len(ALL_CHECKS) for e in events)
    assert events[-1].index == len(ALL_CHECKS) and events[-1].result is report.checks[-1]

    # the measurements are real ones, judged against the configured limits
    output = report.check("connector1.power_modules.output")
    assert output.value["setpoint_v"] == pytest.approx(150.0)  # raised to the modules' minimum
    assert abs(output.value["measured_v"] - 150.0) <= FAST.module_voltage_tolerance_v
    assert output.value["discharged_v"] < FAST.safe_voltage_v
    assert output.limit["safe_voltage_v"] == FAST.safe_voltage_v
    assert rig.sim.world.connector(1).contactor.cycles == cycles_before + 1  # really switched
    imd = report.check("connector1.imd")
    assert imd.value["resistance_kohm"] > FAST.isolation_fault_kohm
    assert report.check("fan.cabinet").value["rpm"] >= FAST.fan_low_fraction * 1800
    # the simulated SDM630 ripples its voltages by up to 0.05 V (rounded to 0.1 V here)
    assert report.check("connector2.meter").value["phase_voltages_v"] == pytest.approx([230.0] * 3, abs=0.11)

    details = report.to_details()
    assert details["passed"] is True and details["summary"] == {"pass": 11, "fail": 0, "skipped": 0}
    assert details["started_at"].endswith("Z") and details["duration_s"] > 0
    check = details["checks"][0]
    assert set(check) >= {"name", "result", "value", "limit", "detail"}
    json.dumps(details)  # JSON-able as the command-status details
    await _assert_left_safe(rig, duty)


@pytest.mark.parametrize(
    ("fault", "target", "failing"),
    [
        pytest.param(
            "module_silence",
            {"connector": 1, "module": 1},
            {"connector1.power_modules.communication"},
            id="module_silence",
        ),
        pytest.param(
            "contactor_fail_to_close", {"connector": 1}, {"connector1.contactor"}, id="fail_to_close"
        ),
        pytest.param(
            "contactor_weld", {"connector": 1}, {"connector1.contactor", "connector1.weld"}, id="weld"
        ),
        pytest.param(
            "isolation_drop", {"connector": 1, "value": 50.0}, {"connector1.imd"}, id="isolation_drop"
        ),
        pytest.param("meter_silence", {"connector": 2}, {"connector2.meter"}, id="meter_silence"),
        pytest.param(
            "fan_slowdown", {"sensor": "cabinet", "value": 0.3}, {"fan.cabinet"}, id="fan_slowdown"
        ),
        pytest.param(
            "over_temperature",
            {"sensor": "power_module", "value": 150.0},
            {"temperature_sensors"},
            id="over_temperature",
        ),
    ],
)
async def test_each_fault_fails_exactly_its_check(
    rig: Rig, fault: str, target: dict[str, Any], failing: set[str]
) -> None:
    duty = _fan_duty(rig)
    rig.sim.inject(fault, **target)
    if fault == "over_temperature":  # a snapshot check: let the driver poll the new value first
        thermal = rig.devices.thermal
        assert thermal is not None
        await eventually(
            lambda: (thermal.temperatures()["power_module"].celsius or 0.0) > FAST.temperature_max_c,
            "the thermal driver reads the injected heat",
        )

    report = await rig.run()

    assert not report.passed
    assert _failing(report) == failing, [c.to_dict() for c in report.failed()]
    skipped = {c.name for c in report.checks if c.result is Outcome.SKIPPED}
    if fault == "module_silence":  # never power modules the controller cannot talk to
        assert skipped == {"connector1.power_modules.output"}
        comm = report.check("connector1.power_modules.communication")
        assert comm.value["silent"] == [1] and "did not answer" in comm.detail
        assert not any(m.on for m in rig.sim.world.connector(1).modules)
    else:
        assert skipped == set()
    for name in failing:
        result = report.check(name)
        assert result.detail and result.limit is not None
    assert report.to_details()["summary"]["fail"] == len(failing)
    await _assert_left_safe(rig, duty)
    if fault == "contactor_weld":
        weld = report.check("connector1.weld")
        assert weld.value["mirror_says_open"] is False and "welded" in weld.detail
        assert "contactor_welded" in report.check("connector1.contactor").detail
    if fault == "isolation_drop":
        assert report.check("connector1.imd").value["resistance_kohm"] == pytest.approx(50.0, abs=1.0)


async def test_with_a_vehicle_plugged_in_the_contactor_is_not_switched(rig: Rig) -> None:
    rig.sim.clear("vehicle_unplug", connector=1)  # "clearing" the unplug plugs the EV in
    vehicle = rig.devices.vehicles[1]
    await eventually(lambda: vehicle.status().pilot is PilotState.B, "pilot B")
    cycles = rig.sim.world.connector(1).contactor.cycles

    report = await rig.run()

    contactor = report.check("connector1.contactor")
    assert contactor.result is Outcome.SKIPPED and "vehicle is plugged in" in contactor.detail
    assert rig.sim.world.connector(1).contactor.cycles == cycles  # never energised
    outcomes = _outcomes(report)
    assert outcomes.pop("connector1.contactor") is Outcome.SKIPPED
    assert set(outcomes.values()) == {Outcome.PASS}  # the other connector is still switched
    assert report.passed


@pytest.mark.parametrize("moment", ["modules_on", "contactor_closed", "fan_at_full"])
async def test_cancellation_mid_run_leaves_the_hardware_safe(rig: Rig, moment: str) -> None:
    duty = _fan_duty(rig)
    modules = rig.devices.power_modules[1]
    contactor = rig.devices.contactors[1]
    thermal = rig.devices.thermal
    assert thermal is not None
    finished: list[CheckResult] = []

    def on_progress(event: SelfTestProgress) -> None:
        if event.result is not None:
            finished.append(event.result)

    task = asyncio.create_task(rig.run(progress=on_progress))
    reached: dict[str, Callable[[], bool]] = {
        "modules_on": lambda: (modules.measured_voltage() or 0.0) > 100.0,
        "contactor_closed": lambda: contactor.status().coil_energised,
        "fan_at_full": lambda: thermal.fans()["cabinet"].duty_percent > 99.0,
    }
    await eventually(reached[moment], moment, timeout=30.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert not any(r.result is Outcome.FAIL for r in finished)  # cancelled, not failed
    await _assert_left_safe(rig, duty)
    if moment == "modules_on":
        await eventually(
            lambda: rig.sim.world.connector(1).modules[0].output_voltage < FAST.safe_voltage_v,
            "output discharged after the cancellation",
        )
    if moment == "contactor_closed":
        await eventually(lambda: not rig.sim.world.connector(1).contactor.closed, "contacts open")


# ---------------------------------------------------------------------------------
# a check that raises or hangs (fakes: no simulator needed)


class _BrokenFans:
    """Thermal with two sensors and two fans: ``raises`` fails to write 100 %, ``hangs``
    never returns from writing 100 %. Every write is recorded."""

    name = "thermal"

    def __init__(self) -> None:
        self.writes: list[tuple[str, float]] = []
        self.duty = {"hangs": 35.0, "raises": 40.0}

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    def temperatures(self) -> dict[str, TemperatureReading]:
        return {"a": TemperatureReading("a", 25.0), "b": TemperatureReading("b", 31.0)}

    def fans(self) -> dict[str, FanStatus]:
        return {n: FanStatus(n, rpm=500.0, duty_percent=d, nominal_rpm=1800.0) for n, d in self.duty.items()}

    async def set_fan_duty(self, fan: str, percent: float) -> None:
        self.writes.append((fan, percent))
        if percent == 100.0 and fan == "raises":
            raise OSError("pwm file not writable")
        if percent == 100.0 and fan == "hangs":
            await asyncio.Event().wait()
        self.duty[fan] = percent

    def health(self) -> Health:
        return Health()


async def test_a_check_that_raises_or_hangs_fails_with_the_reason_and_the_run_goes_on() -> None:
    thermal = _BrokenFans()
    cfg = SelfTestConfig(
        check_timeout_s=5.0, module_settle_timeout_s=1.0, discharge_timeout_s=1.0, fan_spinup_timeout_s=1.0
    )

    report = await run_self_test({}, thermal, cfg)

    assert [c.name for c in report.checks] == ["temperature_sensors", "fan.hangs", "fan.raises"]
    assert report.check("temperature_sensors").result is Outcome.PASS
    hangs, raises = report.check("fan.hangs"), report.check("fan.raises")
    assert hangs.result is Outcome.FAIL and hangs.detail == "timed out after 5 s"
    assert raises.result is Outcome.FAIL and raises.detail == "OSError: pwm file not writable"
    assert hangs.value == {"previous_duty_percent": 35.0} and hangs.limit["min_rpm"] == 1260
    # the previous duty is written back after the timeout and after the exception
    assert ("hangs", 35.0) in thermal.writes and ("raises", 40.0) in thermal.writes
    assert thermal.duty == {"hangs": 35.0, "raises": 40.0}
    assert not report.passed and report.to_details()["summary"] == {"pass": 1, "fail": 2, "skipped": 0}
