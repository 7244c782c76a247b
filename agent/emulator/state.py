"""In-memory state of the platform emulator: devices, credentials, tokens, commands, records,
the log of received requests and the injected outage.

The store is synchronous and single-threaded (it lives on the event loop); every method
completes without awaiting, which is what makes command claiming atomic: a command is
handed to exactly one request unless re-delivery was asked for.

Size: above the ~500 lines we aim for on purpose: :class:`EmulatorStore` is the one object
whose methods must not await between reading and changing state, so it stays one class.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog

from agent.channels.tellus.models import (
    ChargingRecordUpload,
    DeviceCommandStatus,
    DeviceRegisterRequest,
    DeviceTokenRequest,
    ErrorCode,
    PendingCommand,
    utc_now,
)
from agent.emulator.errors import ApiError, OperatorError
from agent.emulator.strict import check_status_sequence
from agent.emulator.operator_models import (
    ChargingRecordView,
    CommandDelivery,
    CommandStatusReport,
    CommandView,
    DeliveryChannel,
    DeviceView,
    OutageMode,
    OutageView,
    ReceivedRequest,
    RequestKind,
)

__all__ = [
    "CommandRecord",
    "Delivery",
    "Device",
    "EmulatorSettings",
    "EmulatorStore",
]

log = structlog.get_logger("agent.emulator.state")

_TOKEN_RETENTION_SECONDS = 86400.0
"""Expired tokens are remembered this long (so they answer 2002, not 2001), then pruned."""


@dataclass
class EmulatorSettings:
    """Runtime-adjustable settings.

    Attributes:
        token_ttl: lifetime of newly issued access tokens, seconds (the platform uses 86400).
        secret_ttl: ``expires_in`` reported at registration (informational; not enforced —
            the documents define no secret renewal).
        rate_limits_enabled: apply the documented per-device rate limits.
        max_received: how many received requests the log keeps (oldest dropped first).
        connectors: connector ids of every registered device (the installation record the
            real platform holds); a request naming another connector is refused (1001).
        accept_extensions: accept the project's extension fields (see
            :mod:`agent.emulator.strict`); ``False`` refuses every field the schema lacks.
    """

    token_ttl: float = 86400.0
    secret_ttl: int = 86400
    rate_limits_enabled: bool = True
    max_received: int = 100_000
    connectors: tuple[int, ...] = (1, 2)
    accept_extensions: bool = True


@dataclass
class Device:
    """A registered device. ``secret`` never appears in ``repr`` or in views."""

    device_id: str
    sn: str
    secret: str = field(repr=False)
    registration: dict[str, Any]
    registered_at: datetime
    last_seen_at: datetime | None = None
    last_heartbeat: dict[str, Any] | None = None
    last_firmware_status: dict[str, Any] | None = None

    def view(self) -> DeviceView:
        """Operator view (no secret)."""
        reg = self.registration
        return DeviceView(
            device_id=self.device_id,
            sn=self.sn,
            model=str(reg.get("model", "")),
            manufacturer=str(reg.get("manufacturer", "")),
            firmware_version=str(reg.get("firmware_version", "")),
            mac=reg.get("mac"),
            registered_at=self.registered_at,
            last_seen_at=self.last_seen_at,
            last_heartbeat=self.last_heartbeat,
            last_firmware_status=self.last_firmware_status,
            registration=dict(reg),
        )


@dataclass
class _Token:
    device_id: str
    expires_at: float


@dataclass
class Delivery:
    """One hand-out of a command to the charger."""

    channel: DeliveryChannel
    delivered_at: datetime
    connector_id: int | None


@dataclass
class CommandRecord:
    """A queued command, its remaining deliveries and its history."""

    command_id: str
    device_id: str
    connector_id: int | None
    command: str
    params: dict[str, Any]
    expiry: datetime | None
    queued_at: datetime
    remaining_deliveries: int
    deliveries: list[Delivery] = field(default_factory=list)
    statuses: list[CommandStatusReport] = field(default_factory=list)
    #: deliver only on this channel (None: whichever asks first)
    channel: DeliveryChannel | None = None

    @property
    def pending(self) -> bool:
        """``True`` while the command still has deliveries left."""
        return self.remaining_deliveries > 0

    def matches_connector(self, connector_id: int) -> bool:
        """Whether a long-poll for ``connector_id`` may take this command."""
        if self.channel is DeliveryChannel.HEARTBEAT:
            return False
        return self.connector_id is None or self.connector_id == connector_id

    def matches_heartbeat(self) -> bool:
        """Whether a heartbeat response may carry this command."""
        if self.channel is not None:
            return self.channel is DeliveryChannel.HEARTBEAT
        return self.connector_id is None

    def wire(self) -> dict[str, Any]:
        """The pending-command object sent to the charger."""
        return PendingCommand(
            command_id=self.command_id, command=self.command, params=self.params, expiry=self.expiry
        ).to_wire()

    def view(self) -> CommandView:
        """Operator view with delivery and status history."""
        return CommandView(
            command_id=self.command_id,
            device_id=self.device_id,
            connector_id=self.connector_id,
            command=self.command,
            params=self.params,
            expiry=self.expiry,
            queued_at=self.queued_at,
            pending=self.pending,
            remaining_deliveries=self.remaining_deliveries,
            deliveries=[
                CommandDelivery(
                    channel=d.channel, delivered_at=d.delivered_at, connector_id=d.connector_id
                )
                for d in self.deliveries
            ],
            statuses=list(self.statuses),
        )


@dataclass
class _StoredRecord:
    record_id: str
    device_id: str
    received_at: datetime
    body: dict[str, Any]
    duplicate_attempts: int = 0


def _new_id(prefix: str, nbytes: int) -> str:
    return f"{prefix}{secrets.token_hex(nbytes)}"


class EmulatorStore:
    """All emulator state.

    Args:
        settings: runtime settings (shared, mutable).
        clock: monotonic clock in seconds (token expiry, outage end).

    Attributes:
        on_command_ready: called with a ``device_id`` whenever a command of that device becomes
            deliverable (queued, re-delivery requested, or handed back after a failed
            delivery); the long-poll broker hooks in here.
    """

    def __init__(self, settings: EmulatorSettings, clock: Callable[[], float]) -> None:
        self.settings = settings
        self._clock = clock
        self.on_command_ready: Callable[[str], None] | None = None
        self._devices: dict[str, Device] = {}
        self._by_sn: dict[str, str] = {}
        self._tokens: dict[str, _Token] = {}
        self._commands: dict[str, CommandRecord] = {}
        self._records: dict[tuple[str, str], _StoredRecord] = {}
        self._received: deque[ReceivedRequest] = deque(maxlen=settings.max_received)
        self._seq = 0
        self._outage_mode: OutageMode | None = None
        self._outage_until = 0.0

    # ------------------------------------------------------------------ devices & auth

    def register(self, request: DeviceRegisterRequest) -> Device:
        """Register a new device and issue its credentials.

        Raises:
            ApiError: 4001 when ``sn`` is already registered.
        """
        if request.sn in self._by_sn:
            raise ApiError(ErrorCode.CONFLICT, "device already registered")
        device = Device(
            device_id=_new_id("dvc_", 6),
            sn=request.sn,
            secret=_new_id("sk_", 16),
            registration=request.to_wire(),
            registered_at=utc_now(),
        )
        self._devices[device.device_id] = device
        self._by_sn[device.sn] = device.device_id
        log.info("device_registered", device_id=device.device_id, sn=device.sn)
        return device

    def issue_token(self, request: DeviceTokenRequest) -> tuple[str, Device]:
        """Exchange device credentials for a new access token.

        Raises:
            ApiError: 2001 when the device is unknown or the secret does not match.
        """
        device = self._devices.get(request.device_id)
        if device is None or not secrets.compare_digest(
            device.secret.encode(), request.device_secret.encode()
        ):
            raise ApiError(ErrorCode.UNAUTHENTICATED, "invalid device credentials")
        now = self._clock()
        self._tokens = {
            t: rec
            for t, rec in self._tokens.items()
            if rec.expires_at > now - _TOKEN_RETENTION_SECONDS
        }
        token = secrets.token_urlsafe(32)
        self._tokens[token] = _Token(device.device_id, now + self.settings.token_ttl)
        log.info("token_issued", device_id=device.device_id, ttl=self.settings.token_ttl)
        return token, device

    def authenticate(self, token: str | None) -> Device:
        """Resolve a bearer token to its device and mark the device as seen.

        Raises:
            ApiError: 2001 for a missing or unknown token (or a removed device); 2002 for an
                expired one (``device_id`` set on the error).
        """
        if not token:
            raise ApiError(ErrorCode.UNAUTHENTICATED, "missing bearer token")
        record = self._tokens.get(token)
        if record is None:
            raise ApiError(ErrorCode.UNAUTHENTICATED, "invalid token")
        device = self._devices.get(record.device_id)
        if device is None:
            raise ApiError(ErrorCode.UNAUTHENTICATED, "invalid token")
        if self._clock() >= record.expires_at:
            raise ApiError(ErrorCode.TOKEN_EXPIRED, "token expired", device_id=device.device_id)
        device.last_seen_at = utc_now()
        return device

    def _tokens_of(self, device_id: str | None) -> list[str]:
        return [
            t for t, rec in self._tokens.items() if device_id is None or rec.device_id == device_id
        ]

    def expire_tokens(self, device_id: str | None = None) -> int:
        """Force the live tokens of one device (or all) to expire now; they answer 2002.

        Returns the number of tokens that were still valid.
        """
        now = self._clock()
        affected = 0
        for token in self._tokens_of(device_id):
            record = self._tokens[token]
            if record.expires_at > now:
                affected += 1
            record.expires_at = float("-inf")
        log.info("tokens_expired", device_id=device_id, affected=affected)
        return affected

    def revoke_tokens(self, device_id: str | None = None) -> int:
        """Forget the tokens of one device (or all); they answer 2001. Returns how many."""
        tokens = self._tokens_of(device_id)
        for token in tokens:
            del self._tokens[token]
        log.info("tokens_revoked", device_id=device_id, affected=len(tokens))
        return len(tokens)

    def delete_device(self, device_id: str) -> None:
        """Remove a device: its tokens and credentials stop working, its ``sn`` may register
        again. Its commands and records stay visible.

        Raises:
            OperatorError: 404 for an unknown device.
        """
        device = self._devices.pop(device_id, None)
        if device is None:
            raise OperatorError(404, f"unknown device {device_id!r}")
        self._by_sn.pop(device.sn, None)
        self.revoke_tokens(device_id)
        log.info("device_deleted", device_id=device_id)

    def device(self, device_id: str) -> Device | None:
        """The device with this id, if registered."""
        return self._devices.get(device_id)

    def devices(self) -> list[Device]:
        """All registered devices in registration order."""
        return list(self._devices.values())

    # ------------------------------------------------------------------ commands

    def queue_command(
        self,
        *,
        command: str,
        params: dict[str, Any],
        device_id: str | None = None,
        connector_id: int | None = None,
        expiry: datetime | None = None,
        command_id: str | None = None,
        deliveries: int = 1,
        channel: DeliveryChannel | None = None,
    ) -> CommandRecord:
        """Queue a command for delivery.

        ``device_id`` may be omitted when exactly one device is registered. Commands are
        delivered even after ``expiry`` (the charger must refuse them itself). ``channel``
        restricts delivery to the heartbeat or the long-poll.

        Raises:
            OperatorError: 404 unknown device, 400 ambiguous/absent device or bad
                ``deliveries``, 409 duplicate ``command_id``.
        """
        if device_id is None:
            if len(self._devices) != 1:
                raise OperatorError(
                    400, f"device_id required ({len(self._devices)} devices registered)"
                )
            device_id = next(iter(self._devices))
        elif device_id not in self._devices:
            raise OperatorError(404, f"unknown device {device_id!r}")
        if deliveries < 1:
            raise OperatorError(400, "deliveries must be >= 1")
        if command_id is None:
            command_id = _new_id("cmd_", 8)
        elif command_id in self._commands:
            raise OperatorError(409, f"command_id {command_id!r} already exists")
        record = CommandRecord(
            command_id=command_id,
            device_id=device_id,
            connector_id=connector_id,
            command=command,
            params=dict(params),
            expiry=expiry,
            queued_at=utc_now(),
            remaining_deliveries=deliveries,
            channel=channel,
        )
        self._commands[command_id] = record
        log.info(
            "command_queued",
            command_id=command_id,
            device_id=device_id,
            connector_id=connector_id,
            command=command,
            deliveries=deliveries,
        )
        self._command_ready(device_id)
        return record

    def redeliver(
        self,
        command_id: str,
        *,
        channel: DeliveryChannel | None = None,
        connector_id: int | None = None,
    ) -> CommandRecord:
        """Make a command deliverable once more under the same ``command_id``, optionally
        only on ``channel`` (and, for the long-poll, only to ``connector_id``'s).

        Raises:
            OperatorError: 404 for an unknown command.
        """
        record = self.command(command_id)
        record.remaining_deliveries += 1
        record.channel = channel
        if connector_id is not None:
            record.connector_id = connector_id
        log.info("command_redelivery", command_id=command_id, device_id=record.device_id)
        self._command_ready(record.device_id)
        return record

    def command(self, command_id: str) -> CommandRecord:
        """The command with this id.

        Raises:
            OperatorError: 404 for an unknown command.
        """
        record = self._commands.get(command_id)
        if record is None:
            raise OperatorError(404, f"unknown command {command_id!r}")
        return record

    def commands(self, device_id: str | None = None) -> list[CommandRecord]:
        """All commands (of one device) in queue order."""
        return [c for c in self._commands.values() if device_id is None or c.device_id == device_id]

    def _pending(self, device_id: str) -> Iterable[CommandRecord]:
        return (c for c in self._commands.values() if c.device_id == device_id and c.pending)

    def _claim(
        self, record: CommandRecord, channel: DeliveryChannel, connector_id: int | None
    ) -> Delivery:
        record.remaining_deliveries -= 1
        delivery = Delivery(channel=channel, delivered_at=utc_now(), connector_id=connector_id)
        record.deliveries.append(delivery)
        log.info(
            "command_delivered",
            command_id=record.command_id,
            device_id=record.device_id,
            channel=channel.value,
            connector_id=connector_id,
        )
        return delivery

    def claim_for_poll(
        self, device_id: str, connector_id: int
    ) -> tuple[CommandRecord, Delivery] | None:
        """Take the oldest pending command a long-poll on ``connector_id`` may receive."""
        for record in self._pending(device_id):
            if record.matches_connector(connector_id):
                return record, self._claim(record, DeliveryChannel.LONG_POLL, connector_id)
        return None

    def claim_for_heartbeat(self, device_id: str) -> list[CommandRecord]:
        """Take every pending device-level command (one delivery each), oldest first.

        A command queued for one connector is left for that connector's long-poll
        (a heartbeat and ``PendingCommand`` carry no connector) -- unless it was queued
        heartbeat-only, which hands it out here without its connector, as the real
        platform does.
        """
        records = [r for r in self._pending(device_id) if r.matches_heartbeat()]
        for record in records:
            self._claim(record, DeliveryChannel.HEARTBEAT, None)
        return records

    def unclaim(self, record: CommandRecord, delivery: Delivery) -> None:
        """Undo a delivery whose response could not be sent (client went away)."""
        if delivery in record.deliveries:
            record.deliveries.remove(delivery)
            record.remaining_deliveries += 1
            log.info("command_delivery_undone", command_id=record.command_id)
            self._command_ready(record.device_id)

    def _command_ready(self, device_id: str) -> None:
        if self.on_command_ready is not None:
            self.on_command_ready(device_id)

    def report_status(self, device_id: str, report: DeviceCommandStatus) -> CommandRecord:
        """Append a charger status report to its command's history.

        Raises:
            ApiError: 3001 when the command is unknown or belongs to another device; 1001
                (field ``status``) for a sequence the platform refuses (see
                :func:`agent.emulator.strict.check_status_sequence`).
        """
        record = self._commands.get(report.command_id)
        if record is None or record.device_id != device_id:
            raise ApiError(ErrorCode.NOT_FOUND, "command not found", device_id=device_id)
        check_status_sequence(record.statuses, record.deliveries, report.status.value, device_id)
        wire = report.to_wire()
        record.statuses.append(
            CommandStatusReport(
                status=report.status.value,
                timestamp=report.timestamp,
                message=report.message,
                details=report.details,
                received_at=utc_now(),
                **{k: v for k, v in wire.items() if k not in _STATUS_FIELDS},
            )
        )
        return record

    # ------------------------------------------------------------------ charging records

    def store_charging_record(self, device_id: str, record: ChargingRecordUpload) -> None:
        """Store a CDR once per ``(device, record_id)``.

        Raises:
            ApiError: 4001 for a ``record_id`` already stored (the attempt is counted).
        """
        key = (device_id, record.record_id)
        stored = self._records.get(key)
        if stored is not None:
            stored.duplicate_attempts += 1
            raise ApiError(
                ErrorCode.CONFLICT, "charging record already exists", device_id=device_id
            )
        self._records[key] = _StoredRecord(
            record_id=record.record_id,
            device_id=device_id,
            received_at=utc_now(),
            body=record.to_wire(),
        )

    def charging_records(self, device_id: str | None = None) -> list[ChargingRecordView]:
        """Stored CDRs (of one device) in arrival order."""
        return [
            ChargingRecordView(
                record_id=r.record_id,
                device_id=r.device_id,
                received_at=r.received_at,
                body=r.body,
                duplicate_attempts=r.duplicate_attempts,
            )
            for r in self._records.values()
            if device_id is None or r.device_id == device_id
        ]

    # ------------------------------------------------------------------ request log

    def record_request(
        self,
        *,
        kind: RequestKind,
        method: str,
        path: str,
        device_id: str | None,
        received_at: datetime,
        query: dict[str, str],
        body: Any,
        http_status: int,
        code: int | None,
        response: Any,
    ) -> ReceivedRequest:
        """Append one received device request to the log and return the entry."""
        self._seq += 1
        entry = ReceivedRequest(
            seq=self._seq,
            kind=kind,
            method=method,
            path=path,
            device_id=device_id,
            received_at=received_at,
            query=query,
            body=body,
            http_status=http_status,
            code=code,
            accepted=200 <= http_status < 300 and code in (None, ErrorCode.SUCCESS),
            response=response,
        )
        self._received.append(entry)
        return entry

    def received(
        self,
        *,
        kind: RequestKind | None = None,
        device_id: str | None = None,
        since_seq: int = 0,
    ) -> list[ReceivedRequest]:
        """Logged requests in arrival order, optionally filtered; ``since_seq`` is exclusive."""
        return [
            r
            for r in self._received
            if r.seq > since_seq
            and (kind is None or r.kind == kind)
            and (device_id is None or r.device_id == device_id)
        ]

    # ------------------------------------------------------------------ outage

    def start_outage(self, seconds: float, mode: OutageMode) -> OutageView:
        """Make every device request fail in ``mode`` for ``seconds`` seconds from now."""
        self._outage_mode = mode
        self._outage_until = self._clock() + seconds
        log.warning("outage_started", mode=mode.value, seconds=seconds)
        return self.outage()

    def end_outage(self) -> OutageView:
        """End an injected outage early."""
        self._outage_mode = None
        self._outage_until = 0.0
        log.info("outage_ended")
        return self.outage()

    def outage_mode(self) -> OutageMode | None:
        """The active outage mode, or ``None`` when the emulator behaves normally."""
        if self._outage_mode is not None and self._clock() >= self._outage_until:
            self._outage_mode = None
        return self._outage_mode

    def outage(self) -> OutageView:
        """Current outage state."""
        mode = self.outage_mode()
        if mode is None:
            return OutageView(active=False)
        return OutageView(
            active=True, mode=mode, remaining_seconds=max(0.0, self._outage_until - self._clock())
        )

    # ------------------------------------------------------------------ reset

    def reset(self) -> None:
        """Forget every device, token, command, record and logged request; end any outage."""
        self._devices.clear()
        self._by_sn.clear()
        self._tokens.clear()
        self._commands.clear()
        self._records.clear()
        self._received.clear()
        self._seq = 0
        self._outage_mode = None
        self._outage_until = 0.0
        log.info("state_reset")


_STATUS_FIELDS = frozenset({"command_id", "status", "timestamp", "message", "details"})
