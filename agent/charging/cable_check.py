"""The DC cable check (IEC 61851-23), run with the contactor open before every DC session.

Sequence, each step bounded, any failure a :class:`~agent.charging.errors.SessionAbort`
(the caller shuts the output down):

1. the vehicle must have sent a target voltage (HLC data), else abort;
2. the modules drive the output to ``min(cable_check_voltage_v, max_voltage_v)`` at
   ``cable_check_current_a``; the voltage must settle within 10 % in
   ``voltage_settle_timeout_s``;
3. with an IMD: optional IMD self test (F-0104 on failure), then after
   ``isolation_grace_s`` the IMD must deliver ``isolation_readings`` fresh readings, all at
   or above ``isolation_fault_kohm`` (one below: F-0102; no readings in
   ``isolation_timeout_s`` or a silent IMD for ``imd_loss_grace_s``: F-0103). The lowest
   reading (or the failing one) is handed to ``isolation_measured``. Without an IMD the
   check is logged and skipped (a config without IMD is a bench);
4. modules off; the output must fall below ``safe_voltage_v`` in
   ``voltage_settle_timeout_s`` (F-0802), so the contactor never closes onto a live output.

``wait_for`` and ``abort_check`` come from the connector: they keep evaluating faults and
abort on unplug, stop requests and blocking faults while the check runs.
"""

from __future__ import annotations

from typing import Awaitable, Callable

import structlog

from agent.charging.config import ChargingSection
from agent.charging.errors import SessionAbort
from agent.charging.hardware import ConnectorHardware

log = structlog.get_logger(__name__)


async def cable_check(
    hw: ConnectorHardware,
    policy: ChargingSection,
    *,
    max_voltage_v: float,
    connector_id: int,
    clock: Callable[[], float],
    wait_for: Callable[[Callable[[], bool], float], Awaitable[bool]],
    abort_check: Callable[[], object],
    isolation_measured: Callable[[float], None],
) -> None:
    """Run the check; return when the output is safe for closing the contactor, else raise SessionAbort."""
    modules, imd, p = hw.modules, hw.imd, policy
    assert modules is not None
    status = hw.vehicle.status()
    if status.target_voltage is None:
        raise SessionAbort("fault", "vehicle sent no target voltage (no HLC data)")
    check_v = min(p.cable_check_voltage_v, max_voltage_v)
    await modules.set_output(check_v, p.cable_check_current_a)
    await modules.output_on()

    def voltage_reached() -> bool:
        v = modules.measured_voltage()
        return v is not None and abs(v - check_v) <= 0.1 * check_v

    if not await wait_for(voltage_reached, p.voltage_settle_timeout_s):
        raise SessionAbort("fault", f"cable-check voltage {check_v:.0f} V not reached")
    if imd is None:
        log.warning("no_imd_configured", connector=connector_id)
    else:
        if p.imd_self_test:
            result = await imd.self_test()
            abort_check()
            if not result.passed:
                raise SessionAbort("fault", f"IMD self test failed: {result.detail}", "F-0104", detail=result.detail)
        applied_at = clock()
        fresh: list[float] = []
        seen: set[float] = set()
        last_ok = clock()

        def enough_readings() -> bool:
            nonlocal last_ok
            r = imd.reading()
            now = clock()
            if r is None or (r.resistance_kohm is None and not r.testing):
                if now - last_ok > p.imd_loss_grace_s:
                    raise SessionAbort("fault", "insulation monitor stopped reporting", "F-0103")
                return False
            last_ok = now
            if r.resistance_kohm is None or r.taken_at in seen or r.taken_at < applied_at + p.isolation_grace_s:
                return False
            seen.add(r.taken_at)
            if r.resistance_kohm < p.isolation_fault_kohm:
                # a failed test is the most telling point of the insulation trend
                isolation_measured(r.resistance_kohm)
                raise SessionAbort(
                    "fault",
                    f"insulation {r.resistance_kohm:.0f} kOhm below {p.isolation_fault_kohm:.0f} kOhm",
                    "F-0102",
                    resistance_kohm=round(r.resistance_kohm, 1),
                    limit_kohm=p.isolation_fault_kohm,
                )
            fresh.append(r.resistance_kohm)
            return len(fresh) >= p.isolation_readings

        if not await wait_for(enough_readings, p.isolation_timeout_s):
            raise SessionAbort("fault", "no fresh insulation readings in time", "F-0103")
        isolation_measured(min(fresh))
    await modules.output_off()

    def discharged() -> bool:
        v = modules.measured_voltage()
        return v is not None and v < p.safe_voltage_v

    if not await wait_for(discharged, p.voltage_settle_timeout_s):
        raise SessionAbort("fault", "output did not discharge below the safe voltage", "F-0802")
