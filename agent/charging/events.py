"""What a connector publishes, as typed events, to the listeners that subscribed to it.

The connector state machine knows nothing of reporting, telemetry, archives or
channels: it publishes one :data:`ConnectorEvent` at a time to every
:class:`ConnectorListener` it holds (the way python-can's ``Notifier`` feeds its
``Listener`` objects), in the order things happened. Contract for listeners:

* :meth:`ConnectorListener.connector_event` must return at once: it runs inside the
  control loop. Anything slow (disk, network) is queued by the listener.
* A listener that raises is logged and skipped; the other listeners still get the event
  and the connector carries on (a reporting bug never stops a safe shutdown).
* Events carry the session object itself; listeners must treat it as read-only.

:class:`SessionFinished` carries the finished session (``stop_reason`` set, accounting
final) and the end time: the charging record is built from it by the reporting side.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from agent.charging.session import Checkpoint, Session


class ConnectorState(enum.StrEnum):
    IDLE = "idle"
    VEHICLE_CONNECTED = "vehicle_connected"
    PREPARING = "preparing"
    CHARGING = "charging"
    DISCHARGING = "discharging"
    FINISHING = "finishing"
    FAULT = "fault"
    UNAVAILABLE = "unavailable"

    @property
    def telemetry_state(self) -> str:
        """The platform's four telemetry states (platform-api gap G7 Project choice)."""
        if self in (ConnectorState.CHARGING, ConnectorState.DISCHARGING):
            return self.value
        if self in (ConnectorState.FAULT, ConnectorState.UNAVAILABLE):
            return "fault"
        return "idle"


@dataclass(frozen=True, slots=True)
class StateChanged:
    connector_id: int
    old: ConnectorState
    new: ConnectorState


@dataclass(frozen=True, slots=True)
class VehicleEvent:
    """A platform event of the connector: ``plug_in``, ``plug_out`` or ``start``."""

    connector_id: int
    event_type: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SessionStarted:
    session: Session


@dataclass(frozen=True, slots=True)
class SessionProgress:
    """The session's accounting changed enough to be checkpointed."""

    session: Session


@dataclass(frozen=True, slots=True)
class SessionSuspended:
    """Energy transfer stopped for a shutdown; the session stays open for a resume."""

    session: Session


@dataclass(frozen=True, slots=True)
class SessionFinished:
    """The session ended (output already safe); exactly one per session."""

    session: Session
    ended_at: datetime
    stop_reason: str
    message: str
    fault_id: str | None = None


@dataclass(frozen=True, slots=True)
class CheckpointAbandoned:
    """A persisted session that will not resume (suspended, vehicle gone): close it from its checkpoint."""

    connector_id: int
    checkpoint: Checkpoint
    stop_reason: str
    message: str


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    """A command the connector owned reached a status (``completed``, ``failed``)."""

    command_id: str
    status: str
    message: str | None = None
    details: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class SetpointChanged:
    """A new output setpoint was sent to the power stage (DC) or the pilot duty changed (AC)."""

    connector_id: int
    voltage: float | None
    current: float | None
    pwm_duty: float | None = None


@dataclass(frozen=True, slots=True)
class IsolationMeasured:
    """A DC cable check measured the insulation: the lowest fresh reading, or the one that failed it."""

    connector_id: int
    resistance_kohm: float
    at: str  # ISO 8601 UTC
    passed: bool


ConnectorEvent = (
    StateChanged
    | VehicleEvent
    | SessionStarted
    | SessionProgress
    | SessionSuspended
    | SessionFinished
    | CheckpointAbandoned
    | CommandOutcome
    | SetpointChanged
    | IsolationMeasured
)


class ConnectorListener(Protocol):
    """Subscribes to a connector's events; see the module contract."""

    def connector_event(self, event: ConnectorEvent) -> None: ...
