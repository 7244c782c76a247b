"""Component-level health block ``component_health`` (platform-api §14.1).

:meth:`ComponentHealth.build` turns one connector's HAL snapshots into the block the
telemetry sampler adds to an upload (the runtime passes it only when
``[platform] send_component_health`` says the platform accepts it). It never talks to a
device and never waits: it reads snapshots and the in-memory copies of the persisted
counters, so it may be called from the sampler at any time.

Fields, where each value comes from:

* ``contactor_cycles``: ``Contactor.status().cycles`` (persisted by the driver).
* ``contactor_max_cycles``: the driver's ``options.rated_cycles`` when it has one (the
  GPIO contactor does), else :attr:`HealthConfig.contactor_max_cycles_ac` /
  ``_dc`` after the connector kind (F-0101: typically 60 000 AC / 100 000 DC).
* ``cooling_fan_rpm`` / ``cooling_fan_status``: the fan named :attr:`HealthConfig.fan`;
  status after :func:`fan_status`.
* ``internal_temps``: the four sensors named in :attr:`HealthConfig.internal_temps`;
  on a DC connector with ``outlet_sensor`` configured, ``dc_outlet`` reads that
  sensor instead (the outlet of *this* connector). Values in degC, 0.1 resolution,
  as the thermal device in the connector's hardware reports them (the agent gives
  connectors the calibrated wrapper, :class:`agent.maintenance.calibration.CalibratedThermal`).
* ``relay_state``: :func:`relay_state` of the main contactor.
* ``isolation_test_kohms`` / ``last_isolation_test``: the connector's latest passed
  cable check, else the last one persisted by :class:`IsolationHistory` (a restart
  keeps it); before the first cable check ever, the IMD's current fresh reading and its
  time.
* V2G-capable connectors only (``hw.bidirectional`` present):
  ``bidirectional_inverter_cycles`` (``Bidirectional.status().cycles``),
  ``bidirectional_inverter_max_cycles`` (:attr:`HealthConfig.bidirectional_max_cycles`,
  left out unless configured: the rated life is a property of the installed stage),
  ``harmonic_distortion_v2g_pct`` and ``discharge_contactor_cycles``
  (:class:`DischargeCycles`).

**Unknown values are omitted, never invented** (the rule platform-api §7.1 states for
``soc``: "omit when unknown rather than sending 0"). The draft makes the non-V2G fields
mandatory inside the block, but every stand-in would be a false statement a
maintenance system acts on: 0 kOhm reads as a dead short, the epoch as a test decades
overdue, 0 rpm as a stopped fan, 0 degC as a real temperature. So:

* no isolation result ever and no fresh IMD reading (AC connector without IMD, IMD not
  answering yet): both isolation fields are left out -- they always appear together;
* a temperature sensor missing, unreadable or not configured: its key is left out of
  ``internal_temps`` (the object itself is always present, possibly empty);
* no thermal device, or no fan of the configured name: ``cooling_fan_rpm`` and
  ``cooling_fan_status`` are left out; a fan whose rpm cannot be read has no
  ``cooling_fan_rpm`` but ``cooling_fan_status = "fault"`` (fan supervision is lost,
  as the thermal driver itself reports with ``sensor_missing``);
* ``harmonic_distortion_v2g_pct`` unknown (stale stage, no measurement): left out.

The counters, the relay state and the rated cycles are always known, so
``contactor_cycles``, ``contactor_max_cycles`` and ``relay_state`` are always present.
A platform consumer must read a missing field as "unknown", never as zero.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import structlog
from pydantic import Field, model_validator

from agent.charging.session import Session
from agent.utctime import to_iso
from agent.store.db import StoreError
from agent.store.kv import KVStore
from hal.config import StrictModel
from hal.interfaces import ContactorPosition, ContactorStatus, FanStatus, HealthState

if TYPE_CHECKING:  # the connector imports the config, which imports this module's config model
    from agent.charging.connector import Connector

log = structlog.get_logger(__name__)

FanState = Literal["ok", "warning", "fault"]
RelayState = Literal["closed", "open", "fault"]

ISOLATION_KEY = "health/isolation/"
DISCHARGE_KEY = "health/discharge_contactor_cycles/"

#: §14.1 field names, for callers that validate or document the block
CORE_FIELDS = (
    "contactor_cycles",
    "contactor_max_cycles",
    "cooling_fan_rpm",
    "cooling_fan_status",
    "internal_temps",
    "relay_state",
    "isolation_test_kohms",
    "last_isolation_test",
)
V2G_FIELDS = (
    "bidirectional_inverter_cycles",
    "bidirectional_inverter_max_cycles",
    "harmonic_distortion_v2g_pct",
    "discharge_contactor_cycles",
)
INTERNAL_TEMPS = ("power_module", "control_board", "ac_inlet", "dc_outlet")


class InternalTempSensors(StrictModel):
    """Thermal sensor name behind each ``internal_temps`` key of the block."""

    power_module: str = Field("power_module", min_length=1)
    control_board: str = Field("control_board", min_length=1)
    ac_inlet: str = Field("ac_inlet", min_length=1)
    dc_outlet: str = Field("dc_outlet", min_length=1)


class HealthConfig(StrictModel):
    """Where the block's values come from, and the fan-status thresholds."""

    internal_temps: InternalTempSensors = Field(default_factory=InternalTempSensors)
    fan: str = Field("cabinet", min_length=1, description="thermal fan reported in the block")
    contactor_max_cycles_ac: int = Field(
        60_000, ge=1, description="rated cycles when the contactor driver states none (AC)"
    )
    contactor_max_cycles_dc: int = Field(
        100_000, ge=1, description="rated cycles when the contactor driver states none (DC)"
    )
    bidirectional_max_cycles: int | None = Field(
        None, ge=1, description="rated V2G stage cycles (from its datasheet; omitted when unset)"
    )
    fan_warning_fraction: float = Field(
        0.85, gt=0.0, le=1.0, description="warning below this fraction of the expected rpm"
    )
    fan_fault_fraction: float = Field(
        0.5, gt=0.0, lt=1.0, description="fault below this fraction of the expected rpm"
    )
    fan_stopped_rpm: float = Field(
        60.0, ge=0.0, description="at or below this a fan that should turn counts as stopped"
    )

    @model_validator(mode="after")
    def _fractions_ordered(self) -> HealthConfig:
        if self.fan_fault_fraction >= self.fan_warning_fraction:
            raise ValueError("fan_fault_fraction must be below fan_warning_fraction")
        return self


