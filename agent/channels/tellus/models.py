"""Wire models of the Tellus Open Platform charger-side API (``/v1/device/*``, spec v1.3.0).

This module is the single definition of every request and response body the charger agent
exchanges with the platform. It is shared by the agent's uplink client and by the local
platform emulator (:mod:`agent.emulator`), so both sides agree on field names, types, enums
and ranges.

Contracts that hold for every model here:

* **Extra properties are accepted and kept.** None of the published schemas forbid additional
  properties, so unknown keys (e.g. a charging record's ``stop_reason`` / ``transaction_id``,
  extra keys in event ``data``) validate and are serialised back unchanged.
* **Types are checked the JSON way.** Integers must be JSON integers (``1`` or ``1.0``; not
  ``"1"`` or ``true``), numbers must be finite JSON numbers (not strings or booleans), strings
  must be strings. Enums accept exactly their documented values.
* **Optional means "may be omitted", not "may be null".** In JSON input
  (``model_validate_json``) an optional field sent as ``null`` is rejected, because the
  published schemas do not allow ``null`` there. In Python ``None`` means "absent": it is
  accepted, an absent field reads as ``None``, and :meth:`ApiModel.to_wire` omits it.
* **Timestamps** are RFC 3339 / ISO 8601 date-time strings with an explicit offset. They are
  parsed into timezone-aware :class:`~datetime.datetime` objects normalised to UTC, and
  serialised as UTC with a ``Z`` suffix (see :func:`format_utc_timestamp`). Naive datetimes
  and offset-less strings are rejected.
* Secrets (``device_secret``, ``access_token``) are hidden from ``repr()``.

Besides the models, the module holds the facts tables the client and the emulator both need:
the application error codes (:data:`ERROR_CODES`), the charger endpoints with their auth,
envelope and rate-limit class (:data:`ENDPOINTS`), the rate limits (:data:`RATE_LIMITS`) and
the long-poll ``wait`` bounds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from types import MappingProxyType
from typing import Annotated, Any, Generic, TypeVar

from annotated_types import Ge, Interval
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    PlainSerializer,
    Strict,
    WithJsonSchema,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema
from agent.utctime import parse_rfc3339 as parse_utc_timestamp
from agent.utctime import to_iso, utc_now

__all__ = [
    "API_VERSION",
    "ENDPOINTS",
    "ERROR_CODES",
    "LONG_POLL_WAIT_DEFAULT",
    "LONG_POLL_WAIT_MAX",
    "LONG_POLL_WAIT_MIN",
    "RATE_LIMITS",
    "TOKEN_LIFETIME_SECONDS",
    "AccessTokenResponse",
    "ApiEnvelope",
    "ApiInt",
    "ApiModel",
    "ApiNumber",
    "ApiString",
    "ChargingRecordUpload",
    "CommandPollQuery",
    "CommandReportStatus",
    "ConnectorId",
    "ConnectorState",
    "DeviceCommandStatus",
    "DeviceEndpoint",
    "DeviceRegisterRequest",
    "DeviceRegisterResponse",
    "DeviceTokenRequest",
    "EndpointSpec",
    "ErrorCode",
    "ErrorCodeInfo",
    "EventReport",
    "EventType",
    "FaultEventData",
    "FirmwareStatus",
    "FirmwareUpgradeStatus",
    "GrantType",
    "HeartbeatRequest",
    "HeartbeatResponseData",
    "HeartbeatStatus",
    "KnownCommand",
    "PendingCommand",
    "Percent",
    "PhaseDetail",
    "PhaseDetails",
    "PlugInEventData",
    "RateLimit",
    "RateLimitClass",
    "ReasonEventData",
    "TelemetryUpload",
    "TokenType",
    "UtcTimestamp",
    "VehicleInfo",
    "WaitSeconds",
    "error_info",
    "format_utc_timestamp",
    "parse_utc_timestamp",
    "utc_now",
]

API_VERSION = "1.3.0"
"""Version of the platform API these models describe."""

TOKEN_LIFETIME_SECONDS = 86400
"""Documented lifetime of a device access token (24 h); there is no refresh token."""

LONG_POLL_WAIT_MIN = 1
"""Smallest ``wait`` (seconds) accepted by ``GET /v1/device/commands``."""

LONG_POLL_WAIT_MAX = 60
"""Largest ``wait`` (seconds) accepted by ``GET /v1/device/commands``."""

LONG_POLL_WAIT_DEFAULT = 30
"""``wait`` the platform uses when the query parameter is omitted."""


# --------------------------------------------------------------------------------------
# Timestamps
# --------------------------------------------------------------------------------------

def format_utc_timestamp(value: datetime) -> str:
    """Serialise an aware datetime the way the API wants it: UTC, ISO 8601, ``Z`` suffix.

    Whole seconds are written without a fraction (``2025-03-15T10:30:00Z``); a non-zero
    sub-second part is written with millisecond precision (``2025-03-15T10:30:00.250Z``).

    Raises:
        ValueError: ``value`` is naive (has no UTC offset) — its instant is unknowable.
    """
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("timestamp must be timezone-aware")
    return to_iso(value, millis=True)


def _coerce_timestamp(value: Any) -> datetime:
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("timestamp must be timezone-aware")
        return value.astimezone(UTC)
    if isinstance(value, str):
        return parse_utc_timestamp(value)
    raise ValueError("timestamp must be an ISO 8601 date-time string")


UtcTimestamp = Annotated[
    datetime,
    BeforeValidator(_coerce_timestamp),
    PlainSerializer(format_utc_timestamp, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
"""A ``date-time`` field: aware UTC datetime in Python, ``...Z`` string on the wire."""


# --------------------------------------------------------------------------------------
# JSON-typed scalars and the "optional but not nullable" marker
# --------------------------------------------------------------------------------------


def _integral_float_to_int(value: Any) -> Any:
    # JSON Schema's "integer" accepts 1.0; booleans stay rejected by the strict validator.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


_AS_INT = BeforeValidator(_integral_float_to_int)

ApiInt = Annotated[int, Strict(), _AS_INT]
"""A JSON integer: ``1`` or ``1.0``; never a string or a boolean."""

ApiNumber = Annotated[float, Strict(), Field(allow_inf_nan=False)]
"""A finite JSON number (integers allowed); never a string or a boolean."""

ApiString = Annotated[str, Strict()]
"""A JSON string."""

ConnectorId = Annotated[int, Strict(), Ge(1), _AS_INT]
"""A connector number: 1-based, unique within one device."""

Percent = Annotated[int, Strict(), Interval(ge=0, le=100), _AS_INT]
"""An integer percentage 0..100 (SOC, progress)."""

WaitSeconds = Annotated[
    int, Strict(), Interval(ge=LONG_POLL_WAIT_MIN, le=LONG_POLL_WAIT_MAX), _AS_INT
]
"""The long-poll ``wait`` in seconds."""


class _NotNull:
    """Annotation for optional fields: may be omitted, but a JSON ``null`` is rejected.

    The published schemas type optional properties without ``null``. In Python ``None``
    means "absent" (accepted, and omitted by :meth:`ApiModel.to_wire`); only JSON input
    (``model_validate_json``) is held to the document. The JSON schema drops the null
    alternative so it matches the document.
    """

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.with_info_before_validator_function(_reject_json_null, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        alternatives = json_schema.get("anyOf")
        if isinstance(alternatives, list):
            kept = [alt for alt in alternatives if alt != {"type": "null"}]
            if len(kept) == 1:
                rest = {k: v for k, v in json_schema.items() if k != "anyOf"}
                return {**kept[0], **rest}
        return json_schema


def _reject_json_null(value: Any, info: core_schema.ValidationInfo) -> Any:
    if value is None and info.mode == "json":
        raise ValueError("must not be null; omit the field instead")
    return value


NOT_NULL = _NotNull()


def _drop_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def _optional(**kwargs: Any) -> Any:
    """``Field`` for an omittable property: default ``None``, no ``default`` in the JSON schema."""
    return Field(default=None, json_schema_extra=_drop_default, **kwargs)


# --------------------------------------------------------------------------------------
# Base model
# --------------------------------------------------------------------------------------


class ApiModel(BaseModel):
    """Base of every wire model: keeps extra properties, validates on assignment."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    def to_wire(self) -> dict[str, Any]:
        """Return the JSON-ready body: aliases applied, timestamps as ``Z`` strings, absent
        (``None``) optional fields and ``None``-valued extras omitted.

        ``None`` values *inside* free-form objects (``params``, ``data``, ``details``) are kept.
        """
        return self.model_dump(mode="json", exclude_none=True, by_alias=True)

    def to_json(self) -> str:
        """Return :meth:`to_wire` as a compact JSON string."""
        return self.model_dump_json(exclude_none=True, by_alias=True)


