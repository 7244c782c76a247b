"""Config models of the charging core: a connector's hardware and the charging policy.

They live here, not in :mod:`agent.config`, so that the connector state machine imports only
what configures it (pydantic and :mod:`hal.config`), never the sections of the agent's other
parts. :mod:`agent.config` composes them into the whole file.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from hal.config import StrictModel


class DeviceSection(BaseModel):
    """``driver = "name"`` plus that driver's options (validated by the driver's model)."""

    model_config = ConfigDict(extra="allow")

    driver: str = Field(..., min_length=1)
    _options: BaseModel | None = PrivateAttr(default=None)

    @property
    def options(self) -> Any:
        """The driver's validated options model (set by :func:`load_config`)."""
        if self._options is None:
            raise RuntimeError(f"options of driver {self.driver!r} were not validated")
        return self._options

    def raw_options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ConnectorConfig(StrictModel):
    id: int = Field(..., ge=1, le=64)
    kind: Literal["dc", "ac"]
    max_power_kw: float = Field(..., gt=0.0, le=1000.0)
    max_current_a: float = Field(..., gt=0.0, le=1000.0)
    max_voltage_v: float = Field(1000.0, gt=0.0, le=1500.0)
    min_voltage_v: float = Field(150.0, ge=0.0, le=1500.0)
    phases: Literal[1, 3] = 3
    power_modules: DeviceSection | None = None
    meter: DeviceSection
    contactor: DeviceSection
    vehicle: DeviceSection
    bidirectional: DeviceSection | None = Field(None, description="V2G stage (discharge)")
    imd: str | None = Field(None, description="name of an [imd.<name>] device")
    outlet_sensor: str | None = Field(None, description="thermal sensor name for this outlet")


class ChargingSection(StrictModel):
    """Charging policy: the safety interlocks' thresholds and timings (all connectors)."""

    autostart: bool = Field(False, description="free vend: start a session on plug-in without a command")
    tick_s: float = Field(0.1, ge=0.02, le=0.5, description="control-loop period")
    isolation_fault_kohm: float = Field(100.0, ge=1.0, le=10_000.0, description="IEC 61851-23:2023 fault limit")
    isolation_readings: int = Field(3, ge=1, le=20, description="fresh readings required to pass")
    isolation_grace_s: float = Field(1.0, ge=0.0, le=30.0, description="readings ignored after voltage is applied")
    isolation_timeout_s: float = Field(30.0, ge=1.0, le=120.0)
    imd_self_test: bool = Field(True, description="run the IMD self test in every cable check")
    cable_check_voltage_v: float = Field(500.0, ge=50.0, le=1500.0)
    cable_check_current_a: float = Field(2.0, gt=0.0, le=5.0)
    safe_voltage_v: float = Field(60.0, ge=10.0, le=120.0, description="below this the output counts as dead")
    voltage_settle_timeout_s: float = Field(10.0, ge=0.5, le=60.0)
    ev_ready_timeout_s: float = Field(120.0, ge=1.0, le=600.0)
    current_ramp_a_per_s: float = Field(50.0, gt=0.0, le=1000.0)
    stop_current_a: float = Field(5.0, ge=0.0, le=50.0, description="contactors open only below this")
    stop_timeout_s: float = Field(2.0, ge=0.1, le=30.0)
    meter_loss_grace_s: float = Field(5.0, ge=0.0, le=120.0)
    imd_loss_grace_s: float = Field(5.0, ge=0.0, le=120.0)
    meter_plausibility_s: float = Field(
        10.0, ge=1.0, le=300.0, description="DC: meter power far below module output this long = F-0452"
    )
    connector_warning_c: float = Field(75.0, ge=30.0, le=150.0, description="F-0203: derate above this")
    connector_derate_factor: float = Field(0.5, gt=0.0, le=1.0)
    cabinet_critical_c: float = Field(85.0, ge=40.0, le=150.0, description="F-0204: stop all connectors")
    fan_low_fraction: float = Field(
        0.7,
        gt=0.0,
        lt=1.0,
        description="F-0601 when a fan stays below this share of the rpm expected at its duty "
        "(nominal at 100 %); the default of every [thermal] fan without its own low_fraction",
    )
    progress_persist_s: float = Field(5.0, ge=1.0, le=300.0, description="open-session checkpoint period")
    on_shutdown: Literal["stop", "suspend"] = Field(
        "stop",
        description=(
            "SIGTERM with a session running: stop = end it and close its record; "
            "suspend = make the output safe, keep the session open and resume it under the "
            "same record after a restart within resume_window_s if the vehicle is still there"
        ),
    )
    resume_window_s: float = Field(300.0, ge=10.0, le=3600.0, description="how old a suspended session may be")
    resume_plug_wait_s: float = Field(15.0, ge=1.0, le=120.0, description="time to see the vehicle after a restart")
