"""Running a self test: the plan of applicable checks, each bounded in time, progress events,
and the hardware made safe at the end whatever happens (:func:`run_self_test`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from agent.maintenance.selftest.checks import _Checks
from agent.maintenance.selftest.model import (
    CheckResult,
    Outcome,
    ProgressCallback,
    SelfTestConfig,
    SelfTestProgress,
    SelfTestReport,
)
from agent.utctime import utc_now
from hal.interfaces import ContactorError, InsulationMonitor, Thermal

if TYPE_CHECKING:  # agent.charging.connector imports agent.config, which imports SelfTestConfig from here
    from agent.charging.connector import ConnectorHardware


log = structlog.get_logger(__name__)


#: A check fills ``value`` as it measures and returns its verdict and detail.
_CheckFn = Callable[[dict[str, Any]], Awaitable[tuple[Outcome, str]]]


@dataclass(frozen=True, slots=True)
class _Check:
    name: str
    limit: Any
    run: _CheckFn


#: Safe-state tasks that outlived a cancelled caller (kept referenced until done).
_SAFE_TASKS: set[asyncio.Task[None]] = set()


class _SelfTest(_Checks):
    """One run: the plan of applicable checks, their execution and the final safe state."""

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
    # the checks wait for fresh readings: the pollers keep their normal period meanwhile
    paces = {id(hw.pace): hw.pace for hw in connectors.values() if hw.pace is not None}
    with contextlib.ExitStack() as busy:
        for pace in paces.values():
            busy.enter_context(pace.busy_while("self_test"))
        await _run_checks(run, checks, results, progress)
    report = SelfTestReport(tuple(results), started_at, round(time.monotonic() - t0, 3))
    log.info(
        "self_test_finished",
        passed=report.passed,
        failed=[c.name for c in report.failed()],
        duration_s=report.duration_s,
    )
    return report


async def _run_checks(
    run: _SelfTest, checks: list[_Check], results: list[CheckResult], progress: ProgressCallback | None
) -> None:
    """Execute ``checks`` in order into ``results``; the hardware is made safe at the end in every case."""
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
