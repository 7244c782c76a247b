"""Shared helpers of the self-test tests: fast timings, the simulated charger rig, outcome readers
and safe-state assertions.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.charging.config import DeviceSection
from agent.charging.connector import ConnectorHardware
from agent.cli.sim import SimulatedCharger
from agent.config import AgentConfig
from agent.maintenance.selftest import Outcome, SelfTestConfig, SelfTestReport, run_self_test
from hal.interfaces import DeviceSet
from tests.agent.sim_rig import eventually


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
                pace=d.pace,
            )
            for cid in d.meters
        }

    async def run(self, **kwargs: Any) -> SelfTestReport:
        return await run_self_test(self.hardware(), self.devices.thermal, FAST, **kwargs)


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
