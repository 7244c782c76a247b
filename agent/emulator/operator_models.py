"""Bodies of the emulator's operator endpoints (``/emulator/*``), shared by server and client.

These are the emulator's own test/bench interface, not part of the platform API. Request
models reject unknown keys (a typo in a test should fail loudly); view models accept them so
an older client can read a newer emulator.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from agent.channels.tellus.models import DeviceEndpoint, UtcTimestamp

__all__ = [
    "ChargingRecordView",
    "CommandDelivery",
    "CommandStatusReport",
    "CommandView",
    "ConfigUpdate",
    "ConfigView",
    "DeliveryChannel",
    "DeviceView",
    "FaultMode",
    "FaultRequest",
    "FaultView",
    "OutageMode",
    "OutageRequest",
    "OutageView",
    "QueueCommandRequest",
    "QueueCommandResponse",
    "ReceivedRequest",
    "RequestKind",
    "TokenActionRequest",
    "TokenActionResponse",
    "kind_of_endpoint",
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _View(BaseModel):
    model_config = ConfigDict(extra="allow")


class RequestKind(StrEnum):
    """Which device endpoint a received request addressed (``unknown``: no such route)."""

    REGISTER = "register"
    TOKEN = "token"
    HEARTBEAT = "heartbeat"
    TELEMETRY = "telemetry"
    EVENTS = "events"
    CHARGING_RECORDS = "charging_records"
    COMMANDS = "commands"
    COMMAND_STATUS = "command_status"
    FIRMWARE_STATUS = "firmware_status"
    UNKNOWN = "unknown"


def kind_of_endpoint(endpoint: DeviceEndpoint) -> RequestKind:
    """The :class:`RequestKind` recorded for requests to ``endpoint``."""
    return RequestKind(endpoint.name.lower())


class DeliveryChannel(StrEnum):
    """How a command reached the charger."""

    HEARTBEAT = "heartbeat"
    LONG_POLL = "long_poll"


class OutageMode(StrEnum):
    """How the emulator misbehaves during an injected outage."""

    HTTP_503 = "http_503"
    """Answer every device request with a plain-text HTTP 503 (no envelope)."""
    DROP = "drop"
    """Close the connection without sending a response."""


class FaultMode(StrEnum):
    """How one endpoint misbehaves during an injected fault (:mod:`agent.emulator.faults`)."""

    INTERNAL_ERROR = "internal_error"
    """HTTP 500 with code 9001."""
    FORBIDDEN = "forbidden"
    """HTTP 403 with code 2003."""
    RATE_LIMITED = "rate_limited"
    """HTTP 429 with code 5001 and no ``retry_after_seconds``."""


class FaultRequest(_Request):
    """``POST /emulator/faults``: one endpoint fails in ``mode`` for ``seconds`` seconds."""

    endpoint: RequestKind
    mode: FaultMode = FaultMode.INTERNAL_ERROR
    seconds: float = Field(gt=0, le=86400)


class FaultView(_View):
    """State of one endpoint's injected fault."""

    endpoint: RequestKind
    active: bool
    mode: FaultMode | None = None
    remaining_seconds: float = 0.0


class QueueCommandRequest(_Request):
    """``POST /emulator/commands``: queue a command for a device.

    ``device_id`` may be omitted when exactly one device is registered. Without
    ``connector_id`` the command is device-level: any connector's long-poll may take it.
    ``deliveries`` > 1 delivers the same ``command_id`` that many times (de-duplication tests).
    ``channel`` restricts delivery to one channel: ``heartbeat`` hands the command out only
    in heartbeat responses (without its connector: the wire format has none), as the
    platform does right after an outage when the heartbeat is the first request through.
    """

    device_id: str | None = None
    connector_id: int | None = Field(default=None, ge=1)
    command: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    expiry: UtcTimestamp | None = None
    command_id: str | None = Field(default=None, min_length=1)
    deliveries: int = Field(default=1, ge=1, le=100)
    channel: DeliveryChannel | None = None


