"""Stored charging schedules, executed autonomously (the network is not involved).

Schedules are persisted in the key/value store (``schedule/<connector>/<schedule_id>``)
with the time they were stored, and evaluated every few seconds with
:func:`agent.charging.schedule.active_slot`. For the active slot of a connector:

* ``charge``: the slot's ``power_limit`` (kW) is applied as the ``schedule`` limit and,
  when a vehicle is plugged in and no session runs, a session is started with start
  reason ``schedule`` (once per slot occurrence: a vehicle that stops by itself is
  not restarted within the same slot);
* ``idle``: the ``schedule`` limit is 0 kW (charging paused);
* ``discharge``: a V2G discharge at the slot's power is requested (rejected on
  hardware that is not V2G-capable; logged once per slot).

When no slot is active the ``schedule`` limit is removed and a session the schedule
started is stopped with reason ``schedule``. A new schedule with the same id
replaces the stored one; ``enabled = false`` disables it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Callable, Literal

import structlog

from agent.charging.schedule_spec import ScheduleSpec
from agent.charging.connector import Connector, Rejected
from agent.charging.schedule import ActiveSlot, active_slot, is_finished
from agent.charging.session import SessionRequest
from agent.utctime import utc_now

log = structlog.get_logger(__name__)

SOURCE = "schedule"


def _key(connector_id: int, schedule_id: str) -> str:
    return f"schedule/{connector_id}/{schedule_id}"


class Scheduler:
    def __init__(
        self,
        kv: Any,
        connectors: dict[int, Connector],
        default_zone: str,
        *,
        now: Callable[[], datetime] = utc_now,
    ) -> None:
        self.kv = kv
        self.connectors = connectors
        self.default_zone = default_zone
        self.now = now
        self.schedules: dict[int, dict[str, tuple[ScheduleSpec, datetime]]] = {cid: {} for cid in connectors}
        self._started: dict[int, tuple[str, datetime]] = {}
        self._attempted: dict[int, tuple[str, datetime]] = {}

    async def load(self) -> None:
        for key, value in (await self.kv.items("schedule/")).items():
            try:
                _, cid, _sid = key.split("/", 2)
                model = ScheduleSpec.model_validate(value["params"])
                stored = datetime.fromisoformat(value["stored_at"])
            except (ValueError, KeyError, TypeError):
                log.warning("stored_schedule_unreadable", key=key)
                continue
            if int(cid) in self.schedules:
                self.schedules[int(cid)][model.schedule_id] = (model, stored)

    async def store(self, connector_id: int, schedule: ScheduleSpec) -> datetime | None:
        """Persist (replace) a schedule; return the start of its next/current slot, if any."""
        stored_at = self.now()
        await self.kv.set(
            _key(connector_id, schedule.schedule_id),
            {"params": schedule.model_dump(mode="json"), "stored_at": stored_at.isoformat()},
        )
        self.schedules[connector_id][schedule.schedule_id] = (schedule, stored_at)
        self.evaluate()
        return None

    def active(self, connector_id: int) -> ActiveSlot | None:
        now = self.now()
        for schedule, stored_at in self.schedules.get(connector_id, {}).values():
            slot = active_slot(schedule, now, default_zone=self.default_zone, stored_at=stored_at)
            if slot is not None:
                return slot
        return None

    async def purge_finished(self) -> None:
        now = self.now()
        for cid, table in self.schedules.items():
            for sid, (schedule, stored_at) in list(table.items()):
                if is_finished(schedule, now, default_zone=self.default_zone, stored_at=stored_at):
                    del table[sid]
                    await self.kv.delete(_key(cid, sid))
                    log.info("schedule_finished", connector=cid, schedule_id=sid)

    def evaluate(self) -> None:
        """Apply the active slot of every connector (called every few seconds)."""
        for cid, connector in self.connectors.items():
            slot = self.active(cid)
            session = connector.session
            if slot is None:
                connector.set_limit(SOURCE, None)
                if session is not None and session.request.start_reason == "schedule" and cid in self._started:
                    self._started.pop(cid, None)
                    try:
                        connector.request_stop("schedule")
                    except Rejected:
                        pass
                continue
            occurrence = (slot.schedule_id, slot.starts_at)
            if slot.action == "idle":
                connector.set_limit(SOURCE, 0.0)
                continue
            connector.set_limit(SOURCE, slot.power_limit_kw)
            if session is not None or connector.in_session() or self._attempted.get(cid) == occurrence:
                continue
            if connector.state.value != "vehicle_connected":
                continue
            self._attempted[cid] = occurrence
            mode: Literal["charge", "discharge"] = "discharge" if slot.action == "discharge" else "charge"
            request = SessionRequest(
                mode=mode,
                start_reason="schedule",
                target_soc=slot.target_soc if mode == "charge" else None,
                power_kw=slot.power_limit_kw if mode == "discharge" else None,
                schedule_id=slot.schedule_id,
            )
            try:
                connector.request_start(request)
                self._started[cid] = occurrence
                log.info("schedule_session_requested", connector=cid, schedule_id=slot.schedule_id, action=slot.action)
            except Rejected as exc:
                log.warning("schedule_session_refused", connector=cid, schedule_id=slot.schedule_id, reason=str(exc))