def fan_status(fan: FanStatus, config: HealthConfig) -> FanState:
    """Maintenance status of one fan from its latest snapshot.

    The expected speed is ``nominal_rpm x duty_percent / 100`` (as the thermal driver
    computes it). ``fault`` when the rpm is unknown, the driver reports FAULT (e.g.
    ``fan_stopped``), STALE or OFFLINE, or a fan that should turn is at/below ``fan_stopped_rpm`` or below
    ``fan_fault_fraction`` of the expected speed; ``warning`` when it is below
    ``fan_warning_fraction`` of the expected speed or the driver reports DEGRADED
    (``fan_low`` after its grace period); else ``ok``. A fan commanded to 0 % is ``ok``
    whatever it turns. The thresholds apply to the instantaneous snapshot, so a fan
    spinning up after a duty increase can read ``warning`` for a few seconds; the
    alarm F-0601 follows the driver's own grace period, not this status.
    """
    if fan.rpm is None or fan.health.state in (
        HealthState.FAULT,
        HealthState.STALE,
        HealthState.OFFLINE,
    ):
        return "fault"
    expected = fan.nominal_rpm * max(fan.duty_percent, 0.0) / 100.0
    status: FanState = "ok"
    if expected > 0.0:
        if fan.rpm <= config.fan_stopped_rpm or fan.rpm < config.fan_fault_fraction * expected:
            return "fault"
        if fan.rpm < config.fan_warning_fraction * expected:
            status = "warning"
    if fan.health.state is HealthState.DEGRADED:
        status = "warning"
    return status


