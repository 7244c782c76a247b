"""The enumerations of the Tellus charger-side API (grant and token types, heartbeat status,
connector states, event types, command report and firmware statuses, known commands).
"""

from __future__ import annotations

from enum import StrEnum


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
