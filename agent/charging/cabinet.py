"""Charger-wide thermal fault policy: F-0204 cabinet over-temperature, F-0601 fan failure.

:func:`check_cabinet` is called about once a second with the (calibrated) thermal view:

* F-0204 is raised when the power-module temperature reaches
  ``[charging] cabinet_critical_c`` and cleared only 5 K below it (hysteresis), so a
  reading hovering at the threshold does not toggle the fault. No reading: no change.
* F-0601 follows the fans' own health: raised while any fan reports ``fan_low`` or
  ``fan_stopped`` (degraded or fault), cleared when none does.

The connectors react to these faults through the fault board (derating or stopping);
this module only decides when they are active.
"""

from __future__ import annotations

from agent.charging.config import ChargingSection
from agent.charging.faults import FaultBoard
from hal.interfaces import HealthState, Thermal

CABINET_CLEAR_HYSTERESIS_C = 5.0
FAN_FAULT_CODES = ("fan_low", "fan_stopped")


def check_cabinet(faults: FaultBoard, thermal: Thermal, policy: ChargingSection) -> None:
    """Raise or clear F-0204 and F-0601 from one look at ``thermal`` (never blocks)."""
    pm = thermal.temperatures().get("power_module")
    if pm is not None and pm.celsius is not None:
        if pm.celsius >= policy.cabinet_critical_c:
            faults.raise_("F-0204", None, temperature=round(pm.celsius, 1), threshold=policy.cabinet_critical_c)
        elif pm.celsius < policy.cabinet_critical_c - CABINET_CLEAR_HYSTERESIS_C:
            faults.clear("F-0204", None)
    for name, fan in thermal.fans().items():
        low = fan.health.state in (HealthState.DEGRADED, HealthState.FAULT) and fan.health.code in FAN_FAULT_CODES
        if low:
            faults.raise_("F-0601", None, fan=name, rpm=fan.rpm, nominal_rpm=fan.nominal_rpm)
        else:
            faults.clear("F-0601", None)
