"""The built-in hardware self test behind the remote ``run_self_test`` (platform-api §14.2).

:func:`run_self_test` runs a fixed sequence of checks against the HAL devices of the
given connectors and returns a :class:`SelfTestReport`: one :class:`CheckResult` per
check with ``name``, ``result`` (``pass`` / ``fail`` / ``skipped``), the measured
``value``, the ``limit`` it was judged against and a human ``detail``.

Preconditions (the caller's job, not checked here): every connector passed in is
``unavailable`` for the whole run and has no session; nothing else drives its
modules, contactor or pilot meanwhile.

Sequence and limits (names use the connector id ``N``; a check whose device is not
configured is not listed at all):

1. ``temperature_sensors`` -- every configured sensor reads a value, each within
   ``temperature_min_c..temperature_max_c``, and ``max - min <= temperature_max_spread_c``.
2. Per connector, in id order:

   * ``connectorN.meter`` -- two fresh readings (stamped after the check began, the
     second newer than the first) within ``meter_reading_timeout_s``; ``|power| <=
     meter_max_idle_power_kw``; voltage: DC (a connector with power modules)
     ``|V| <= safe_voltage_v``, AC ``ac_min_voltage_v..ac_max_voltage_v`` on L1 (or the
     mean when the meter gives no phases) and on every other phase that carries more
     than :data:`PHASE_PRESENT_V`; energy registers non-negative and not going
     backwards between the two readings.
   * ``connectorN.power_modules.communication`` -- every known module answers (a
     status newer than the check's start) within ``module_answer_timeout_s``.
   * ``connectorN.power_modules.output`` -- skipped (nothing powered) when
     communication failed, when the contactor is not confirmed open, or when the
     modules cannot regulate at or below ``module_max_test_voltage_v``. Test voltage
     ``max(module_test_voltage_v, modules' minimum)`` with the contactor open, current
     limit ``module_test_current_a``: measured voltage within
     ``module_voltage_tolerance_v`` inside ``module_settle_timeout_s``, measured current
     never above the limit; then OFF and below ``safe_voltage_v`` within
     ``discharge_timeout_s``.
   * ``connectorN.contactor`` -- skipped unless the pilot reads A (no vehicle), and
     when the DC output cannot be confirmed below ``safe_voltage_v`` with the modules
     OFF. Close confirmed by the mirror, stays closed for ``contactor_hold_s``, open
     confirmed by the mirror (the driver's own confirmation timeouts apply).
   * ``connectorN.weld`` -- coil off and the mirror reports "open" within
     ``weld_confirm_s``; a latched weld also fails.
   * ``connectorN.imd`` -- once per IMD (an IMD shared by connectors is tested under
     the first one): ``InsulationMonitor.self_test()`` passes, then a reading taken
     after it, not testing, within ``imd_reading_timeout_s``, above
     ``isolation_fault_kohm``.

3. ``fan.<name>`` per fan -- duty set to 100 %, rpm reaches ``fan_low_fraction x
   nominal_rpm`` within ``fan_spinup_timeout_s``; the previous duty is restored.

Behaviour common to every check:

* Each check runs under ``check_timeout_s``; a timeout or an exception makes it
  ``fail`` with the reason (values measured so far are kept). A failing check never
  stops the run.
* The hardware is left safe after every check and after the run, also when the run
  is cancelled or a check raises: contactor coils released, every connector's
  modules commanded OFF, fan duties restored. The final step is shielded from a
  second cancellation (it completes in the background) and bounded by
  ``safe_state_timeout_s`` per device.
* ``progress`` is called with a :class:`SelfTestProgress` when a check starts and
  when it finishes; it must return at once; an exception in it is logged and ignored.
* Cancellation propagates (no report); the hardware is still made safe first.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import structlog
from pydantic import Field, model_validator
from agent.utctime import to_iso, utc_now

if TYPE_CHECKING:  # agent.charging.connector imports agent.config, which imports SelfTestConfig from here
    from agent.charging.connector import ConnectorHardware
from hal.config import StrictModel
from hal.interfaces import ContactorError, InsulationMonitor, PilotState, Thermal, monotonic

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: A phase whose voltage is below this counts as "not wired" (single-phase install).
PHASE_PRESENT_V = 50.0
#: How often the waits below look at the HAL snapshots (s).
POLL_STEP_S = 0.05


class SelfTestConfig(StrictModel):
    """Limits and timings of the self test. Defaults suit a real charger (about 1-2 min)."""

    check_timeout_s: float = Field(90.0, ge=5.0, le=300.0, description="upper bound of any one check")
    safe_state_timeout_s: float = Field(
        10.0, ge=1.0, le=60.0, description="bound per device when making the hardware safe"
    )
    safe_voltage_v: float = Field(
        60.0, gt=0.0, le=60.0, description="DC voltage below which the output counts as safe"
    )
    module_answer_timeout_s: float = Field(5.0, ge=0.5, le=60.0)
    module_test_voltage_v: float = Field(
        60.0, ge=10.0, le=500.0, description="requested test voltage (raised to the modules' minimum)"
    )
    module_max_test_voltage_v: float = Field(
        200.0, ge=10.0, le=500.0, description="never test above this (contactor open)"
    )
    module_test_current_a: float = Field(1.0, gt=0.0, le=5.0, description="current limit while testing")
    module_voltage_tolerance_v: float = Field(10.0, ge=1.0, le=50.0)
    module_settle_timeout_s: float = Field(10.0, ge=0.5, le=60.0)
    discharge_timeout_s: float = Field(10.0, ge=0.5, le=60.0)
    contactor_hold_s: float = Field(0.5, ge=0.0, le=10.0, description="closed time before opening")
    weld_confirm_s: float = Field(2.0, ge=0.1, le=30.0)
    isolation_fault_kohm: float = Field(100.0, ge=1.0, le=10_000.0, description="IEC 61851-23 fault limit")
    imd_reading_timeout_s: float = Field(10.0, ge=0.5, le=60.0)
    meter_reading_timeout_s: float = Field(5.0, ge=0.5, le=60.0)
    meter_max_idle_power_kw: float = Field(0.1, ge=0.0, le=5.0)
    ac_min_voltage_v: float = Field(195.0, ge=90.0, le=300.0)
    ac_max_voltage_v: float = Field(265.0, ge=90.0, le=300.0)
    fan_spinup_timeout_s: float = Field(15.0, ge=1.0, le=120.0)
    fan_low_fraction: float = Field(0.7, gt=0.0, lt=1.0)
    temperature_min_c: float = Field(-30.0, ge=-60.0, le=0.0)
    temperature_max_c: float = Field(120.0, ge=40.0, le=200.0)
    temperature_max_spread_c: float = Field(80.0, ge=10.0, le=200.0)

    @model_validator(mode="after")
    def _consistent(self) -> SelfTestConfig:
        if self.module_test_voltage_v > self.module_max_test_voltage_v:
            raise ValueError("module_test_voltage_v must not exceed module_max_test_voltage_v")
        if self.ac_min_voltage_v >= self.ac_max_voltage_v:
            raise ValueError("ac_min_voltage_v must be below ac_max_voltage_v")
        inner = self.module_settle_timeout_s + self.discharge_timeout_s
        if inner >= self.check_timeout_s:
            raise ValueError(
                "check_timeout_s must exceed module_settle_timeout_s + discharge_timeout_s"
            )
        return self


class Outcome(enum.StrEnum):
    PASS = "pass"
    FAIL = "fail"
    SKIPPED = "skipped"


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One check's verdict. ``value``/``limit`` are JSON-able (numbers, strings, dicts)."""

    name: str
    result: Outcome
    value: Any = None
    limit: Any = None
    detail: str = ""
    duration_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "result": self.result.value,
            "value": self.value,
            "limit": self.limit,
            "detail": self.detail,
            "duration_s": self.duration_s,
        }