class QueueCommandResponse(_View):
    """Answer to :class:`QueueCommandRequest`."""

    command_id: str
    device_id: str


class CommandDelivery(_View):
    """One delivery of a command. ``connector_id`` is the poll's connector (None for heartbeat)."""

    channel: DeliveryChannel
    delivered_at: UtcTimestamp
    connector_id: int | None = None


class CommandStatusReport(_View):
    """One accepted ``command-status`` report as the charger sent it, plus the receive time."""

    status: str
    timestamp: UtcTimestamp
    message: str | None = None
    details: dict[str, Any] | None = None
    received_at: UtcTimestamp


class CommandView(_View):
    """A queued command with its delivery and status history."""

    command_id: str
    device_id: str
    connector_id: int | None
    command: str
    params: dict[str, Any]
    expiry: UtcTimestamp | None = None
    queued_at: UtcTimestamp
    pending: bool
    remaining_deliveries: int
    deliveries: list[CommandDelivery]
    statuses: list[CommandStatusReport]

    @property
    def last_status(self) -> str | None:
        """Status of the most recent report, or ``None`` before any report."""
        return self.statuses[-1].status if self.statuses else None


class ReceivedRequest(_View):
    """One device request as the emulator saw it, accepted or rejected.

    ``body`` is the parsed JSON body (or the raw text when it was not JSON, ``None`` for GET),
    ``query`` the query string, ``code`` the application code answered (``None`` when no
    envelope was sent: outage or token success), ``response`` the JSON body sent back.
    ``http_status`` is 0 when no response was sent (dropped connection, client gone).
    Secrets and tokens are replaced by ``"***"`` in ``body`` and ``response``.
    """

    seq: int
    kind: RequestKind
    method: str
    path: str
    device_id: str | None
    received_at: UtcTimestamp
    query: dict[str, str]
    body: Any
    http_status: int
    code: int | None
    accepted: bool
    response: Any = None


class DeviceView(_View):
    """A registered device."""

    device_id: str
    sn: str
    model: str
    manufacturer: str
    firmware_version: str
    mac: str | None = None
    registered_at: UtcTimestamp
    last_seen_at: UtcTimestamp | None = None
    last_heartbeat: dict[str, Any] | None = None
    last_firmware_status: dict[str, Any] | None = None
    registration: dict[str, Any] = Field(default_factory=dict)


class ChargingRecordView(_View):
    """A stored charging record and how many duplicate uploads of it were rejected (4001)."""

    record_id: str
    device_id: str
    received_at: UtcTimestamp
    body: dict[str, Any]
    duplicate_attempts: int


class OutageRequest(_Request):
    """``POST /emulator/outage``: misbehave for ``seconds`` seconds."""

    seconds: float = Field(gt=0, le=86400)
    mode: OutageMode = OutageMode.HTTP_503


class OutageView(_View):
    """Current outage state."""

    active: bool
    mode: OutageMode | None = None
    remaining_seconds: float = 0.0


class TokenActionRequest(_Request):
    """``POST /emulator/tokens/expire`` / ``revoke``: one device, or every device if omitted."""

    device_id: str | None = None


class TokenActionResponse(_View):
    """How many access tokens were affected."""

    affected: int


class ConfigView(_View):
    """Runtime settings of the emulator."""

    token_ttl: float
    secret_ttl: int
    rate_limits_enabled: bool
    connectors: list[int]
    accept_extensions: bool


class ConfigUpdate(_Request):
    """``PATCH /emulator/config``: change only the given settings (new tokens use the TTL)."""

    token_ttl: float | None = Field(default=None, gt=0)
    secret_ttl: int | None = Field(default=None, ge=1)
    rate_limits_enabled: bool | None = None
    connectors: list[int] | None = Field(default=None, min_length=1)
    accept_extensions: bool | None = None

