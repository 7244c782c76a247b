"""The self test's hardware checks: temperatures, meter, power modules (communication and output),
contactor and weld, IMD, fans; each fills its measured ``value`` and returns its outcome.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from agent.maintenance.selftest.model import PHASE_PRESENT_V, POLL_STEP_S, Outcome, SelfTestConfig
from hal.interfaces import PilotState, Thermal, monotonic

if TYPE_CHECKING:  # agent.charging.connector imports agent.config, which imports this package
    from agent.charging.connector import ConnectorHardware

log = structlog.get_logger(__name__)

T = TypeVar("T")


def _r(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(x, digits)


async def _wait_for(probe: Callable[[], T | None], timeout_s: float) -> T | None:
    """Poll ``probe`` until it returns something other than None/False; None on timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if loop.time() >= deadline:
            return None
        await asyncio.sleep(POLL_STEP_S)


@dataclass
class _Checks:
    """The hardware checks of one self-test run and what they must undo (fan duties)."""

    connectors: dict[int, ConnectorHardware]
    thermal: Thermal | None
    cfg: SelfTestConfig
    comm_ok: dict[int, bool] = field(default_factory=dict)
    fan_restore: dict[str, float] = field(default_factory=dict)

    async def _restore_fan(self, name: str, duty: float) -> None:
        if self.thermal is None:
            return
        try:
            await asyncio.wait_for(self.thermal.set_fan_duty(name, duty), self.cfg.safe_state_timeout_s)
        except Exception as exc:  # noqa: BLE001 - logged; the final safe state retries
            log.error("self_test_fan_restore_failed", fan=name, duty_percent=duty, error=repr(exc))
            return
        self.fan_restore.pop(name, None)

    # ------------------------------------------------------------------ checks

    async def _temperatures(self, value: dict[str, Any]) -> tuple[Outcome, str]:
        assert self.thermal is not None
        c = self.cfg
        readings = self.thermal.temperatures()
        problems: list[str] = []
        present: dict[str, float] = {}
        for name, reading in sorted(readings.items()):
            value[name] = _r(reading.celsius, 1)
            if reading.celsius is None:
                problems.append(f"{name} missing ({reading.health.detail or 'no value'})")
                continue
            present[name] = reading.celsius
            if not (c.temperature_min_c <= reading.celsius <= c.temperature_max_c):
                problems.append(
                    f"{name} {reading.celsius:.1f} degC outside "
                    f"{c.temperature_min_c:g}..{c.temperature_max_c:g} degC"
                )
        if len(present) >= 2:
            spread = max(present.values()) - min(present.values())
            value["spread_c"] = _r(spread, 1)
            if spread > c.temperature_max_spread_c:
                hot = max(present, key=lambda n: present[n])
                cold = min(present, key=lambda n: present[n])
                problems.append(
                    f"spread {spread:.1f} degC ({hot} - {cold}) above {c.temperature_max_spread_c:g} degC"
                )
        if problems:
            return Outcome.FAIL, "; ".join(problems)
        return Outcome.PASS, f"{len(present)} sensors plausible"

    async def _meter(self, cid: int, value: dict[str, Any]) -> tuple[Outcome, str]:
        c = self.cfg
        hw = self.connectors[cid]
        meter = hw.meter
        t0 = monotonic()
        first = await _wait_for(
            lambda: r if (r := meter.reading()) is not None and r.taken_at > t0 else None,
            c.meter_reading_timeout_s,
        )
        if first is None:
            health = meter.health()
            return Outcome.FAIL, (
                f"no fresh reading within {c.meter_reading_timeout_s:g} s "
                f"({health.state.value}: {health.code or '-'} {health.detail or ''})".rstrip()
            )
        second = await _wait_for(
            lambda: r if (r := meter.reading()) is not None and r.taken_at > first.taken_at else None,
            c.meter_reading_timeout_s,
        )
        if second is None:
            return Outcome.FAIL, f"no second reading within {c.meter_reading_timeout_s:g} s"
        value.update(
            voltage_v=_r(second.voltage),
            current_a=_r(second.current),
            power_kw=_r(second.power_kw, 3),
            energy_import_kwh=_r(second.energy_import_kwh, 3),
            energy_export_kwh=_r(second.energy_export_kwh, 3),
        )
        problems: list[str] = []
        if abs(second.power_kw) > c.meter_max_idle_power_kw:
            problems.append(
                f"power {second.power_kw:.3f} kW with no current expected "
                f"(limit {c.meter_max_idle_power_kw:g} kW)"
            )
        if hw.modules is not None:
            if not abs(second.voltage) <= c.safe_voltage_v:
                problems.append(
                    f"DC voltage {second.voltage:.1f} V with the output off (limit {c.safe_voltage_v:g} V)"
                )
        else:
            problems.extend(self._ac_voltage_problems(second.voltage, second.phases, value))
        for attr in ("energy_import_kwh", "energy_export_kwh"):
            before, after = getattr(first, attr), getattr(second, attr)
            if not (math.isfinite(after) and after >= 0.0):
                problems.append(f"{attr} {after!r} is negative")
            elif after < before:
                problems.append(f"{attr} went backwards ({before:.3f} -> {after:.3f})")
        if problems:
            return Outcome.FAIL, "; ".join(problems)
        return Outcome.PASS, "fresh, idle and plausible"

    def _ac_voltage_problems(
        self, mean: float, phases: Any, value: dict[str, Any]
    ) -> list[str]:
        c = self.cfg
        window = f"{c.ac_min_voltage_v:g}..{c.ac_max_voltage_v:g} V"
        if phases is None:
            ok = c.ac_min_voltage_v <= mean <= c.ac_max_voltage_v
            return [] if ok else [f"voltage {mean:.1f} V outside {window}"]
        voltages = [p.voltage for p in phases]
        value["phase_voltages_v"] = [_r(v, 1) for v in voltages]
        problems = []
        for index, v in enumerate(voltages, start=1):
            if index > 1 and v < PHASE_PRESENT_V:
                continue  # not wired (single-phase installation)
            if not (c.ac_min_voltage_v <= v <= c.ac_max_voltage_v):
                problems.append(f"L{index} {v:.1f} V outside {window}")
        return problems

    async def _module_comm(self, cid: int, value: dict[str, Any]) -> tuple[Outcome, str]:
        modules = self.connectors[cid].modules
        assert modules is not None
        self.comm_ok[cid] = False
        t0 = monotonic()
        addresses = [m.address for m in modules.modules()]
        value["modules"] = addresses
        if not addresses:
            return Outcome.FAIL, "no power module known to the driver"

        def fresh() -> list[int]:
            return [
                m.address
                for m in modules.modules()
                if m.online and m.last_seen is not None and m.last_seen > t0
            ]

        await _wait_for(lambda: len(fresh()) == len(addresses), self.cfg.module_answer_timeout_s)
        answered = fresh()
        silent = [a for a in addresses if a not in answered]
        value["answered"] = answered
        value["silent"] = silent
        if silent:
            return Outcome.FAIL, (
                f"module(s) {', '.join(map(str, silent))} did not answer within "
                f"{self.cfg.module_answer_timeout_s:g} s"
            )
        self.comm_ok[cid] = True
        return Outcome.PASS, f"{len(answered)} module(s) answered"

    async def _module_output(self, cid: int, value: dict[str, Any]) -> tuple[Outcome, str]:
        c = self.cfg
        hw = self.connectors[cid]
        modules = hw.modules
        assert modules is not None
        if not self.comm_ok.get(cid, False):
            return Outcome.SKIPPED, "not powered: module communication failed"
        status = hw.contactor.status()
        if status.coil_energised or not status.mirror_says_open:
            return Outcome.SKIPPED, "not powered: the contactor is not confirmed open (see the weld check)"
        capability = modules.capability()
        if capability is None:
            return Outcome.FAIL, "no module online"
        setpoint = max(c.module_test_voltage_v, capability.min_voltage)
        current = min(c.module_test_current_a, capability.max_current)
        value["setpoint_v"] = _r(setpoint)
        if setpoint > c.module_max_test_voltage_v:
            return Outcome.SKIPPED, (
                f"the modules cannot regulate below {capability.min_voltage:g} V, above the "
                f"allowed test voltage {c.module_max_test_voltage_v:g} V"
            )
        peak_current = 0.0
        try:
            await modules.set_output(setpoint, current)
            await modules.output_on()

            def settled() -> float | None:
                nonlocal peak_current
                peak_current = max(peak_current, abs(modules.measured_current() or 0.0))
                v = modules.measured_voltage()
                if v is not None and abs(v - setpoint) <= c.module_voltage_tolerance_v:
                    return v
                return None

            reached = await _wait_for(settled, c.module_settle_timeout_s)
            value["measured_v"] = _r(reached if reached is not None else modules.measured_voltage())
            value["peak_current_a"] = _r(peak_current)
        finally:
            await modules.output_off()
        loop = asyncio.get_running_loop()
        off_at = loop.time()
        discharged = await _wait_for(
            lambda: v if (v := modules.measured_voltage()) is not None and v < c.safe_voltage_v else None,
            c.discharge_timeout_s,
        )
        value["discharged_v"] = _r(discharged if discharged is not None else modules.measured_voltage())
        value["discharge_s"] = _r(loop.time() - off_at) if discharged is not None else None
        problems: list[str] = []
        if reached is None:
            problems.append(
                f"output did not reach {setpoint:g} +/- {c.module_voltage_tolerance_v:g} V within "
                f"{c.module_settle_timeout_s:g} s (measured {value['measured_v']} V)"
            )
        if peak_current > current:
            problems.append(f"{peak_current:.1f} A flowed with the contactor open (limit {current:g} A)")
        if discharged is None:
            problems.append(
                f"output not below {c.safe_voltage_v:g} V within {c.discharge_timeout_s:g} s after OFF "
                f"(measured {value['discharged_v']} V)"
            )
        if problems:
            return Outcome.FAIL, "; ".join(problems)
        return Outcome.PASS, f"regulated {reached:.1f} V and discharged below {c.safe_voltage_v:g} V"

    async def _contactor(self, cid: int, value: dict[str, Any]) -> tuple[Outcome, str]:
        c = self.cfg
        hw = self.connectors[cid]
        vehicle = hw.vehicle.status()
        if vehicle.plugged or vehicle.pilot is not PilotState.A:
            why = (
                "a vehicle is plugged in"
                if vehicle.plugged
                else "the pilot does not confirm that no vehicle is present"
            )
            return Outcome.SKIPPED, f"not switched: {why} (pilot {vehicle.pilot.value})"
        if hw.modules is not None:
            await hw.modules.output_off()

            def dc_voltage() -> float | None:
                assert hw.modules is not None
                v = hw.modules.measured_voltage()
                if v is None and (r := hw.meter.reading()) is not None:
                    v = r.voltage
                return v

            low = await _wait_for(
                lambda: v if (v := dc_voltage()) is not None and abs(v) < c.safe_voltage_v else None,
                c.discharge_timeout_s,
            )
            if low is None:
                return Outcome.SKIPPED, (
                    f"not switched: the DC output is not confirmed below {c.safe_voltage_v:g} V "
                    f"(measured {_r(dc_voltage())} V)"
                )
        contactor = hw.contactor
        before = contactor.status()
        value["cycles_before"] = before.cycles
        if before.coil_energised or not before.mirror_says_open:
            return Outcome.FAIL, "not switched: the mirror does not confirm 'open' before closing"
        try:
            await contactor.close()
            value["closed"] = True
            await asyncio.sleep(c.contactor_hold_s)
            held = contactor.status()
            if held.mirror_says_open or not held.coil_energised:
                value["held"] = False
                return Outcome.FAIL, f"did not stay closed for {c.contactor_hold_s:g} s"
            value["held"] = True
            await contactor.open()
            value["opened"] = True
        finally:
            if contactor.status().coil_energised:
                contactor.release()
        value["cycles_after"] = contactor.status().cycles
        return Outcome.PASS, "close and open confirmed by the mirror contact"

    async def _weld(self, cid: int, value: dict[str, Any]) -> tuple[Outcome, str]:
        contactor = self.connectors[cid].contactor
        if contactor.status().coil_energised:
            contactor.release()
        status = await _wait_for(
            lambda: s if (s := contactor.status()).mirror_says_open and not s.coil_energised else None,
            self.cfg.weld_confirm_s,
        )
        final = status or contactor.status()
        value.update(
            coil_energised=final.coil_energised,
            mirror_says_open=final.mirror_says_open,
            weld_latched=final.welded,
        )
        if status is None:
            return Outcome.FAIL, (
                f"the mirror reports the main contacts closed with the coil off "
                f"for {self.cfg.weld_confirm_s:g} s: welded"
            )
        if final.welded:
            return Outcome.FAIL, "the mirror reads open but the weld latch is set (service, then clear_weld())"
        return Outcome.PASS, "coil off and the mirror confirms open"

    async def _imd(self, cid: int, value: dict[str, Any]) -> tuple[Outcome, str]:
        c = self.cfg
        imd = self.connectors[cid].imd
        assert imd is not None
        users = [i for i, hw in sorted(self.connectors.items()) if hw.imd is imd]
        if len(users) > 1:
            value["connectors"] = users
        result = await imd.self_test()
        value["self_test"] = result.detail
        value["self_test_s"] = result.duration_s
        if not result.passed:
            return Outcome.FAIL, f"IMD self test failed: {result.detail}"
        done = monotonic()
        reading = await _wait_for(
            lambda: r
            if (r := imd.reading()) is not None
            and r.taken_at > done
            and not r.testing
            and r.resistance_kohm is not None
            else None,
            c.imd_reading_timeout_s,
        )
        if reading is None or reading.resistance_kohm is None:
            health = imd.health()
            return Outcome.FAIL, (
                f"no valid insulation reading within {c.imd_reading_timeout_s:g} s after the self test "
                f"({health.state.value}: {health.code or '-'})"
            )
        value["resistance_kohm"] = _r(reading.resistance_kohm, 1)
        value["alarm"] = reading.alarm.value
        if reading.resistance_kohm <= c.isolation_fault_kohm:
            return Outcome.FAIL, (
                f"insulation {reading.resistance_kohm:.1f} kOhm at or below the fault limit "
                f"{c.isolation_fault_kohm:g} kOhm"
            )
        return Outcome.PASS, "self test passed and insulation above the fault limit"

    async def _fan(self, name: str, value: dict[str, Any]) -> tuple[Outcome, str]:
        c = self.cfg
        thermal = self.thermal
        assert thermal is not None
        before = thermal.fans()[name]
        threshold = c.fan_low_fraction * before.nominal_rpm
        value["previous_duty_percent"] = _r(before.duty_percent, 1)
        self.fan_restore[name] = before.duty_percent
        peak = 0.0
        try:
            await thermal.set_fan_duty(name, 100.0)

            def spun_up() -> float | None:
                nonlocal peak
                rpm = thermal.fans()[name].rpm
                if rpm is None:
                    return None
                peak = max(peak, rpm)
                return rpm if rpm >= threshold else None

            rpm = await _wait_for(spun_up, c.fan_spinup_timeout_s)
            value["rpm"] = round(rpm if rpm is not None else peak)
        finally:
            await self._restore_fan(name, before.duty_percent)
        if rpm is None:
            return Outcome.FAIL, (
                f"{peak:.0f} rpm at 100 % after {c.fan_spinup_timeout_s:g} s "
                f"(expected >= {threshold:.0f} rpm)"
            )
        return Outcome.PASS, f"{rpm:.0f} rpm at 100 %, duty restored to {before.duty_percent:.0f} %"
