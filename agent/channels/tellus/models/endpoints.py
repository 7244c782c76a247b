"""The charger endpoints of the Tellus API with their method, auth, envelope, rate-limit class
and body model, and the documented rate limits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from agent.channels.tellus.models.bodies import (
    ChargingRecordUpload,
    DeviceCommandStatus,
    DeviceRegisterRequest,
    DeviceTokenRequest,
    EventReport,
    FirmwareUpgradeStatus,
    HeartbeatRequest,
    TelemetryUpload,
)
from agent.channels.tellus.models.wire import ApiModel


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
