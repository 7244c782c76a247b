"""Charging schedules: which slot (if any) is active at a given instant.

Pure evaluation, no clocks read and no I/O; the scheduler task calls
:func:`active_slot` with the current UTC time every few seconds and acts on the
answer, so schedules run the same way online and offline.

Semantics (platform-api §8.3 plus Project choices):

* ``start``/``end`` are local wall-clock times in the schedule's IANA zone (the
  charger's zone when absent). ``end <= start`` means the slot crosses midnight and
  ends the next day.
* ``weekly`` slots run on the listed days; the day is the day the slot *starts*
  (a Monday 22:00-08:00 slot runs from Monday night to Tuesday morning).
* ``daily`` slots run every day; ``once`` slots run at their first occurrence that
  ends after the schedule became effective (``effective_from``, else the time it
  was stored), and never again.
* DST: local times are resolved with :mod:`zoneinfo` (``fold=0``). A start inside a
  spring-forward gap begins at the first real instant after the gap; a time in the
  repeated autumn hour means its first occurrence. A slot's duration in real time
  therefore changes on DST days, as a wall clock would suggest.
* Outside ``effective_from``/``effective_until`` and when ``enabled`` is false,
  nothing is active.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

from agent.charging.schedule_spec import DAYS, ScheduleSpec, TimeSlot


@dataclass(frozen=True)
class ActiveSlot:
    schedule_id: str
    slot_index: int
    action: str
    power_limit_kw: float | None
    target_soc: int | None
    starts_at: datetime  # UTC
    ends_at: datetime  # UTC


def _resolve(day: date, at: time, zone: ZoneInfo) -> datetime:
    """Local wall time -> aware UTC instant; gap times move forward past the gap."""
    wall = datetime.combine(day, at)
    utc = wall.replace(tzinfo=zone).astimezone(timezone.utc)
    if utc.astimezone(zone).replace(tzinfo=None) == wall:
        return utc
    # nonexistent local time (spring forward): the first instant whose wall time is past it
    t = wall.replace(tzinfo=zone, fold=1).astimezone(timezone.utc).replace(second=0, microsecond=0)
    while t.astimezone(zone).replace(tzinfo=None) < wall:
        t += timedelta(minutes=1)
    return t


def occurrences(slot: TimeSlot, day: date, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """The UTC [start, end) of ``slot`` when it starts on local ``day``."""
    start = _resolve(day, slot.start_time, zone)
    end_day = day if slot.end_time > slot.start_time else day + timedelta(days=1)
    end = _resolve(end_day, slot.end_time, zone)
    return start, end


def _runs_on(schedule: ScheduleSpec, slot: TimeSlot, day: date) -> bool:
    if schedule.type == "weekly":
        return DAYS[day.weekday()] in (slot.day_of_week or [])
    return True


def active_slot(
    schedule: ScheduleSpec, now: datetime, *, default_zone: str = "UTC", stored_at: datetime | None = None
) -> ActiveSlot | None:
    """The slot of ``schedule`` active at ``now`` (aware), or ``None``."""
    if not schedule.enabled:
        return None
    if schedule.effective_from is not None and now < schedule.effective_from:
        return None
    if schedule.effective_until is not None and now >= schedule.effective_until:
        return None
    zone = ZoneInfo(schedule.timezone or default_zone)
    today = now.astimezone(zone).date()
    since = schedule.effective_from or stored_at
    for index, slot in enumerate(schedule.time_slots):
        # a slot active now started today or (crossing midnight) yesterday
        for day in (today - timedelta(days=1), today):
            if not _runs_on(schedule, slot, day):
                continue
            start, end = occurrences(slot, day, zone)
            if not start <= now < end:
                continue
            if schedule.type == "once" and since is not None and first_occurrence(schedule, slot, since, zone) != start:
                continue
            return ActiveSlot(
                schedule_id=schedule.schedule_id,
                slot_index=index,
                action=slot.action,
                power_limit_kw=slot.power_limit,
                target_soc=schedule.target_soc,
                starts_at=start,
                ends_at=end,
            )
    return None


def first_occurrence(schedule: ScheduleSpec, slot: TimeSlot, since: datetime, zone: ZoneInfo) -> datetime | None:
    """Start of the first occurrence of ``slot`` that ends after ``since``."""
    day = since.astimezone(zone).date() - timedelta(days=1)
    for _ in range(9):
        if _runs_on(schedule, slot, day):
            start, end = occurrences(slot, day, zone)
            if end > since:
                return start
        day += timedelta(days=1)
    return None


def is_finished(schedule: ScheduleSpec, now: datetime, *, default_zone: str = "UTC", stored_at: datetime | None = None) -> bool:
    """True when the schedule can never become active again (expired, or a ``once`` that ran)."""
    if schedule.effective_until is not None and now >= schedule.effective_until:
        return True
    if schedule.type != "once":
        return False
    zone = ZoneInfo(schedule.timezone or default_zone)
    since = schedule.effective_from or stored_at
    if since is None:
        return False
    ends = []
    for slot in schedule.time_slots:
        start = first_occurrence(schedule, slot, since, zone)
        if start is not None:
            ends.append(occurrences(slot, start.astimezone(zone).date(), zone)[1])
    return bool(ends) and now >= max(ends)
