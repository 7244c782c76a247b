"""Stored schedules run autonomously: no uplink exists in these tests at all."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from agent.commands.params import SetSchedule
from agent.charging.connector import ConnectorState
from agent.charging.scheduler import Scheduler
from agent.store import Store
from tests.agent.charging.test_connector import Rig


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def schedule(**kw: object) -> SetSchedule:
    body: dict[str, object] = {
        "schedule_id": "night",
        "enabled": True,
        "type": "daily",
        "timezone": "Europe/London",
        "time_slots": [{"start": "23:30", "end": "00:30", "power_limit": 11, "action": "charge"}],
    }
    body.update(kw)
    return SetSchedule.model_validate(body)


async def test_schedule_starts_limits_and_stops_a_session_offline(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "state")
    clock = Clock(datetime(2025, 1, 10, 23, 0, tzinfo=timezone.utc))
    try:
        async with Rig() as rig:
            scheduler = Scheduler(store.kv, {1: rig.connector}, "UTC", now=clock)
            await scheduler.store(1, schedule())
            rig.vehicle.plug()
            await rig.until(lambda: rig.connector.state is ConnectorState.VEHICLE_CONNECTED)
            scheduler.evaluate()
            assert rig.connector.session is None and rig.connector.limits.get("schedule") is None

            clock.now = datetime(2025, 1, 10, 23, 45, tzinfo=timezone.utc)  # inside the slot (crosses midnight)
            scheduler.evaluate()
            await rig.until(lambda: rig.connector.state is ConnectorState.CHARGING)
            assert rig.connector.session is not None and rig.connector.session.request.start_reason == "schedule"
            assert rig.connector.effective_limit_kw() == 11

            clock.now = datetime(2025, 1, 11, 0, 31, tzinfo=timezone.utc)  # slot over
            scheduler.evaluate()
            await rig.until(lambda: rig.listener.records != [])
            assert rig.listener.records[0]["stop_reason"] == "schedule"
            assert rig.connector.limits.get("schedule") is None
    finally:
        await store.close()


async def test_schedule_survives_a_restart_and_does_not_restart_within_the_slot(tmp_path: Path) -> None:
    clock = Clock(datetime(2025, 7, 1, 22, 0, tzinfo=timezone.utc))  # 23:00 London (BST)
    store = await Store.open(tmp_path / "state")
    async with Rig() as rig:
        await Scheduler(store.kv, {1: rig.connector}, "UTC", now=clock).store(1, schedule(time_slots=[
            {"start": "22:30", "end": "23:59", "action": "charge"}]))
    await store.close()

    store = await Store.open(tmp_path / "state")  # a restart: the schedule comes back from disk
    try:
        async with Rig() as rig:
            scheduler = Scheduler(store.kv, {1: rig.connector}, "UTC", now=clock)
            await scheduler.load()
            assert "night" in scheduler.schedules[1]
            rig.vehicle.plug()
            await rig.until(lambda: rig.connector.state is ConnectorState.VEHICLE_CONNECTED)
            scheduler.evaluate()
            await rig.until(lambda: rig.connector.state is ConnectorState.CHARGING)
            rig.vehicle.wants_energy = False  # the EV stops by itself within the slot
            await rig.until(lambda: rig.listener.records != [])
            rig.vehicle.wants_energy = True
            clock.now += timedelta(minutes=5)
            scheduler.evaluate()
            assert rig.connector.session is None and len(rig.listener.records) == 1
    finally:
        await store.close()


async def test_idle_slot_pauses_with_a_zero_limit(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "state")
    clock = Clock(datetime(2025, 1, 10, 12, 0, tzinfo=timezone.utc))
    try:
        async with Rig() as rig:
            scheduler = Scheduler(store.kv, {1: rig.connector}, "UTC", now=clock)
            await scheduler.store(1, schedule(time_slots=[{"start": "11:00", "end": "13:00", "action": "idle"}]))
            assert rig.connector.effective_limit_kw() == 0.0
            await scheduler.store(1, schedule(enabled=False))  # same id replaces it
            assert rig.connector.limits.get("schedule") is None
    finally:
        await store.close()