# --------------------------------------------------------------------------------------
# Enumerations
# --------------------------------------------------------------------------------------


class GrantType(StrEnum):
    """``grant_type`` of the device token request."""

    CLIENT_CREDENTIALS = "client_credentials"


class TokenType(StrEnum):
    """``token_type`` of the access-token response."""

    BEARER = "Bearer"


class HeartbeatStatus(StrEnum):
    """Device-wide ``status`` in a heartbeat."""

    ONLINE = "online"
    OFFLINE = "offline"
    FAULT = "fault"


class ConnectorState(StrEnum):
    """Connector ``state`` in a telemetry upload (only these four are valid)."""

    IDLE = "idle"
    CHARGING = "charging"
    DISCHARGING = "discharging"
    FAULT = "fault"


class EventType(StrEnum):
    """``event_type`` of an event report."""

    PLUG_IN = "plug_in"
    PLUG_OUT = "plug_out"
    START = "start"
    STOP = "stop"
    FAULT = "fault"
    ALARM = "alarm"


class CommandReportStatus(StrEnum):
    """``status`` the charger reports for a command via ``/v1/device/command-status``."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"
    COMPLETED = "completed"
    FAILED = "failed"


class FirmwareStatus(StrEnum):
    """``status`` of a firmware-upgrade status report."""

    DOWNLOADING = "downloading"
    UPGRADING = "upgrading"
    SUCCESS = "success"
    FAILED = "failed"


class KnownCommand(StrEnum):
    """Command types the v1.3 document enumerates.

    :attr:`PendingCommand.command` stays a plain string: the platform may deliver other types.
    """

    START_CHARGING = "start_charging"
    STOP_CHARGING = "stop_charging"
    SET_POWER_LIMIT = "set_power_limit"
    SET_SCHEDULE = "set_schedule"
    FIRMWARE_UPGRADE = "firmware_upgrade"
    DISCHARGE = "discharge"


# --------------------------------------------------------------------------------------
# Error codes
# --------------------------------------------------------------------------------------


class ErrorCode(IntEnum):
    """Application ``code`` values of the response envelope."""

    SUCCESS = 0
    INVALID_PARAMETER = 1001
    MISSING_PARAMETER = 1002
    UNAUTHENTICATED = 2001
    TOKEN_EXPIRED = 2002
    PERMISSION_DENIED = 2003
    NOT_FOUND = 3001
    CONFLICT = 4001
    TOO_MANY_REQUESTS = 5001
    INTERNAL_ERROR = 9001


@dataclass(frozen=True)
class ErrorCodeInfo:
    """One row of the error-code table.

    Attributes:
        code: the application code.
        http_status: the HTTP status the platform sends with it.
        meaning: short description.
        transient: ``True`` when the same request may succeed if retried later unchanged
            (with backoff). ``False`` means permanent for this request as sent.
        reauthenticate: ``True`` when the remedy is a new access token followed by one retry.
    """

    code: ErrorCode
    http_status: int
    meaning: str
    transient: bool
    reauthenticate: bool = False


ERROR_CODES: Mapping[ErrorCode, ErrorCodeInfo] = MappingProxyType(
    {
        info.code: info
        for info in (
            ErrorCodeInfo(ErrorCode.SUCCESS, 200, "success", transient=False),
            ErrorCodeInfo(
                ErrorCode.INVALID_PARAMETER, 400, "invalid request parameters", transient=False
            ),
            ErrorCodeInfo(
                ErrorCode.MISSING_PARAMETER, 400, "missing required parameter", transient=False
            ),
            ErrorCodeInfo(
                ErrorCode.UNAUTHENTICATED,
                401,
                "unauthenticated or invalid token",
                transient=False,
                reauthenticate=True,
            ),
            ErrorCodeInfo(
                ErrorCode.TOKEN_EXPIRED, 401, "token expired", transient=False, reauthenticate=True
            ),
            ErrorCodeInfo(ErrorCode.PERMISSION_DENIED, 403, "permission denied", transient=False),
            ErrorCodeInfo(ErrorCode.NOT_FOUND, 404, "resource not found", transient=False),
            ErrorCodeInfo(
                ErrorCode.CONFLICT,
                409,
                "resource conflict (e.g. device already registered)",
                transient=False,
            ),
            ErrorCodeInfo(ErrorCode.TOO_MANY_REQUESTS, 429, "too many requests", transient=True),
            ErrorCodeInfo(ErrorCode.INTERNAL_ERROR, 500, "internal server error", transient=True),
        )
    }
)
"""Every documented application code → HTTP status, meaning, transient/permanent."""


def error_info(code: int) -> ErrorCodeInfo | None:
    """Return the table row for ``code``, or ``None`` for a code the document does not list."""
    try:
        return ERROR_CODES[ErrorCode(code)]
    except ValueError:
        return None


# --------------------------------------------------------------------------------------
# Endpoints and rate limits
# --------------------------------------------------------------------------------------


class RateLimitClass(StrEnum):
    """Per-device rate-limit classes of the charger endpoints."""

    HIGH_FREQUENCY = "high_frequency"
    """Heartbeat and telemetry, shared budget."""
    REPORTING = "reporting"
    """Events, charging records and command status, shared budget."""


@dataclass(frozen=True)
class RateLimit:
    """At most ``requests`` requests per ``per_seconds`` seconds, per device."""

    requests: int
    per_seconds: float


RATE_LIMITS: Mapping[RateLimitClass, RateLimit] = MappingProxyType(
    {
        RateLimitClass.HIGH_FREQUENCY: RateLimit(requests=10, per_seconds=1.0),
        RateLimitClass.REPORTING: RateLimit(requests=60, per_seconds=60.0),
    }
)
"""Documented per-device limits; exceeding one yields HTTP 429 / code 5001."""


class DeviceEndpoint(StrEnum):
    """Charger endpoints; the value is the path relative to the base URL (which ends in ``/v1``)."""

    REGISTER = "/device/register"
    TOKEN = "/device/token"
    HEARTBEAT = "/device/heartbeat"
    TELEMETRY = "/device/telemetry"
    EVENTS = "/device/events"
    CHARGING_RECORDS = "/device/charging-records"
    COMMANDS = "/device/commands"
    COMMAND_STATUS = "/device/command-status"
    FIRMWARE_STATUS = "/device/firmware/status"


@dataclass(frozen=True)
class EndpointSpec:
    """How one charger endpoint is called.

    Attributes:
        method: HTTP method.
        bearer_auth: the request needs ``Authorization: Bearer <access_token>``.
        enveloped: the response body is the ``{code, message, data}`` envelope (the token
            response is the only one that is not).
        rate_limit: the per-device rate-limit class, or ``None`` when none is documented.
        request_model: model of the JSON request body, ``None`` for the GET long-poll.
    """

    method: str
    bearer_auth: bool
    enveloped: bool
    rate_limit: RateLimitClass | None
    request_model: type[ApiModel] | None


# --------------------------------------------------------------------------------------
# Response envelope
# --------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------
# Provisioning
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------


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


ENDPOINTS: Mapping[DeviceEndpoint, EndpointSpec] = MappingProxyType(
    {
        DeviceEndpoint.REGISTER: EndpointSpec("POST", False, True, None, DeviceRegisterRequest),
        DeviceEndpoint.TOKEN: EndpointSpec("POST", False, False, None, DeviceTokenRequest),
        DeviceEndpoint.HEARTBEAT: EndpointSpec(
            "POST", True, True, RateLimitClass.HIGH_FREQUENCY, HeartbeatRequest
        ),
        DeviceEndpoint.TELEMETRY: EndpointSpec(
            "POST", True, True, RateLimitClass.HIGH_FREQUENCY, TelemetryUpload
        ),
        DeviceEndpoint.EVENTS: EndpointSpec(
            "POST", True, True, RateLimitClass.REPORTING, EventReport
        ),
        DeviceEndpoint.CHARGING_RECORDS: EndpointSpec(
            "POST", True, True, RateLimitClass.REPORTING, ChargingRecordUpload
        ),
        DeviceEndpoint.COMMANDS: EndpointSpec("GET", True, True, None, None),
        DeviceEndpoint.COMMAND_STATUS: EndpointSpec(
            "POST", True, True, RateLimitClass.REPORTING, DeviceCommandStatus
        ),
        DeviceEndpoint.FIRMWARE_STATUS: EndpointSpec(
            "POST", True, True, None, FirmwareUpgradeStatus
        ),
    }
)
"""Every charger endpoint with its method, auth, envelope, rate-limit class and body model."""