def relay_state(status: ContactorStatus) -> RelayState:
    """``fault`` when the contactor is welded, its position is FAULT (the driver debounces
    a mirror contact that disagrees with the coil) or its health is FAULT (welded,
    ``mirror_mismatch``, ``contactor_failed_to_close``, mirror unreadable); otherwise
    ``closed``/``open`` after the reported position."""
    if (
        status.welded
        or status.position is ContactorPosition.FAULT
        or status.health.state is HealthState.FAULT
        or status.health.code in ("contactor_welded", "mirror_mismatch")
    ):
        return "fault"
    return "closed" if status.position is ContactorPosition.CLOSED else "open"


@dataclass(frozen=True, slots=True)
class IsolationResult:
    """One passed cable check: lowest fresh insulation reading (kOhm) and its ISO 8601 UTC time."""

    kohm: float
    at: str


class IsolationHistory:
    """The last isolation result per connector, persisted under ``health/isolation/<id>``.

    The connector keeps its latest result in memory only (``last_isolation_kohm`` /
    ``last_isolation_at``, set when a cable check passes); :meth:`observe` writes a new
    one to the key/value store so it survives restarts, and :meth:`latest` prefers the
    connector's own (newer) value over the stored one.
    """

    def __init__(self, kv: KVStore) -> None:
        """Bind to the agent's key/value store; call :meth:`load` before use."""
        self._kv = kv
        self._stored: dict[int, IsolationResult] = {}

    async def load(self) -> None:
        """Read every persisted result; malformed entries are logged and ignored."""
        self._stored = {}
        for key, value in (await self._kv.items(ISOLATION_KEY)).items():
            suffix = key[len(ISOLATION_KEY) :]
            try:
                cid = int(suffix)
                result = IsolationResult(float(value["kohm"]), str(value["at"]))
            except (TypeError, ValueError, KeyError):
                log.warning("isolation_history_invalid", key=key, value=value)
                continue
            self._stored[cid] = result

    def stored(self, connector_id: int) -> IsolationResult | None:
        """The persisted result of ``connector_id`` (None if there never was one)."""
        return self._stored.get(connector_id)

    def latest(self, connector: Connector) -> IsolationResult | None:
        """The connector's in-memory result if it has one, else the persisted one."""
        kohm, at = connector.last_isolation_kohm, connector.last_isolation_at
        if kohm is not None and at is not None:
            return IsolationResult(float(kohm), at)
        return self._stored.get(connector.id)

    async def record(self, connector_id: int, result: IsolationResult) -> None:
        """Persist ``result`` as the connector's latest (durable when this returns)."""
        await self._kv.set(f"{ISOLATION_KEY}{connector_id}", {"kohm": result.kohm, "at": result.at})
        self._stored[connector_id] = result

    async def observe(self, connector: Connector) -> bool:
        """Persist the connector's in-memory result if it differs from the stored one.

        Returns True when something was written. Store errors propagate.
        """
        kohm, at = connector.last_isolation_kohm, connector.last_isolation_at
        if kohm is None or at is None:
            return False
        result = IsolationResult(float(kohm), at)
        if self._stored.get(connector.id) == result:
            return False
        await self.record(connector.id, result)
        log.info("isolation_result_persisted", connector=connector.id, kohm=result.kohm, at=at)
        return True


