"""Behavioural contracts of every kind of device the agent uses.

The agent sees hardware only through these interfaces. Each one is a
:class:`typing.Protocol`; a driver is any class that satisfies it and is
registered by name in :mod:`hal.registry`.

Rules shared by every device (stated once here, assumed by every docstring below):

* **Lifecycle.** ``await start()`` opens the transport and starts the driver's own
  poll task; it returns once the first poll has been *attempted* (not necessarily
  answered) and never blocks longer than the device's configured timeout plus one
  second. ``await stop()`` leaves the device in its safe state ("off", coil
  released), stops every task the driver started and closes the transport. Both
  are idempotent.
* **Reads never block on the wire.** Snapshot methods (``status()``,
  ``reading()``, ...) return the latest *already received* data immediately. Only
  methods documented as ``async`` talk to the device.
* **Comm loss.** A device that stops answering is marked stale after its
  configured timeout: its snapshot carries ``health.state == STALE`` (or
  ``OFFLINE``) and a reason, its measured values are ``None`` -- old values are
  never presented as new. The driver keeps polling and recovers by itself when the
  device answers again; no restart is needed.
* **Faults are observations.** Drivers report what they see through
  :class:`Health` (``state``, ``code``, ``detail``); mapping observations to the
  platform's fault dictionary is the agent's job.
* **Bad input from the device** (garbage frames, impossible values, CRC errors) is
  counted and discarded; it never raises into the caller and never updates a
  published value.

Why one module of ~520 lines: every device contract of the HAL in one place, so a driver
author reads all of them (and the shared Health/snapshot types) at once.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Protocol, runtime_checkable

if TYPE_CHECKING:
    from hal.tick import Pace


def monotonic() -> float:
    """Monotonic clock used for every ``taken_at`` / ``last_seen`` stamp in the HAL."""
    return time.monotonic()


class HealthState(enum.StrEnum):
    """How much a device's latest data can be trusted."""

    OK = "ok"
    DEGRADED = "degraded"  # answering, but something is off (garbage frames, one module lost)
    STALE = "stale"  # no valid answer within the comm timeout; values withheld
    FAULT = "fault"  # the device itself reports, or the driver detected, a fault
    OFFLINE = "offline"  # not started, transport could not be opened


@dataclass(frozen=True, slots=True)
class Health:
    """A device's health. ``code`` is a short machine-readable HAL fault name.

    HAL fault codes used across drivers (the agent maps them to platform codes):
    ``comm_timeout``, ``garbage_frames``, ``transport_error``, ``meter_frozen``,
    ``contactor_welded``, ``contactor_failed_to_close``, ``mirror_mismatch``,
    ``isolation_low``, ``isolation_warning``, ``imd_device_error``,
    ``module_alarm``, ``over_temperature``, ``fan_low``, ``fan_stopped``,
    ``sensor_missing``, ``pilot_error``.
    """

    state: HealthState = HealthState.OK
    code: str | None = None
    detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.state is HealthState.OK


OK = Health()


# ---------------------------------------------------------------------------
# Power modules (DC)


@dataclass(frozen=True, slots=True)
class ModuleRatings:
    max_voltage: float  # V
    min_voltage: float  # V
    max_current: float  # A
    rated_power_w: float  # W


@dataclass(frozen=True, slots=True)
class ModuleStatus:
    """One power module as last seen on the bus.

    ``voltage``/``current``/``temperature`` are ``None`` while the module is stale.
    ``flags`` are the decoded status bits (protocol-independent names such as
    ``output_off``, ``fault``, ``protection``, ``fan_fault``, ``over_temperature``,
    ``output_over_voltage``, ``walk_in``, ``power_limiting``, ``can_comm_fault``,
    ``input_phase_lost``, ``short_circuit``).
    """

    address: int
    online: bool
    voltage: float | None = None
    current: float | None = None
    temperature: float | None = None
    output_on: bool | None = None
    flags: frozenset[str] = frozenset()
    ratings: ModuleRatings | None = None
    last_seen: float | None = None  # monotonic
    health: Health = OK


