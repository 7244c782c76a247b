"""Which connector a connector command without a connector means (Project choice, issue 8).

A command delivered in a heartbeat response carries no connector, and ``PendingCommand``
has no ``connector_id``. Rather than refusing it, :func:`resolve` picks the one connector it
can only mean:

* a single-connector charger: its connector, for every command;
* ``stop_charging``, ``pause_charging``, ``set_power_limit``: the one connector with an
  active (or armed) session. With no session at all ``stop_charging`` is refused ("no
  active session"), while a limit applies to the whole charger, as before;
* ``start_charging``, ``discharge``: the one connector with a vehicle connected and no
  session;
* anything else connector-scoped (``set_schedule``): no guess, ``params.connector_id`` is
  required.

When more than one connector fits, the answer is *ambiguous* with the candidates; the
dispatcher holds such a command briefly in case the same ``command_id`` arrives on a
connector's long-poll, then rejects it naming the candidates.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.charging.connector import Connector, ConnectorState

__all__ = ["AMBIGUOUS_PREFIX", "Resolution", "ambiguity_message", "resolve"]

SESSION_COMMANDS = frozenset({"stop_charging", "pause_charging", "set_power_limit"})
START_COMMANDS = frozenset({"start_charging", "discharge"})
#: commands that mean the whole charger when no session runs
DEVICE_WIDE_WHEN_IDLE = frozenset({"pause_charging", "set_power_limit"})
AMBIGUOUS_PREFIX = "params.connector_id: ambiguous"


@dataclass(frozen=True)
class Resolution:
    """``connector_id`` when resolved (None with ``device_wide``), else ``candidates``
    (ambiguous, two or more) or a rejection ``reason``."""

    connector_id: int | None = None
    candidates: list[int] = field(default_factory=list)
    reason: str | None = None
    device_wide: bool = False

    @property
    def ambiguous(self) -> bool:
        return len(self.candidates) >= 2


def _pick(command: str, fits: list[int], none_reason: str) -> Resolution:
    if len(fits) == 1:
        return Resolution(connector_id=fits[0])
    if fits:
        return Resolution(candidates=fits)
    if command in DEVICE_WIDE_WHEN_IDLE:
        return Resolution(device_wide=True)
    return Resolution(reason=none_reason)


def resolve(command: str, connectors: Mapping[int, Connector]) -> Resolution:
    """Apply the module's rule to ``command`` arriving without a connector."""
    if len(connectors) == 1:
        return Resolution(connector_id=next(iter(connectors)))
    ids = sorted(connectors)
    if command in SESSION_COMMANDS:
        active = [cid for cid in ids if connectors[cid].busy()]
        return _pick(command, active, f"no active session on any connector (have {ids})")
    if command in START_COMMANDS:
        free = [cid for cid in ids if connectors[cid].state is ConnectorState.VEHICLE_CONNECTED
                and not connectors[cid].busy()]
        return _pick(
            command, free, f"no connector has a vehicle connected without a session (have {ids})"
        )
    return Resolution(
        reason="params.connector_id: required for this command when it arrives without a "
        "connector (heartbeat)"
    )


def ambiguity_message(command: str, candidates: list[int]) -> str:
    """The rejection naming the candidate connectors."""
    what = "have an active session" if command in SESSION_COMMANDS else "have a vehicle waiting"
    names = ", ".join(str(c) for c in candidates[:-1]) + f" and {candidates[-1]}"
    return (
        f"{AMBIGUOUS_PREFIX}: {command} arrived without a connector and connectors {names} "
        f"{what}; send params.connector_id"
    )
