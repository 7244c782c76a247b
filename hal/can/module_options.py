"""Options every CAN power-module driver accepts (``[connectors.power_modules]``)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator

from hal.config import StrictModel


class ModuleGroupOptions(StrictModel):
    """Options shared by every CAN power-module driver.

    ``comm_timeout_s`` must exceed the modules' own 10 s watchdog. Tests that need a
    short timeout build validated options and then override it with
    ``options.model_copy(update={"comm_timeout_s": 0.5})``, which skips validation.
    """

    max_address: ClassVar[int] = 0x3F

    bus: str = Field(..., min_length=1, description="name of the [can.<name>] bus")
    group: int = Field(0, ge=0, description="module group number")
    addresses: list[int] | None = Field(
        None, description="module addresses; None = discover the group's modules"
    )
    poll_interval_s: float = Field(
        1.0, ge=0.05, le=5.0, description="poll (and keep-alive) period per module"
    )
    idle_poll_interval_s: float = Field(
        5.0,
        ge=0.05,
        le=5.0,
        description=(
            "poll period while the charger is idle and the output is off and settled; "
            "never faster than poll_interval_s, at least three polls per comm_timeout_s"
        ),
    )
    comm_timeout_s: float = Field(
        15.0, gt=10.0, le=300.0, description="module lost after this long without valid answer"
    )
    setpoint_refresh_s: float = Field(
        5.0, ge=0.1, le=60.0, description="re-send setpoints and ON this often while on"
    )
    verify_grace_s: float = Field(
        2.0, ge=0.1, le=60.0, description="time a module gets to follow an on/off command"
    )
    reset_off_s: float = Field(
        5.0, ge=0.1, le=120.0, description="how long reset_module() keeps a module off"
    )
    answer_timeout_s: float = Field(
        1.0, ge=0.05, le=5.0, description="start() waits this long for discovery/ratings answers"
    )

    @field_validator("addresses")
    @classmethod
    def _check_addresses(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("addresses must not be empty (omit it to discover the modules)")
        if len(set(value)) != len(value):
            raise ValueError("addresses must be unique")
        for address in value:
            if not 0 <= address <= cls.max_address:
                raise ValueError(f"address {address} outside 0..{cls.max_address}")
        return sorted(value)
