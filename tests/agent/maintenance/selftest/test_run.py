"""Running the self test: every check passes on a healthy charger with progress reported, cancellation
leaves the hardware safe, a check that raises or hangs fails with its reason and the run goes on.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest

from agent.maintenance.selftest import (
    CheckResult,
    Outcome,
    SelfTestConfig,
    SelfTestProgress,
    run_self_test,
)
from hal.interfaces import FanStatus, Health, TemperatureReading
from tests.agent.maintenance.selftest.helpers import (
    ALL_CHECKS,
    FAST,
    Rig,
    _assert_left_safe,
    _fan_duty,
)
from tests.agent.sim_rig import eventually


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
    # the simulated meter carries a deterministic +-0.05 V ripple: whatever the moment of the read
    assert report.check("connector2.meter").value["phase_voltages_v"] == pytest.approx([230.0, 230.0, 230.0], abs=0.11)

    details = report.to_details()
    assert details["passed"] is True and details["summary"] == {"pass": 11, "fail": 0, "skipped": 0}
    assert details["started_at"].endswith("Z") and details["duration_s"] > 0
    check = details["checks"][0]
    assert set(check) >= {"name", "result", "value", "limit", "detail"}
    json.dumps(details)  # JSON-able as the command-status details
    await _assert_left_safe(rig, duty)


async def test_an_idle_charger_is_busy_on_the_pace_for_the_whole_self_test(rig: Rig) -> None:
    pace = rig.devices.pace
    assert pace is not None
    for cid in rig.devices.meters:
        pace.report(cid, False)  # every connector idle: meters and IMD at the idle pace (5 s)
    idle_during: list[bool] = []

    report = await rig.run(progress=lambda event: idle_during.append(pace.idle))

    # the meter checks wait 1.5 s for two fresh readings: only the normal pace gives them
    assert report.passed, [c.to_dict() for c in report.failed()]
    assert idle_during and not any(idle_during)
    assert pace.idle  # released at the end


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
