"""Bender ISOMETER isoCHA425HV insulation monitor (Modbus RTU, holding registers).

Measurement channels are 4 holding registers each (FC 03):

* reg+0..+1: value, float32 high word first;
* reg+2 high byte "AT&T": bits 0..2 alarm type (0 none, 1 prewarning, 2 device
  error, 4 warning, 5 alarm; 3, 6, 7 reserved), bits 6..7 test type (0 none,
  1 internal test, 2 external/manual test);
* reg+2 low byte "R&U": bits 0..4 unit (2 = ohm, 4 = V, ...), bits 6..7 validity
  (0 exact, 1 true value is lower, 2 true value is higher, 3 invalid);
* reg+3: channel description code.

Channel 1000 is the insulation resistance R_F (ohm), channel 1008 the system
voltage U_n (DC+ to DC-, V). Self test: write 0x5445 ("TE") to register 8005 with
FC 16. Device enable: register 3026 (1 measuring, 0 stopped).

Where the field-proven EVerest driver and the register documents differ, the
EVerest behaviour is the default and the other is an option:

* ``device_enable = true``: 3026 is written to 1 (FC 16) before the first reading,
  so a device left disabled measures again; retried every poll until the device
  confirmed it; a device that answers with a Modbus exception (no such register)
  is logged once and read anyway. ``false`` leaves the register alone.
* ``alarm_code_2_in_test = "reserved"``: alarm type 2 while the test bits are set is
  not a device error (EVerest treats it as reserved there); after the test it is.
  ``"device_error"`` reads it as a device error during the test too.

Contract (on top of :class:`hal.interfaces.InsulationMonitor` and
:class:`hal.modbus.poller.PolledDevice`):

* Each poll reads channel 1000; channel 1008 is read too unless a test runs.
  ``resistance_kohm`` is ``None`` while a test runs, while the device reports a
  device error, and when the validity bits say "invalid"; ``voltage`` is ``None``
  during a test or when invalid. Values flagged "true value is lower/higher" are
  published as they are (they are bounds; thresholds stay conservative).
* Garbage (reserved alarm code, wrong unit code, NaN/inf/negative value) is
  counted and discarded.
* Health: device error -> ``FAULT``/``imd_device_error``; R_F below
  ``alarm_kohm`` or device alarm type "alarm" -> ``FAULT``/``isolation_low``;
  R_F below ``warning_kohm`` or device "warning"/"prewarning" ->
  ``DEGRADED``/``isolation_warning``. While a test runs the previous isolation
  verdict is kept (a test never clears a low-isolation fault). Readings stay
  published while FAULT (an IMD alarm is information, not a reason to hide it).
* ``self_test()`` (one at a time): writes the start command, waits for the test
  bits to become set (if they are not seen within ``self_test_start_s`` the result
  is ``passed=False``, "self test did not start" -- a missed start is never
  reported as a pass) and then to return to "no test"; the test failed if the
  device then reports a device error. Whole procedure bounded by
  ``self_test_timeout_s`` (``passed=False``, detail ``"timeout"``). Transient read
  failures while waiting are tolerated until the deadline.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, model_validator

from hal.context import BuildContext
from hal.interfaces import (
    Health,
    HealthState,
    IsolationAlarm,
    IsolationReading,
    SelfTestResult,
    monotonic,
)
from hal.modbus.link import ModbusLinkError, decode_float32
from hal.modbus.poller import DeviceDataError, PolledDevice, PolledOptions, resolve_link

#: PDU start register of the R_F (insulation resistance) channel.
CHANNEL_RF = 1000
#: PDU start register of the U_n (DC+ to DC-) channel.
CHANNEL_UN = 1008
#: Registers per measurement channel.
CHANNEL_REGISTERS = 4
#: Register to write the self-test command to, and the command ("TE").
SELF_TEST_REGISTER = 8005
SELF_TEST_COMMAND = 0x5445
#: Device enable register: 1 = measuring, 0 = measurement stopped.
DEVICE_ENABLE_REGISTER = 3026

UNIT_OHM = 2
UNIT_VOLT = 4

ALARM_CODES: dict[int, IsolationAlarm] = {
    0: IsolationAlarm.NONE,
    1: IsolationAlarm.PREWARNING,
    2: IsolationAlarm.DEVICE_ERROR,
    4: IsolationAlarm.WARNING,
    5: IsolationAlarm.ALARM,
}
TEST_TYPES: dict[int, str] = {0: "none", 1: "internal", 2: "external", 3: "unknown"}
Validity = Literal["exact", "lower", "higher", "invalid"]
VALIDITY: dict[int, Validity] = {0: "exact", 1: "lower", 2: "higher", 3: "invalid"}


@dataclass(frozen=True, slots=True)
class BenderChannel:
    """One decoded 4-register measurement channel."""

    value: float
    alarm: IsolationAlarm
    test: str  # none / internal / external / unknown
    unit_code: int
    validity: Validity
    description: int

    @property
    def testing(self) -> bool:
        return self.test != "none"

    @property
    def device_error(self) -> bool:
        return self.alarm is IsolationAlarm.DEVICE_ERROR


def decode_channel(registers: Sequence[int], *, code_2_in_test_reserved: bool = True) -> BenderChannel:
    """Decode one channel. Raises :class:`DeviceDataError` for a reserved alarm code,
    a wrong register count or a non-finite value. With ``code_2_in_test_reserved``
    alarm type 2 while a test runs reads as no alarm (reserved there), not a device
    error."""
    if len(registers) != CHANNEL_REGISTERS:
        raise DeviceDataError(f"channel needs {CHANNEL_REGISTERS} registers, got {len(registers)}")
    (value,) = decode_float32(registers[0:2])
    att = registers[2] >> 8
    ru = registers[2] & 0xFF
    alarm_code = att & 0x07
    if alarm_code not in ALARM_CODES:
        raise DeviceDataError(f"reserved alarm type {alarm_code}")
    test = TEST_TYPES[(att >> 6) & 0x03]
    if alarm_code == 2 and test != "none" and code_2_in_test_reserved:
        alarm_code = 0
    if not math.isfinite(value):
        raise DeviceDataError("non-finite channel value")
    return BenderChannel(
        value=value,
        alarm=ALARM_CODES[alarm_code],
        test=test,
        unit_code=ru & 0x1F,
        validity=VALIDITY[(ru >> 6) & 0x03],
        description=registers[3],
    )


class BenderIsoCha425(PolledDevice[IsolationReading]):
    """:class:`hal.interfaces.InsulationMonitor` for a Bender isoCHA425HV (see module docstring)."""

    driver = "bender_isocha425"
    withhold_on_fault = False

    class Options(PolledOptions):
        """isoCHA425HV options (factory link defaults: 19200 baud, even parity, address 3)."""

        unit_id: int = Field(3, ge=1, le=247, description="Modbus device address")
        self_test_timeout_s: float = Field(30.0, gt=0.0, le=300.0)
        self_test_start_s: float = Field(
            5.0, gt=0.0, le=60.0, description="the test bits must be seen set within this"
        )
        self_test_read_interval_s: float = Field(
            0.2, ge=0.05, le=5.0, description="status read period while a self test runs"
        )
        device_enable: bool = Field(
            True, description="write device enable (register 3026) = 1 before the first reading"
        )
        alarm_code_2_in_test: Literal["reserved", "device_error"] = Field(
            "reserved", description="alarm type 2 while a self test runs"
        )
        warning_kohm: float = Field(500.0, gt=0.0, description="below: DEGRADED/isolation_warning")
        alarm_kohm: float = Field(100.0, gt=0.0, description="below: FAULT/isolation_low")

        @model_validator(mode="after")
        def _thresholds(self) -> BenderIsoCha425.Options:
            if self.alarm_kohm >= self.warning_kohm:
                raise ValueError(
                    f"alarm_kohm ({self.alarm_kohm}) must be below warning_kohm ({self.warning_kohm})"
                )
            return self

    def __init__(self, name: str, options: Options, ctx: BuildContext) -> None:
        super().__init__(
            name,
            link=resolve_link(ctx, options.link, name),
            unit_id=options.unit_id,
            poll_interval_s=options.poll_interval_s,
            stale_after_s=options.stale_after_s,
            idle_poll_interval_s=options.idle_poll_interval_s,
            pace=ctx.pace,
        )
        self.options = options
        self._self_test_lock = asyncio.Lock()
        self._last_rf: BenderChannel | None = None
        self._last_self_test: SelfTestResult | None = None
        self._enable_pending = options.device_enable
        self._code_2_reserved = options.alarm_code_2_in_test == "reserved"

    async def _read_channel(self, start: int) -> BenderChannel:
        return decode_channel(
            await self._link.read_holding(start, CHANNEL_REGISTERS, self._unit_id),
            code_2_in_test_reserved=self._code_2_reserved,
        )

    async def _enable_device(self) -> None:
        """Write device enable = 1; a comm failure propagates (the poll fails, retried)."""
        try:
            await self._link.write_registers(DEVICE_ENABLE_REGISTER, [1], self._unit_id)
        except ModbusLinkError as exc:
            if exc.reason != "exception_response":
                raise
            self._log.warning("imd.device_enable_refused", exception_code=exc.exception_code)
        else:
            self._log.info("imd.device_enabled", register=DEVICE_ENABLE_REGISTER)
        self._enable_pending = False

    async def _poll(self) -> IsolationReading:
        if self._enable_pending:
            await self._enable_device()
        rf = await self._read_channel(CHANNEL_RF)
        voltage: float | None = None
        if not rf.testing:
            un = await self._read_channel(CHANNEL_UN)
            if un.validity != "invalid" and not un.device_error:
                if un.unit_code != UNIT_VOLT:
                    raise DeviceDataError(f"U_n unit code {un.unit_code}, expected {UNIT_VOLT} (V)")
                voltage = un.value
        resistance: float | None = None
        if not rf.testing and not rf.device_error and rf.validity != "invalid":
            if rf.unit_code != UNIT_OHM:
                raise DeviceDataError(f"R_F unit code {rf.unit_code}, expected {UNIT_OHM} (ohm)")
            if rf.value < 0.0:
                raise DeviceDataError(f"negative insulation resistance {rf.value}")
            resistance = rf.value / 1000.0
        self._last_rf = rf
        reading = IsolationReading(
            resistance_kohm=resistance,
            alarm=rf.alarm,
            voltage=voltage,
            taken_at=monotonic(),
            testing=rf.testing,
        )
        self._set_device_health(self._judge(rf, resistance))
        return reading

    def _judge(self, rf: BenderChannel, resistance: float | None) -> Health | None:
        if rf.device_error:
            return Health(HealthState.FAULT, "imd_device_error", "IMD reports a device error")
        if rf.testing:
            return self._device_health  # keep the verdict from before the test
        o = self.options
        if rf.alarm is IsolationAlarm.ALARM or (
            resistance is not None and resistance < o.alarm_kohm
        ):
            return Health(
                HealthState.FAULT,
                "isolation_low",
                f"R_F {_kohm(resistance)} (alarm below {o.alarm_kohm:g} kOhm, device: {rf.alarm})",
            )
        if rf.alarm in (IsolationAlarm.WARNING, IsolationAlarm.PREWARNING) or (
            resistance is not None and resistance < o.warning_kohm
        ):
            return Health(
                HealthState.DEGRADED,
                "isolation_warning",
                f"R_F {_kohm(resistance)} (warning below {o.warning_kohm:g} kOhm, device: {rf.alarm})",
            )
        return None

    def reading(self) -> IsolationReading | None:
        """Latest reading (``None`` when stale or not started)."""
        return self._published_value()

    async def self_test(self) -> SelfTestResult:
        """Run the device self test (see module docstring). Never raises for device/comm problems."""
        async with self._self_test_lock:
            result = await self._self_test()
        self._last_self_test = result
        log = self._log.info if result.passed else self._log.warning
        log(
            "imd.self_test_done",
            passed=result.passed,
            detail=result.detail,
            duration_s=result.duration_s,
        )
        return result

    async def _self_test(self) -> SelfTestResult:
        o = self.options
        t0 = monotonic()
        deadline = t0 + o.self_test_timeout_s

        def done(passed: bool, detail: str) -> SelfTestResult:
            return SelfTestResult(passed, detail, round(monotonic() - t0, 3))

        self._log.info("imd.self_test_start")
        try:
            await self._link.write_registers(SELF_TEST_REGISTER, [SELF_TEST_COMMAND], self._unit_id)
        except ModbusLinkError as exc:
            return done(False, f"could not start self test: {exc.reason}: {exc.detail}")
        seen_running = False
        while True:
            now = monotonic()
            if now >= deadline:
                return done(False, "timeout")
            try:
                rf = await asyncio.wait_for(self._read_channel(CHANNEL_RF), timeout=deadline - now)
            except (ModbusLinkError, DeviceDataError):
                pass  # transient; the deadline bounds the wait
            except TimeoutError:
                return done(False, "timeout")
            else:
                if rf.testing:
                    seen_running = True
                elif seen_running:
                    if rf.device_error:
                        return done(False, "device error reported after the self test")
                    return done(True, "passed")
                elif monotonic() - t0 > o.self_test_start_s:
                    return done(False, "self test did not start")
            remaining = deadline - monotonic()
            if remaining > 0:
                await asyncio.sleep(min(o.self_test_read_interval_s, remaining))

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["function_code"] = 3
        d["channels"] = {"R_F": CHANNEL_RF, "U_n": CHANNEL_UN}
        rf = self._last_rf
        d["last_rf_channel"] = (
            None
            if rf is None
            else {
                "alarm": str(rf.alarm),
                "test": rf.test,
                "unit_code": rf.unit_code,
                "validity": rf.validity,
                "description": rf.description,
            }
        )
        st = self._last_self_test
        d["last_self_test"] = (
            None
            if st is None
            else {"passed": st.passed, "detail": st.detail, "duration_s": st.duration_s}
        )
        d["options"] = self.options.model_dump()
        return d


def _kohm(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} kOhm"
