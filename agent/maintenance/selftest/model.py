"""The self test's vocabulary: its config (``[selftest]``), the outcome of a check, the report
and progress events (see :mod:`agent.maintenance.selftest` for the contract).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import Field, model_validator

from agent.utctime import to_iso
from hal.config import StrictModel


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