@runtime_checkable
class PowerModules(Protocol):
    """The DC power modules that feed one connector (a group on a CAN bus).

    Contract:

    * ``start()`` first commands every assigned module OFF, then discovers or
      confirms the configured modules and reads their ratings, then starts the
      poll/keep-alive task. The keep-alive guarantees that every module hears a
      frame from the controller well inside its own comms watchdog (10 s for
      InfyPower), *as long as the event loop is alive*: a hung process stops the
      frames and the modules switch themselves off. While the charger is idle and the
      output is off and settled, the period stretches to ``idle_poll_interval_s``
      (at most 5 s and a third of ``comm_timeout_s``).
    * A module that gives no valid answer for ``comm_timeout_s`` (configured > the
      module's own watchdog) goes ``online=False``; capability is recomputed and the
      requested current is redistributed over the remaining modules. It is re-polled
      every cycle and comes back by itself.
    * ``set_output(voltage, current)`` sets the *total* current for the group,
      clamped to the ratings of the online modules; returns once the frames are
      queued (the single transmit task sends them with the configured spacing).
    * ``output_off()`` queues OFF ahead of any pending setpoint and returns after
      it has been handed to the bus. "Off" means: modules commanded off; it does
      *not* mean the output current is zero yet -- callers wait for
      ``measured_current()`` to fall below their threshold before opening contactors.
    * A CAN send failure or bus-off marks the group ``health.code="transport_error"``;
      OFF is re-sent as soon as the bus accepts frames again.
    """

    name: str

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def set_output(self, voltage: float, current: float) -> None: ...
    async def output_on(self) -> None: ...
    async def output_off(self) -> None: ...
    async def reset_module(self, address: int) -> None:
        """Power-cycle one module's output (OFF, wait, restore previous on/off state)."""
        ...

    def modules(self) -> list[ModuleStatus]: ...
    def measured_voltage(self) -> float | None:
        """Mean output voltage of online modules, ``None`` if none is online."""
        ...

    def measured_current(self) -> float | None:
        """Sum of output currents of online modules, ``None`` if none is online."""
        ...

    def capability(self) -> ModuleRatings | None:
        """Aggregate rating of the online modules (current and power summed)."""
        ...

    def health(self) -> Health: ...


# ---------------------------------------------------------------------------
# Energy meter


@dataclass(frozen=True, slots=True)
class PhaseReading:
    voltage: float  # V, line to neutral
    current: float  # A
    power_kw: float | None = None


@dataclass(frozen=True, slots=True)
class MeterReading:
    """One consistent poll of a meter. Power in kW, energy in kWh (register values)."""

    voltage: float  # V (DC: output voltage; AC: mean L-N)
    current: float  # A (DC: signed output current; AC: mean phase current)
    power_kw: float  # signed: negative = export (V2G discharge)
    energy_import_kwh: float
    energy_export_kwh: float
    taken_at: float  # monotonic time of the answer
    phases: tuple[PhaseReading, PhaseReading, PhaseReading] | None = None  # AC three-phase
    frequency_hz: float | None = None
    temperature: float | None = None


@runtime_checkable
class EnergyMeter(Protocol):
    """An energy meter polled over Modbus.

    Contract:

    * Polls every ``poll_interval_s`` (``idle_poll_interval_s`` while the charger is
      idle, see :class:`hal.tick.Pace`). ``reading()`` returns the last reading that is
      younger than ``stale_after_s`` (two idle periods if longer, while idle or for a
      reading taken while idle); after that it returns ``None`` and ``health()``
      is ``STALE`` with ``code="comm_timeout"``. Old values are never re-published.
    * A meter that answers but whose values stop changing while power flows
      (energy register not advancing, identical raw registers across polls) is
      ``FAULT`` with ``code="meter_frozen"``; ``reading()`` returns ``None`` then.
    * Each request waits at most the link's ``timeout_s``; requests on one serial
      port are serialised by a per-port lock.
    """

    name: str

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def reading(self) -> MeterReading | None: ...
    def health(self) -> Health: ...


# ---------------------------------------------------------------------------
# Contactor with mirror contact


class ContactorPosition(enum.StrEnum):
    OPEN = "open"
    CLOSED = "closed"
    FAULT = "fault"


@dataclass(frozen=True, slots=True)
class ContactorStatus:
    coil_energised: bool
    mirror_says_open: bool  # NC mirror contact closed == main contacts open
    position: ContactorPosition
    welded: bool  # latched until clear_weld()
    cycles: int
    health: Health = OK