@dataclass(frozen=True, slots=True)
class SelfTestReport:
    """The whole run. ``passed`` means no check failed (skipped checks do not fail it)."""

    checks: tuple[CheckResult, ...]
    started_at: datetime
    duration_s: float

    @property
    def passed(self) -> bool:
        return not any(c.result is Outcome.FAIL for c in self.checks)

    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if c.result is Outcome.FAIL]

    def check(self, name: str) -> CheckResult:
        """The result of the check called ``name``; KeyError if it was not run."""
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_details(self) -> dict[str, Any]:
        """The command-status ``details`` object (JSON-able)."""
        counts = {o.value: sum(1 for c in self.checks if c.result is o) for o in Outcome}
        return {
            "passed": self.passed,
            "started_at": to_iso(self.started_at),
            "duration_s": self.duration_s,
            "summary": counts,
            "checks": [c.to_dict() for c in self.checks],
        }


@dataclass(frozen=True, slots=True)
class SelfTestProgress:
    """A check started (``result`` None) or finished; ``index`` counts from 1 to ``total``."""

    name: str
    phase: Literal["started", "finished"]
    index: int
    total: int
    result: CheckResult | None = None

    def __str__(self) -> str:
        tail = f": {self.result.result.value}" if self.result is not None else ""
        return f"{self.index}/{self.total} {self.name} {self.phase}{tail}"


