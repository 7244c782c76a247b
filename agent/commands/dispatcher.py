"""The one entry point for remote commands, from either channel (heartbeat or long-poll).

For every delivered command, in this order:

1. Shape: an object with a non-empty string ``command_id`` (without one nothing can
   be reported: the delivery is audited and dropped), a string ``command``, an
   object ``params`` (absent = ``{}``), an optional date-time ``expiry``.
2. De-duplication: the command ledger (persisted >= 48 h) records the id; a repeated
   delivery is not executed again, its last status is re-sent.
3. ``expiry`` in the past -> ``rejected`` "expired".
4. Unknown command -> ``rejected`` naming it; invalid params -> ``rejected`` naming
   the field (``params.target_soc: ...``).
5. Connector-scoped commands need a connector: ``params.connector_id``, else the
   long-poll it came on, else the only connector; otherwise ``rejected``.
6. Risk class (§14.2): a medium-risk command is refused while a session runs.
7. The handler runs; it reports ``accepted`` (and later ``completed``/``failed``) or
   raises :class:`agent.charging.connector.Rejected`; any other exception ends the command
   ``failed`` ("internal error: ...").

Every decision is written to the append-only audit log.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Awaitable, Callable, Literal, Protocol

import structlog

from agent.commands.params import Params, parse
from agent.charging.connector import Connector, Rejected
from agent.utctime import parse_iso, utc_now

log = structlog.get_logger(__name__)


class StatusSink(Protocol):
    def command_status(
        self, command_id: str, status: str, message: str | None = None, details: dict[str, Any] | None = None
    ) -> None: ...


@dataclass
class CommandContext:
    command_id: str
    command: str
    params: Any  # the validated Params model
    connector: Connector | None
    channel: str
    report: Callable[[str, str | None, dict[str, Any] | None], None]

    def accepted(self, message: str | None = None, details: dict[str, Any] | None = None) -> None:
        self.report("accepted", message, details)

    def completed(self, message: str | None = None, details: dict[str, Any] | None = None) -> None:
        self.report("completed", message, details)

    def failed(self, message: str, details: dict[str, Any] | None = None) -> None:
        self.report("failed", message, details)


Run = Callable[[CommandContext], Awaitable[None]]


@dataclass(frozen=True)
class CommandSpec:
    """One command. ``risk`` is the §14.2 class: a ``medium`` command is refused while any
    session runs, unless ``own_session_check`` says its handler applies a finer rule
    (``reset_power_module``: refused only when the module carries a session it cannot
    be taken out of)."""

    name: str
    params: type[Params]
    scope: Literal["connector", "device"]
    run: Run
    risk: Literal["low", "medium"] = "low"
    own_session_check: bool = False


class LedgerLike(Protocol):
    async def record_received(self, command_id: str, command: str, connector_id: int | None, params: Any) -> Any: ...
    async def resend_last_status(self, command_id: str) -> int | None: ...
    async def audit(
        self, source: str, command_id: str | None, command: str | None, params: Any, outcome: str, message: str | None = None
    ) -> int: ...


def _parse_expiry(value: Any) -> datetime:
    if not isinstance(value, str):
        raise ValueError("expiry: expected an ISO 8601 date-time string")
    try:
        parsed = parse_iso(value)
    except ValueError:
        raise ValueError(f"expiry: expected an ISO 8601 date-time (got {value!r})") from None
    if parsed.tzinfo is None:
        raise ValueError(f"expiry: expected a date-time with a time zone (got {value!r})")
    return parsed


class Dispatcher:
    def __init__(
        self,
        ledger: LedgerLike,
        sink: StatusSink,
        connectors: dict[int, Connector],
        specs: dict[str, CommandSpec],
        *,
        now: Callable[[], datetime] = utc_now,
        ready: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """``ready`` is awaited before each command (a soft reset in progress: until the
        connectors are rebuilt), so no command meets a half-rebuilt ``connectors`` set."""
        self.ledger = ledger
        self.sink = sink
        self.connectors = connectors
        self.specs = specs
        self.now = now
        self.ready = ready
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()

    async def deliver(self, raw: Any, channel: str, connector_id: int | None) -> None:
        """Handle one delivered command. Never raises (bad input becomes a report)."""
        try:
            async with self._lock:  # one command at a time: arrival order per connector
                if self.ready is not None:
                    await self.ready()
                await self._deliver(raw, channel, connector_id)
        except Exception:
            log.exception("dispatch_error", channel=channel)

    async def _deliver(self, raw: Any, channel: str, channel_connector: int | None) -> None:
        if not isinstance(raw, dict) or not isinstance(raw.get("command_id"), str) or not raw["command_id"]:
            log.warning("command_without_id", channel=channel, payload=str(raw)[:200])
            await self.ledger.audit(channel, None, None, None, "dropped", "no command_id: cannot be reported")
            return
        command_id: str = raw["command_id"]
        command = raw.get("command")
        params = raw.get("params", {})
        name = command if isinstance(command, str) else "?"
        received = await self.ledger.record_received(
            command_id, name, channel_connector, params if isinstance(params, dict) else {"_invalid": str(params)[:200]}
        )
        if not received.is_new:
            await self.ledger.resend_last_status(command_id)
            await self.ledger.audit(channel, command_id, name, None, "duplicate", "already received; last status re-sent")
            return

        def report(status: str, message: str | None = None, details: dict[str, Any] | None = None) -> None:
            self.sink.command_status(command_id, status, message, details)

        def reject(message: str) -> None:
            log.info("command_rejected", command_id=command_id, command=name, reason=message)
            report("rejected", message)

        async def audit(outcome: str, message: str | None = None) -> None:
            await self.ledger.audit(channel, command_id, name, params if isinstance(params, dict) else None, outcome, message)

        if not isinstance(command, str) or not command:
            reject("command: expected a non-empty string")
            await audit("rejected", "command missing")
            return
        if raw.get("expiry") is not None:
            try:
                expiry = _parse_expiry(raw["expiry"])
            except ValueError as exc:
                reject(str(exc))
                await audit("rejected", str(exc))
                return
            if expiry <= self.now():
                reject("expired")
                await audit("rejected", "expired")
                return
        spec = self.specs.get(command)
        if spec is None:
            message = f"command: unknown command {command!r} (supported: {', '.join(sorted(self.specs))})"
            reject(message)
            await audit("rejected", "unknown command")
            return
        try:
            model = parse(spec.params, params)
        except ValueError as exc:
            reject(str(exc))
            await audit("rejected", str(exc))
            return
        connector: Connector | None = None
        target = model.connector_id if model.connector_id is not None else channel_connector
        if spec.scope == "connector":
            if target is None and len(self.connectors) == 1:
                target = next(iter(self.connectors))
            if target is None:
                msg = "params.connector_id: required for this command when it arrives without a connector (heartbeat)"
                reject(msg)
                await audit("rejected", msg)
                return
            if target not in self.connectors:
                msg = f"params.connector_id: unknown connector {target} (have {sorted(self.connectors)})"
                reject(msg)
                await audit("rejected", msg)
                return
            connector = self.connectors[target]
        elif model.connector_id is not None:
            if model.connector_id not in self.connectors:
                msg = f"params.connector_id: unknown connector {model.connector_id} (have {sorted(self.connectors)})"
                reject(msg)
                await audit("rejected", msg)
                return
            connector = self.connectors[model.connector_id]
        if spec.risk == "medium" and not spec.own_session_check:
            busy = sorted(cid for cid, c in self.connectors.items() if c.in_session())
            if busy:
                msg = f"{command} is a medium-risk command: refused during an active session (connector {busy[0]})"
                reject(msg)
                await audit("rejected", msg)
                return
        ctx = CommandContext(command_id, command, model, connector, channel, report)
        try:
            await spec.run(ctx)
        except Rejected as exc:
            reject(str(exc))
            await audit("rejected", str(exc))
            return
        except Exception as exc:  # a handler bug must still end the command and be audited
            log.exception("command_handler_error", command_id=command_id, command=name)
            message = f"internal error: {type(exc).__name__}: {exc}"
            report("failed", message)
            await audit("failed", message)
            return
        await audit("accepted")
