"""OCPP charging profiles (Smart Charging) feeding the connectors' power limits.

Profiles are kept per connector (0 = the whole charge point) and persisted. Every second,
and at once when a session starts or ends on any connector (:meth:`connector_event`),
:meth:`ChargingProfiles.apply` sets each connector's limit source ``"ocpp"``. The rule:

1. **Own limit** of connector *n*: the TxProfile of its running transaction if one applies,
   else its TxDefaultProfile (one installed on *n* or on connector 0); of each purpose the
   valid profile with the highest stack level at that instant wins (Absolute, Relative to
   the transaction start, Recurring Daily/Weekly; validFrom/validTo; duration).
2. **Charge-point limit** (ChargePointMaxProfile, connector 0 only) caps the *sum* over the
   connectors (OCPP 1.6 §3.13.2). It is shared among the connectors that have a session:
   each gets at most its *ceiling* -- the lowest of its own limit, its rating and its other
   limit sources (Tellus ``set_power_limit``/``pause_charging``, schedules) -- and the
   budget one connector cannot use goes to the others in equal parts
   (:func:`agent.channels.ocpp.budget.share`). A connector without a session is given the
   share it would get if it started now, so a starting session never pushes the sum over
   the budget; the split is re-evaluated the moment a session starts or ends.
3. The connector's own rule -- the lowest limit of all sources wins -- combines the result
   with the Tellus limits.

Units: a limit in W is used as is. A limit in A is per phase: on an AC connector times
230 V and ``numberPhases`` (default: the connector's phases); on a DC connector times its
present output voltage (its maximum voltage without a reading); on connector 0 (the grid
connection) times 230 V and ``numberPhases`` (default 3).

GetCompositeSchedule evaluates the rule at every instant where any profile may change
(period starts, schedule ends, validity bounds, recurrences) within the requested
duration, so the periods are exact. Connector 0 reports the charge-point schedule: the
ChargePointMaxProfile limit, capped by the sum of the connectors' ceilings.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from typing import Any, Awaitable, Callable

from agent.channels.ocpp.budget import share
from agent.charging.connector import Connector
from agent.charging.events import ConnectorEvent, SessionFinished, SessionStarted, SessionSuspended
from agent.utctime import to_iso as iso

PURPOSES = ("ChargePointMaxProfile", "TxDefaultProfile", "TxProfile")
LIMIT_SOURCE = "ocpp"
GRID_VOLTS = 230.0
MAX_COMPOSITE_PERIODS = 1024


def _parse(ts: str | None) -> datetime | None:
    if not ts:
        return None
    try:
        value = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


class ChargingProfiles:
    def __init__(
        self,
        connectors: dict[int, Connector],
        persist: Callable[[list[dict[str, Any]]], Awaitable[None]],
        tx_start: Callable[[int], datetime | None],
        max_stack_level: int = 8,
    ) -> None:
        self.connectors = connectors
        self.persist = persist
        self.tx_start = tx_start
        self.max_stack_level = max_stack_level
        self.installed: list[dict[str, Any]] = []  # {"connector_id": n, **profile (snake_case)}
        self.dirty = False

    def load(self, stored: list[dict[str, Any]]) -> None:
        self.installed = [p for p in stored if isinstance(p, dict)]

    def set(self, connector_id: int, profile: dict[str, Any]) -> str:
        """SetChargingProfile: ``Accepted`` | ``Rejected``."""
        purpose = profile.get("charging_profile_purpose")
        if connector_id != 0 and connector_id not in self.connectors:
            return "Rejected"
        if purpose == "ChargePointMaxProfile" and connector_id != 0:
            return "Rejected"
        if purpose == "TxProfile":
            if connector_id == 0 or self.tx_start(connector_id) is None:
                return "Rejected"
        if int(profile.get("stack_level", 0)) > self.max_stack_level:
            return "Rejected"
        self.installed = [
            p
            for p in self.installed
            if p.get("charging_profile_id") != profile.get("charging_profile_id")
            and not (
                p["connector_id"] == connector_id
                and p.get("charging_profile_purpose") == purpose
                and p.get("stack_level") == profile.get("stack_level")
            )
        ]
        self.installed.append({"connector_id": connector_id, **profile})
        self.dirty = True
        self.apply()
        return "Accepted"

    def clear(self, profile_id: int | None, connector_id: int | None, purpose: str | None, stack_level: int | None) -> bool:
        def matches(p: dict[str, Any]) -> bool:
            if profile_id is not None:
                return bool(p.get("charging_profile_id") == profile_id)
            return (
                (connector_id is None or p["connector_id"] == connector_id)
                and (purpose is None or p.get("charging_profile_purpose") == purpose)
                and (stack_level is None or p.get("stack_level") == stack_level)
            )

        before = len(self.installed)
        self.installed = [p for p in self.installed if not matches(p)]
        if len(self.installed) != before:
            self.dirty = True
            self.apply()
        return len(self.installed) != before

    def transaction_ended(self, connector_id: int) -> None:
        """TxProfiles live as long as their transaction."""
        before = len(self.installed)
        self.installed = [p for p in self.installed if not (p["connector_id"] == connector_id and p.get("charging_profile_purpose") == "TxProfile")]
        if len(self.installed) != before:
            self.dirty = True

    async def flush(self) -> None:
        if self.dirty:
            self.dirty = False
            await self.persist(self.installed)

    # ------------------------------------------------------------------ re-evaluation on session changes

    def attach(self) -> None:
        """Listen to every connector so the split follows sessions starting and ending."""
        for connector in self.connectors.values():
            add = getattr(connector, "add_listener", None)
            if add is not None:
                add(self)

    def detach(self) -> None:
        for connector in self.connectors.values():
            remove = getattr(connector, "remove_listener", None)
            if remove is not None:
                remove(self)

    def connector_event(self, event: ConnectorEvent) -> None:
        if isinstance(event, (SessionStarted, SessionFinished, SessionSuspended)):
            self.apply()

    # ------------------------------------------------------------------ evaluation of one profile

    def _start_of(self, profile: dict[str, Any], connector_id: int, at: datetime, origin: datetime | None) -> datetime:
        """Start of the schedule (the current recurrence for a Recurring one) as seen at ``at``."""
        schedule = profile.get("charging_schedule") or {}
        kind = profile.get("charging_profile_kind")
        start = _parse(schedule.get("start_schedule"))
        if kind == "Relative":
            return self.tx_start(connector_id) or origin or at
        if kind == "Recurring":
            period = _recurrence(profile)
            start = start or origin or at
            if at > start:
                start += period * int((at - start) / period)
            return start
        return start or origin or at

    def _limit_at(self, profile: dict[str, Any], connector_id: int, at: datetime, origin: datetime | None = None) -> float | None:
        """The limit (kW) of one profile at ``at``, or None when it does not apply then."""
        valid_from, valid_to = _parse(profile.get("valid_from")), _parse(profile.get("valid_to"))
        if (valid_from and at < valid_from) or (valid_to and at >= valid_to):
            return None
        schedule = profile.get("charging_schedule") or {}
        start = self._start_of(profile, connector_id, at, origin)
        offset = (at - start).total_seconds()
        duration = schedule.get("duration")
        if offset < 0 or (duration is not None and offset >= duration):
            return None
        current: dict[str, Any] | None = None
        for period in sorted(schedule.get("charging_schedule_period") or [], key=lambda p: p.get("start_period", 0)):
            if period.get("start_period", 0) <= offset:
                current = period
        if current is None:
            return None
        return self._to_kw(connector_id, float(current["limit"]), schedule.get("charging_rate_unit", "W"), current.get("number_phases"))

    def _changes(self, profile: dict[str, Any], connector_id: int, begin: datetime, end: datetime, origin: datetime) -> frozenset[datetime]:
        """Every instant in (begin, end) at which this profile's limit may change."""
        out = {t for t in (_parse(profile.get("valid_from")), _parse(profile.get("valid_to"))) if t is not None}
        schedule = profile.get("charging_schedule") or {}
        first = self._start_of(profile, connector_id, begin, origin)
        starts = [first]
        if profile.get("charging_profile_kind") == "Recurring":
            period = _recurrence(profile)
            while starts[-1] < end and len(starts) < MAX_COMPOSITE_PERIODS:
                starts.append(starts[-1] + period)
        for start in starts:
            out.add(start)
            out.update(start + timedelta(seconds=p.get("start_period", 0)) for p in schedule.get("charging_schedule_period") or [])
            if schedule.get("duration") is not None:
                out.add(start + timedelta(seconds=schedule["duration"]))
        return frozenset(t for t in out if begin < t < end)

    # ------------------------------------------------------------------ units

    def _volts_phases(self, connector_id: int, phases: int | None) -> float:
        """kW per A of a connector (connector 0: the grid connection)."""
        connector = self.connectors.get(connector_id)
        if connector is None:
            return GRID_VOLTS * (phases or 3) / 1000.0
        if connector.is_dc:
            reading = connector.hw.meter.reading()
            volts = reading.voltage if reading is not None and reading.voltage > 50 else float(connector.config.max_voltage_v)
            return volts / 1000.0
        return GRID_VOLTS * (phases or getattr(connector.config, "phases", 3) or 3) / 1000.0

    def _to_kw(self, connector_id: int, limit: float, unit: str, phases: int | None) -> float:
        return limit / 1000.0 if unit == "W" else limit * self._volts_phases(connector_id, phases)

    def _from_kw(self, connector_id: int, kw: float, unit: str) -> float:
        return round(kw * 1000.0, 1) if unit == "W" else round(kw / self._volts_phases(connector_id, None), 1)

    # ------------------------------------------------------------------ the rule

    def _best(self, connector_id: int, purpose: str, at: datetime, origin: datetime | None = None) -> float | None:
        """The limit of the highest-stack-level profile of ``purpose`` that applies at ``at``."""
        scope = (connector_id,) if purpose != "TxDefaultProfile" else (0, connector_id)
        candidates = [p for p in self.installed if p.get("charging_profile_purpose") == purpose and p["connector_id"] in scope]
        for profile in sorted(candidates, key=lambda p: (int(p.get("stack_level", 0)), p["connector_id"]), reverse=True):
            found = self._limit_at(profile, connector_id, at, origin)
            if found is not None:
                return found
        return None

    def own_kw(self, connector_id: int, at: datetime, origin: datetime | None = None) -> float | None:
        """TxProfile of the running transaction if one applies, else TxDefaultProfile (kW)."""
        tx = self._best(connector_id, "TxProfile", at, origin) if self.tx_start(connector_id) is not None else None
        return tx if tx is not None else self._best(connector_id, "TxDefaultProfile", at, origin)

    def charge_point_kw(self, at: datetime, origin: datetime | None = None) -> float | None:
        """The ChargePointMaxProfile limit (kW) for the whole charge point at ``at``."""
        return self._best(0, "ChargePointMaxProfile", at, origin)

    def _ceiling(self, connector_id: int, at: datetime, origin: datetime | None = None) -> float:
        connector = self.connectors[connector_id]
        bounds = [float(connector.config.max_power_kw)]
        bounds += [kw for source, kw in (getattr(connector, "limits", None) or {}).items() if source != LIMIT_SOURCE]
        session = getattr(connector, "session", None)
        if session is not None and session.request.power_kw is not None:
            bounds.append(float(session.request.power_kw))
        own = self.own_kw(connector_id, at, origin)
        if own is not None:
            bounds.append(own)
        return max(0.0, min(bounds))

    def allocation(self, at: datetime | None = None, origin: datetime | None = None) -> dict[int, float | None]:
        """The ``ocpp`` limit (kW, None = none) of every connector at ``at`` (see the module rule)."""
        at = at or datetime.now(timezone.utc)
        own = {cid: self.own_kw(cid, at, origin) for cid in self.connectors}
        budget = self.charge_point_kw(at, origin)
        if budget is None:
            return dict(own)
        ceilings = {cid: self._ceiling(cid, at, origin) for cid in self.connectors}
        charging = {cid: ceilings[cid] for cid, c in self.connectors.items() if getattr(c, "session", None) is not None}
        grants: dict[int, float | None] = dict(share(budget, charging))
        for cid in self.connectors:
            if cid not in grants:
                grants[cid] = share(budget, {**charging, cid: ceilings[cid]})[cid]
        return grants

    def limit_kw(self, connector_id: int, at: datetime | None = None) -> float | None:
        return self.allocation(at).get(connector_id)

    def apply(self) -> None:
        for cid, kw in self.allocation().items():
            self.connectors[cid].set_limit(LIMIT_SOURCE, kw)

    # ------------------------------------------------------------------ GetCompositeSchedule

    def _value_at(self, connector_id: int, at: datetime, origin: datetime) -> float:
        if connector_id == 0:
            total = sum(self._ceiling(cid, at, origin) for cid in self.connectors)
            budget = self.charge_point_kw(at, origin)
            return total if budget is None else min(budget, total)
        kw = self.allocation(at, origin)[connector_id]
        return float(self.connectors[connector_id].config.max_power_kw) if kw is None else kw

    def composite(self, connector_id: int, duration: int, unit: str | None) -> tuple[str, dict[str, Any]] | None:
        """(scheduleStart, chargingSchedule) over ``duration`` s from now; None for an unknown connector."""
        if connector_id != 0 and connector_id not in self.connectors:
            return None
        unit = unit or "W"
        now = datetime.now(timezone.utc)
        start = now.replace(microsecond=now.microsecond // 1000 * 1000)  # scheduleStart to the millisecond
        end = start + timedelta(seconds=max(duration, 1))
        offsets = {0}
        for profile in self.installed:
            for cid in [int(profile["connector_id"])] if profile["connector_id"] else (list(self.connectors) or [0]):
                # startPeriod is whole seconds: a change within a second shows from the next one
                offsets |= {math.ceil((t - start).total_seconds()) for t in self._changes(profile, cid, start, end, start)}
        periods: list[dict[str, Any]] = []
        for offset in sorted(o for o in offsets if o < max(duration, 1))[:MAX_COMPOSITE_PERIODS]:
            value = self._from_kw(connector_id, self._value_at(connector_id, start + timedelta(seconds=offset), start), unit)
            if not periods or periods[-1]["limit"] != value:
                periods.append({"start_period": offset, "limit": value})
        schedule = {"duration": duration, "charging_rate_unit": unit, "charging_schedule_period": periods}
        return iso(start, millis=True), schedule


def _recurrence(profile: dict[str, Any]) -> timedelta:
    return timedelta(days=7 if profile.get("recurrency_kind") == "Weekly" else 1)