ProgressCallback = Callable[[SelfTestProgress], None]

#: A check fills ``value`` as it measures and returns its verdict and detail.
_CheckFn = Callable[[dict[str, Any]], Awaitable[tuple[Outcome, str]]]


@dataclass(frozen=True, slots=True)
class _Check:
    name: str
    limit: Any
    run: _CheckFn


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


#: Safe-state tasks that outlived a cancelled caller (kept referenced until done).
_SAFE_TASKS: set[asyncio.Task[None]] = set()


@dataclass
class _SelfTest:
    connectors: dict[int, ConnectorHardware]
    thermal: Thermal | None
    cfg: SelfTestConfig
    comm_ok: dict[int, bool] = field(default_factory=dict)
    fan_restore: dict[str, float] = field(default_factory=dict)

    # ------------------------------------------------------------------ plan

    def plan(self) -> list[_Check]:
        c = self.cfg
        checks: list[_Check] = []
        if self.thermal is not None and self.thermal.temperatures():
            checks.append(
                _Check(
                    "temperature_sensors",
                    {
                        "min_c": c.temperature_min_c,
                        "max_c": c.temperature_max_c,
                        "max_spread_c": c.temperature_max_spread_c,
                    },
                    self._temperatures,
                )
            )
        imds_seen: list[InsulationMonitor] = []
        for cid in sorted(self.connectors):
            hw = self.connectors[cid]
            prefix = f"connector{cid}"
            checks.append(_Check(f"{prefix}.meter", self._meter_limit(hw), self._bind(self._meter, cid)))
            if hw.modules is not None:
                checks.append(
                    _Check(
                        f"{prefix}.power_modules.communication",
                        {"answer_within_s": c.module_answer_timeout_s},
                        self._bind(self._module_comm, cid),
                    )
                )
                checks.append(
                    _Check(
                        f"{prefix}.power_modules.output",
                        {
                            "test_voltage_v": c.module_test_voltage_v,
                            "max_test_voltage_v": c.module_max_test_voltage_v,
                            "tolerance_v": c.module_voltage_tolerance_v,
                            "current_limit_a": c.module_test_current_a,
                            "safe_voltage_v": c.safe_voltage_v,
                            "settle_within_s": c.module_settle_timeout_s,
                            "discharge_within_s": c.discharge_timeout_s,
                        },
                        self._bind(self._module_output, cid),
                    )
                )
            checks.append(
                _Check(
                    f"{prefix}.contactor",
                    {"mirror": "confirms closed, then open", "hold_s": c.contactor_hold_s},
                    self._bind(self._contactor, cid),
                )
            )
            checks.append(
                _Check(
                    f"{prefix}.weld",
                    {"mirror": "open with the coil off", "within_s": c.weld_confirm_s},
                    self._bind(self._weld, cid),
                )
            )
            if hw.imd is not None and not any(hw.imd is seen for seen in imds_seen):
                imds_seen.append(hw.imd)
                checks.append(
                    _Check(
                        f"{prefix}.imd",
                        {"self_test": "passed", "min_resistance_kohm": c.isolation_fault_kohm},
                        self._bind(self._imd, cid),
                    )
                )
        if self.thermal is not None:
            for name, fan in sorted(self.thermal.fans().items()):
                checks.append(
                    _Check(
                        f"fan.{name}",
                        {
                            "min_rpm": round(c.fan_low_fraction * fan.nominal_rpm),
                            "at_duty_percent": 100.0,
                            "within_s": c.fan_spinup_timeout_s,
                        },
                        self._bind_fan(name),
                    )
                )
        return checks

    def _bind(
        self, fn: Callable[[int, dict[str, Any]], Awaitable[tuple[Outcome, str]]], cid: int
    ) -> _CheckFn:
        async def run(value: dict[str, Any]) -> tuple[Outcome, str]:
            return await fn(cid, value)

        return run

    def _bind_fan(self, name: str) -> _CheckFn:
        async def run(value: dict[str, Any]) -> tuple[Outcome, str]:
            return await self._fan(name, value)

        return run

    def _meter_limit(self, hw: ConnectorHardware) -> dict[str, Any]:
        c = self.cfg
        if hw.modules is not None:
            voltage: dict[str, Any] = {"max_abs_voltage_v": c.safe_voltage_v}
        else:
            voltage = {"min_voltage_v": c.ac_min_voltage_v, "max_voltage_v": c.ac_max_voltage_v}
        return {
            "max_abs_power_kw": c.meter_max_idle_power_kw,
            **voltage,
            "energy": "non-negative, not decreasing",
            "fresh_within_s": c.meter_reading_timeout_s,
        }

    # ------------------------------------------------------------------ execution

    async def execute(self, check: _Check) -> CheckResult:
        value: dict[str, Any] = {}
        t0 = time.monotonic()
        outcome: Outcome
        detail: str
        timeout = asyncio.timeout(self.cfg.check_timeout_s)
        try:
            async with timeout:
                outcome, detail = await check.run(value)
        except TimeoutError as exc:
            outcome = Outcome.FAIL
            if timeout.expired():
                detail = f"timed out after {self.cfg.check_timeout_s:g} s"
            else:
                detail = f"TimeoutError: {exc}" if str(exc) else "TimeoutError"
        except ContactorError as exc:
            outcome, detail = Outcome.FAIL, f"{exc.code}: {exc.detail}"
        except Exception as exc:  # noqa: BLE001 - a check that raises is a failed check
            log.warning("self_test_check_raised", check=check.name, error=repr(exc))
            outcome, detail = Outcome.FAIL, f"{type(exc).__name__}: {exc}"
        return CheckResult(
            name=check.name,
            result=outcome,
            value=value or None,
            limit=check.limit,
            detail=detail,
            duration_s=round(time.monotonic() - t0, 3),
        )

    # ------------------------------------------------------------------ safe state

    async def make_safe(self) -> None:
        """Coils released, every connector's modules OFF, fan duties restored."""
        bound = self.cfg.safe_state_timeout_s
        for hw in self.connectors.values():
            if hw.contactor.status().coil_energised:
                hw.contactor.release()
        for cid, hw in self.connectors.items():
            if hw.modules is None:
                continue
            try:
                await asyncio.wait_for(hw.modules.output_off(), bound)
            except Exception as exc:  # noqa: BLE001 - keep making the rest safe
                log.error("self_test_modules_off_failed", connector=cid, error=repr(exc))
        for name, duty in list(self.fan_restore.items()):
            await self._restore_fan(name, duty)

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


