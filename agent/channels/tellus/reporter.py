"""Turns what the connectors observe into durable outbox items, in order.

The connectors call the :class:`Reporter` synchronously (it implements
``ConnectorListener`` and ``FaultSink``); every call only appends to an in-memory
queue, so the control loop never waits on the disk. One writer task drains the
queue in order into the store:

* events -> outbox ``event`` (platform EventReport bodies);
* a session start -> ``SessionStore.open_session`` (the power-loss anchor);
* progress -> ``update_session`` (coalesced checkpoints);
* a session end -> ``finalize_session``: the open-session row is deleted and the
  charging record plus its ``stop`` event are queued in ONE transaction, keyed by
  ``record_id``, so a replay after a crash cannot produce a second record;
* command statuses -> ``CommandLedger.update_status`` (ledger + report, one transaction);
* faults -> ``fault`` (error severity) or ``alarm`` (warning) events, raised and
  cleared, each transition once. Device-wide faults are reported on the lowest
  connector id (platform-api gap G9).

If the process dies with items still in the queue, those few milliseconds of
observations are lost; a session's record is not (the open-session row is closed
with ``power_loss`` at the next start).
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

import structlog

from agent.charging.connector import ConnectorState
from agent.charging.faults import ActiveFault, Severity
from agent.charging.session import Checkpoint, Session, record_from_checkpoint
from agent.store import Store
from agent.store.commands import StatusTransitionError, UnknownCommandError
from agent.utctime import to_iso, utc_now

log = structlog.get_logger(__name__)

Job = Callable[[], Awaitable[Any]]


class Reporter:
    def __init__(
        self, store: Store, connector_ids: list[int], *, cdr_extensions: bool = True, send_vin: bool = False
    ) -> None:
        self.store = store
        self.cdr_extensions = cdr_extensions
        self.send_vin = send_vin
        self.connector_ids = sorted(connector_ids)
        self._queue: asyncio.Queue[Job | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.on_state_change: Callable[[int, ConnectorState], None] | None = None
        self.on_fault_change: Callable[[], None] | None = None
        self.on_session_started: Callable[[Session], None] | None = None
        self.archive: Any = None  # agent.maintenance.archive.SessionArchive, when enabled
        self.errors = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._writer(), name="reporter")

    async def stop(self) -> None:
        """Write everything queued so far, then stop."""
        if self._task is None:
            return
        await self._queue.put(None)
        await self._task
        self._task = None

    async def drain(self) -> None:
        """Wait until everything queued so far is committed."""
        done = asyncio.get_running_loop().create_future()

        async def mark() -> None:
            done.set_result(None)

        self._queue.put_nowait(mark)
        await done

    async def _writer(self) -> None:
        while True:
            job = await self._queue.get()
            if job is None:
                return
            try:
                await job()
            except Exception:
                self.errors += 1
                log.exception("reporter_write_failed")

    def _submit(self, job: Job) -> None:
        self._queue.put_nowait(job)

    # ------------------------------------------------------------------ ConnectorListener

    def state_changed(self, connector_id: int, state: ConnectorState) -> None:
        if self.on_state_change is not None:
            self.on_state_change(connector_id, state)

    def event(self, connector_id: int, event_type: str, data: dict[str, Any]) -> None:
        body = {"timestamp": to_iso(utc_now()), "event_type": event_type, "connector_id": connector_id, "data": data}
        self._submit(lambda: self.store.outbox.put("event", body))

    def session_started(self, session: Session) -> None:
        if self.on_session_started is not None:
            self.on_session_started(session)
        checkpoint = session.checkpoint()
        self._submit(lambda: self.store.sessions.open_session(session.connector_id, session.record_id, checkpoint))

    def session_progress(self, session: Session) -> None:
        checkpoint = session.checkpoint()

        async def job() -> None:
            self.store.sessions.update_session(session.connector_id, checkpoint)

        self._submit(job)

    def session_suspended(self, session: Session) -> None:
        checkpoint = session.checkpoint()
        checkpoint["suspended_at"] = to_iso(utc_now())
        self.event(session.connector_id, "stop", {"reason": "shutdown", "suspended": True})

        async def job() -> None:
            await self.store.sessions.update_session(session.connector_id, checkpoint)

        self._submit(job)

    def close_checkpoint(
        self,
        connector_id: int,
        checkpoint: Checkpoint,
        stop_reason: str,
        message: str,
        meter_end: float | None = None,
    ) -> None:
        """Close a persisted open session from its checkpoint: one record, exactly once.

        Used for sessions left open by a power loss and for suspended sessions that
        could not be resumed. The record and its ``stop`` event are committed with the
        removal of the open-session row in one transaction; the session's start command
        (if any) ends ``failed`` with ``message``.
        """
        end = to_iso(utc_now())
        record = record_from_checkpoint(
            checkpoint,
            end_time=end,
            meter_end=meter_end,
            stop_reason=stop_reason,
            extensions=self.cdr_extensions,
            send_vin=self.send_vin,
        )
        event = {"timestamp": end, "event_type": "stop", "connector_id": connector_id, "data": {"reason": stop_reason}}

        async def job() -> None:
            result = await self.store.sessions.finalize_session(connector_id, record, [event])
            if self.archive is not None:  # the per-second archive gets the real stop reason too
                from agent.maintenance.archive import summary_from_record

                await self.archive.end_session(record["record_id"], summary_from_record(record, stop_reason))
            log.warning(
                "session_closed_from_checkpoint",
                connector=connector_id,
                record_id=record["record_id"],
                stop_reason=stop_reason,
                energy=record["energy"],
                already=result.already_finalized,
            )

        self._submit(job)
        command_id = checkpoint.get("command_id")
        if command_id:
            self.command_status(command_id, "failed", message, {"energy_delivered": record["energy"], "stop_reason": stop_reason})

    def session_finished(self, session: Session, record: dict[str, Any], stop_event: dict[str, Any]) -> None:
        event = {"timestamp": record["end_time"], "event_type": "stop", "connector_id": session.connector_id, "data": stop_event}
        self._submit(lambda: self.store.sessions.finalize_session(session.connector_id, record, [event]))

    def command_status(
        self, command_id: str, status: str, message: str | None = None, details: dict[str, Any] | None = None
    ) -> None:
        async def job() -> None:
            try:
                entry = await self.store.ledger.update_status(command_id, status, message=message, details=details)  # type: ignore[arg-type]
            except (UnknownCommandError, StatusTransitionError) as exc:
                log.warning("command_status_not_recorded", command_id=command_id, status=status, error=str(exc))
                return
            if status in ("completed", "failed"):  # the final outcome of work that ran after the decision
                await self.store.ledger.audit("agent", command_id, entry.command, None, status, message)

        self._submit(job)

    # ------------------------------------------------------------------ FaultSink

    def _fault_event(self, fault: ActiveFault, cleared: bool) -> None:
        connector = fault.connector_id or (self.connector_ids[0] if self.connector_ids else 1)
        event_type = "fault" if fault.definition.severity is Severity.ERROR else "alarm"
        log.log(
            30 if not cleared else 20,
            "fault_cleared" if cleared else "fault_raised",
            fault=fault.fault_id,
            connector=fault.connector_id,
            details=fault.details,
        )
        self.event(connector, event_type, fault.event_data(cleared=cleared))
        if self.on_fault_change is not None:
            self.on_fault_change()

    def fault_raised(self, fault: ActiveFault) -> None:
        self._fault_event(fault, cleared=False)

    def fault_cleared(self, fault: ActiveFault) -> None:
        self._fault_event(fault, cleared=True)
