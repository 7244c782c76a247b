"""Charging profiles -> the connector limit source ``ocpp`` (stack levels, purposes, recurrency, units)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

from agent.channels.ocpp.profiles import ChargingProfiles


class FakeConnector:
    def __init__(self, dc: bool = False) -> None:
        self.is_dc = dc
        self.config = SimpleNamespace(max_voltage_v=500, phases=3, max_power_kw=22.0)
        self.hw = SimpleNamespace(meter=SimpleNamespace(reading=lambda: None))
        self.limits: dict[str, float] = {}

    def set_limit(self, source: str, kw: float | None) -> None:
        if kw is None:
            self.limits.pop(source, None)
        else:
            self.limits[source] = kw


def _profile(pid: int, purpose: str, level: int, limit: float, unit: str = "W", **extra: Any) -> dict[str, Any]:
    schedule = {"charging_rate_unit": unit, "charging_schedule_period": [{"start_period": 0, "limit": limit}]}
    schedule.update(extra.pop("schedule", {}))
    return {"charging_profile_id": pid, "stack_level": level, "charging_profile_purpose": purpose,
            "charging_profile_kind": extra.pop("kind", "Absolute" if "start_schedule" in schedule else "Relative"), "charging_schedule": schedule, **extra}


def _profiles(tx_running: bool = True) -> tuple[ChargingProfiles, dict[int, Any]]:
    connectors: dict[int, Any] = {1: FakeConnector(), 2: FakeConnector(dc=True)}
    start = datetime.now(timezone.utc) - timedelta(minutes=10)

    async def persist(_p: list[dict[str, Any]]) -> None:
        return None

    return ChargingProfiles(connectors, persist, lambda cid: start if tx_running else None), connectors


def test_highest_stack_level_wins_and_max_profile_caps() -> None:
    p, conns = _profiles()
    assert p.set(1, _profile(1, "TxDefaultProfile", 0, 11000)) == "Accepted"
    assert p.set(1, _profile(2, "TxDefaultProfile", 2, 7000)) == "Accepted"
    assert conns[1].limits["ocpp"] == 7.0
    assert p.set(0, _profile(3, "ChargePointMaxProfile", 0, 5000)) == "Accepted"
    assert conns[1].limits["ocpp"] == 5.0 and conns[2].limits["ocpp"] == 5.0
    assert p.clear(3, None, None, None)
    assert conns[1].limits["ocpp"] == 7.0 and "ocpp" not in conns[2].limits


def test_tx_profile_overrides_default_and_needs_a_transaction() -> None:
    p, conns = _profiles()
    p.set(1, _profile(1, "TxDefaultProfile", 0, 11000))
    assert p.set(1, _profile(2, "TxProfile", 0, 16000)) == "Accepted"
    assert conns[1].limits["ocpp"] == 16.0  # TxProfile replaces the default during its transaction
    p.transaction_ended(1)
    p.apply()
    assert conns[1].limits["ocpp"] == 11.0
    idle, _ = _profiles(tx_running=False)
    assert idle.set(1, _profile(2, "TxProfile", 0, 16000)) == "Rejected"
    assert idle.set(1, _profile(3, "ChargePointMaxProfile", 0, 1000)) == "Rejected"  # only on connector 0
    assert idle.set(5, _profile(4, "TxDefaultProfile", 0, 1000)) == "Rejected"
    assert idle.set(1, _profile(5, "TxDefaultProfile", 99, 1000)) == "Rejected"


def test_amps_become_kw_and_periods_follow_time() -> None:
    p, conns = _profiles()
    p.set(1, _profile(1, "TxDefaultProfile", 0, 16, unit="A"))
    assert round(conns[1].limits["ocpp"], 2) == round(16 * 230 * 3 / 1000, 2)
    p.set(2, _profile(2, "TxDefaultProfile", 0, 20, unit="A"))
    assert conns[2].limits["ocpp"] == 20 * 500 / 1000  # DC: at the connector's voltage without a reading
    now = datetime.now(timezone.utc)
    stepped = _profile(3, "TxDefaultProfile", 1, 3000, schedule={
        "start_schedule": (now - timedelta(seconds=90)).isoformat(),
        "charging_schedule_period": [{"start_period": 0, "limit": 3000}, {"start_period": 60, "limit": 9000}],
    })
    p.set(1, stepped)
    assert conns[1].limits["ocpp"] == 9.0  # second period since 30 s
    assert p.limit_kw(1, now - timedelta(seconds=60)) == 3.0


def test_recurring_daily_and_expired_validity() -> None:
    p, conns = _profiles()
    now = datetime.now(timezone.utc)
    daily = _profile(1, "TxDefaultProfile", 0, 4000, kind="Recurring", recurrency_kind="Daily", schedule={
        "start_schedule": (now - timedelta(days=3, minutes=5)).isoformat(), "duration": 3600,
    })
    p.set(1, daily)
    assert conns[1].limits["ocpp"] == 4.0  # 5 min into today's window
    assert p.limit_kw(1, now + timedelta(hours=2)) is None  # outside the 1 h window
    p.set(1, _profile(2, "TxDefaultProfile", 3, 1000, valid_to=(now - timedelta(seconds=1)).isoformat()))
    assert conns[1].limits["ocpp"] == 4.0  # the expired profile does not apply


def test_composite_schedule() -> None:
    p, _ = _profiles()
    p.set(1, _profile(1, "TxDefaultProfile", 0, 6000))
    result = p.composite(1, 600, "W")
    assert result is not None
    _start, schedule = result
    assert schedule["charging_schedule_period"][0] == {"start_period": 0, "limit": 6000.0}
    assert p.composite(9, 600, None) is None
