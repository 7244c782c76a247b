"""The request and response bodies of the Tellus charger-side API: the response envelope,
provisioning, commands and reporting.
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, TypeVar

from pydantic import Field

from agent.channels.tellus.models.enums import (
    CommandReportStatus,
    ConnectorState,
    EventType,
    FirmwareStatus,
    GrantType,
    HeartbeatStatus,
    TokenType,
)
from agent.channels.tellus.models.errors import ErrorCode
from agent.channels.tellus.models.wire import (
    LONG_POLL_WAIT_DEFAULT,
    NOT_NULL,
    ApiInt,
    ApiModel,
    ApiNumber,
    ApiString,
    ConnectorId,
    Percent,
    UtcTimestamp,
    WaitSeconds,
    _optional,
)

DataT = TypeVar("DataT")


class ApiEnvelope(ApiModel, Generic[DataT]):
    """The ``{code, message, data[, details]}`` wrapper of every response except the token one.

    Parametrise with the payload model, e.g. ``ApiEnvelope[PendingCommand]``; ``data`` is
    ``None`` for endpoints that return nothing, for a long-poll timeout, and on errors.
    A response is a success only if the HTTP status is 2xx **and** :attr:`ok` is true.
    """

    code: ApiInt = Field(description="0 = success; otherwise an application error code.")
    message: ApiString = Field(description="Human-readable text; never branch on it.")
    data: DataT | None = Field(default=None, description="Endpoint-specific payload.")
    details: Annotated[dict[str, Any] | None, NOT_NULL] = _optional(
        description="Error diagnostics, e.g. {field, value} or {retry_after_seconds}."
    )

    @property
    def ok(self) -> bool:
        """``True`` when ``code`` is 0."""
        return self.code == ErrorCode.SUCCESS

    @property
    def error_code(self) -> ErrorCode | None:
        """The code as :class:`ErrorCode`; ``None`` on success or for an undocumented code."""
        if self.ok:
            return None
        try:
            return ErrorCode(self.code)
        except ValueError:
            return None

    @property
    def retry_after_seconds(self) -> int | None:
        """``details.retry_after_seconds`` when present and a non-negative integer."""
        value = (self.details or {}).get("retry_after_seconds")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            return None
        return int(value)

    @property
    def error_field(self) -> str | None:
        """``details.field`` (the offending request field of a 1001/1002) when present."""
        value = (self.details or {}).get("field")
        return value if isinstance(value, str) else None


class DeviceRegisterRequest(ApiModel):
    """Body of ``POST /v1/device/register`` (no auth). ``sn`` is the platform's uniqueness key."""

    sn: ApiString = Field(description="Manufacturer serial number.")
    model: ApiString
    manufacturer: ApiString
    firmware_version: ApiString
    mac: Annotated[ApiString | None, NOT_NULL] = _optional(description="MAC address.")


class DeviceRegisterResponse(ApiModel):
    """``data`` of a successful registration: opaque credentials to persist."""

    device_id: ApiString
    device_secret: ApiString = Field(repr=False)
    expires_in: ApiInt = Field(description="Validity period of the secret, seconds.")


class DeviceTokenRequest(ApiModel):
    """Body of ``POST /v1/device/token`` (no auth)."""

    device_id: ApiString
    device_secret: ApiString = Field(repr=False)
    grant_type: GrantType = Field(description="Always client_credentials.")


class AccessTokenResponse(ApiModel):
    """Top-level (not enveloped) body of a successful token exchange."""

    access_token: ApiString = Field(repr=False)
    token_type: TokenType = Field(description="Always Bearer.")
    expires_in: ApiInt = Field(description="Token validity, seconds (documented as 86400).")


class PendingCommand(ApiModel):
    """A command delivered to the charger (long-poll ``data`` or heartbeat ``data.commands[]``).

    The charger must de-duplicate by ``command_id``: the same command can arrive on both
    channels, and a repeated delivery must not be executed twice.
    """

    command_id: ApiString
    command: ApiString = Field(description="Command type, see KnownCommand.")
    params: dict[str, Any] = Field(description="Command-specific parameters; may be empty.")
    expiry: Annotated[UtcTimestamp | None, NOT_NULL] = _optional(
        description="Do not start the command after this instant."
    )


class HeartbeatResponseData(ApiModel):
    """``data`` of a heartbeat response: commands piggybacked for the device (possibly none)."""

    commands: Annotated[list[PendingCommand], NOT_NULL] = Field(default_factory=list)


