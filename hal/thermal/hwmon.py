"""Temperature sensors and cooling fans through Linux hwmon sysfs files.

Implements :class:`hal.interfaces.Thermal`. Every value comes from a file named in
the options, so the same driver reads a real ``/sys/class/hwmon/hwmonN`` and the
files :mod:`hal.sim.hwmon_files` writes:

* ``temp*_input``: millidegree Celsius (integer text);
* ``fan*_input``: rpm (integer text);
* ``pwm*``: fan duty 0..255, read back every poll and written by ``set_fan_duty``;
* ``pwm*_enable`` (optional per fan): set to ``1`` (manual) at ``start()`` and
  restored to its previous content at ``stop()``.

Behaviour:

* A poll task reads every file once per ``poll_interval_s``, inline on the event
  loop (:mod:`hal.sysfs`: a few bytes each); ``temperatures()``/``fans()`` only
  return the last evaluated snapshot and never touch files. ``start()`` returns
  after the first poll.
* A sensor whose file is missing, unreadable, not a number or outside
  -60..250 degC reads ``celsius=None`` with ``FAULT``/``sensor_missing``; other
  sensors are unaffected. Bad reads are counted (``describe()``).
* A sensor above ``max_c`` is ``FAULT``/``over_temperature`` until it has cooled
  to ``max_c - hysteresis_c``.
* A fan commanded above 0 % is expected to turn at ``nominal_rpm x duty / 100``.
  When its rpm stays below ``low_fraction`` x expected for ``grace_s`` it is
  ``DEGRADED``/``fan_low``; if at that point it is below ``stopped_rpm`` it is
  ``FAULT``/``fan_stopped`` (the same grace covers spin-up from standstill). An
  unreadable rpm file gives ``rpm=None`` with ``FAULT``/``sensor_missing``; an
  unreadable or unwritable pwm file gives ``DEGRADED``/``transport_error``.
* ``health()``: OFFLINE before ``start()``; otherwise the worst item: FAULT
  (over_temperature, fan_stopped, sensor_missing of a fan) beats DEGRADED
  (fan_low, transport_error, a missing temperature sensor) beats OK. A single
  missing temperature sensor only degrades the device: the others still read.
* ``stop()`` leaves the fans running at their last duty (the safe state for
  cooling) and stops polling.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from pydantic import Field, model_validator

from hal.config import StrictModel
from hal.context import BuildContext
from hal.interfaces import FanStatus, Health, HealthState, TemperatureReading, monotonic
from hal.tasks import stop_task
from hal.sysfs import read_attr
from hal.tick import sleep_to_grid

log = structlog.get_logger(__name__)

PWM_MAX = 255
PLAUSIBLE_C = (-60.0, 250.0)

SENSOR_MISSING = "sensor_missing"
OVER_TEMPERATURE = "over_temperature"
FAN_LOW = "fan_low"
FAN_STOPPED = "fan_stopped"
TRANSPORT_ERROR = "transport_error"


class SensorOptions(StrictModel):
    name: str = Field(..., min_length=1)
    path: str = Field(..., min_length=1, description="hwmon temp*_input file (millidegree C)")
    max_c: float = Field(..., description="over_temperature above this")
    hysteresis_c: float = Field(
        default=2.0, ge=0.0, le=50.0, description="clears at max_c - hysteresis_c"
    )


class FanOptions(StrictModel):
    name: str = Field(..., min_length=1)
    rpm_path: str = Field(..., min_length=1, description="hwmon fan*_input file (rpm)")
    pwm_path: str = Field(..., min_length=1, description="hwmon pwm* file (0..255)")
    pwm_enable_path: str | None = Field(
        default=None, description="hwmon pwm*_enable; set to 1 (manual)"
    )
    nominal_rpm: float = Field(default=1800.0, gt=0.0, description="rpm at 100 % duty")
    low_fraction: float = Field(default=0.7, gt=0.0, lt=1.0)
    grace_s: float = Field(default=10.0, ge=0.0, le=600.0)
    stopped_rpm: float = Field(
        default=60.0, ge=0.0, description="below this the fan counts as stopped"
    )


def _read_number(path: str) -> float:
    text = read_attr(path)
    return float(int(text)) if text.lstrip("-").isdigit() else float(text)


@dataclass
class _FanState:
    duty: float | None = None  # last known duty (read back or commanded), percent
    rpm: float | None = None
    below_since: float | None = None
    rpm_error: str | None = None
    pwm_error: str | None = None
    enable_error: str | None = None
    health: Health = field(
        default_factory=lambda: Health(HealthState.OFFLINE, None, "not polled yet")
    )


class HwmonThermal:
    """Temperature sensors and fans on hwmon-style sysfs files."""

    class Options(StrictModel):
        poll_interval_s: float = Field(default=1.0, gt=0.0, le=60.0)
        sensors: list[SensorOptions] = Field(default_factory=list)
        fans: list[FanOptions] = Field(default_factory=list)

        @model_validator(mode="after")
        def _unique_names(self) -> HwmonThermal.Options:
            for kind, names in (
                ("sensor", [s.name for s in self.sensors]),
                ("fan", [f.name for f in self.fans]),
            ):
                dupes = sorted({n for n in names if names.count(n) > 1})
                if dupes:
                    raise ValueError(f"duplicate {kind} names: {', '.join(dupes)}")
            return self

    def __init__(self, name: str, options: Options, ctx: BuildContext) -> None:
        self.name = name
        self.options = options
        self._log = log.bind(thermal=name)
        self._sensors = {s.name: s for s in options.sensors}
        self._fan_opts = {f.name: f for f in options.fans}
        offline = Health(HealthState.OFFLINE, None, "not polled yet")
        self._temps: dict[str, TemperatureReading] = {
            s.name: TemperatureReading(s.name, None, offline) for s in options.sensors
        }
        self._over: set[str] = set()
        self._fans: dict[str, _FanState] = {f.name: _FanState() for f in options.fans}
        self._bad_reads = 0
        self._polls = 0
        self._enable_saved: dict[str, str] = {}
        self._started = False
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Switch configured fans to manual PWM, run the first poll, start the poll task."""
        if self._started:
            return
        self._started = True
        await asyncio.to_thread(self._take_manual_control)
        await self._poll_once()
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"thermal-{self.name}"
        )

    async def stop(self) -> None:
        """Stop polling and hand PWM control back (``pwm*_enable`` restored). Idempotent."""
        if not self._started:
            return
        self._started = False
        task, self._task = self._task, None
        await stop_task(task)
        await asyncio.to_thread(self._restore_control)

    # ------------------------------------------------------------------ snapshots

    def temperatures(self) -> Mapping[str, TemperatureReading]:
        return dict(self._temps)

    def fans(self) -> Mapping[str, FanStatus]:
        return {name: self._fan_status(name) for name in self._fans}

    def health(self) -> Health:
        if not self._started:
            return Health(HealthState.OFFLINE, None, "not started")
        faults: list[Health] = []
        degraded: list[Health] = []
        for reading in self._temps.values():
            h = reading.health
            if h.code == SENSOR_MISSING:
                degraded.append(Health(HealthState.DEGRADED, SENSOR_MISSING, h.detail))
            elif h.state is HealthState.FAULT:
                faults.append(h)
        for state in self._fans.values():
            if state.health.state is HealthState.FAULT:
                faults.append(state.health)
            elif state.health.state is HealthState.DEGRADED:
                degraded.append(state.health)
        if faults:
            return faults[0]
        if degraded:
            return degraded[0]
        return Health()

    def describe(self) -> dict[str, Any]:
        """Configured files and live values for ``probe``/``status``."""
        return {
            "driver": "hwmon",
            "name": self.name,
            "poll_interval_s": self.options.poll_interval_s,
            "polls": self._polls,
            "bad_reads": self._bad_reads,
            "sensors": {
                s.name: {"path": s.path, "max_c": s.max_c, "celsius": self._temps[s.name].celsius}
                for s in self.options.sensors
            },
            "fans": {
                f.name: {
                    "rpm_path": f.rpm_path,
                    "pwm_path": f.pwm_path,
                    "rpm": self._fans[f.name].rpm,
                    "duty_percent": self._fans[f.name].duty,
                }
                for f in self.options.fans
            },
            "health": {"state": self.health().state.value, "code": self.health().code},
        }

    # ------------------------------------------------------------------ commands

    async def set_fan_duty(self, fan: str, percent: float) -> None:
        """Write ``percent`` (clamped to 0..100) to the fan's pwm file now.

        Raises ``KeyError`` for an unknown fan and ``ValueError`` for NaN. A failed
        write is logged and shown as ``DEGRADED``/``transport_error`` on the fan
        (the previous duty stays in the snapshot); it does not raise.
        """
        opts = self._fan_opts.get(fan)
        if opts is None:
            raise KeyError(
                f"unknown fan {fan!r} (configured: {', '.join(self._fan_opts) or 'none'})"
            )
        if math.isnan(percent):
            raise ValueError("fan duty must be a number")
        percent = min(100.0, max(0.0, float(percent)))
        raw = round(percent * PWM_MAX / 100.0)
        state = self._fans[fan]
        try:
            await asyncio.to_thread(Path(opts.pwm_path).write_text, f"{raw}\n", "ascii")
        except OSError as exc:
            if state.pwm_error is None:
                self._log.error("fan_pwm_write_failed", fan=fan, path=opts.pwm_path, error=str(exc))
            state.pwm_error = f"cannot write {opts.pwm_path}: {exc}"
            state.health = self._fan_health(fan, monotonic())
            return
        if state.pwm_error is not None:
            self._log.info("fan_pwm_recovered", fan=fan)
        state.pwm_error = None
        if state.duty is None or round(state.duty * PWM_MAX / 100.0) != raw:
            self._log.info("fan_duty_set", fan=fan, duty_percent=round(raw * 100.0 / PWM_MAX, 1))
        state.duty = raw * 100.0 / PWM_MAX
        state.health = self._fan_health(fan, monotonic())

    # ------------------------------------------------------------------ polling

    async def _run(self) -> None:
        while True:
            await sleep_to_grid(self.options.poll_interval_s)
            try:
                await self._poll_once()
            except Exception as exc:  # noqa: BLE001 - keep polling whatever happens
                self._log.exception("thermal_poll_failed", error=str(exc))

    async def _poll_once(self) -> None:
        temps, fans = self._read_all()  # small sysfs attributes: inline, no thread hop
        now = monotonic()
        self._polls += 1
        for name, value in temps.items():
            self._update_sensor(name, value)
        for name, (rpm, duty) in fans.items():
            self._update_fan(name, rpm, duty, now)

    def _read_all(
        self,
    ) -> tuple[dict[str, float | str], dict[str, tuple[float | str, float | str]]]:
        """Read every file; a string result is the reason a read failed."""
        temps: dict[str, float | str] = {}
        for s in self.options.sensors:
            temps[s.name] = self._read_celsius(s.path)
        fans: dict[str, tuple[float | str, float | str]] = {}
        for f in self.options.fans:
            rpm: float | str
            duty: float | str
            try:
                rpm = _read_number(f.rpm_path)
                if rpm < 0 or not math.isfinite(rpm):
                    rpm = f"implausible rpm {rpm:g} in {f.rpm_path}"
            except (OSError, ValueError) as exc:
                rpm = f"cannot read {f.rpm_path}: {exc}"
            try:
                raw = _read_number(f.pwm_path)
                duty = (
                    raw * 100.0 / PWM_MAX
                    if 0 <= raw <= PWM_MAX
                    else f"pwm value {raw:g} out of 0..255"
                )
            except (OSError, ValueError) as exc:
                duty = f"cannot read {f.pwm_path}: {exc}"
            fans[f.name] = (rpm, duty)
        return temps, fans

    @staticmethod
    def _read_celsius(path: str) -> float | str:
        try:
            celsius = _read_number(path) / 1000.0
        except FileNotFoundError:
            return f"{path} does not exist"
        except (OSError, ValueError) as exc:
            return f"cannot read {path}: {exc}"
        if not (PLAUSIBLE_C[0] <= celsius <= PLAUSIBLE_C[1]):
            return f"implausible value {celsius:g} degC in {path}"
        return celsius

    def _update_sensor(self, name: str, value: float | str) -> None:
        opts = self._sensors[name]
        previous = self._temps[name]
        if isinstance(value, str):
            self._bad_reads += 1
            self._over.discard(name)
            health = Health(HealthState.FAULT, SENSOR_MISSING, value)
            if previous.health.code != SENSOR_MISSING:
                self._log.warning("temperature_sensor_missing", sensor=name, detail=value)
            self._temps[name] = TemperatureReading(name, None, health)
            return
        if previous.health.code == SENSOR_MISSING:
            self._log.info("temperature_sensor_back", sensor=name, celsius=value)
        if name in self._over:
            still_over = value > opts.max_c - opts.hysteresis_c
        else:
            still_over = value > opts.max_c
        if still_over and name not in self._over:
            self._log.error("over_temperature", sensor=name, celsius=value, max_c=opts.max_c)
            self._over.add(name)
        elif not still_over and name in self._over:
            self._log.info("over_temperature_cleared", sensor=name, celsius=value)
            self._over.discard(name)
        health = (
            Health(
                HealthState.FAULT,
                OVER_TEMPERATURE,
                f"{name} {value:.1f} degC > {opts.max_c:g} degC",
            )
            if still_over
            else Health()
        )
        self._temps[name] = TemperatureReading(name, value, health)

    def _update_fan(self, name: str, rpm: float | str, duty: float | str, now: float) -> None:
        state = self._fans[name]
        if isinstance(rpm, str):
            self._bad_reads += 1
            if state.rpm_error is None:
                self._log.warning("fan_rpm_unreadable", fan=name, detail=rpm)
            state.rpm_error, state.rpm = rpm, None
        else:
            if state.rpm_error is not None:
                self._log.info("fan_rpm_back", fan=name, rpm=rpm)
            state.rpm_error, state.rpm = None, rpm
        if isinstance(duty, str):
            self._bad_reads += 1
            if state.pwm_error is None:
                self._log.warning("fan_pwm_unreadable", fan=name, detail=duty)
            state.pwm_error = duty
        else:
            if state.pwm_error is not None:
                self._log.info("fan_pwm_back", fan=name)
            state.pwm_error, state.duty = None, duty
        opts = self._fan_opts[name]
        duty_now = state.duty or 0.0
        expected = opts.nominal_rpm * duty_now / 100.0
        below = (
            state.rpm is not None and duty_now > 0.0 and state.rpm < opts.low_fraction * expected
        )
        if below:
            if state.below_since is None:
                state.below_since = now
        else:
            state.below_since = None
        previous = state.health
        state.health = self._fan_health(name, now)
        if state.health.code != previous.code:
            if state.health.code in (FAN_LOW, FAN_STOPPED):
                self._log.error(
                    "fan_fault", fan=name, code=state.health.code, detail=state.health.detail
                )
            elif previous.code in (FAN_LOW, FAN_STOPPED) and state.health.ok:
                self._log.info("fan_recovered", fan=name, rpm=state.rpm)

    def _fan_health(self, name: str, now: float) -> Health:
        state = self._fans[name]
        opts = self._fan_opts[name]
        if state.rpm_error is not None:
            return Health(HealthState.FAULT, SENSOR_MISSING, state.rpm_error)
        if (
            state.below_since is not None
            and now - state.below_since >= opts.grace_s
            and state.rpm is not None
        ):
            duty = state.duty or 0.0
            expected = opts.nominal_rpm * duty / 100.0
            if state.rpm < opts.stopped_rpm:
                return Health(
                    HealthState.FAULT,
                    FAN_STOPPED,
                    f"{name} at {state.rpm:.0f} rpm while commanded {duty:.0f} %",
                )
            return Health(
                HealthState.DEGRADED,
                FAN_LOW,
                f"{name} at {state.rpm:.0f} rpm, expected {expected:.0f} rpm at {duty:.0f} %",
            )
        if state.pwm_error is not None or state.enable_error is not None:
            return Health(
                HealthState.DEGRADED, TRANSPORT_ERROR, state.pwm_error or state.enable_error
            )
        return Health()

    def _fan_status(self, name: str) -> FanStatus:
        state = self._fans[name]
        return FanStatus(
            name=name,
            rpm=state.rpm,
            duty_percent=state.duty if state.duty is not None else 0.0,
            nominal_rpm=self._fan_opts[name].nominal_rpm,
            health=state.health,
        )

    # ------------------------------------------------------------------ pwm_enable

    def _take_manual_control(self) -> None:
        for f in self.options.fans:
            if f.pwm_enable_path is None:
                continue
            try:
                self._enable_saved[f.name] = (
                    Path(f.pwm_enable_path).read_text(encoding="ascii").strip()
                )
                Path(f.pwm_enable_path).write_text("1\n", encoding="ascii")
            except OSError as exc:
                self._fans[f.name].enable_error = f"cannot set {f.pwm_enable_path} to manual: {exc}"
                self._log.error("fan_manual_control_failed", fan=f.name, error=str(exc))

    def _restore_control(self) -> None:
        for f in self.options.fans:
            saved = self._enable_saved.pop(f.name, None)
            if f.pwm_enable_path is None or saved is None:
                continue
            try:
                Path(f.pwm_enable_path).write_text(f"{saved}\n", encoding="ascii")
            except OSError as exc:
                self._log.error("fan_control_restore_failed", fan=f.name, error=str(exc))
