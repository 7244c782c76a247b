"""The connector's boundary: typed events to every listener, a failing listener isolated, a read-only snapshot."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from agent.charging import events as ev
from agent.charging.connector import ConnectorState
from agent.charging.session import SessionRequest

from tests.agent.charging.test_connector import Rig


class Broken:
    def connector_event(self, event: ev.ConnectorEvent) -> None:
        raise RuntimeError("listener bug")


class Collect:
    def __init__(self) -> None:
        self.events: list[ev.ConnectorEvent] = []

    def connector_event(self, event: ev.ConnectorEvent) -> None:
        self.events.append(event)


async def test_every_listener_gets_the_typed_events_in_order_even_beside_a_broken_one() -> None:
    collect = Collect()
    async with Rig() as rig:
        rig.connector.listeners.insert(0, Broken())  # type: ignore[arg-type]
        rig.connector.add_listener(collect)
        rig.vehicle.plug()
        await rig.until(lambda: rig.connector.state is ConnectorState.VEHICLE_CONNECTED)
        rig.connector.request_start(SessionRequest(command_id="c1"))
        await rig.until(lambda: rig.connector.state is ConnectorState.CHARGING)
        await asyncio.sleep(0.2)
        rig.connector.request_stop("remote_stop", "c2")
        await rig.until(lambda: rig.listener.records != [])
        await rig.until(lambda: rig.connector.state is ConnectorState.VEHICLE_CONNECTED)
    kinds = [type(e).__name__ for e in collect.events]
    assert kinds.index("SessionStarted") < kinds.index("SessionFinished")
    measured = [e for e in collect.events if isinstance(e, ev.IsolationMeasured)]
    assert measured and measured[0].passed and measured[0].resistance_kohm > 0
    finished = next(e for e in collect.events if isinstance(e, ev.SessionFinished))
    assert finished.stop_reason == "remote_stop" and finished.session.stop_reason == "remote_stop"
    assert any(isinstance(e, ev.SetpointChanged) and e.current is not None for e in collect.events)
    states = [(e.old, e.new) for e in collect.events if isinstance(e, ev.StateChanged)]
    assert (ConnectorState.PREPARING, ConnectorState.CHARGING) in states
    outcomes = {(e.command_id, e.status) for e in collect.events if isinstance(e, ev.CommandOutcome)}
    assert {("c1", "completed"), ("c2", "completed")} <= outcomes
    # the broken listener did not stop the recording one either: one record, built from the event
    assert len(rig.listener.records) == 1 and rig.listener.records[0]["energy"] > 0


async def test_the_snapshot_is_a_consistent_read_only_view() -> None:
    async with Rig() as rig:
        rig.vehicle.plug()
        await rig.until(lambda: rig.connector.state is ConnectorState.VEHICLE_CONNECTED)
        rig.connector.request_start(SessionRequest(transaction_id="tx-1"))
        await rig.until(lambda: rig.connector.state is ConnectorState.CHARGING)
        await asyncio.sleep(0.2)
        snap = rig.connector.snapshot()
        assert snap.state is ConnectorState.CHARGING and snap.plugged and snap.kind == "dc"
        assert snap.session is not None and snap.session.transaction_id == "tx-1"
        assert snap.contactor.coil_energised and snap.meter is not None
        assert snap.last_isolation_kohm is not None and snap.last_isolation_at is not None
        with pytest.raises(dataclasses.FrozenInstanceError):
            snap.state = ConnectorState.IDLE  # type: ignore[misc]
        rig.connector.request_stop("remote_stop")
        await rig.until(lambda: rig.connector.snapshot().session is None)