class ContactorError(Exception):
    """Raised by ``close()``/``open()`` when the mirror does not confirm.

    ``code`` is ``contactor_failed_to_close``, ``contactor_welded`` or
    ``mirror_mismatch``.
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@runtime_checkable
class Contactor(Protocol):
    """A main contactor driven by a GPIO coil output, confirmed by a mirror input.

    Contract:

    * ``close()``: refuses (``ContactorError("contactor_welded")``) unless the coil
      is off and the mirror confirms "open" right now; then energises the coil and
      waits up to ``close_timeout_ms`` for the mirror to report "closed" stable for
      ``debounce_ms``. On timeout it releases the coil again and raises
      ``ContactorError("contactor_failed_to_close")``. Counts one cycle on success.
    * ``open()``: releases the coil and waits up to ``open_timeout_ms`` for the mirror
      to report "open". If it does not, the weld latch is set and
      ``ContactorError("contactor_welded")`` is raised; the coil stays released.
    * ``release()`` releases the coil without waiting -- the emergency path; never
      raises.
    * An unexpected mirror change while idle or closed sets ``health`` to
      ``FAULT``/``mirror_mismatch``.
    * The cycle counter is persisted (atomic write) on every change and survives
      restarts. When the process dies the kernel releases the line request and the
      hardware pull-down de-energises the coil.
    """

    name: str

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def close(self) -> None: ...
    async def open(self) -> None: ...
    def release(self) -> None: ...
    def status(self) -> ContactorStatus: ...
    def reset_cycles(self) -> None: ...
    def clear_weld(self) -> None: ...
    def health(self) -> Health: ...


# ---------------------------------------------------------------------------
# Insulation monitoring device


class IsolationAlarm(enum.StrEnum):
    NONE = "none"
    PREWARNING = "prewarning"
    WARNING = "warning"
    ALARM = "alarm"
    DEVICE_ERROR = "device_error"


@dataclass(frozen=True, slots=True)
class IsolationReading:
    resistance_kohm: float | None  # None while a self test runs or the value is invalid
    alarm: IsolationAlarm
    voltage: float | None  # DC+ to DC-, V
    taken_at: float
    testing: bool = False


@dataclass(frozen=True, slots=True)
class SelfTestResult:
    passed: bool
    detail: str
    duration_s: float


@runtime_checkable
class InsulationMonitor(Protocol):
    """An IMD (IEC 61557-8) on Modbus.

    Contract:

    * Polls once per second; ``reading()`` is ``None`` when the last valid reading is
      older than ``stale_after_s`` (``health`` ``STALE``/``comm_timeout``).
    * Readings taken while a self test runs, or while the device reports a device
      error, carry ``resistance_kohm=None``.
    * ``self_test()`` starts the device's self test and waits for its end, at most
      ``self_test_timeout_s`` (then ``passed=False``, detail "timeout").
    """

    name: str

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def reading(self) -> IsolationReading | None: ...
    async def self_test(self) -> SelfTestResult: ...
    def health(self) -> Health: ...


# ---------------------------------------------------------------------------
# Thermal: temperature sensors and fans


@dataclass(frozen=True, slots=True)
class TemperatureReading:
    name: str
    celsius: float | None  # None when the sensor is missing or unreadable
    health: Health = OK


@dataclass(frozen=True, slots=True)
class FanStatus:
    name: str
    rpm: float | None
    duty_percent: float
    nominal_rpm: float
    health: Health = OK  # fan_low below the configured fraction of nominal, fan_stopped at ~0


@runtime_checkable
class Thermal(Protocol):
    """Temperature sensors and cooling fans (Linux hwmon).

    Contract: polled every ``poll_interval_s``; ``temperatures()``/``fans()`` return
    the latest snapshot. A sensor above its configured limit has health
    ``FAULT``/``over_temperature``. A fan whose rpm stays below ``low_fraction`` of
    the rpm expected at its duty for ``fan_grace_s`` is ``DEGRADED``/``fan_low``.
    ``set_fan_duty()`` writes the PWM at once (0..100 %).
    """

    name: str

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def temperatures(self) -> Mapping[str, TemperatureReading]: ...
    def fans(self) -> Mapping[str, FanStatus]: ...
    async def set_fan_duty(self, fan: str, percent: float) -> None: ...
    def health(self) -> Health: ...


# ---------------------------------------------------------------------------
# Vehicle / control pilot


class PilotState(enum.StrEnum):
    """IEC 61851-1 control-pilot states (hardware.md §6.1)."""

    A = "A"  # no EV
    B = "B"  # EV connected, not requesting energy
    C = "C"  # EV requests energy
    D = "D"  # EV requests energy, ventilation required
    E = "E"  # CP shorted / no supply: error
    F = "F"  # EVSE not available (EVSE drives -12 V)
    UNKNOWN = "unknown"  # reading outside every window, or stale


@dataclass(frozen=True, slots=True)
class VehicleStatus:
    """What the charger knows about the vehicle on one connector.

    ``soc``, ``target_voltage``, ``target_current``, ``vin`` come from high-level
    communication (ISO 15118 / DIN 70121) and are ``None`` when no HLC source is
    configured or the EV did not tell. ``discharge_allowed`` is the EV's V2G consent
    (``None`` = unknown); ``discharge_refusal`` an ISO 15118-20 code when it refused.
    """

    pilot: PilotState
    plugged: bool
    ev_ready: bool  # pilot C or D
    pwm_duty_percent: float  # what the charger currently drives, 100 = no PWM
    soc: int | None = None
    target_voltage: float | None = None
    target_current: float | None = None
    max_discharge_current: float | None = None
    discharge_allowed: bool | None = None
    discharge_refusal: str | None = None
    vin: str | None = None
    taken_at: float = 0.0
    health: Health = OK


@runtime_checkable
class Vehicle(Protocol):
    """Control pilot (and, where present, HLC data) of one connector.

    Contract: the pilot is sampled every ``poll_interval_s`` and debounced
    (``debounce_samples`` equal classifications before a state change is
    published). ``set_pwm_duty(percent)`` drives the CP PWM (100 = constant +12 V,
    5 = digital communication, 10..96 = AC current offer, 0 = state F). A stale or
    out-of-window reading gives ``PilotState.UNKNOWN`` with health ``STALE`` or
    ``FAULT``/``pilot_error``; the agent treats UNKNOWN like E (open contactors).
    """

    name: str

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def status(self) -> VehicleStatus: ...
    async def set_pwm_duty(self, percent: float) -> None: ...
    def health(self) -> Health: ...


# ---------------------------------------------------------------------------
# Bidirectional (V2G) power stage


@dataclass(frozen=True, slots=True)
class BidirectionalStatus:
    """The V2G stage of one connector as last seen.

    ``power_kw`` is the exported power (positive while discharging), ``None`` when
    stale. ``grid_synced`` False while discharging means the inverter lost the grid
    (F-0701). ``cycles`` counts discharge sessions run by the stage.
    """

    active: bool
    power_kw: float | None
    grid_synced: bool
    cycles: int
    harmonic_distortion_pct: float | None = None
    health: Health = OK


@runtime_checkable
class Bidirectional(Protocol):
    """The bidirectional (V2G) stage that lets a connector export energy from the EV.

    Contract: ``discharge(voltage, power_kw)`` starts or updates export at up to
    ``power_kw``; it returns once the command was accepted by the stage (at most the
    driver's request timeout). ``stop_discharge()`` brings the export current to zero
    ("off": no current is drawn from the EV; contactors may open once the measured
    current confirms it). On comm loss the status goes stale (``power_kw`` None,
    health STALE) and the stage itself must stop exporting (its own watchdog).
    """

    name: str

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def discharge(self, voltage: float, power_kw: float) -> None: ...
    async def stop_discharge(self) -> None: ...
    def status(self) -> BidirectionalStatus: ...
    def health(self) -> Health: ...


# ---------------------------------------------------------------------------
# Things every device exposes for `probe` and `status`


class Described(Protocol):
    """Optional: a driver may describe itself for probe/status output."""

    def describe(self) -> dict[str, Any]: ...


@dataclass(slots=True)
class DeviceSet:
    """Every configured device, keyed the way the agent addresses them."""

    power_modules: dict[int, PowerModules] = field(default_factory=dict)  # by connector id
    meters: dict[int, EnergyMeter] = field(default_factory=dict)  # by connector id
    contactors: dict[int, Contactor] = field(default_factory=dict)  # by connector id
    vehicles: dict[int, Vehicle] = field(default_factory=dict)  # by connector id
    imd: dict[int, InsulationMonitor] = field(default_factory=dict)  # by connector id
    bidirectional: dict[int, Bidirectional] = field(default_factory=dict)  # by connector id (V2G)
    thermal: Thermal | None = None
    #: the :class:`~hal.tick.Pace` these devices poll by (``None``: built without one)
    pace: Pace | None = None

    def all(self) -> list[Any]:
        devices: list[Any] = []
        for group in (self.power_modules, self.meters, self.contactors, self.vehicles, self.imd, self.bidirectional):
            devices.extend(group.values())
        if self.thermal is not None:
            devices.append(self.thermal)
        # one IMD or bus object may serve several connectors: start/stop each once
        unique: list[Any] = []
        for d in devices:
            if not any(d is u for u in unique):
                unique.append(d)
        return unique
