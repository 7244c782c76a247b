"""Sensor calibration for the ``calibrate_sensor`` service command (platform-api §14.2).

Calibratable sensors (:meth:`Calibration.sensors`):

* every temperature sensor of the thermal device, by its name: **offset** calibration,
  ``offset = reference - measured`` (degC), bounded by ``max_temperature_offset_c``;
* ``dc_voltage:<connector_id>`` / ``dc_current:<connector_id>`` for every connector with
  power modules (DC): **gain** calibration of the modules' own output measurement,
  ``gain = reference / measured``, bounded by ``min_gain..max_gain``; the measurement
  must be at least ``min_voltage_v`` / ``min_current_a`` so the gain is meaningful.

**The billing energy meter is never calibrated in software.** Its readings are the
legal-metrology basis of every charging record (MID / Eichrecht); a correction factor
applied by the agent would falsify billed energy. A meter out of tolerance is replaced
or re-verified, not corrected here; none of its names is calibratable.

Every calibration is computed from the *raw* (uncalibrated) measurement, so a new
calibration replaces the previous one rather than stacking on it; calibrating with
``reference == measured`` restores the identity. An out-of-bounds result raises
:class:`CalibrationError` and leaves the stored calibration unchanged. Entries are
persisted under ``calibration/<sensor>`` in the key/value store and applied from
memory: :class:`CalibratedThermal` applies offsets to ``temperatures()``;
:meth:`Calibration.voltage` / :meth:`Calibration.current` apply gains.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import structlog
from pydantic import Field

from agent.store.kv import KVStore
from agent.utctime import to_iso, utc_now
from hal.config import StrictModel
from hal.interfaces import (
    FanStatus,
    Health,
    PowerModules,
    TemperatureReading,
    Thermal,
)

log = structlog.get_logger(__name__)

CALIBRATION_KEY = "calibration/"
VOLTAGE_PREFIX = "dc_voltage:"
CURRENT_PREFIX = "dc_current:"

CalibrationKind = Literal["offset", "gain"]


class CalibrationConfig(StrictModel):
    """Bounds a calibration must stay within (outside them the reference is suspect)."""

    max_temperature_offset_c: float = Field(
        10.0, gt=0.0, le=50.0, description="|offset| allowed for a temperature sensor"
    )
    min_gain: float = Field(0.95, gt=0.5, le=1.0, description="lowest voltage/current gain")
    max_gain: float = Field(1.05, ge=1.0, lt=2.0, description="highest voltage/current gain")
    min_voltage_v: float = Field(
        10.0, gt=0.0, description="a voltage gain needs at least this measured"
    )
    min_current_a: float = Field(
        2.0, gt=0.0, description="a current gain needs at least this measured"
    )


class CalibrationError(ValueError):
    """A calibration that was refused; the message names the problem for the operator."""


@dataclass(frozen=True, slots=True)
class CalibrationEntry:
    """One sensor's calibration: ``value`` is the offset (degC) or the gain (factor)."""

    sensor: str
    kind: CalibrationKind
    value: float
    reference: float
    measured: float
    calibrated_at: str  # ISO 8601 UTC

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (stored, and fit for command-status ``details``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CalibrationEntry:
        """Inverse of :meth:`to_dict`; raises ``KeyError``/``TypeError``/``ValueError``."""
        kind = data["kind"]
        if kind not in ("offset", "gain"):
            raise ValueError(f"unknown calibration kind {kind!r}")
        return cls(
            sensor=str(data["sensor"]),
            kind=kind,
            value=float(data["value"]),
            reference=float(data["reference"]),
            measured=float(data["measured"]),
            calibrated_at=str(data["calibrated_at"]),
        )


class Calibration:
    """Calibrations of the charger's sensors, persisted in the key/value store.

    ``thermal`` must be the *raw* thermal driver (not :class:`CalibratedThermal`);
    ``modules`` are the power-module groups by connector id (DC connectors only).
    """

    def __init__(
        self,
        kv: KVStore,
        config: CalibrationConfig | None = None,
        *,
        thermal: Thermal | None = None,
        modules: Mapping[int, PowerModules] | None = None,
    ) -> None:
        """Bind to the store and the devices whose sensors can be calibrated."""
        self._kv = kv
        self.config = config or CalibrationConfig()
        self._thermal = thermal
        self._modules = dict(modules or {})
        self._entries: dict[str, CalibrationEntry] = {}

    async def load(self) -> None:
        """Read the persisted entries. Malformed ones, and ones outside the current bounds
        (e.g. the bounds were narrowed), are logged and not applied."""
        self._entries = {}
        for key, value in (await self._kv.items(CALIBRATION_KEY)).items():
            try:
                entry = CalibrationEntry.from_dict(value)
            except (KeyError, TypeError, ValueError):
                log.warning("calibration_invalid", key=key, value=value)
                continue
            problem = self._bounds_problem(entry.sensor, entry.kind, entry.value)
            if entry.sensor != key[len(CALIBRATION_KEY) :] or problem is not None:
                log.warning("calibration_not_applied", key=key, problem=problem or "key mismatch")
                continue
            self._entries[entry.sensor] = entry

    # ------------------------------------------------------------------ sensors

    def sensors(self) -> list[str]:
        """Every calibratable sensor: thermal sensor names (sorted), then
        ``dc_voltage:<id>``/``dc_current:<id>`` per DC connector (by id)."""
        names = sorted(self._thermal.temperatures()) if self._thermal is not None else []
        for cid in sorted(self._modules):
            names += [f"{VOLTAGE_PREFIX}{cid}", f"{CURRENT_PREFIX}{cid}"]
        return names

    def kind_of(self, sensor: str) -> CalibrationKind:
        """``offset`` or ``gain``; raises :class:`CalibrationError` for an unknown sensor."""
        if self._thermal is not None and sensor in self._thermal.temperatures():
            return "offset"
        if sensor.startswith((VOLTAGE_PREFIX, CURRENT_PREFIX)):
            cid = _connector_id(sensor)
            if cid is not None and cid in self._modules:
                return "gain"
        known = ", ".join(self.sensors()) or "none"
        raise CalibrationError(
            f"unknown sensor {sensor!r}; calibratable sensors: {known} "
            "(the energy meter is never calibrated in software)"
        )

    def raw_value(self, sensor: str) -> float | None:
        """The sensor's current raw (uncalibrated) measurement, None when it has none.

        Raises :class:`CalibrationError` for an unknown sensor.
        """
        if self.kind_of(sensor) == "offset":
            assert self._thermal is not None
            reading = self._thermal.temperatures().get(sensor)
            return reading.celsius if reading is not None else None
        cid = _connector_id(sensor)
        assert cid is not None
        group = self._modules[cid]
        if sensor.startswith(VOLTAGE_PREFIX):
            return group.measured_voltage()
        return group.measured_current()

    # ------------------------------------------------------------------ calibrate

    async def calibrate(
        self, sensor: str, reference_value: float, measured_now: float | None
    ) -> CalibrationEntry:
        """Calibrate ``sensor`` so that ``measured_now`` (its raw reading) maps to
        ``reference_value`` (what the technician's instrument shows), and persist it.

        Raises :class:`CalibrationError` -- and changes nothing -- when the sensor is
        unknown, a value is missing or not finite, the measurement is too small for a
        gain (below ``min_voltage_v`` / ``min_current_a``), or the resulting offset or
        gain is outside the configured bounds.
        """
        kind = self.kind_of(sensor)
        if measured_now is None or not math.isfinite(measured_now):
            raise CalibrationError(
                f"sensor {sensor!r} has no current measurement to calibrate against"
            )
        if not math.isfinite(reference_value):
            raise CalibrationError(f"reference value {reference_value!r} is not a number")
        if kind == "offset":
            value = reference_value - measured_now
        else:
            minimum, unit = (
                (self.config.min_voltage_v, "V")
                if sensor.startswith(VOLTAGE_PREFIX)
                else (self.config.min_current_a, "A")
            )
            if abs(measured_now) < minimum:
                raise CalibrationError(
                    f"sensor {sensor!r} measures {measured_now:g} {unit}; a gain calibration "
                    f"needs at least {minimum:g} {unit} flowing"
                )
            value = reference_value / measured_now
        problem = self._bounds_problem(sensor, kind, value)
        if problem is not None:
            raise CalibrationError(problem)
        entry = CalibrationEntry(
            sensor=sensor,
            kind=kind,
            value=value,
            reference=float(reference_value),
            measured=float(measured_now),
            calibrated_at=to_iso(utc_now()),
        )
        await self._kv.set(f"{CALIBRATION_KEY}{sensor}", entry.to_dict())
        previous = self._entries.get(sensor)
        self._entries[sensor] = entry
        log.info(
            "sensor_calibrated",
            sensor=sensor,
            kind=kind,
            value=round(value, 6),
            previous=None if previous is None else round(previous.value, 6),
        )
        return entry

    def _bounds_problem(self, sensor: str, kind: str, value: float) -> str | None:
        cfg = self.config
        if not math.isfinite(value):
            return f"calibration of {sensor!r} is not a finite number"
        if kind == "offset":
            if abs(value) > cfg.max_temperature_offset_c:
                return (
                    f"offset {value:+.2f} degC for sensor {sensor!r} is outside "
                    f"+/-{cfg.max_temperature_offset_c:g} degC; check the reference"
                )
            return None
        if not cfg.min_gain <= value <= cfg.max_gain:
            return (
                f"gain {value:.4f} for sensor {sensor!r} is outside "
                f"{cfg.min_gain:g}..{cfg.max_gain:g}; check the reference"
            )
        return None

    # ------------------------------------------------------------------ apply

    def entry(self, sensor: str) -> CalibrationEntry | None:
        """The calibration in force for ``sensor``, None if uncalibrated."""
        return self._entries.get(sensor)

    def entries(self) -> dict[str, CalibrationEntry]:
        """Every calibration in force, by sensor."""
        return dict(self._entries)

    def offset(self, sensor: str) -> float:
        """Temperature offset of ``sensor`` in degC (0.0 if uncalibrated)."""
        entry = self._entries.get(sensor)
        return entry.value if entry is not None and entry.kind == "offset" else 0.0

    def gain(self, sensor: str) -> float:
        """Gain of ``sensor`` (1.0 if uncalibrated)."""
        entry = self._entries.get(sensor)
        return entry.value if entry is not None and entry.kind == "gain" else 1.0

    def voltage(self, connector_id: int, raw: float | None) -> float | None:
        """Raw module output voltage of ``connector_id`` with its gain applied (None stays None)."""
        return None if raw is None else raw * self.gain(f"{VOLTAGE_PREFIX}{connector_id}")

    def current(self, connector_id: int, raw: float | None) -> float | None:
        """Raw module output current of ``connector_id`` with its gain applied (None stays None)."""
        return None if raw is None else raw * self.gain(f"{CURRENT_PREFIX}{connector_id}")


def _connector_id(sensor: str) -> int | None:
    _, _, suffix = sensor.partition(":")
    return int(suffix) if suffix.isdigit() else None


class CalibratedThermal:
    """A :class:`hal.interfaces.Thermal` that applies temperature offsets to the wrapped driver.

    ``temperatures()`` returns each reading with ``celsius + offset`` (None stays None;
    health unchanged); fans, fan duty, lifecycle and ``health()`` pass through. The
    driver's own over-temperature health is judged on *raw* values, so its ``max_c``
    limits refer to the uncalibrated sensor. The agent uses this wrapper wherever it
    reads temperatures; calibration itself must read :attr:`raw`.
    """

    def __init__(self, thermal: Thermal, calibration: Calibration) -> None:
        """Wrap ``thermal`` (the raw driver) with the offsets held by ``calibration``."""
        self.raw = thermal
        self.calibration = calibration
        self.name = thermal.name

    async def start(self) -> None:
        await self.raw.start()

    async def stop(self) -> None:
        await self.raw.stop()

    def temperatures(self) -> Mapping[str, TemperatureReading]:
        readings: dict[str, TemperatureReading] = {}
        for name, reading in self.raw.temperatures().items():
            offset = self.calibration.offset(name)
            if reading.celsius is None or offset == 0.0:
                readings[name] = reading
            else:
                readings[name] = TemperatureReading(
                    reading.name, reading.celsius + offset, reading.health
                )
        return readings

    def fans(self) -> Mapping[str, FanStatus]:
        return self.raw.fans()

    async def set_fan_duty(self, fan: str, percent: float) -> None:
        await self.raw.set_fan_duty(fan, percent)

    def health(self) -> Health:
        return self.raw.health()

    def describe(self) -> dict[str, Any]:
        """The wrapped driver's description (if it has one) plus the offsets in force."""
        inner = getattr(self.raw, "describe", None)
        base: dict[str, Any] = dict(inner()) if callable(inner) else {"name": self.name}
        base["calibration_offsets_c"] = {
            s: e.value for s, e in self.calibration.entries().items() if e.kind == "offset"
        }
        return base


__all__ = [
    "CALIBRATION_KEY",
    "CalibratedThermal",
    "Calibration",
    "CalibrationConfig",
    "CalibrationEntry",
    "CalibrationError",
]
