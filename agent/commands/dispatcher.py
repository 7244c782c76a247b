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
   long-poll it came on, else the one connector the command can only mean
   (:mod:`agent.commands.resolve`; ``set_power_limit``/``pause_charging`` without
   ``params.connector_id`` are resolved the same way from any channel). When several
   connectors fit, the command is held ``hold_s`` seconds: a copy of the same
   ``command_id`` arriving on a connector's long-poll meanwhile is executed there (the
   copy is not a duplicate); otherwise it is decided again and, still ambiguous,
   ``rejected`` naming the candidates. A command rejected only for that ambiguity is
   re-opened, not treated as a duplicate, when it arrives later on a long-poll.
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

from hal.tasks import stop_tasks
from agent.commands.params import Params, parse
from agent.commands.resolve import AMBIGUOUS_PREFIX, DEVICE_WIDE_WHEN_IDLE, ambiguity_message, resolve
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
    expiry: datetime | None = None
    now: Callable[[], datetime] = utc_now

    def expired(self) -> bool:
        """Whether ``expiry`` has passed: deferred work checks again when it actually starts."""
        return self.expiry is not None and self.expiry <= self.now()

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
    #: fills configured defaults into the raw params before validation (e.g. a default target)
    prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None


class LedgerLike(Protocol):
    async def record_received(self, command_id: str, command: str, connector_id: int | None, params: Any) -> Any: ...
    async def resend_last_status(self, command_id: str) -> int | None: ...
    async def reopen(self, command_id: str) -> bool: ...
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
        hold_s: float = 5.0,
    ) -> None:
        """``ready`` is awaited before each command (a soft reset in progress: until the
        connectors are rebuilt), so no command meets a half-rebuilt ``connectors`` set."""
        self.ledger = ledger
        self.hold_s = hold_s
        #: command_id -> the task holding an ambiguous connector command
        self._held: dict[str, asyncio.Task[None]] = {}
        self.sink = sink
        self.connectors = connectors
        self.specs = specs
        self.now = now
        self.ready = ready
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()

    async def deliver(
        self, raw: Any, channel: str, connector_id: int | None, *, _after_hold: bool = False
    ) -> None:
        """Handle one delivered command. Never raises (bad input becomes a report)."""
        try:
            async with self._lock:  # one command at a time: arrival order per connector
                if self.ready is not None:
                    await self.ready()
                await self._deliver(raw, channel, connector_id, _after_hold)
        except Exception:
            log.exception("dispatch_error", channel=channel)

    async def close(self) -> None:
        """Cancel the holds still waiting (their commands end ``failed`` at the next start)."""
        await stop_tasks(list(self._held.values()))

    def _hold(self, raw: dict[str, Any], channel: str) -> None:
        command_id = raw["command_id"]

        async def release() -> None:
            await asyncio.sleep(self.hold_s)
            if self._held.get(command_id) is task:
                del self._held[command_id]
                await self.deliver(raw, channel, None, _after_hold=True)

        task = asyncio.create_task(release(), name=f"command-hold-{command_id}")
        self._held[command_id] = task

    async def _repeat_may_run(
        self, entry: Any, command_id: str, channel_connector: int | None, after_hold: bool
    ) -> bool:
        """Whether a known ``command_id`` is decided again instead of being a duplicate."""
        if channel_connector is None or after_hold:
            return False
        held = self._held.pop(command_id, None)
        if held is not None:  # the long-poll copy of a held command: run it there
            held.cancel()
            return True
        message = getattr(entry, "message", None) or ""
        if getattr(entry, "status", None) == "rejected" and message.startswith(AMBIGUOUS_PREFIX):
            return await self.ledger.reopen(command_id)
        return False

    async def _deliver(
        self, raw: Any, channel: str, channel_connector: int | None, after_hold: bool = False
    ) -> None:
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
        copy_of_held = False
        if not received.is_new:
            copy_of_held = await self._repeat_may_run(received.entry, command_id, channel_connector, after_hold)
        if not received.is_new and not copy_of_held and not after_hold:
            if command_id in self._held:  # another copy without a connector: still held
                await self.ledger.audit(channel, command_id, name, None, "duplicate", "held")
                return
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
        expiry: datetime | None = None
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
        prepared = spec.prepare(params) if spec.prepare is not None and isinstance(params, dict) else params
        try:
            model = parse(spec.params, prepared)
        except ValueError as exc:
            reject(str(exc))
            await audit("rejected", str(exc))
            return
        connector: Connector | None = None
        target: int | None = None
        if model.connector_id is not None:
            target = model.connector_id
        elif channel_connector is not None and (copy_of_held or spec.scope == "connector"):
            target = channel_connector
        elif spec.scope == "connector" or command in DEVICE_WIDE_WHEN_IDLE:
            resolution = resolve(command, self.connectors)
            if resolution.ambiguous and not after_hold:
                self._hold(raw, channel)
                await audit("held", f"candidates {resolution.candidates}; waiting {self.hold_s:g} s for a long-poll copy")
                return
            refusal = ambiguity_message(command, resolution.candidates) if resolution.ambiguous else resolution.reason
            if refusal is not None:
                reject(refusal)
                await audit("rejected", refusal)
                return
            target = resolution.connector_id
        if target is not None:
            if target not in self.connectors:
                msg = f"params.connector_id: unknown connector {target} (have {sorted(self.connectors)})"
                reject(msg)
                await audit("rejected", msg)
                return
            connector = self.connectors[target]
        if spec.risk == "medium" and not spec.own_session_check:
            busy = sorted(cid for cid, c in self.connectors.items() if c.in_session())
            if busy:
                msg = f"{command} is a medium-risk command: refused during an active session (connector {busy[0]})"
                reject(msg)
                await audit("rejected", msg)
                return
        ctx = CommandContext(command_id, command, model, connector, channel, report, expiry, self.now)
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
