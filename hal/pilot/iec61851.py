"""IEC 61851-1 control pilot on Linux IIO (ADC) and sysfs PWM, plus an optional HLC data file.

Implements :class:`hal.interfaces.Vehicle` for one connector.

**Pilot measurement.** The CP high level is read from an IIO ADC channel::

    mV at the ADC = in_voltageN_raw x in_voltageN_scale          (IIO convention)
    CP volts      = mV / 1000 x divider_ratio + offset_v          (board front end)

The front end must present the *high* level of the PWM to the ADC (peak hold or
sampling synchronised to the PWM high phase). One sample is taken every
``poll_interval_s`` while a PWM duty offers charging, and every
``idle_poll_interval_s`` while the PWM is at 100 % or 0 % (no current can flow then,
so only plug-in detection waits on it), on the shared tick grid and read inline (a
few bytes of sysfs; the scale file every ``scale_reread_s``). It is classified into
a window of +/- ``window_v`` around the nominal levels 12/9/6/3/0/-12 V
(A/B/C/D/E/F); a value in no window classifies as UNKNOWN. A new classification is
published after ``debounce_samples`` equal samples in a row. If no sample could be
read for :meth:`Iec61851Vehicle.stale_limit` (``stale_after_s``, or two sample
periods if longer) the pilot is UNKNOWN at once with ``STALE``/``comm_timeout``; a
published out-of-window UNKNOWN has ``FAULT``/``pilot_error``. Until the first
debounced state the pilot is UNKNOWN with ``STALE`` (no code) and is sampled every
``poll_interval_s`` whatever the duty, so it settles within the agent's pilot-error
grace at start-up and after an outage. ``plugged`` is true in B/C/D, ``ev_ready`` in C/D.

**PWM output.** Linux sysfs PWM channel ``pwm_dir`` (already exported, e.g.
``/sys/class/pwm/pwmchip0/pwm0``): ``period`` = 1 000 000 ns (1 kHz),
``duty_cycle`` in ns, ``enable`` = 1. 100 % is a constant high level (X1, no PWM),
0 % a constant low level which the front end turns into -12 V (state F).
``start()`` drives 100 %; ``stop()`` drives 0 % (state F: "EVSE not available",
because nothing controls the charger any more). sysfs PWM keeps its setting when
the process dies; the contactor's GPIO release is what makes that safe. A PWM
channel that is missing or unwritable gives ``FAULT``/``transport_error`` and is
retried every second; ``set_pwm_duty`` does not raise for it.

**HLC data** (``hlc = "file"``): ISO 15118 / DIN 70121 themselves are out of
scope here. An HLC stack (or :mod:`hal.sim.pilot_files`) owns the session and
keeps a JSON document at ``hlc_path`` up to date, replacing it atomically at
least every ``hlc_stale_after_s / 2`` seconds::

    {"soc": 55, "target_voltage": 431.0, "target_current": 120.0,
     "max_discharge_current": null, "discharge_allowed": false,
     "discharge_refusal": null, "vin": "WVWZZZ..."}

Every key is optional (``null``/absent = unknown); unknown keys are ignored.
Freshness is judged by the file changing (inode/mtime/size), checked every
``hlc_check_interval_s`` with the next pilot sample and measured on the
monotonic clock; a file first seen already older than ``hlc_stale_after_s``
(wall-clock mtime) is stale. A document that does not parse is counted and
ignored (it neither updates the values nor refreshes them). The values are
reported only while fresh *and* while the pilot shows a plugged EV (B/C/D), so a
previous session's data never leaks into the next one. Stale HLC data makes the
device ``DEGRADED``/``comm_timeout`` (the pilot itself is still trusted).
With ``hlc = "none"`` those fields are always ``None``.

Why one module of ~520 lines: one driver (ADC sampling, PWM, debouncing, HLC file) whose
parts run on one sample clock.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hal.config import StrictModel
from hal.context import BuildContext
from hal.interfaces import Health, HealthState, PilotState, VehicleStatus, monotonic
from hal.tasks import stop_task
from hal.sysfs import read_attr
from hal.tick import sleep_to_grid

log = structlog.get_logger(__name__)

PWM_PERIOD_NS = 1_000_000  # 1 kHz
PWM_RETRY_S = 1.0

#: nominal CP high level per state (IEC 61851-1)
NOMINAL_V: dict[PilotState, float] = {
    PilotState.A: 12.0,
    PilotState.B: 9.0,
    PilotState.C: 6.0,
    PilotState.D: 3.0,
    PilotState.E: 0.0,
    PilotState.F: -12.0,
}
PLUGGED = frozenset({PilotState.B, PilotState.C, PilotState.D})
READY = frozenset({PilotState.C, PilotState.D})


def classify(volts: float, window_v: float) -> PilotState:
    """The state whose nominal level is within ``window_v`` of ``volts``, else UNKNOWN."""
    for state, nominal in NOMINAL_V.items():
        if abs(volts - nominal) <= window_v:
            return state
    return PilotState.UNKNOWN


def duty_to_ns(percent: float, period_ns: int = PWM_PERIOD_NS) -> int:
    """PWM ``duty_cycle`` in ns for ``percent`` of ``period_ns``."""
    return round(period_ns * percent / 100.0)


class HlcDocument(BaseModel):
    """The HLC integration file. All fields optional; unknown keys ignored."""

    model_config = ConfigDict(extra="ignore")

    soc: float | None = Field(default=None, ge=0.0, le=100.0)
    target_voltage: float | None = Field(default=None, ge=0.0)
    target_current: float | None = Field(default=None, ge=0.0)
    max_discharge_current: float | None = Field(default=None, ge=0.0)
    discharge_allowed: bool | None = None
    discharge_refusal: str | None = None
    vin: str | None = None


@dataclass(frozen=True, slots=True)
class _Sample:
    volts: float | None
    error: str | None


class Iec61851Vehicle:
    """Control pilot (IIO ADC in, sysfs PWM out) and optional HLC data for one connector."""

    class Options(StrictModel):
        poll_interval_s: float = Field(default=0.05, gt=0.0, le=1.0)
        idle_poll_interval_s: float = Field(
            default=0.5, gt=0.0, le=1.0,
            description=(
                "sample period while no charging is offered (PWM at 100 % or 0 %): the EV "
                "cannot draw current then, so only plug-in detection waits on it "
                "(debounce_samples periods); 0.5 s is the idle control tick, so both share "
                "one wake-up. Until a first state is known the pilot samples at poll_interval_s."
            ),
        )
        adc_raw_path: str = Field(..., min_length=1, description="IIO in_voltageN_raw")
        adc_scale_path: str = Field(
            ..., min_length=1, description="IIO in_voltageN_scale (mV per LSB)"
        )
        divider_ratio: float = Field(..., description="CP volts per ADC volt")
        offset_v: float = Field(
            default=0.0, description="added after scaling (level-shifted front ends)"
        )
        pwm_dir: str = Field(
            ..., min_length=1, description="exported sysfs PWM channel, e.g. .../pwmchip0/pwm0"
        )
        window_v: float = Field(
            default=1.0, gt=0.0, le=1.45, description="+/- around 12/9/6/3/0/-12 V"
        )
        debounce_samples: int = Field(default=3, ge=1, le=100)
        stale_after_s: float = Field(
            default=0.5, gt=0.0, le=60.0, description="no ADC sample for this long"
        )
        hlc: Literal["none", "file"] = "none"
        hlc_path: str | None = Field(
            default=None, description="JSON document kept by the HLC stack"
        )
        hlc_stale_after_s: float = Field(default=2.0, gt=0.0, le=600.0)
        hlc_check_interval_s: float = Field(
            default=0.5, gt=0.0, le=60.0,
            description="how often the HLC file is checked for a change (with the next pilot sample)",
        )
        scale_reread_s: float = Field(
            default=1.0, ge=0.0, le=60.0,
            description="re-read in_voltageN_scale this often (it only changes with the ADC range); 0: every sample",
        )

        @model_validator(mode="after")
        def _consistent(self) -> Iec61851Vehicle.Options:
            if self.divider_ratio == 0 or not math.isfinite(self.divider_ratio):
                raise ValueError("divider_ratio must be a non-zero number")
            if self.hlc == "file" and not self.hlc_path:
                raise ValueError("hlc = 'file' needs 'hlc_path'")
            if self.hlc == "none" and self.hlc_path is not None:
                raise ValueError("'hlc_path' is only used with hlc = 'file'")
            return self

    def __init__(self, name: str, options: Options, ctx: BuildContext) -> None:
        self.name = name
        self.options = options
        self.connector_id = ctx.connector_id
        self._log = log.bind(vehicle=name, connector=ctx.connector_id)
        self._pwm = Path(options.pwm_dir)
        self._started = False
        self._started_at = 0.0
        self._task: asyncio.Task[None] | None = None
        # pilot
        self._published = PilotState.UNKNOWN
        self._have_state = False
        self._candidate: PilotState | None = None
        self._candidate_count = 0
        self._last_volts: float | None = None
        self._last_good_at: float | None = None
        self._stale = False
        self._stale_after = 0.0
        self._sample_error: str | None = None
        self._bad_samples = 0
        # pwm
        self._duty = 100.0
        self._pwm_ready = False
        self._pwm_error: str | None = None
        self._pwm_retry_at = 0.0
        # hlc
        self._hlc_doc: HlcDocument | None = None
        self._hlc_key: tuple[int, int, int] | None = None
        self._hlc_checked_at = -math.inf
        self._scale_text: str | None = None
        self._scale_read_at = -math.inf
        self._hlc_fresh_at: float | None = None
        self._hlc_bad = 0
        self._hlc_was_stale: bool | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Drive 100 % (no PWM), take the first sample, start the poll task (idempotent)."""
        if self._started:
            return
        self._started = True
        self._duty = 100.0
        self._started_at = monotonic()
        await self._apply_pwm()
        await self.sample_now()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"pilot-{self.name}")

    async def stop(self) -> None:
        """Stop sampling and drive 0 % (state F, EVSE not available). Idempotent."""
        if not self._started:
            return
        self._started = False
        task, self._task = self._task, None
        await stop_task(task)
        self._duty = 0.0
        await self._apply_pwm()
        self._log.info("pilot_stopped", pwm_duty_percent=0.0)

    # ------------------------------------------------------------------ commands

    async def set_pwm_duty(self, percent: float) -> None:
        """Drive the CP PWM at ``percent`` (0..100; 100 = constant high, 0 = state F).

        Raises ``ValueError`` outside 0..100 or for NaN. Write failures are reported
        through ``health()`` (``FAULT``/``transport_error``), not raised.
        """
        if math.isnan(percent) or not 0.0 <= percent <= 100.0:
            raise ValueError(f"PWM duty must be 0..100 %, got {percent}")
        previous = self._duty
        self._duty = float(percent)
        if self._duty == previous and self._pwm_ready and self._pwm_error is None:
            return  # already on the wire: the control loop re-asserts its duty every tick
        await self._apply_pwm()
        if self._duty != previous and self._pwm_error is None:
            self._log.info("pilot_pwm_set", pwm_duty_percent=self._duty, previous=previous)

    # ------------------------------------------------------------------ snapshots

    def status(self) -> VehicleStatus:
        pilot = self._published if not self._stale else PilotState.UNKNOWN
        doc = self._hlc_document() if pilot in PLUGGED else None
        return VehicleStatus(
            pilot=pilot,
            plugged=pilot in PLUGGED,
            ev_ready=pilot in READY,
            pwm_duty_percent=self._duty,
            soc=round(doc.soc) if doc is not None and doc.soc is not None else None,
            target_voltage=doc.target_voltage if doc is not None else None,
            target_current=doc.target_current if doc is not None else None,
            max_discharge_current=doc.max_discharge_current if doc is not None else None,
            discharge_allowed=doc.discharge_allowed if doc is not None else None,
            discharge_refusal=doc.discharge_refusal if doc is not None else None,
            vin=doc.vin if doc is not None else None,
            taken_at=self._last_good_at or 0.0,
            health=self.health(),
        )

    def health(self) -> Health:
        if not self._started:
            return Health(HealthState.OFFLINE, None, "not started")
        if self._stale:
            return Health(
                HealthState.STALE,
                "comm_timeout",
                f"no pilot sample for {self._stale_after:g} s: {self._sample_error}",
            )
        if self._pwm_error is not None:
            return Health(HealthState.FAULT, "transport_error", self._pwm_error)
        if not self._have_state:
            return Health(
                HealthState.STALE,
                None,
                f"waiting for {self.options.debounce_samples} consistent pilot samples",
            )
        if self._published is PilotState.UNKNOWN:
            volts = f"{self._last_volts:.2f} V" if self._last_volts is not None else "no value"
            return Health(
                HealthState.FAULT, "pilot_error", f"CP level {volts} outside every state window"
            )
        if self.options.hlc == "file" and self._hlc_document() is None:
            return Health(
                HealthState.DEGRADED,
                "comm_timeout",
                f"HLC data in {self.options.hlc_path} missing or stale",
            )
        return Health()

    def describe(self) -> dict[str, Any]:
        """Configuration and live values for ``probe``/``status``."""
        return {
            "driver": "iec61851",
            "name": self.name,
            "connector_id": self.connector_id,
            "adc_raw_path": self.options.adc_raw_path,
            "pwm_dir": self.options.pwm_dir,
            "cp_volts": self._last_volts,
            "pilot": self.status().pilot.value,
            "pwm_duty_percent": self._duty,
            "bad_samples": self._bad_samples,
            "hlc": self.options.hlc,
            "hlc_path": self.options.hlc_path,
            "hlc_bad_documents": self._hlc_bad,
            "health": {"state": self.health().state.value, "code": self.health().code},
        }

    # ------------------------------------------------------------------ sampling

    def sample_period(self) -> float:
        """``idle_poll_interval_s`` while no charging is offered (PWM 100 %/0 %) and a pilot
        state is known; else ``poll_interval_s``. Until the first debounced state (start-up,
        samples back after an outage) the pilot samples fast, so the state is known after
        ``debounce_samples`` poll periods (0.15 s by default), inside the agent's 0.5 s
        pilot-error grace, instead of after as many idle periods (1-1.5 s: every start-up
        would raise and clear a pilot fault)."""
        if self._have_state and self._duty in (0.0, 100.0):
            return max(self.options.idle_poll_interval_s, self.options.poll_interval_s)
        return self.options.poll_interval_s

    def stale_limit(self) -> float:
        """How long without a good sample makes the pilot stale: ``stale_after_s``, or two
        sample periods if that is longer (one missed sample at the idle period is no outage)."""
        return max(self.options.stale_after_s, 2.0 * self.sample_period())

    async def _run(self) -> None:
        while True:
            await sleep_to_grid(self.sample_period())
            try:
                await self.sample_now()
                if not self._pwm_ready and monotonic() >= self._pwm_retry_at:
                    await self._apply_pwm()
            except Exception as exc:  # noqa: BLE001 - keep sampling whatever happens
                self._log.exception("pilot_poll_failed", error=str(exc))

    async def sample_now(self) -> None:
        """Take one pilot sample (and read the HLC file) now, exactly as the poll task does.

        ``start()`` uses it for the first sample; ``probe`` and tests can use it to
        step the debounce deterministically.
        """
        # a few bytes from sysfs (and a stat of the HLC file): inline, no thread hop
        sample, hlc = self._read_inputs()
        now = monotonic()
        self._on_sample(sample, now)
        if hlc is not None:
            self._on_hlc(hlc, now)

    def _read_inputs(
        self,
    ) -> tuple[_Sample, tuple[tuple[int, int, int] | None, float, str | None] | None]:
        """One ADC sample, and (every ``hlc_check_interval_s``) the HLC file if it changed."""
        hlc = None
        if self.options.hlc == "file":
            now = monotonic()
            if now - self._hlc_checked_at >= self.options.hlc_check_interval_s:
                self._hlc_checked_at = now
                hlc = self._read_hlc()
        return self._read_adc(), hlc

    def _read_adc(self) -> _Sample:
        o = self.options
        try:
            raw_text = read_attr(o.adc_raw_path)
            now = monotonic()
            if self._scale_text is None or now - self._scale_read_at >= o.scale_reread_s:
                self._scale_text = read_attr(o.adc_scale_path)
                self._scale_read_at = now
            scale_text = self._scale_text
        except OSError as exc:
            self._scale_text = None
            return _Sample(None, f"cannot read ADC: {exc}")
        try:
            raw = int(raw_text)
            scale = float(scale_text)
        except ValueError:
            return _Sample(None, f"ADC files hold {raw_text[:16]!r} / {scale_text[:16]!r}")
        if not math.isfinite(scale) or scale <= 0:
            return _Sample(None, f"ADC scale {scale_text!r} is not a positive number")
        return _Sample(raw * scale / 1000.0 * o.divider_ratio + o.offset_v, None)

    def _on_sample(self, sample: _Sample, now: float) -> None:
        if sample.volts is None:
            self._bad_samples += 1
            if self._sample_error != sample.error:
                self._log.warning("pilot_sample_failed", error=sample.error)
            self._sample_error = sample.error
            since = self._last_good_at if self._last_good_at is not None else self._started_at
            if not self._stale and now - since >= self.stale_limit():
                self._stale = True
                self._stale_after = self.stale_limit()  # for the message: the limit that ran out
                self._candidate, self._candidate_count = None, 0
                self._have_state = False
                self._log.error("pilot_stale", error=sample.error)
            return
        if self._stale:
            self._log.info("pilot_samples_back", cp_volts=round(sample.volts, 2))
        self._stale = False
        self._sample_error = None
        self._last_good_at = now
        self._last_volts = sample.volts
        state = classify(sample.volts, self.options.window_v)
        if self._have_state and state is self._published:
            self._candidate, self._candidate_count = None, 0
            return
        if state is self._candidate:
            self._candidate_count += 1
        else:
            self._candidate, self._candidate_count = state, 1
        if self._candidate_count >= self.options.debounce_samples:
            previous = self._published if self._have_state else None
            self._published = state
            self._have_state = True
            self._candidate, self._candidate_count = None, 0
            event = "pilot_state_unknown" if state is PilotState.UNKNOWN else "pilot_state"
            self._log.info(
                event,
                state=state.value,
                previous=previous.value if previous is not None else None,
                cp_volts=round(sample.volts, 2),
            )

    # ------------------------------------------------------------------ pwm

    async def _apply_pwm(self) -> None:
        duty_ns = duty_to_ns(self._duty)
        try:
            await asyncio.to_thread(self._write_pwm, duty_ns)
        except OSError as exc:
            detail = f"PWM channel {self._pwm}: {exc}"
            if not self._pwm.is_dir():
                detail = f"PWM channel {self._pwm} does not exist (export it via the pwmchip's 'export' file)"
            if self._pwm_error != detail:
                self._log.error("pilot_pwm_failed", detail=detail)
            self._pwm_error = detail
            self._pwm_ready = False
            self._pwm_retry_at = monotonic() + PWM_RETRY_S
            return
        if self._pwm_error is not None:
            self._log.info("pilot_pwm_recovered", pwm_duty_percent=self._duty)
        self._pwm_error = None
        self._pwm_ready = True

    def _write_pwm(self, duty_ns: int) -> None:
        """Worker thread: period (once), duty, enable -- in an order sysfs accepts."""
        if not self._pwm_ready:
            try:
                period = int((self._pwm / "period").read_text(encoding="ascii").strip() or "0")
            except ValueError:
                period = -1
            if period != PWM_PERIOD_NS:
                # duty_cycle may never exceed period: shrink it first
                (self._pwm / "duty_cycle").write_text("0\n", encoding="ascii")
                (self._pwm / "period").write_text(f"{PWM_PERIOD_NS}\n", encoding="ascii")
        (self._pwm / "duty_cycle").write_text(f"{duty_ns}\n", encoding="ascii")
        if (self._pwm / "enable").read_text(encoding="ascii").strip() != "1":
            (self._pwm / "enable").write_text("1\n", encoding="ascii")

    # ------------------------------------------------------------------ hlc

    def _read_hlc(self) -> tuple[tuple[int, int, int] | None, float, str | None]:
        """(file identity, wall-clock age, content if it changed)."""
        assert self.options.hlc_path is not None
        try:
            st = os.stat(self.options.hlc_path)
        except OSError:
            return None, math.inf, None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        age = max(0.0, time.time() - st.st_mtime)
        if key == self._hlc_key:
            return key, age, None
        try:
            text = Path(self.options.hlc_path).read_text(encoding="utf-8")
        except OSError:
            return None, math.inf, None
        return key, age, text

    def _on_hlc(
        self, hlc: tuple[tuple[int, int, int] | None, float, str | None], now: float
    ) -> None:
        key, age, text = hlc
        if key is None:
            self._hlc_doc, self._hlc_key, self._hlc_fresh_at = None, None, None
        elif text is not None:
            first = self._hlc_key is None
            self._hlc_key = key
            try:
                doc = HlcDocument.model_validate(json.loads(text))
            except (ValueError, ValidationError) as exc:
                self._hlc_bad += 1
                self._log.warning(
                    "hlc_document_invalid", path=self.options.hlc_path, error=str(exc)[:200]
                )
            else:
                self._hlc_doc = doc
                self._hlc_fresh_at = now - age if first else now
        stale = self._hlc_document() is None
        if stale != self._hlc_was_stale:
            if stale:
                self._log.warning("hlc_data_stale", path=self.options.hlc_path)
            elif self._hlc_was_stale is not None:
                self._log.info("hlc_data_fresh", path=self.options.hlc_path)
            self._hlc_was_stale = stale

    def _hlc_document(self) -> HlcDocument | None:
        if self._hlc_doc is None or self._hlc_fresh_at is None:
            return None
        if monotonic() - self._hlc_fresh_at > self.options.hlc_stale_after_s:
            return None
        return self._hlc_doc