class DischargeCycles:
    """Contactor closures during discharge (V2G) sessions, per connector, persisted under
    ``health/discharge_contactor_cycles/<id>``.

    Every session start -- new or resumed -- follows exactly one confirmed
    ``Contactor.close()``, so :meth:`note_session_started` (from
    ``ConnectorListener.session_started``) counts one closure per discharge session
    start. Counting is synchronous (listener methods must not block); :meth:`flush`
    writes changed counts. A crash between a count and the next flush loses that count.
    """

    def __init__(self, kv: KVStore) -> None:
        """Bind to the agent's key/value store; call :meth:`load` before use."""
        self._kv = kv
        self._counts: dict[int, int] = {}
        self._dirty: set[int] = set()

    async def load(self) -> None:
        """Read the persisted counts; malformed entries are logged and read as 0."""
        self._counts = {}
        self._dirty = set()
        for key, value in (await self._kv.items(DISCHARGE_KEY)).items():
            try:
                cid = int(key[len(DISCHARGE_KEY) :])
            except ValueError:
                log.warning("discharge_cycles_invalid", key=key, value=value)
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                log.warning("discharge_cycles_invalid", key=key, value=value)
                continue
            self._counts[cid] = value

    def count(self, connector_id: int) -> int:
        """Closures counted on ``connector_id`` so far (0 if none)."""
        return self._counts.get(connector_id, 0)

    def record_closure(self, connector_id: int) -> None:
        """Count one contactor closure for a discharge session (persisted by :meth:`flush`)."""
        self._counts[connector_id] = self._counts.get(connector_id, 0) + 1
        self._dirty.add(connector_id)

    def note_session_started(self, session: Session) -> None:
        """Count the closure behind ``session`` when it is a discharge session."""
        if session.request.mode == "discharge":
            self.record_closure(session.connector_id)

    async def flush(self) -> None:
        """Persist every changed count; a count whose write fails stays pending."""
        for cid in sorted(self._dirty):
            await self._kv.set(f"{DISCHARGE_KEY}{cid}", self._counts.get(cid, 0))
            self._dirty.discard(cid)

    async def reset(self, connector_id: int) -> int:
        """Set the count to 0 durably (the contactor was replaced); return the previous count."""
        previous = self._counts.get(connector_id, 0)
        await self._kv.set(f"{DISCHARGE_KEY}{connector_id}", 0)
        self._counts[connector_id] = 0
        self._dirty.discard(connector_id)
        log.info("discharge_contactor_cycles_reset", connector=connector_id, previous=previous)
        return previous


def imd_reading(connector: Connector) -> IsolationResult | None:
    """The IMD's current fresh reading as an isolation result (None without one)."""
    imd = connector.hw.imd
    reading = imd.reading() if imd is not None else None
    if reading is None or reading.resistance_kohm is None or not math.isfinite(reading.resistance_kohm):
        return None
    age = max(0.0, time.monotonic() - reading.taken_at)
    at = datetime.now(UTC) - timedelta(seconds=age)
    return IsolationResult(float(reading.resistance_kohm), to_iso(at))


