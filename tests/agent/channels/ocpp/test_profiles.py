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
        self.session: Any = None

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


# ---------------------------------------------------------------------- ChargePointMaxProfile: a shared budget


def _charging(conn: FakeConnector, power_kw: float | None = None) -> None:
    conn.session = SimpleNamespace(request=SimpleNamespace(power_kw=power_kw))


def test_share_is_max_min_fair_and_never_exceeds_the_budget() -> None:
    from agent.channels.ocpp.budget import share

    assert share(10.0, {1: 22.0, 2: 22.0}) == {1: 5.0, 2: 5.0}
    assert share(10.0, {1: 3.0, 2: 22.0}) == {1: 3.0, 2: 7.0}  # what 1 cannot use goes to 2
    assert share(12.0, {1: 3.0, 2: 4.0, 3: 22.0}) == {1: 3.0, 2: 4.0, 3: 5.0}
    assert share(10.0, {1: 3.0, 2: 4.0, 3: 22.0}) == {1: 3.0, 2: 3.5, 3: 3.5}
    assert share(10.0, {1: 2.0, 2: 2.0}) == {1: 2.0, 2: 2.0}  # budget left unused: no one exceeds its ceiling
    thirds = share(10.0, {1: 50.0, 2: 50.0, 3: 50.0})
    assert sum(thirds.values()) <= 10.0 and min(thirds.values()) == 3.333
    assert share(-1.0, {1: 5.0}) == {1: 0.0}
    assert share(10.0, {}) == {}


def test_charge_point_max_is_shared_by_the_charging_connectors_in_watts() -> None:
    p, conns = _profiles()
    assert p.set(0, _profile(1, "ChargePointMaxProfile", 0, 10000)) == "Accepted"
    assert conns[1].limits["ocpp"] == 10.0 and conns[2].limits["ocpp"] == 10.0  # nobody charging: each could take all
    _charging(conns[1])
    p.apply()
    assert conns[1].limits["ocpp"] == 10.0  # alone: the whole budget
    assert conns[2].limits["ocpp"] == 5.0  # idle: the share it gets when it starts
    _charging(conns[2])
    p.apply()
    assert conns[1].limits["ocpp"] + conns[2].limits["ocpp"] == 10.0 and conns[1].limits["ocpp"] == 5.0
    conns[1].session = None  # session on 1 ended
    p.apply()
    assert conns[2].limits["ocpp"] == 10.0


def test_own_profiles_first_then_the_rest_of_the_budget_in_amps() -> None:
    p, conns = _profiles()
    _charging(conns[1])
    _charging(conns[2])
    cp_amps = 32  # per phase at the grid connection: 32 A x 230 V x 3 = 22.08 kW
    assert p.set(0, _profile(1, "ChargePointMaxProfile", 0, cp_amps, unit="A")) == "Accepted"
    assert p.set(1, _profile(2, "TxDefaultProfile", 0, 6, unit="A")) == "Accepted"  # 6 A x 230 V x 3 = 4.14 kW on AC
    own = round(6 * 230 * 3 / 1000, 3)
    assert round(conns[1].limits["ocpp"], 3) == own
    assert round(conns[2].limits["ocpp"], 3) == round(cp_amps * 230 * 3 / 1000 - own, 3)  # 2 gets the rest
    # a Tellus limit on 2 (another limit source) frees budget for 1 only up to 1's own limit
    conns[2].limits["remote_limit"] = 2.0
    p.apply()
    assert conns[2].limits["ocpp"] == 2.0 and round(conns[1].limits["ocpp"], 3) == own
    p.clear(2, None, None, None)
    assert round(conns[1].limits["ocpp"], 3) == round(cp_amps * 230 * 3 / 1000 - 2.0, 3)


def test_charge_point_max_stack_levels_and_recurrency() -> None:
    p, conns = _profiles()
    _charging(conns[1])
    _charging(conns[2])
    now = datetime.now(timezone.utc)
    p.set(0, _profile(1, "ChargePointMaxProfile", 0, 20000))
    night = _profile(2, "ChargePointMaxProfile", 1, 8000, kind="Recurring", recurrency_kind="Daily", schedule={
        "start_schedule": (now - timedelta(days=2, minutes=30)).isoformat(), "duration": 3600,
    })
    p.set(0, night)
    assert conns[1].limits["ocpp"] == 4.0 and conns[2].limits["ocpp"] == 4.0  # level 1, 30 min into today's hour
    later = now + timedelta(hours=2)  # outside the recurring window: level 0 applies again
    assert p.allocation(later) == {1: 10.0, 2: 10.0}
    tomorrow = now + timedelta(days=1)  # the same window a day later
    assert p.allocation(tomorrow) == {1: 4.0, 2: 4.0}


def test_composite_schedule_of_connector_zero_is_the_charge_point_schedule() -> None:
    p, conns = _profiles()
    _charging(conns[1])
    _charging(conns[2])
    now = datetime.now(timezone.utc).replace(microsecond=0)
    stepped = _profile(1, "ChargePointMaxProfile", 0, 0, schedule={
        "start_schedule": now.isoformat(),
        "charging_schedule_period": [{"start_period": 0, "limit": 12000}, {"start_period": 90, "limit": 30000}, {"start_period": 200, "limit": 6000}],
    }, kind="Absolute")
    p.set(0, stepped)
    result = p.composite(0, 600, "W")
    assert result is not None
    periods = result[1]["charging_schedule_period"]
    # exact boundaries; 30 kW is capped by the connectors' ratings (2 x 22 kW = 44 kW: not binding)
    assert [(q["start_period"], q["limit"]) for q in periods] == [(0, 12000.0), (90, 30000.0), (200, 6000.0)]
    per_connector = p.composite(1, 600, "W")
    assert per_connector is not None
    assert [(q["start_period"], q["limit"]) for q in per_connector[1]["charging_schedule_period"]] == [(0, 6000.0), (90, 15000.0), (200, 3000.0)]
    amps = p.composite(0, 60, "A")
    assert amps is not None and amps[1]["charging_schedule_period"][0]["limit"] == round(12000 / (230 * 3), 1)
    p.clear(1, None, None, None)
    uncapped = p.composite(0, 60, "W")
    assert uncapped is not None and uncapped[1]["charging_schedule_period"] == [{"start_period": 0, "limit": 44000.0}]
