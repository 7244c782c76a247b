"""Schedule evaluation: midnight crossing, weekly days, once, DST changes, effective window."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, strategies as st

from agent.commands.params import SetSchedule, parse
from agent.charging.schedule import active_slot, is_finished


def sched(**kw: object) -> SetSchedule:
    body: dict[str, object] = {
        "schedule_id": "sch_001",
        "enabled": True,
        "type": "daily",
        "time_slots": [{"start": "22:00", "end": "08:00", "power_limit": 7, "action": "charge"}],
        "timezone": "Europe/London",
    }
    body.update(kw)
    return SetSchedule.model_validate(body)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


def test_slot_crossing_midnight_is_active_on_both_sides() -> None:
    s = sched()
    # January: London = UTC
    assert active_slot(s, utc(2025, 1, 10, 21, 59)) is None
    assert active_slot(s, utc(2025, 1, 10, 22, 0)) is not None
    assert active_slot(s, utc(2025, 1, 11, 3, 0)) is not None
    slot = active_slot(s, utc(2025, 1, 11, 7, 59))
    assert slot is not None and slot.power_limit_kw == 7
    assert active_slot(s, utc(2025, 1, 11, 8, 0)) is None


def test_weekly_slot_belongs_to_its_start_day() -> None:
    s = sched(type="weekly", time_slots=[{"day_of_week": ["fri"], "start": "22:00", "end": "08:00", "action": "charge"}])
    # 2025-01-10 is a Friday: Friday night and Saturday morning are in, Saturday night is not
    assert active_slot(s, utc(2025, 1, 10, 23, 0)) is not None
    assert active_slot(s, utc(2025, 1, 11, 7, 0)) is not None
    assert active_slot(s, utc(2025, 1, 11, 23, 0)) is None
    assert active_slot(s, utc(2025, 1, 9, 23, 0)) is None


def test_summer_time_shifts_the_utc_instant() -> None:
    s = sched(time_slots=[{"start": "18:00", "end": "20:00", "action": "charge"}])
    # July: London = UTC+1, so 18:00 local = 17:00 UTC
    assert active_slot(s, utc(2025, 7, 1, 17, 0)) is not None
    assert active_slot(s, utc(2025, 7, 1, 19, 0)) is None


def test_spring_forward_night_is_one_hour_shorter() -> None:
    # 2025-03-30 01:00 GMT clocks go to 02:00 BST. Slot 00:00-04:00 local.
    s = sched(time_slots=[{"start": "00:00", "end": "04:00", "action": "charge"}])
    slot = active_slot(s, utc(2025, 3, 30, 1, 30))
    assert slot is not None
    assert slot.ends_at - slot.starts_at == timedelta(hours=3)


def test_start_inside_the_spring_gap_begins_after_the_gap() -> None:
    s = sched(time_slots=[{"start": "01:30", "end": "05:00", "action": "charge"}])
    # 01:30 local does not exist on 2025-03-30; the slot starts at 02:00 BST = 01:00 UTC
    assert active_slot(s, utc(2025, 3, 30, 0, 45)) is None
    slot = active_slot(s, utc(2025, 3, 30, 1, 5))
    assert slot is not None and slot.starts_at == utc(2025, 3, 30, 1, 0)


def test_fall_back_night_is_one_hour_longer() -> None:
    # 2025-10-26 02:00 BST -> 01:00 GMT. Slot 00:00-04:00 local lasts 5 h.
    s = sched(time_slots=[{"start": "00:00", "end": "04:00", "action": "charge"}])
    slot = active_slot(s, utc(2025, 10, 26, 2, 0))
    assert slot is not None and slot.ends_at - slot.starts_at == timedelta(hours=5)


def test_effective_window_and_disabled() -> None:
    s = sched(effective_from="2025-03-16T00:00:00Z", effective_until="2025-03-31T23:59:59Z")
    assert active_slot(s, utc(2025, 3, 10, 23, 0)) is None
    assert active_slot(s, utc(2025, 3, 20, 23, 0)) is not None
    assert active_slot(s, utc(2025, 4, 2, 23, 0)) is None
    assert is_finished(s, utc(2025, 4, 2, 23, 0))
    assert active_slot(sched(enabled=False), utc(2025, 1, 10, 23, 0)) is None


def test_once_runs_only_at_its_first_occurrence() -> None:
    s = sched(type="once")
    stored = utc(2025, 1, 10, 12, 0)
    assert active_slot(s, utc(2025, 1, 10, 23, 0), stored_at=stored) is not None
    assert active_slot(s, utc(2025, 1, 11, 23, 0), stored_at=stored) is None
    assert is_finished(s, utc(2025, 1, 11, 9, 0), stored_at=stored)
    # stored in the middle of tonight's slot: tonight's occurrence counts
    assert active_slot(s, utc(2025, 1, 11, 2, 0), stored_at=utc(2025, 1, 11, 1, 0)) is not None


def test_invalid_params_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"params.time_slots\[0\].start"):
        parse(SetSchedule, {"schedule_id": "x", "enabled": True, "type": "daily", "time_slots": [{"start": "25:00", "end": "01:00", "action": "charge"}]})
    with pytest.raises(ValueError, match="day_of_week is required"):
        parse(SetSchedule, {"schedule_id": "x", "enabled": True, "type": "weekly", "time_slots": [{"start": "01:00", "end": "02:00", "action": "charge"}]})
    with pytest.raises(ValueError, match="params.timezone"):
        parse(SetSchedule, {"schedule_id": "x", "enabled": True, "type": "daily", "time_slots": [], "timezone": "Mars/Olympus"})


@given(
    start=st.integers(0, 23 * 60 + 59),
    length=st.integers(1, 23 * 60),
    minute=st.integers(0, 14 * 24 * 60),
    zone=st.sampled_from(["Europe/London", "America/New_York", "Asia/Shanghai", "Australia/Lord_Howe", "UTC"]),
)
def test_daily_slot_activity_matches_wall_clock(start: int, length: int, minute: int, zone: str) -> None:
    from zoneinfo import ZoneInfo

    end = (start + length) % (24 * 60)
    s = sched(timezone=zone, time_slots=[{"start": f"{start // 60:02d}:{start % 60:02d}", "end": f"{end // 60:02d}:{end % 60:02d}", "action": "charge"}])
    now = utc(2025, 3, 20) + timedelta(minutes=minute)
    local = now.astimezone(ZoneInfo(zone))
    m = local.hour * 60 + local.minute
    inside = (start <= m < end) if end > start else (m >= start or m < end)
    slot = active_slot(s, now)
    if slot is not None:
        assert slot.starts_at <= now < slot.ends_at
    # away from DST transitions the wall-clock rule and the evaluation agree
    if abs((local.utcoffset() or timedelta()) - (now - timedelta(hours=6)).astimezone(ZoneInfo(zone)).utcoffset()) == timedelta(0):  # type: ignore[operator]
        assert (slot is not None) == inside
