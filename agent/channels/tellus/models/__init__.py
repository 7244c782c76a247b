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

Layout: :mod:`.wire` (constants, timestamps, JSON scalars, :class:`ApiModel`), :mod:`.enums`,
:mod:`.errors` (application error codes), :mod:`.bodies` (envelope and bodies),
:mod:`.endpoints` (endpoints and rate limits). Import from this package.
"""

from __future__ import annotations

from agent.channels.tellus.models.bodies import (
    AccessTokenResponse,
    ApiEnvelope,
    ChargingRecordUpload,
    CommandPollQuery,
    DeviceCommandStatus,
    DeviceRegisterRequest,
    DeviceRegisterResponse,
    DeviceTokenRequest,
    EventReport,
    FaultEventData,
    FirmwareUpgradeStatus,
    HeartbeatRequest,
    HeartbeatResponseData,
    PendingCommand,
    PhaseDetail,
    PhaseDetails,
    PlugInEventData,
    ReasonEventData,
    TelemetryUpload,
    VehicleInfo,
)
from agent.channels.tellus.models.endpoints import (
    ENDPOINTS,
    RATE_LIMITS,
    DeviceEndpoint,
    EndpointSpec,
    RateLimit,
    RateLimitClass,
)
from agent.channels.tellus.models.enums import (
    CommandReportStatus,
    ConnectorState,
    EventType,
    FirmwareStatus,
    GrantType,
    HeartbeatStatus,
    KnownCommand,
    TokenType,
)
from agent.channels.tellus.models.errors import ERROR_CODES, ErrorCode, ErrorCodeInfo, error_info
from agent.channels.tellus.models.wire import (
    API_VERSION,
    LONG_POLL_WAIT_DEFAULT,
    LONG_POLL_WAIT_MAX,
    LONG_POLL_WAIT_MIN,
    TOKEN_LIFETIME_SECONDS,
    ApiInt,
    ApiModel,
    ApiNumber,
    ApiString,
    ConnectorId,
    Percent,
    UtcTimestamp,
    WaitSeconds,
    format_utc_timestamp,
)
from agent.utctime import parse_rfc3339 as parse_utc_timestamp
from agent.utctime import utc_now

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
