"""Wire models of the proposed extensions the agent may send (platform-api §14, not in v1.3).

:class:`ComponentHealthBlock` is the ``component_health`` block of a telemetry upload
(§14.1) as this project sends it and as the emulator accepts it:

* unknown keys are refused (``extra="forbid"``), every value is type-checked the JSON way;
* ``contactor_cycles``, ``contactor_max_cycles``, ``relay_state`` and ``internal_temps``
  are always present (they are always known);
* ``isolation_test_kohms`` and ``last_isolation_test`` travel together; the time is an
  ISO 8601 UTC string ending in ``Z``;
* values the agent does not know are omitted, never sent as 0 (see
  :mod:`agent.maintenance.health`).

:class:`OcppMetadataBlock` is the optional ``ocpp`` block of a telemetry upload (the proposed
device metadata fields of §14.3, sent only with ``[ocpp] send_metadata``): every key is
optional, unknown keys are refused.

:data:`CDR_EXTENSIONS` are the charging-record extension keys (``stop_reason``,
``transaction_id``, ``direction``; platform-api §7.3 Project choice).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from annotated_types import Ge
from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.channels.tellus.models import ApiNumber, ApiString

__all__ = ["CDR_EXTENSIONS", "UTC_Z_TIMESTAMP", "ComponentHealthBlock", "InternalTemps", "OcppMetadataBlock"]

CDR_EXTENSIONS = ("stop_reason", "transaction_id", "direction")
UTC_Z_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?Z$")
"""The platform's timestamp form: UTC, upper-case ``T`` and ``Z`` (``2025-03-15T10:30:00Z``)."""

Count = Annotated[ApiNumber, Ge(0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InternalTemps(_Strict):
    power_module: ApiNumber | None = None
    control_board: ApiNumber | None = None
    ac_inlet: ApiNumber | None = None
    dc_outlet: ApiNumber | None = None


class ComponentHealthBlock(_Strict):
    contactor_cycles: Count
    contactor_max_cycles: Annotated[ApiNumber, Field(gt=0)]
    cooling_fan_rpm: Count | None = None
    cooling_fan_status: Literal["ok", "warning", "fault"] | None = None
    internal_temps: InternalTemps
    relay_state: Literal["closed", "open", "fault"]
    isolation_test_kohms: Count | None = None
    last_isolation_test: ApiString | None = None
    bidirectional_inverter_cycles: Count | None = None
    bidirectional_inverter_max_cycles: Annotated[ApiNumber, Field(gt=0)] | None = None
    harmonic_distortion_v2g_pct: Annotated[ApiNumber, Field(ge=0, le=100)] | None = None
    discharge_contactor_cycles: Count | None = None

    @model_validator(mode="after")
    def _isolation_pair(self) -> ComponentHealthBlock:
        if (self.isolation_test_kohms is None) != (self.last_isolation_test is None):
            raise ValueError("isolation_test_kohms and last_isolation_test go together")
        if self.last_isolation_test is not None and not UTC_Z_TIMESTAMP.match(
            self.last_isolation_test
        ):
            raise ValueError("last_isolation_test: expected an ISO 8601 UTC time ending in Z")
        return self


class OcppMetadataBlock(_Strict):
    ocpp_version: Literal["1.6-J", "2.0.1"] | None = None
    ocpp_csms_messages_per_minute: Count | None = None
    ocpp_csms_last_message_at: ApiString | None = None
    ocpp_negotiated_features: list[ApiString] | None = None

    @model_validator(mode="after")
    def _utc_time(self) -> "OcppMetadataBlock":
        at = self.ocpp_csms_last_message_at
        if at is not None and not UTC_Z_TIMESTAMP.match(at):
            raise ValueError("ocpp_csms_last_message_at: expected a UTC time like 2025-03-15T10:30:00Z")
        return self
