"""The platform's fault dictionary and the agent's own codes, in one table.

The dictionary uses string ids (``F-0411``); the API wants an integer ``fault_code``.
Project choice (platform-api §9.3): the integer is the numeric part (``F-0411`` ->
``411``), ``fault_message`` starts with the string id, and ``details.fault_id``
carries it. Change :func:`numeric_code` if the platform publishes a mapping.

Codes from the dictionary keep its title and severity. Codes the dictionary does not
have (meter, IMD, pilot) are this project's and use free numbers in the same scheme.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol
from agent.utctime import now_iso


class Severity(enum.StrEnum):
    ERROR = "error"  # reported as a `fault` event; heartbeat status `fault`
    WARNING = "warning"  # reported as an `alarm` event; heartbeat stays `online`


@dataclass(frozen=True)
class FaultDef:
    fault_id: str
    title: str
    severity: Severity
    stops_session: bool
    source: str  # "dictionary" or "project"


FAULTS: dict[str, FaultDef] = {
    f.fault_id: f
    for f in (
        FaultDef("F-0101", "Contactor weld detected", Severity.ERROR, True, "dictionary"),
        FaultDef("F-0203", "Connector over-temperature", Severity.WARNING, False, "dictionary"),
        FaultDef("F-0204", "Cabinet over-temperature", Severity.ERROR, True, "dictionary"),
        FaultDef("F-0302", "Reconnect storm", Severity.WARNING, False, "dictionary"),
        FaultDef("F-0411", "Power module communication timeout", Severity.ERROR, False, "dictionary"),
        FaultDef("F-0421", "Contactor failed to engage on session start", Severity.ERROR, True, "dictionary"),
        FaultDef("F-0601", "Cooling fan below nominal RPM", Severity.WARNING, False, "dictionary"),
        FaultDef("F-0701", "V2G inverter sync lost", Severity.ERROR, True, "dictionary"),
        FaultDef("F-0702", "EV battery management refused discharge", Severity.WARNING, False, "dictionary"),
        FaultDef("F-0805", "Session terminated unexpectedly", Severity.WARNING, False, "dictionary"),
        # project codes (not in the dictionary)
        FaultDef("F-0102", "Insulation fault", Severity.ERROR, True, "project"),
        FaultDef("F-0103", "Insulation monitor not responding", Severity.ERROR, True, "project"),
        FaultDef("F-0104", "Insulation monitor self-test failed", Severity.ERROR, True, "project"),
        FaultDef("F-0304", "OCPP transaction message dead-lettered", Severity.WARNING, False, "project"),
        FaultDef("F-0412", "All power modules lost", Severity.ERROR, True, "project"),
        FaultDef("F-0413", "Power module alarm", Severity.ERROR, True, "project"),
        FaultDef("F-0422", "Contactor opened or closed unexpectedly", Severity.ERROR, True, "project"),
        FaultDef("F-0451", "Energy meter communication lost", Severity.ERROR, True, "project"),
        FaultDef("F-0452", "Energy meter frozen", Severity.ERROR, True, "project"),
        FaultDef("F-0801", "Control pilot error", Severity.ERROR, True, "project"),
        FaultDef("F-0802", "Output voltage present before contactor close", Severity.ERROR, True, "project"),
        FaultDef("F-0303", "Upload refused by the platform (kept as a dead letter)", Severity.WARNING, False, "project"),
    )
}


def numeric_code(fault_id: str) -> int:
    """``"F-0411"`` -> ``411`` (platform-api §9.3 Project choice)."""
    return int(fault_id.split("-", 1)[1])


@dataclass(frozen=True)
class ActiveFault:
    fault_id: str
    connector_id: int | None  # None = device-wide
    details: dict[str, Any] = field(default_factory=dict)
    raised_at: str = field(default_factory=now_iso)

    @property
    def definition(self) -> FaultDef:
        return FAULTS[self.fault_id]

    def event_data(self, *, cleared: bool = False) -> dict[str, Any]:
        """``data`` of the `fault`/`alarm` event (platform-api §7.2 shape)."""
        d = self.definition
        details = {"fault_id": d.fault_id, **self.details}
        if cleared:
            details["cleared"] = True
        return {
            "fault_code": numeric_code(d.fault_id),
            "fault_message": f"{d.fault_id} {d.title}" + (" (cleared)" if cleared else ""),
            "details": details,
        }


def most_severe(faults: list[ActiveFault]) -> ActiveFault | None:
    """The fault the heartbeat reports: errors before warnings, then the lowest id."""
    if not faults:
        return None
    return sorted(faults, key=lambda f: (f.definition.severity is not Severity.ERROR, f.fault_id))[0]


class FaultSink(Protocol):
    """Where raised/cleared faults go (the reporter implements it; must not block)."""

    def fault_raised(self, fault: ActiveFault) -> None: ...
    def fault_cleared(self, fault: ActiveFault) -> None: ...


class FaultBoard:
    """Every active fault of the charger; reports each transition exactly once.

    ``raise_`` of a fault that is already active (same id and connector) does
    nothing; ``clear`` of an inactive fault does nothing. So callers may evaluate
    their condition every tick and call raise/clear unconditionally.
    """

    def __init__(self, sink: FaultSink | None = None) -> None:
        self._active: dict[tuple[str, int | None], ActiveFault] = {}
        self.sink = sink

    def raise_(self, fault_id: str, connector_id: int | None, **details: Any) -> bool:
        key = (fault_id, connector_id)
        if key in self._active:
            return False
        fault = ActiveFault(fault_id, connector_id, dict(details))
        self._active[key] = fault
        if self.sink is not None:
            self.sink.fault_raised(fault)
        return True

    def clear(self, fault_id: str, connector_id: int | None) -> bool:
        fault = self._active.pop((fault_id, connector_id), None)
        if fault is None:
            return False
        if self.sink is not None:
            self.sink.fault_cleared(fault)
        return True

    def set(self, fault_id: str, connector_id: int | None, active: bool, **details: Any) -> None:
        """Raise when ``active`` else clear: for conditions evaluated every tick."""
        if active:
            self.raise_(fault_id, connector_id, **details)
        else:
            self.clear(fault_id, connector_id)

    def is_active(self, fault_id: str, connector_id: int | None) -> bool:
        return (fault_id, connector_id) in self._active

    def active(self, connector_id: int | None = None) -> list[ActiveFault]:
        """Faults of one connector plus device-wide ones; all faults when connector_id is None."""
        if connector_id is None:
            return list(self._active.values())
        return [f for f in self._active.values() if f.connector_id in (connector_id, None)]

    def blocking(self, connector_id: int) -> list[ActiveFault]:
        """Active faults that forbid energy transfer on this connector."""
        return [f for f in self.active(connector_id) if f.definition.stops_session]
