"""Parameter models of every command the agent executes.

The platform publishes no device-side ``params`` schema (platform-api gap G11); these
models follow the operator requests that create the commands. Unknown keys are
ignored (lenient, as the spec advises); known keys are type- and range-checked, and
a failure names the field: :func:`validation_message` turns a pydantic error into
``"params.target_soc: expected an integer between 0 and 100 (got 120)"``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.charging.schedule_spec import ScheduleSpec


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


class SetSchedule(Params, ScheduleSpec):
    """``set_schedule``: the schedule plus the optional target connector."""


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