def _notify(progress: ProgressCallback | None, event: SelfTestProgress) -> None:
    if progress is None:
        return
    try:
        progress(event)
    except Exception as exc:  # noqa: BLE001 - reporting must not break the test
        log.warning("self_test_progress_callback_failed", error=repr(exc))


async def run_self_test(
    connectors: Mapping[int, ConnectorHardware],
    thermal: Thermal | None,
    config: SelfTestConfig,
    *,
    progress: ProgressCallback | None = None,
) -> SelfTestReport:
    """Run every applicable check (module docstring) and return the report.

    The hardware is made safe at the end in every case, including cancellation
    (which then propagates) and a failing check. ``connectors`` must be unavailable
    and idle for the whole run (the caller's job).
    """
    run = _SelfTest(dict(connectors), thermal, config)
    checks = run.plan()
    started_at = utc_now()
    t0 = time.monotonic()
    results: list[CheckResult] = []
    log.info("self_test_started", checks=[c.name for c in checks])
    try:
        for index, check in enumerate(checks, start=1):
            _notify(progress, SelfTestProgress(check.name, "started", index, len(checks)))
            result = await run.execute(check)
            results.append(result)
            log.info(
                "self_test_check",
                check=result.name,
                result=result.result.value,
                detail=result.detail,
                value=result.value,
            )
            _notify(progress, SelfTestProgress(check.name, "finished", index, len(checks), result))
    finally:
        safe = asyncio.get_running_loop().create_task(run.make_safe(), name="self-test-safe-state")
        _SAFE_TASKS.add(safe)
        safe.add_done_callback(_SAFE_TASKS.discard)
        with contextlib.suppress(Exception):
            await asyncio.shield(safe)
    report = SelfTestReport(tuple(results), started_at, round(time.monotonic() - t0, 3))
    log.info(
        "self_test_finished",
        passed=report.passed,
        failed=[c.name for c in report.failed()],
        duration_s=report.duration_s,
    )
    return report
