"""Charger-wide thermal fault policy: F-0204 with 5 K hysteresis, F-0601 from fan health."""

from __future__ import annotations

from agent.charging.cabinet import check_cabinet
from agent.charging.config import ChargingSection
from agent.charging.faults import FaultBoard
from hal.interfaces import FanStatus, Health, HealthState, TemperatureReading


class Thermal:
    """Just the two snapshot methods :func:`check_cabinet` reads."""

    def __init__(self) -> None:
        self.pm: float | None = 40.0
        self.fan = FanStatus("cabinet", 3000.0, 60.0, 3000.0)

    def temperatures(self) -> dict[str, TemperatureReading]:
        return {"power_module": TemperatureReading("power_module", self.pm)}

    def fans(self) -> dict[str, FanStatus]:
        return {"cabinet": self.fan}


def test_cabinet_fault_raises_at_the_threshold_and_clears_only_5_k_below() -> None:
    faults, thermal, policy = FaultBoard(), Thermal(), ChargingSection(cabinet_critical_c=85.0)
    seen = []
    for celsius in (84.9, 85.0, 82.0, 80.1, 79.9, 85.5, None):
        thermal.pm = celsius
        check_cabinet(faults, thermal, policy)  # type: ignore[arg-type]
        seen.append(faults.is_active("F-0204", None))
    assert seen == [False, True, True, True, False, True, True]  # no reading: no change


def test_fan_fault_follows_the_fan_health() -> None:
    faults, thermal, policy = FaultBoard(), Thermal(), ChargingSection()
    check_cabinet(faults, thermal, policy)  # type: ignore[arg-type]
    assert not faults.is_active("F-0601", None)
    thermal.fan = FanStatus("cabinet", 400.0, 60.0, 3000.0, Health(HealthState.DEGRADED, "fan_low"))
    check_cabinet(faults, thermal, policy)  # type: ignore[arg-type]
    assert faults.active()[0].details == {"fan": "cabinet", "rpm": 400.0, "nominal_rpm": 3000.0}
    thermal.fan = FanStatus("cabinet", 0.0, 60.0, 3000.0, Health(HealthState.FAULT, "sensor_missing"))
    check_cabinet(faults, thermal, policy)  # type: ignore[arg-type]
    assert not faults.is_active("F-0601", None)  # a missing tach sensor is not a fan failure