class ComponentHealth:
    """Builds the §14.1 block and keeps the two counters it persists itself.

    Lifecycle: ``await load()`` at start-up; ``await sync(connectors)`` periodically
    (about every second) and once at shutdown, to persist new isolation results and
    discharge closures; :meth:`build` whenever a telemetry sample is taken.
    """

    def __init__(self, kv: KVStore, config: HealthConfig | None = None) -> None:
        """Bind to the agent's key/value store with ``config`` (defaults if None)."""
        self.config = config or HealthConfig()
        self.isolation = IsolationHistory(kv)
        self.discharge = DischargeCycles(kv)
        self._imd_seen: dict[int, IsolationResult] = {}

    async def load(self) -> None:
        """Read the persisted isolation results and discharge counts."""
        await self.isolation.load()
        await self.discharge.load()

    async def sync(self, connectors: Iterable[Connector]) -> None:
        """Persist what changed in memory. A store error is logged and retried next call."""
        try:
            for connector in connectors:
                await self.isolation.observe(connector)
            await self.discharge.flush()
        except StoreError as exc:
            log.warning("component_health_persist_failed", error=str(exc))

    def contactor_max_cycles(self, connector: Connector) -> int:
        """The driver's ``options.rated_cycles`` if it states one, else the per-kind default."""
        options = getattr(connector.hw.contactor, "options", None)
        rated = getattr(options, "rated_cycles", None)
        if isinstance(rated, int) and not isinstance(rated, bool) and rated > 0:
            return rated
        if connector.config.kind == "dc":
            return self.config.contactor_max_cycles_dc
        return self.config.contactor_max_cycles_ac

    def build(self, connector: Connector) -> dict[str, Any]:
        """The ``component_health`` block of ``connector`` (see the module docstring)."""
        cfg = self.config
        contactor = connector.hw.contactor.status()
        block: dict[str, Any] = {
            "contactor_cycles": contactor.cycles,
            "contactor_max_cycles": self.contactor_max_cycles(connector),
        }
        thermal = connector.hw.thermal
        fan = thermal.fans().get(cfg.fan) if thermal is not None else None
        if fan is not None:
            if fan.rpm is not None and math.isfinite(fan.rpm):
                block["cooling_fan_rpm"] = round(fan.rpm)
            block["cooling_fan_status"] = fan_status(fan, cfg)
        block["internal_temps"] = self._internal_temps(connector)
        block["relay_state"] = relay_state(contactor)
        isolation = self.isolation.latest(connector)
        if isolation is None:  # no cable check ever: the IMD's reading (kept while it is busy)
            isolation = imd_reading(connector) or self._imd_seen.get(connector.id)
            if isolation is not None:
                self._imd_seen[connector.id] = isolation
        if isolation is not None:
            block["isolation_test_kohms"] = round(isolation.kohm, 1)
            block["last_isolation_test"] = isolation.at
        stage = connector.hw.bidirectional
        if stage is not None:
            status = stage.status()
            block["bidirectional_inverter_cycles"] = status.cycles
            if cfg.bidirectional_max_cycles is not None:
                block["bidirectional_inverter_max_cycles"] = cfg.bidirectional_max_cycles
            thd = status.harmonic_distortion_pct
            if thd is not None and math.isfinite(thd):
                block["harmonic_distortion_v2g_pct"] = round(thd, 2)
            block["discharge_contactor_cycles"] = self.discharge.count(connector.id)
        return block

    def missing(self, connector: Connector, block: dict[str, Any]) -> list[str]:
        """Fields the hardware could give but ``block`` lacks yet (drivers still starting):
        the isolation pair with an IMD, the fan fields with the fan, a temperature whose
        sensor exists. The telemetry sampler waits for these before its first sample."""
        absent: list[str] = []
        if connector.hw.imd is not None and "isolation_test_kohms" not in block:
            absent.append("isolation_test_kohms")
        thermal = connector.hw.thermal
        if thermal is None:
            return absent
        fan = thermal.fans().get(self.config.fan)
        if fan is not None and "cooling_fan_rpm" not in block:
            absent.append("cooling_fan_rpm")
        names = self.config.internal_temps.model_dump()
        if connector.config.kind == "dc" and connector.config.outlet_sensor:
            names["dc_outlet"] = connector.config.outlet_sensor
        sensors = thermal.temperatures()
        temps = block.get("internal_temps", {})
        absent += [
            f"internal_temps.{key}"
            for key in INTERNAL_TEMPS
            if names[key] in sensors and key not in temps
        ]
        return absent

    def _internal_temps(self, connector: Connector) -> dict[str, float]:
        thermal = connector.hw.thermal
        if thermal is None:
            return {}
        names = self.config.internal_temps.model_dump()
        if connector.config.kind == "dc" and connector.config.outlet_sensor:
            names["dc_outlet"] = connector.config.outlet_sensor
        readings = thermal.temperatures()
        temps: dict[str, float] = {}
        for key in INTERNAL_TEMPS:
            reading = readings.get(names[key])
            if (
                reading is not None
                and reading.celsius is not None
                and math.isfinite(reading.celsius)
            ):
                temps[key] = round(reading.celsius, 1)
        return temps


__all__ = [
    "CORE_FIELDS",
    "INTERNAL_TEMPS",
    "V2G_FIELDS",
    "ComponentHealth",
    "DischargeCycles",
    "HealthConfig",
    "InternalTempSensors",
    "IsolationHistory",
    "IsolationResult",
    "fan_status",
    "relay_state",
]
