"""OCPP charging profiles (Smart Charging) feeding the connectors' power limits.

Profiles are kept per connector (0 = the whole charge point) and persisted. Every
second :meth:`ChargingProfiles.apply` evaluates, per connector, the valid profile with
the highest stack level of each purpose at the current time (Absolute, Relative to the
transaction start, Recurring Daily/Weekly) and sets the connector limit source ``"ocpp"``
to ``min(ChargePointMaxProfile, TxProfile if one applies else TxDefaultProfile)``. The
connector's own rule -- the lowest limit of all sources wins -- combines it with the
Tellus ``set_power_limit``/``pause_charging`` and schedules. Current limits (A) become kW
at 230 V per phase (AC) or at the connector's present output voltage (DC).

Simplifications (README): a ChargePointMaxProfile caps each connector, it is not shared
out between them; GetCompositeSchedule reports the limit period by period without merging
TxDefault and Max profiles across period boundaries beyond ``min`` of the two at each start.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, Awaitable, Callable

from agent.charging.connector import Connector
from agent.utctime import to_iso as iso

PURPOSES = ("ChargePointMaxProfile", "TxDefaultProfile", "TxProfile")
LIMIT_SOURCE = "ocpp"


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

    # ------------------------------------------------------------------ evaluation

    def _limit_at(self, profile: dict[str, Any], connector_id: int, at: datetime) -> tuple[float, datetime | None] | None:
        """(limit in kW, when the current period ends) of one profile at ``at``, or None."""
        valid_from, valid_to = _parse(profile.get("valid_from")), _parse(profile.get("valid_to"))
        if (valid_from and at < valid_from) or (valid_to and at >= valid_to):
            return None
        schedule = profile.get("charging_schedule") or {}
        kind = profile.get("charging_profile_kind")
        start = _parse(schedule.get("start_schedule"))
        if kind == "Relative":
            start = self.tx_start(connector_id) or at
        elif kind == "Recurring":
            period = timedelta(days=7 if profile.get("recurrency_kind") == "Weekly" else 1)
            start = start or at
            while start + period <= at:
                start += period
        if start is None:
            start = at
        offset = (at - start).total_seconds()
        duration = schedule.get("duration")
        if offset < 0 or (duration is not None and offset >= duration):
            return None
        current: dict[str, Any] | None = None
        next_start: datetime | None = None
        for period in sorted(schedule.get("charging_schedule_period") or [], key=lambda p: p.get("start_period", 0)):
            if period.get("start_period", 0) <= offset:
                current = period
            elif next_start is None:
                next_start = start + timedelta(seconds=period["start_period"])
        if current is None:
            return None
        return self._to_kw(connector_id, float(current["limit"]), schedule.get("charging_rate_unit", "W"), current.get("number_phases")), next_start

    def _to_kw(self, connector_id: int, limit: float, unit: str, phases: int | None) -> float:
        if unit == "W":
            return limit / 1000.0
        connector = self.connectors.get(connector_id) or next(iter(self.connectors.values()))
        if connector.is_dc:
            reading = connector.hw.meter.reading()
            volts = reading.voltage if reading is not None and reading.voltage > 50 else float(connector.config.max_voltage_v)
            return limit * volts / 1000.0
        return limit * 230.0 * (phases or getattr(connector.config, "phases", 3) or 3) / 1000.0

    def _best(self, connector_id: int, purpose: str, at: datetime) -> float | None:
        candidates = [
            p
            for p in self.installed
            if p.get("charging_profile_purpose") == purpose and p["connector_id"] in ((0, connector_id) if purpose != "TxProfile" else (connector_id,))
        ]
        for profile in sorted(candidates, key=lambda p: (int(p.get("stack_level", 0)), p["connector_id"]), reverse=True):
            found = self._limit_at(profile, connector_id, at)
            if found is not None:
                return found[0]
        return None

    def limit_kw(self, connector_id: int, at: datetime | None = None) -> float | None:
        at = at or datetime.now(timezone.utc)
        limits = [v for v in (self._best(connector_id, "ChargePointMaxProfile", at),) if v is not None]
        tx = self._best(connector_id, "TxProfile", at) if self.tx_start(connector_id) is not None else None
        default = tx if tx is not None else self._best(connector_id, "TxDefaultProfile", at)
        if default is not None:
            limits.append(default)
        return min(limits) if limits else None

    def apply(self) -> None:
        for cid, connector in self.connectors.items():
            connector.set_limit(LIMIT_SOURCE, self.limit_kw(cid))

    def composite(self, connector_id: int, duration: int, unit: str | None) -> tuple[str, dict[str, Any]] | None:
        """(scheduleStart, chargingSchedule) sampled every minute over ``duration`` s."""
        if connector_id != 0 and connector_id not in self.connectors:
            return None
        cid = connector_id or min(self.connectors)
        start = datetime.now(timezone.utc).replace(microsecond=0)
        periods: list[dict[str, Any]] = []
        step = max(60, duration // 24 or 60)
        for offset in range(0, max(duration, 1), step):
            kw = self.limit_kw(cid, start + timedelta(seconds=offset))
            if kw is None:
                kw = self.connectors[cid].config.max_power_kw if cid in self.connectors else 0.0
            value = round(kw * 1000.0, 1)
            if unit == "A":
                value = round(kw * 1000.0 / (230.0 * 3), 1)
            if not periods or periods[-1]["limit"] != value:
                periods.append({"start_period": offset, "limit": value})
        schedule = {"duration": duration, "charging_rate_unit": unit or "W", "charging_schedule_period": periods}
        return iso(start), schedule