class CommandPollQuery(ApiModel):
    """Query parameters of ``GET /v1/device/commands`` (long-poll for one command)."""

    connector_id: ConnectorId
    wait: WaitSeconds = LONG_POLL_WAIT_DEFAULT


class DeviceCommandStatus(ApiModel):
    """Body of ``POST /v1/device/command-status``: progress or result of a received command."""

    command_id: ApiString
    status: CommandReportStatus
    timestamp: UtcTimestamp
    message: Annotated[ApiString | None, NOT_NULL] = _optional()
    details: Annotated[dict[str, Any] | None, NOT_NULL] = _optional(
        description="Execution details, e.g. {energy_delivered, duration}."
    )


class HeartbeatRequest(ApiModel):
    """Body of ``POST /v1/device/heartbeat``; device-wide, no ``connector_id``."""

    timestamp: UtcTimestamp
    status: HeartbeatStatus
    fault_code: ApiInt = Field(description="0 = no fault.")


class PhaseDetail(ApiModel):
    """Voltage (V) and current (A) of one phase."""

    voltage: ApiNumber
    current: ApiNumber


class PhaseDetails(ApiModel):
    """Three-phase breakdown; each key optional."""

    phase_a: Annotated[PhaseDetail | None, NOT_NULL] = _optional()
    phase_b: Annotated[PhaseDetail | None, NOT_NULL] = _optional()
    phase_c: Annotated[PhaseDetail | None, NOT_NULL] = _optional()


class TelemetryUpload(ApiModel):
    """Body of ``POST /v1/device/telemetry``: one sample of one connector (kW, kWh, V, A, °C)."""

    timestamp: UtcTimestamp
    connector_id: ConnectorId
    state: ConnectorState
    voltage: ApiNumber
    current: ApiNumber
    power: ApiNumber
    energy_delivered: ApiNumber
    soc: Annotated[Percent | None, NOT_NULL] = _optional()
    temperature: Annotated[ApiNumber | None, NOT_NULL] = _optional()
    phase_details: Annotated[PhaseDetails | None, NOT_NULL] = _optional()


class EventReport(ApiModel):
    """Body of ``POST /v1/device/events``. ``data`` is required; send ``{}`` when empty."""

    timestamp: UtcTimestamp
    event_type: EventType
    connector_id: ConnectorId
    data: dict[str, Any] = Field(description="Event-specific payload.")


class PlugInEventData(ApiModel):
    """Documented ``data`` of a ``plug_in`` event (build helper; ``data`` itself is free-form)."""

    vehicle_connected: bool


class ReasonEventData(ApiModel):
    """Documented ``data`` of a ``start`` / ``stop`` event; ``reason`` is free text."""

    reason: ApiString


class FaultEventData(ApiModel):
    """Documented ``data`` of a ``fault`` event."""

    fault_code: ApiInt
    fault_message: ApiString
    details: dict[str, Any] = Field(default_factory=dict)


class VehicleInfo(ApiModel):
    """Vehicle data attached to a charging record; all optional."""

    vin: Annotated[ApiString | None, NOT_NULL] = _optional(description="17-character VIN.")
    soc_start: Annotated[Percent | None, NOT_NULL] = _optional()
    soc_end: Annotated[Percent | None, NOT_NULL] = _optional()


class ChargingRecordUpload(ApiModel):
    """Body of ``POST /v1/device/charging-records`` (CDR), uploaded once per session.

    ``record_id`` is charger-generated and reused on every retry; a 409/4001 answer means the
    platform already stores it. Extension keys such as ``stop_reason`` and ``transaction_id``
    are not in the published schema and travel as extra properties.
    """

    record_id: ApiString
    connector_id: ConnectorId
    start_time: UtcTimestamp
    end_time: UtcTimestamp
    energy: ApiNumber
    max_power: ApiNumber
    avg_power: ApiNumber
    cost: Annotated[ApiNumber | None, NOT_NULL] = _optional()
    meter_start: ApiNumber
    meter_end: ApiNumber
    vehicle_info: Annotated[VehicleInfo | None, NOT_NULL] = _optional()


class FirmwareUpgradeStatus(ApiModel):
    """Body of ``POST /v1/device/firmware/status``; ``firmware_version`` is the target version."""

    firmware_version: ApiString
    status: FirmwareStatus
    progress: Annotated[Percent | None, NOT_NULL] = _optional()
    message: Annotated[ApiString | None, NOT_NULL] = _optional()
