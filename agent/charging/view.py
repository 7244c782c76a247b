"""A read-only snapshot of one connector: what readers outside the charging core may see.

:meth:`agent.charging.connector.Connector.snapshot` builds a :class:`ConnectorSnapshot`
from the HAL drivers' cached snapshots (never awaiting, never touching a bus), so
status, telemetry, health and archive read one consistent, immutable picture instead
of the state machine's internals. ``meter`` is ``None`` when the meter has no fresh
reading; every other field is always present.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from agent.charging.events import ConnectorState
from hal.interfaces import ContactorStatus, MeterReading, TemperatureReading, VehicleStatus


@dataclass(frozen=True, slots=True)
class SessionView:
    record_id: str
    mode: str
    start_time: datetime
    energy_kwh: float  # moved so far (import when charging, export when discharging)
    max_power_kw: float
    soc_start: int | None
    transaction_id: str | None


@dataclass(frozen=True, slots=True)
class ConnectorSnapshot:
    id: int
    kind: str  # "dc" | "ac"
    state: ConnectorState
    plugged: bool
    meter: MeterReading | None
    vehicle: VehicleStatus
    contactor: ContactorStatus
    outlet_temperature: TemperatureReading | None  # the configured outlet sensor, if any
    session: SessionView | None
    limit_kw: float
    unavailable_reason: str | None
    last_error: str | None
    last_isolation_kohm: float | None  # latest passed cable check (None before the first)
    last_isolation_at: str | None  # ISO 8601 UTC of that check
