"""ChargePointMaxProfile through the channel: one budget for two connectors, split as sessions come and go.

The local CSMS sets the profile and asks for composite schedules; the two connectors are
fakes that publish SessionStarted/SessionFinished like the real state machine, so the test
shows the split is re-evaluated at the moment a session starts or ends (not a tick later).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ocpp.v16 import call

from agent.charging.events import SessionFinished, SessionStarted
from agent.charging.session import Session
from agent.csms import Csms
from tests.agent.channels.ocpp.test_channel_delivery import CP, _channel, _stop, _until, csms  # noqa: F401
from tests.agent.channels.ocpp.test_transactions import FakeConnector


class BudgetConnector(FakeConnector):
    """A fake connector that keeps its limits and publishes session events to its listeners."""

    def __init__(self, cid: int, rated_kw: float) -> None:
        super().__init__()
        self.id = cid
        self.is_dc = False
        self.config = SimpleNamespace(max_power_kw=rated_kw, phases=3, max_voltage_v=500)
        self.limits: dict[str, float] = {}
        self.listeners: list[Any] = []

    def add_listener(self, listener: Any) -> None:
        self.listeners.append(listener)

    def remove_listener(self, listener: Any) -> None:
        self.listeners.remove(listener)

    def set_limit(self, source: str, kw: float | None) -> None:
        if kw is None:
            self.limits.pop(source, None)
        else:
            self.limits[source] = kw

    def effective_limit_kw(self) -> float:
        return min([self.config.max_power_kw, *self.limits.values()])

    def begin(self, record_id: str = "rec-1") -> Session:
        session = super().begin(record_id)
        for listener in list(self.listeners):
            listener.connector_event(SessionStarted(session))
        return session

    def end(self, reason: str | None) -> None:
        session = self.session
        super().end(reason)
        assert session is not None
        for listener in list(self.listeners):
            listener.connector_event(SessionFinished(session, datetime.now(timezone.utc), reason or "", ""))


def _cp_max(watts: float) -> dict[str, Any]:
    return {
        "chargingProfileId": 40, "stackLevel": 0, "chargingProfilePurpose": "ChargePointMaxProfile", "chargingProfileKind": "Absolute",
        "chargingSchedule": {"chargingRateUnit": "W", "startSchedule": datetime.now(timezone.utc).isoformat(),
                             "chargingSchedulePeriod": [{"startPeriod": 0, "limit": watts}]},
    }


async def test_charge_point_max_is_shared_between_two_connectors(tmp_path: Path, csms: Csms) -> None:  # noqa: F811
    one, two = BudgetConnector(1, 22.0), BudgetConnector(2, 22.0)
    channel, journal, _ = await _channel(tmp_path, csms, connectors={1: one, 2: two})
    try:
        await _until("online", lambda: channel.online)
        answer = await asyncio.wait_for(csms.call(CP, call.SetChargingProfile(connector_id=0, cs_charging_profiles=_cp_max(16000))), 5)
        assert answer.status == "Accepted"
        one.begin("rec-a")
        assert one.limits["ocpp"] == 16.0 and two.limits["ocpp"] == 8.0  # 2 idle: its share if it started
        two.begin("rec-b")
        assert one.limits["ocpp"] == 8.0 and two.limits["ocpp"] == 8.0  # at SessionStarted, before any tick
        one.end("user_request")
        assert two.limits["ocpp"] == 16.0
        whole = await asyncio.wait_for(csms.call(CP, call.GetCompositeSchedule(connector_id=0, duration=300, charging_rate_unit="W")), 5)
        assert whole.status == "Accepted" and whole.charging_schedule["charging_schedule_period"][0]["limit"] == 16000.0
        mine = await asyncio.wait_for(csms.call(CP, call.GetCompositeSchedule(connector_id=1, duration=300, charging_rate_unit="W")), 5)
        assert mine.charging_schedule["charging_schedule_period"][0]["limit"] == 8000.0  # idle 1 would get half
        assert csms.violations == []
    finally:
        await _stop(channel, journal)
    assert one.listeners == [] and two.listeners == []  # the channel let go of the connectors
