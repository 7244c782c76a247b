"""The charging-schedule model: time slots with an action and a power cap.

The ``set_schedule`` command's parameter model (:class:`agent.commands.params.SetSchedule`)
extends it; it is defined here so the schedule engine needs nothing of the
command layer.
"""

from __future__ import annotations

from datetime import datetime, time
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def parse_hhmm(value: str) -> time:
    try:
        hh, mm = value.split(":")
        if len(hh) != 2 or len(mm) != 2:
            raise ValueError
        return time(int(hh), int(mm))
    except ValueError:
        raise ValueError(f"a time of day as HH:MM (got {value!r})") from None


class TimeSlot(BaseModel):
    model_config = ConfigDict(extra="ignore")

    day_of_week: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] | None = None
    start: str
    end: str
    power_limit: float | None = Field(None, ge=0, le=1000, description="kW within the slot")
    action: Literal["charge", "discharge", "idle"]

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, value: str) -> str:
        parse_hhmm(value)
        return value

    @property
    def start_time(self) -> time:
        return parse_hhmm(self.start)

    @property
    def end_time(self) -> time:
        return parse_hhmm(self.end)


class ScheduleSpec(BaseModel):
    """A charging schedule as the platform sends it (``set_schedule``, platform-api §8.5)."""

    model_config = ConfigDict(extra="ignore", strict=False)

    schedule_id: str = Field(..., min_length=1, max_length=128)
    enabled: bool
    type: Literal["once", "daily", "weekly"]
    time_slots: list[TimeSlot] = Field(..., min_length=0, max_length=48)
    target_soc: int | None = Field(None, ge=0, le=100)
    effective_from: datetime | None = None
    effective_until: datetime | None = None
    timezone: str | None = None

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"an IANA time zone such as 'Europe/London' (got {value!r})") from None
        return value

    @field_validator("effective_from", "effective_until")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("a date-time with a time zone (e.g. 2025-03-16T00:00:00Z)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "ScheduleSpec":
        if self.type == "weekly":
            for i, slot in enumerate(self.time_slots):
                if not slot.day_of_week:
                    raise ValueError(f"time_slots[{i}].day_of_week is required for a weekly schedule")
        for i, slot in enumerate(self.time_slots):
            if slot.start == slot.end:
                raise ValueError(f"time_slots[{i}]: start and end are equal (empty slot)")
        if self.effective_from and self.effective_until and self.effective_until <= self.effective_from:
            raise ValueError("effective_until must be after effective_from")
        return self
