"""Parameter models of every command the agent executes.

The platform publishes no device-side ``params`` schema (platform-api gap G11); these
models follow the operator requests that create the commands. Unknown keys are
ignored (lenient, as the spec advises); known keys are type- and range-checked, and
a failure names the field: :func:`validation_message` turns a pydantic error into
``"params.target_soc: expected an integer between 0 and 100 (got 120)"``.
"""

from __future__ import annotations

from datetime import datetime, time
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class Params(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=False)

    connector_id: int | None = Field(None, ge=1, description="optional explicit target connector")


class StartCharging(Params):
    charge_power: float | None = Field(None, gt=0, le=1000, description="kW cap for the session")
    duration: int | None = Field(None, gt=0, le=7 * 86400, description="seconds")
    target_soc: int | None = Field(None, ge=0, le=100)
    transaction_id: str | None = Field(None, min_length=1, max_length=128)


class StopCharging(Params):
    reason: str | None = Field(None, max_length=64)


class SetPowerLimit(Params):
    power_limit_percent: int = Field(..., ge=0, le=100)
    duration: int = Field(..., gt=0, le=7 * 86400)
    reason: str | None = None


class PauseCharging(Params):
    duration: int = Field(..., gt=0, le=7 * 86400)
    reason: str | None = None


class Discharge(Params):
    discharge_power: float = Field(..., gt=0, le=1000, description="kW")
    duration: int | None = Field(None, gt=0, le=7 * 86400)
    min_soc: int | None = Field(None, ge=0, le=100)


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


class SetSchedule(Params):
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
    def _consistent(self) -> "SetSchedule":
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


class NoParams(Params):
    """Commands without parameters (unknown keys are ignored)."""


def validation_message(exc: ValidationError) -> str:
    """One readable line naming the first bad field, e.g. ``params.duration: ...``."""
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in err["loc"]).replace(".[", "[")
        where = f"params.{loc}" if loc else "params"
        msg = str(err["msg"])
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "missing":
            msg = "required"
        got = err.get("input")
        # a URL may be pre-signed: never echo it back into a report or a log
        if err["type"] != "missing" and not isinstance(got, (dict, list)) and "url" not in loc and "(got " not in msg:
            msg += f" (got {got!r})"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def parse(model: type[Params], params: Any) -> Params:
    """Validate ``params`` (must be a JSON object) against ``model``; ValueError names the field."""
    if not isinstance(params, dict):
        raise ValueError(f"params: expected an object (got {type(params).__name__})")
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        raise ValueError(validation_message(exc)) from None
