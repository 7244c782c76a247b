"""The command dispatcher: every way a delivered command is refused, de-duplicated or dropped.

Real parts throughout: a :class:`~agent.store.Store` in ``tmp_path`` (ledger, audit log,
outbox), the :class:`~agent.channels.tellus.reporter.Reporter` writing statuses into it, the operational
handlers with real :class:`~agent.charging.limits.PowerLimits` / :class:`~agent.charging.scheduler.Scheduler`,
and real :class:`~agent.charging.connector.Connector` state machines (1 DC, 2 AC) running on the
in-memory HAL fakes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agent.commands.dispatcher import CommandContext, CommandSpec, Dispatcher
from agent.commands.operational import operational_specs
from agent.commands.params import NoParams
from agent.charging.config import ChargingSection, ConnectorConfig, DeviceSection
from agent.charging.connector import Connector, ConnectorHardware, ConnectorState
from agent.charging.faults import FaultBoard
from agent.charging.limits import PowerLimits
from agent.channels.tellus.reporter import Reporter
from agent.charging.scheduler import Scheduler
from agent.store import Store
from tests.agent.fakes import FakeContactor, FakeImd, FakeMeter, FakeModules, FakeVehicle
from tests.agent.helpers import decision_audit, until

NOW = datetime(2025, 3, 15, 10, 30, tzinfo=UTC)
HOLD_S = 0.3
SCHEDULE = {
    "schedule_id": "night",
    "enabled": True,
    "type": "daily",
    "time_slots": [{"start": "01:00", "end": "05:00", "action": "charge", "power_limit": 11}],
}


class RecordingReporter(Reporter):
    """The real reporter (ledger + outbox) that also remembers what the dispatcher reported."""

    def __init__(self, store: Store, connector_ids: list[int]) -> None:
        super().__init__(store, connector_ids)
        self.reported: list[tuple[str, str, str | None]] = []

    def command_status(
        self, command_id: str, status: str, message: str | None = None, details: dict[str, Any] | None = None
    ) -> None:
        self.reported.append((command_id, status, message))
        super().command_status(command_id, status, message, details)


def _dev() -> DeviceSection:
    return DeviceSection(driver="fake")


class Charger:
    """Connectors on fakes + store + reporter + dispatcher, as the runtime wires them."""

    def __init__(self, store: Store, *, connectors: tuple[int, ...] = (1, 2), v2g: bool = False) -> None:
        self.store = store
        self.faults = FaultBoard()
        self.reporter = RecordingReporter(store, list(connectors))
        self.vehicles: dict[int, FakeVehicle] = {}
        self.hw: dict[int, ConnectorHardware] = {}
        self.connectors: dict[int, Connector] = {}
        policy = ChargingSection(
            tick_s=0.02, isolation_grace_s=0.0, isolation_readings=2, current_ramp_a_per_s=1000.0,
            meter_loss_grace_s=0.5, ev_ready_timeout_s=2.0,
        )
        for cid in connectors:
            dc = cid == 1
            contactor = FakeContactor()
            modules = FakeModules(contactor=contactor) if dc else None
            vehicle = FakeVehicle()
            self.vehicles[cid] = vehicle
            cfg = ConnectorConfig(
                id=cid, kind="dc" if dc else "ac", max_power_kw=60 if dc else 22, max_current_a=150 if dc else 32,
                power_modules=_dev() if dc else None, meter=_dev(), contactor=_dev(), vehicle=_dev(),
            )
            hw = ConnectorHardware(
                meter=FakeMeter(modules=modules), contactor=contactor, vehicle=vehicle,
                modules=modules, imd=FakeImd() if dc else None,
            )
            self.hw[cid] = hw
            self.connectors[cid] = Connector(cfg, hw, policy, self.faults, self.reporter)
        self.limits = PowerLimits(store.kv, self.connectors, lambda cid, d: self.reporter.command_status(cid, "completed", None, d))
        self.scheduler = Scheduler(store.kv, self.connectors, "UTC")
        self.specs = operational_specs(self.limits, self.scheduler, v2g_capable=v2g)
        self.dispatcher = Dispatcher(
            store.ledger, self.reporter, self.connectors, self.specs, now=lambda: NOW, hold_s=HOLD_S
        )
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.reporter.start()
        self._tasks = [asyncio.create_task(c.run()) for c in self.connectors.values()]
        await asyncio.sleep(0.05)

    async def stop(self) -> None:
        await self.dispatcher.close()
        for c in self.connectors.values():
            await c.shutdown()
        await asyncio.wait_for(asyncio.gather(*self._tasks), 10)
        await self.reporter.stop()

    # ------------------------------------------------------------------ helpers

    async def deliver(self, raw: Any, channel: str = "heartbeat", connector_id: int | None = None) -> None:
        await self.dispatcher.deliver(raw, channel, connector_id)
        await self.reporter.drain()

    def reported(self, command_id: str) -> list[tuple[str, str | None]]:
        return [(s, m) for c, s, m in self.reporter.reported if c == command_id]

    async def rejected_with(self, raw: dict[str, Any], channel: str = "heartbeat", connector_id: int | None = None) -> str:
        """Deliver ``raw``; assert it was rejected once (and only that); return the message."""
        await self.deliver(raw, channel, connector_id)
        reports = self.reported(raw["command_id"])
        assert [s for s, _ in reports] == ["rejected"], reports
        message = reports[0][1]
        assert message
        entry = await self.store.ledger.seen(raw["command_id"])
        assert entry is not None and entry.status == "rejected" and entry.message == message and entry.completed
        audit = [a for a in await decision_audit(self.store.ledger) if a.command_id == raw["command_id"]]
        assert [a.outcome for a in audit] == ["rejected"], audit
        assert audit[0].source == channel
        return message

    async def plug(self, cid: int) -> None:
        self.vehicles[cid].plug()
        await until(lambda: self.connectors[cid].state is ConnectorState.VEHICLE_CONNECTED)

    async def queued_statuses(self, command_id: str) -> list[str]:
        items = await self.store.outbox.next_batch(1000, ["command_status"])
        return [i.payload["status"] for i in items if i.payload["command_id"] == command_id]


@pytest.fixture
async def charger(store: Store) -> AsyncIterator[Charger]:
    c = Charger(store)
    await c.start()
    yield c
    await c.stop()


# ---------------------------------------------------------------------------- command name


async def test_unknown_command_is_rejected_naming_it(charger: Charger) -> None:
    msg = await charger.rejected_with({"command_id": "c1", "command": "self_destruct", "params": {}})
    assert msg.startswith("command: unknown command 'self_destruct'")
    assert "start_charging" in msg  # lists what is supported
    audit = await decision_audit(charger.store.ledger)
    assert audit[-1].message == "unknown command" and audit[-1].command == "self_destruct"


@pytest.mark.parametrize("command", [None, "", 42, ["start_charging"]])
async def test_missing_or_non_string_command_is_rejected(charger: Charger, command: Any) -> None:
    raw: dict[str, Any] = {"command_id": "c1", "params": {}}
    if command is not None:
        raw["command"] = command
    msg = await charger.rejected_with(raw)
    assert msg == "command: expected a non-empty string"


# ---------------------------------------------------------------------------- params


@pytest.mark.parametrize("params", [[], "connector_id=1", 5, None, True])
async def test_params_that_are_not_an_object_are_rejected(charger: Charger, params: Any) -> None:
    await charger.plug(2)
    msg = await charger.rejected_with({"command_id": "c1", "command": "start_charging", "params": params}, "long_poll:2", 2)
    assert msg.startswith("params: expected an object")
    assert charger.connectors[2].session is None and not charger.connectors[2].in_session()


async def test_absent_params_mean_an_empty_object(charger: Charger) -> None:
    await charger.plug(2)
    await charger.deliver({"command_id": "c1", "command": "start_charging"}, "long_poll:2", 2)
    assert [s for s, _ in charger.reported("c1")] == ["accepted"]
    await until(lambda: charger.connectors[2].state is ConnectorState.CHARGING)


@pytest.mark.parametrize(
    ("command", "params", "field"),
    [
        ("set_power_limit", {"power_limit_percent": 50}, "params.duration"),
        ("set_power_limit", {"duration": 60}, "params.power_limit_percent"),
        ("pause_charging", {}, "params.duration"),
        ("discharge", {"duration": 600}, "params.discharge_power"),
        ("set_schedule", {k: v for k, v in SCHEDULE.items() if k != "schedule_id"}, "params.schedule_id"),
        ("set_schedule", {k: v for k, v in SCHEDULE.items() if k != "time_slots"}, "params.time_slots"),
        ("set_schedule", {**SCHEDULE, "time_slots": [{"start": "01:00", "action": "charge"}]}, "params.time_slots[0].end"),
    ],
)
async def test_missing_required_param_is_rejected_naming_the_field(
    charger: Charger, command: str, params: dict[str, Any], field: str
) -> None:
    msg = await charger.rejected_with({"command_id": "c1", "command": command, "params": {**params, "connector_id": 1}})
    assert msg.startswith(f"{field}: required"), msg
    assert charger.limits.entries == [] and charger.scheduler.schedules[1] == {}


@pytest.mark.parametrize(
    ("command", "params", "field", "got"),
    [
        ("start_charging", {"target_soc": 120}, "params.target_soc", "(got 120)"),
        ("start_charging", {"target_soc": -1}, "params.target_soc", "(got -1)"),
        ("start_charging", {"charge_power": 0}, "params.charge_power", "(got 0)"),
        ("start_charging", {"charge_power": 5000}, "params.charge_power", "(got 5000)"),
        ("start_charging", {"duration": 0}, "params.duration", "(got 0)"),
        ("start_charging", {"duration": 8 * 86400}, "params.duration", f"(got {8 * 86400})"),
        ("start_charging", {"transaction_id": ""}, "params.transaction_id", "(got '')"),
        ("start_charging", {"connector_id": 0}, "params.connector_id", "(got 0)"),
        ("stop_charging", {"reason": "x" * 65}, "params.reason", ""),
        ("set_power_limit", {"power_limit_percent": -1, "duration": 60}, "params.power_limit_percent", "(got -1)"),
        ("set_power_limit", {"power_limit_percent": 101, "duration": 60}, "params.power_limit_percent", "(got 101)"),
        ("set_power_limit", {"power_limit_percent": 50, "duration": -5}, "params.duration", "(got -5)"),
        ("pause_charging", {"duration": 0}, "params.duration", "(got 0)"),
        ("discharge", {"discharge_power": -3}, "params.discharge_power", "(got -3)"),
        ("discharge", {"discharge_power": 10, "min_soc": 101}, "params.min_soc", "(got 101)"),
        ("set_schedule", {**SCHEDULE, "target_soc": 150}, "params.target_soc", "(got 150)"),
        ("set_schedule", {**SCHEDULE, "time_slots": [{"start": "25:00", "end": "05:00", "action": "charge"}]},
         "params.time_slots[0].start", "'25:00'"),
        ("set_schedule", {**SCHEDULE, "time_slots": [{"start": "01:00", "end": "05:00", "action": "charge", "power_limit": -1}]},
         "params.time_slots[0].power_limit", "(got -1)"),
        ("set_schedule", {**SCHEDULE, "time_slots": [{"start": "01:00", "end": "05:00", "action": "fly"}]},
         "params.time_slots[0].action", "'fly'"),
        ("set_schedule", {**SCHEDULE, "timezone": "Mars/Olympus_Mons"}, "params.timezone", "Mars/Olympus_Mons"),
    ],
)
async def test_out_of_range_param_is_rejected_naming_the_field(
    charger: Charger, command: str, params: dict[str, Any], field: str, got: str
) -> None:
    await charger.plug(1)
    msg = await charger.rejected_with({"command_id": "c1", "command": command, "params": params}, "long_poll:1", 1)
    assert msg.startswith(f"{field}: "), msg
    assert got in msg
    assert not charger.connectors[1].in_session() and charger.limits.entries == []
    assert charger.scheduler.schedules[1] == {}


@pytest.mark.parametrize(
    ("command", "params", "field"),
    [
        ("start_charging", {"target_soc": "abc"}, "params.target_soc"),
        ("start_charging", {"target_soc": 50.5}, "params.target_soc"),
        ("start_charging", {"charge_power": [7]}, "params.charge_power"),
        ("start_charging", {"transaction_id": 12345}, "params.transaction_id"),
        ("start_charging", {"connector_id": "one"}, "params.connector_id"),
        ("stop_charging", {"reason": {"why": "x"}}, "params.reason"),
        ("set_power_limit", {"power_limit_percent": "fifty", "duration": 60}, "params.power_limit_percent"),
        ("set_power_limit", {"power_limit_percent": 50, "duration": None}, "params.duration"),
        ("pause_charging", {"duration": "soon"}, "params.duration"),
        ("discharge", {"discharge_power": "lots"}, "params.discharge_power"),
        ("set_schedule", {**SCHEDULE, "enabled": [1]}, "params.enabled"),
        ("set_schedule", {**SCHEDULE, "type": "hourly"}, "params.type"),
        ("set_schedule", {**SCHEDULE, "time_slots": "01:00-05:00"}, "params.time_slots"),
        ("set_schedule", {**SCHEDULE, "effective_from": "next week"}, "params.effective_from"),
        ("set_schedule", {**SCHEDULE, "effective_from": "2025-03-16T00:00:00"}, "params.effective_from"),
    ],
)
async def test_wrong_param_type_is_rejected_naming_the_field(
    charger: Charger, command: str, params: dict[str, Any], field: str
) -> None:
    await charger.plug(1)
    msg = await charger.rejected_with({"command_id": "c1", "command": command, "params": params}, "long_poll:1", 1)
    assert msg.startswith(f"{field}: "), msg
    assert not charger.connectors[1].in_session() and charger.limits.entries == []


async def test_schedule_consistency_errors_are_rejected(charger: Charger) -> None:
    weekly = {**SCHEDULE, "type": "weekly"}
    msg = await charger.rejected_with({"command_id": "c1", "command": "set_schedule", "params": weekly}, "long_poll:1", 1)
    assert "time_slots[0].day_of_week is required" in msg and msg.startswith("params")
    empty = {**SCHEDULE, "time_slots": [{"start": "01:00", "end": "01:00", "action": "idle"}]}
    msg = await charger.rejected_with({"command_id": "c2", "command": "set_schedule", "params": empty}, "long_poll:1", 1)
    assert "time_slots[0]: start and end are equal" in msg


async def test_unknown_params_keys_are_ignored(charger: Charger) -> None:
    await charger.deliver(
        {"command_id": "c1", "command": "set_power_limit", "params": {"power_limit_percent": 50, "duration": 60, "colour": "blue"}}
    )
    assert [s for s, _ in charger.reported("c1")] == ["accepted"]


# ---------------------------------------------------------------------------- expiry


async def test_expired_command_is_rejected_and_not_executed(charger: Charger) -> None:
    await charger.plug(2)
    past = (NOW - timedelta(seconds=1)).isoformat().replace("+00:00", "Z")
    msg = await charger.rejected_with(
        {"command_id": "c1", "command": "start_charging", "params": {}, "expiry": past}, "long_poll:2", 2
    )
    assert msg == "expired"
    assert not charger.connectors[2].in_session()
    # exactly "now" counts as expired too
    msg = await charger.rejected_with(
        {"command_id": "c2", "command": "set_power_limit", "params": {"power_limit_percent": 10, "duration": 60},
         "expiry": NOW.isoformat()}
    )
    assert msg == "expired" and charger.limits.entries == []


async def test_expiry_is_checked_before_anything_else_about_the_command(charger: Charger) -> None:
    past = (NOW - timedelta(hours=1)).isoformat()
    msg = await charger.rejected_with({"command_id": "c1", "command": "no_such_command", "params": {}, "expiry": past})
    assert msg == "expired"


async def test_future_expiry_is_executed(charger: Charger) -> None:
    future = (NOW + timedelta(minutes=5)).isoformat().replace("+00:00", "Z")
    await charger.deliver(
        {"command_id": "c1", "command": "set_power_limit", "params": {"power_limit_percent": 10, "duration": 60}, "expiry": future}
    )
    assert [s for s, _ in charger.reported("c1")] == ["accepted"]
    assert len(charger.limits.entries) == 2  # both connectors


@pytest.mark.parametrize(
    ("expiry", "expected"),
    [
        ("tomorrow", "expiry: expected an ISO 8601 date-time (got 'tomorrow')"),
        ("2025-13-45T99:00:00Z", "expiry: expected an ISO 8601 date-time"),
        ("2030-01-01T00:00:00", "expiry: expected a date-time with a time zone"),
        (1742034600, "expiry: expected an ISO 8601 date-time string"),
        ({"at": "2030-01-01T00:00:00Z"}, "expiry: expected an ISO 8601 date-time string"),
    ],
)
async def test_malformed_expiry_is_rejected(charger: Charger, expiry: Any, expected: str) -> None:
    msg = await charger.rejected_with(
        {"command_id": "c1", "command": "set_power_limit", "params": {"power_limit_percent": 10, "duration": 60}, "expiry": expiry}
    )
    assert msg.startswith(expected), msg
    assert charger.limits.entries == []


async def test_null_expiry_means_no_expiry(charger: Charger) -> None:
    await charger.deliver(
        {"command_id": "c1", "command": "set_power_limit", "params": {"power_limit_percent": 10, "duration": 60}, "expiry": None}
    )
    assert [s for s, _ in charger.reported("c1")] == ["accepted"]


# ---------------------------------------------------------------------------- connector resolution


async def test_set_schedule_on_heartbeat_needs_connector_id_when_there_are_several(charger: Charger) -> None:
    msg = await charger.rejected_with({"command_id": "c1", "command": "set_schedule", "params": SCHEDULE})
    assert msg.startswith("params.connector_id: required"), msg


async def test_stop_on_heartbeat_without_any_session_is_rejected(charger: Charger) -> None:
    msg = await charger.rejected_with({"command_id": "c1", "command": "stop_charging", "params": {}})
    assert msg == "no active session on any connector (have [1, 2])"


@pytest.mark.parametrize("command", ["start_charging", "discharge"])
async def test_start_on_heartbeat_with_two_vehicles_waiting_is_held_then_rejected_naming_both(
    charger: Charger, command: str
) -> None:
    params = {"discharge": {"discharge_power": 5}}.get(command, {})
    await charger.plug(1)
    await charger.plug(2)
    await charger.deliver({"command_id": "c1", "command": command, "params": params})
    assert charger.reported("c1") == []  # held, not yet decided
    await until(lambda: charger.reported("c1") != [], timeout=HOLD_S + 5)
    [(status, message)] = charger.reported("c1")
    assert status == "rejected" and message is not None
    assert message.startswith("params.connector_id: ambiguous") and "connectors 1 and 2" in message
    audit = [(a.outcome) for a in await decision_audit(charger.store.ledger) if a.command_id == "c1"]
    assert audit == ["held", "rejected"]
    assert not any(c.in_session() for c in charger.connectors.values())


async def test_start_on_heartbeat_goes_to_the_one_connector_with_a_vehicle_waiting(charger: Charger) -> None:
    await charger.plug(2)
    await charger.deliver({"command_id": "c1", "command": "start_charging", "params": {}})
    assert charger.reported("c1")[0][0] == "accepted"
    await until(lambda: charger.connectors[2].state is ConnectorState.CHARGING)
    assert not charger.connectors[1].in_session()


async def _two_sessions(charger: Charger) -> None:
    for cid in (1, 2):
        await charger.plug(cid)
        await charger.deliver({"command_id": f"start-{cid}", "command": "start_charging", "params": {}},
                              f"long_poll:{cid}", cid)
    await until(lambda: all(c.state is ConnectorState.CHARGING for c in charger.connectors.values()))


async def test_stop_on_heartbeat_stops_the_one_running_session(charger: Charger) -> None:
    await charger.plug(1)
    await charger.plug(2)
    await charger.deliver({"command_id": "s", "command": "start_charging", "params": {}}, "long_poll:2", 2)
    await until(lambda: charger.connectors[2].state is ConnectorState.CHARGING)
    await charger.deliver({"command_id": "c1", "command": "stop_charging", "params": {}})
    assert charger.reported("c1")[0][0] == "accepted"
    await until(lambda: not charger.connectors[2].in_session())
    assert charger.connectors[1].state is ConnectorState.VEHICLE_CONNECTED


async def test_long_poll_copy_of_a_held_stop_is_executed_on_its_connector(charger: Charger) -> None:
    await _two_sessions(charger)
    stop = {"command_id": "c1", "command": "stop_charging", "params": {}}
    await charger.deliver(stop)  # heartbeat: ambiguous, held
    await charger.deliver(stop, "long_poll:2", 2)  # the copy within the hold window
    assert charger.reported("c1")[0][0] == "accepted"
    await until(lambda: not charger.connectors[2].in_session())
    await asyncio.sleep(HOLD_S + 0.2)
    assert [s for s, _ in charger.reported("c1")] in (["accepted"], ["accepted", "completed"])
    assert charger.connectors[1].state is ConnectorState.CHARGING
    audit = [(a.source, a.outcome) for a in await decision_audit(charger.store.ledger) if a.command_id == "c1"]
    assert audit[:2] == [("heartbeat", "held"), ("long_poll:2", "accepted")]


async def test_an_ambiguity_rejection_does_not_make_a_later_long_poll_copy_a_duplicate(charger: Charger) -> None:
    await _two_sessions(charger)
    stop = {"command_id": "c1", "command": "stop_charging", "params": {}}
    await charger.deliver(stop)
    await until(lambda: charger.reported("c1") != [], timeout=HOLD_S + 5)
    assert charger.reported("c1")[0][0] == "rejected"
    assert all(c.in_session() for c in charger.connectors.values())
    await charger.deliver(stop, "long_poll:1", 1)
    assert [s for s, _ in charger.reported("c1")][:2] == ["rejected", "accepted"]
    await until(lambda: not charger.connectors[1].in_session())
    assert charger.connectors[2].in_session()
    await charger.deliver(stop, "long_poll:1", 1)  # a third copy now is a duplicate
    audit = [a.outcome for a in await decision_audit(charger.store.ledger) if a.command_id == "c1"]
    assert audit[:3] == ["held", "rejected", "accepted"] and audit[-1] == "duplicate"


async def test_limit_on_heartbeat_without_sessions_applies_to_the_whole_charger(charger: Charger) -> None:
    await charger.deliver(
        {"command_id": "c1", "command": "set_power_limit", "params": {"power_limit_percent": 50, "duration": 60}}
    )
    assert charger.reported("c1")[0][0] == "accepted"
    assert all(c.effective_limit_kw() == c.config.max_power_kw / 2 for c in charger.connectors.values())


async def test_connector_command_on_heartbeat_with_connector_id_is_executed(charger: Charger) -> None:
    await charger.plug(2)
    await charger.deliver({"command_id": "c1", "command": "start_charging", "params": {"connector_id": 2}})
    assert charger.reported("c1")[0][0] == "accepted"
    await until(lambda: charger.connectors[2].state is ConnectorState.CHARGING)
    assert not charger.connectors[1].in_session()


async def test_connector_command_on_heartbeat_goes_to_the_only_connector(store: Store) -> None:
    single = Charger(store, connectors=(2,))
    await single.start()
    try:
        await single.plug(2)
        await single.deliver({"command_id": "c1", "command": "start_charging", "params": {}})
        assert single.reported("c1")[0][0] == "accepted"
        await until(lambda: single.connectors[2].state is ConnectorState.CHARGING)
    finally:
        await single.stop()


@pytest.mark.parametrize(
    ("command", "params", "channel", "channel_connector"),
    [
        ("start_charging", {"connector_id": 7}, "heartbeat", None),
        ("start_charging", {"connector_id": 7}, "long_poll:1", 1),
        ("stop_charging", {"connector_id": 3}, "heartbeat", None),
        ("set_schedule", {**SCHEDULE, "connector_id": 9}, "heartbeat", None),
        ("set_power_limit", {"power_limit_percent": 20, "duration": 60, "connector_id": 9}, "heartbeat", None),
        ("pause_charging", {"duration": 60, "connector_id": 5}, "long_poll:2", 2),
    ],
)
async def test_unknown_connector_id_is_rejected(
    charger: Charger, command: str, params: dict[str, Any], channel: str, channel_connector: int | None
) -> None:
    await charger.plug(1)
    msg = await charger.rejected_with({"command_id": "c1", "command": command, "params": params}, channel, channel_connector)
    assert msg.startswith(f"params.connector_id: unknown connector {params['connector_id']} (have [1, 2])"), msg
    assert charger.limits.entries == [] and not charger.connectors[1].in_session()


async def test_explicit_connector_id_wins_over_the_long_poll_channel(charger: Charger) -> None:
    await charger.plug(2)
    await charger.deliver({"command_id": "c1", "command": "start_charging", "params": {"connector_id": 2}}, "long_poll:1", 1)
    assert charger.reported("c1")[0][0] == "accepted"
    await until(lambda: charger.connectors[2].state is ConnectorState.CHARGING)
    assert not charger.connectors[1].in_session()


# ---------------------------------------------------------------------------- handler refusals


async def test_start_without_vehicle_is_rejected(charger: Charger) -> None:
    msg = await charger.rejected_with({"command_id": "c1", "command": "start_charging", "params": {}}, "long_poll:1", 1)
    assert msg == "no vehicle connected to connector 1"
    await asyncio.sleep(0.1)
    assert not charger.connectors[1].in_session()


async def test_start_while_faulted_is_rejected(charger: Charger) -> None:
    imd = charger.hw[1].imd
    assert isinstance(imd, FakeImd)
    imd.kohm = 50.0  # insulation fault: the connector raises F-0102 itself
    charger.vehicles[1].plug()
    await until(lambda: charger.connectors[1].state is ConnectorState.FAULT)
    msg = await charger.rejected_with({"command_id": "c1", "command": "start_charging", "params": {}}, "long_poll:1", 1)
    assert msg == "connector 1 is faulted (F-0102)"
    imd.kohm = 5000.0
    await until(lambda: charger.connectors[1].state is ConnectorState.VEHICLE_CONNECTED)
    # a device-wide blocking fault refuses every connector
    await charger.plug(2)
    charger.faults.raise_("F-0204", None, temperature=90.0)
    msg = await charger.rejected_with({"command_id": "c2", "command": "start_charging", "params": {}}, "long_poll:2", 2)
    assert msg == "connector 2 is faulted (F-0204)"
    charger.faults.clear("F-0204", None)


async def test_start_while_a_session_runs_is_rejected(charger: Charger) -> None:
    await charger.plug(2)
    await charger.deliver({"command_id": "c1", "command": "start_charging", "params": {}}, "long_poll:2", 2)
    await until(lambda: charger.connectors[2].state is ConnectorState.CHARGING)
    msg = await charger.rejected_with({"command_id": "c2", "command": "start_charging", "params": {}}, "long_poll:2", 2)
    assert msg == "connector 2 already has a session"


async def test_stop_without_session_is_rejected(charger: Charger) -> None:
    msg = await charger.rejected_with({"command_id": "c1", "command": "stop_charging", "params": {}}, "long_poll:1", 1)
    assert msg == "no active session on connector 1"
    await charger.plug(1)
    msg = await charger.rejected_with(
        {"command_id": "c2", "command": "stop_charging", "params": {"reason": "user_request"}}, "long_poll:1", 1
    )
    assert msg == "no active session on connector 1"


async def test_discharge_on_hardware_without_v2g_is_rejected(charger: Charger) -> None:
    await charger.plug(1)
    msg = await charger.rejected_with(
        {"command_id": "c1", "command": "discharge", "params": {"discharge_power": 10}}, "long_poll:1", 1
    )
    assert msg == "connector 1 is not V2G-capable"
    await asyncio.sleep(0.1)
    assert not charger.connectors[1].in_session()


# ---------------------------------------------------------------------------- de-duplication


async def test_duplicate_command_id_is_executed_once_and_its_last_status_resent(charger: Charger) -> None:
    cmd = {"command_id": "c1", "command": "set_schedule", "params": {**SCHEDULE, "connector_id": 1}}
    await charger.deliver(cmd, "heartbeat")
    assert [s for s, _ in charger.reported("c1")] == ["accepted", "completed"]
    assert await charger.queued_statuses("c1") == ["accepted", "completed"]
    await charger.deliver(cmd, "long_poll:1", 1)  # the same command on the other channel
    await charger.deliver(cmd, "heartbeat")  # and once more
    # not executed again: nothing new reported by a handler...
    assert [s for s, _ in charger.reported("c1")] == ["accepted", "completed"]
    # ...but the last status is queued again for each repeated delivery
    assert await charger.queued_statuses("c1") == ["accepted", "completed", "completed", "completed"]
    audit = [a for a in await decision_audit(charger.store.ledger) if a.command_id == "c1"]
    assert [(a.source, a.outcome) for a in audit] == [
        ("heartbeat", "accepted"), ("long_poll:1", "duplicate"), ("heartbeat", "duplicate"),
    ]


async def test_duplicate_start_does_not_arm_a_second_session(charger: Charger) -> None:
    await charger.plug(2)
    cmd = {"command_id": "c1", "command": "start_charging", "params": {"transaction_id": "tx-1"}}
    await charger.deliver(cmd, "long_poll:2", 2)
    await until(lambda: charger.connectors[2].state is ConnectorState.CHARGING)
    await charger.deliver(cmd, "long_poll:2", 2)  # executed again it would be "already has a session"
    assert [s for s, _ in charger.reported("c1")] == ["accepted"]
    assert await charger.queued_statuses("c1") == ["accepted", "accepted"]


async def test_duplicate_of_a_changed_command_is_still_not_executed(charger: Charger) -> None:
    await charger.deliver({"command_id": "c1", "command": "set_power_limit", "params": {"power_limit_percent": 50, "duration": 60}})
    await charger.deliver({"command_id": "c1", "command": "pause_charging", "params": {"duration": 60}})
    assert [e.kw for e in charger.limits.entries] == [30.0, 11.0]  # the first command only, on both connectors
    assert [s for s, _ in charger.reported("c1")] == ["accepted"]


async def test_duplicate_of_a_rejected_command_resends_the_rejection(charger: Charger) -> None:
    cmd = {"command_id": "c1", "command": "stop_charging", "params": {}}
    await charger.rejected_with(cmd, "long_poll:1", 1)
    await charger.plug(1)
    await charger.deliver(cmd, "long_poll:1", 1)
    assert await charger.queued_statuses("c1") == ["rejected", "rejected"]
    assert [s for s, _ in charger.reported("c1")] == ["rejected"]


async def test_duplicate_before_any_status_resends_nothing(charger: Charger) -> None:
    await charger.store.ledger.record_received("c1", "start_charging", 1, {})  # e.g. crashed right after receipt
    await charger.plug(1)
    await charger.deliver({"command_id": "c1", "command": "start_charging", "params": {}}, "long_poll:1", 1)
    assert charger.reported("c1") == [] and await charger.queued_statuses("c1") == []
    assert not charger.connectors[1].in_session()
    audit = await decision_audit(charger.store.ledger)
    assert [a.outcome for a in audit] == ["duplicate"]


async def test_concurrent_deliveries_on_both_channels_execute_once(charger: Charger) -> None:
    await charger.plug(2)
    cmd = {"command_id": "c1", "command": "start_charging", "params": {"connector_id": 2}}
    await asyncio.gather(
        charger.dispatcher.deliver(cmd, "heartbeat", None),
        charger.dispatcher.deliver(cmd, "long_poll:2", 2),
        charger.dispatcher.deliver(cmd, "long_poll:1", 1),
    )
    await charger.reporter.drain()
    await until(lambda: charger.connectors[2].state is ConnectorState.CHARGING)
    outcomes = sorted(a.outcome for a in await decision_audit(charger.store.ledger))
    assert outcomes.count("duplicate") == 2 and len(outcomes) == 3
    assert [s for s, _ in charger.reported("c1")] == ["accepted"]


# ---------------------------------------------------------------------------- unreportable deliveries


@pytest.mark.parametrize(
    "raw",
    [
        {"command": "stop_charging", "params": {}},
        {"command_id": "", "command": "stop_charging"},
        {"command_id": None, "command": "stop_charging"},
        {"command_id": 17, "command": "stop_charging"},
        ["start_charging"],
        "start_charging",
        None,
    ],
)
async def test_delivery_without_command_id_is_audited_and_dropped(charger: Charger, raw: Any) -> None:
    await charger.plug(1)
    await charger.deliver(raw, "long_poll:1", 1)
    assert charger.reporter.reported == []
    assert await charger.store.outbox.next_batch(100, ["command_status"]) == []
    assert await charger.store.ledger.non_terminal() == []
    audit = await decision_audit(charger.store.ledger)
    assert len(audit) == 1
    assert audit[0].outcome == "dropped" and audit[0].command_id is None and audit[0].source == "long_poll:1"
    assert "command_id" in (audit[0].message or "")
    assert not charger.connectors[1].in_session()


# ---------------------------------------------------------------------------- audit log


async def test_every_decision_lands_in_the_audit_log(charger: Charger) -> None:
    await charger.plug(2)
    past = (NOW - timedelta(minutes=1)).isoformat()
    deliveries: list[tuple[Any, str, int | None]] = [
        ({"command_id": "a1", "command": "start_charging", "params": {"transaction_id": "tx"}}, "long_poll:2", 2),
        ({"command_id": "a1", "command": "start_charging", "params": {"transaction_id": "tx"}}, "heartbeat", None),
        ({"command_id": "a2", "command": "warp_drive", "params": {}}, "heartbeat", None),
        ({"command_id": "a3", "command": "set_power_limit", "params": {"power_limit_percent": 50}}, "heartbeat", None),
        ({"command_id": "a4", "command": "pause_charging", "params": {"duration": 60}, "expiry": past}, "heartbeat", None),
        ({"command_id": "a5", "command": "set_schedule", "params": SCHEDULE}, "heartbeat", None),
        ({"command_id": "a6", "command": "stop_charging", "params": {}}, "long_poll:1", 1),
        ({"command_id": "a7", "command": "discharge", "params": {"discharge_power": 7}}, "long_poll:1", 1),
        ({"command": "start_charging"}, "heartbeat", None),
        ({"command_id": "a8", "command": "set_power_limit", "params": {"power_limit_percent": 50, "duration": 60}}, "heartbeat", None),
        ({"command_id": "a9", "command": "set_schedule", "params": SCHEDULE}, "long_poll:1", 1),
    ]
    for raw, channel, cid in deliveries:
        await charger.deliver(raw, channel, cid)
    await until(lambda: charger.connectors[2].state is ConnectorState.CHARGING)
    await charger.deliver({"command_id": "a10", "command": "stop_charging", "params": {"reason": "user_request"}}, "long_poll:2", 2)
    audit = await decision_audit(charger.store.ledger)
    assert [(a.command_id, a.source, a.outcome) for a in audit] == [
        ("a1", "long_poll:2", "accepted"),
        ("a1", "heartbeat", "duplicate"),
        ("a2", "heartbeat", "rejected"),
        ("a3", "heartbeat", "rejected"),
        ("a4", "heartbeat", "rejected"),
        ("a5", "heartbeat", "rejected"),
        ("a6", "long_poll:1", "rejected"),
        ("a7", "long_poll:1", "rejected"),
        (None, "heartbeat", "dropped"),
        ("a8", "heartbeat", "accepted"),
        ("a9", "long_poll:1", "accepted"),
        ("a10", "long_poll:2", "accepted"),
    ]
    by_id = {a.command_id: a for a in audit if a.outcome != "duplicate"}
    assert by_id["a3"].message == "params.duration: required"
    assert by_id["a4"].message == "expired"
    assert by_id["a5"].message is not None and by_id["a5"].message.startswith("params.connector_id: required")
    assert by_id["a6"].message == "no active session on connector 1"
    assert by_id["a7"].message == "connector 1 is not V2G-capable"
    assert by_id["a1"].params == {"transaction_id": "tx"} and by_id["a1"].command == "start_charging"
    # every reportable decision also reached the ledger with a status
    for command_id in ("a2", "a3", "a4", "a5", "a6", "a7"):
        entry = await charger.store.ledger.seen(command_id)
        assert entry is not None and entry.status == "rejected"
    await until(lambda: ("a1", "completed", "Charging finished") in charger.reporter.reported)
    assert ("a10", "completed", "Charging stopped") in charger.reporter.reported


async def test_audit_log_is_append_only(charger: Charger) -> None:
    await charger.deliver({"command_id": "c1", "command": "nope", "params": {}})
    with pytest.raises(Exception, match="append-only"):
        await charger.store.db.run(lambda conn: conn.execute("DELETE FROM command_audit"))
    assert len(await decision_audit(charger.store.ledger)) == 1


# ---------------------------------------------------------------------------- handler failures


async def test_a_handler_crash_is_reported_failed_and_audited(store: Store) -> None:
    charger = Charger(store)

    async def broken(ctx: CommandContext) -> None:
        ctx.accepted()
        raise RuntimeError("disk on fire")

    charger.dispatcher.specs = {**charger.specs, "broken": CommandSpec("broken", NoParams, "device", broken)}
    await charger.start()
    try:
        await charger.deliver({"command_id": "c1", "command": "broken", "params": {}})
        statuses = [s for s, _ in charger.reported("c1")]
        assert statuses == ["accepted", "failed"]
        assert "disk on fire" in (charger.reported("c1")[1][1] or "")
        audit = await decision_audit(store.ledger)
        assert [(a.command_id, a.outcome) for a in audit] == [("c1", "failed")]
        entry = await store.ledger.seen("c1")
        assert entry is not None and entry.status == "failed"
        # the dispatcher still works afterwards
        await charger.deliver({"command_id": "c2", "command": "nope", "params": {}})
        assert [s for s, _ in charger.reported("c2")] == ["rejected"]
    finally:
        await charger.stop()


async def test_the_final_outcome_is_audited_after_the_decision(charger: Charger) -> None:
    cmd = {"command_id": "c-final", "command": "set_schedule", "params": {**SCHEDULE, "connector_id": 1}}
    await charger.deliver(cmd, "heartbeat")
    await charger.reporter.drain()
    rows = [a for a in await charger.store.ledger.audit_entries() if a.command_id == "c-final"]
    assert [(a.source, a.outcome) for a in rows] == [("heartbeat", "accepted"), ("agent", "completed")]
    assert rows[1].command == "set_schedule"
