"""The command ledger (seen ``command_id``s and their last status) and the command audit log.

Contract
--------
* **De-duplication.** :meth:`CommandLedger.record_received` inserts a command id and tells the
  caller whether it is new, atomically: when the same command arrives twice at once (heartbeat
  response and long-poll), exactly one caller sees ``is_new=True`` and executes it.
* **Status reports are queued with the status.** When the ledger has an outbox,
  :meth:`CommandLedger.update_status` stores the new status AND queues the ``command_status``
  report (key ``<command_id>:<status>``; a repeated non-terminal status with a different
  message or details, e.g. upload progress, gets its own key) in ONE transaction, so after
  any crash the ledger and the outbox agree. Terminal statuses (``rejected``, ``completed``,
  ``failed``) are final.
* **Retention.** Entries are kept at least ``retention_s`` (never less than 48 h, spec 8.4)
  after their last activity; :meth:`CommandLedger.purge` never removes a command that has not
  reached a terminal status, whatever its age. Purging uses the wall clock: run it only once
  the clock is NTP-synchronised (a jump from 1970 would otherwise age everything at once).
* **Audit.** ``command_audit`` is append-only: the schema has triggers that abort any UPDATE
  or DELETE, so not even a bug in this process can rewrite history. It is not pruned.
* All writes are committed with ``synchronous=FULL`` before the awaitable resolves; a full
  disk raises :class:`~agent.store.db.StoreFullError` and changes nothing (status updates
  first let the outbox drop queued telemetry to make room).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal, NamedTuple, TypeVar

import structlog

from agent.store.db import StateDB, StoreError
from agent.store.outbox import Outbox, OutboxTxn, encode_payload
from agent.utctime import to_iso

log = structlog.get_logger(__name__)

T = TypeVar("T")

CommandStatus = Literal["accepted", "rejected", "completed", "failed"]
STATUSES: Final[frozenset[str]] = frozenset({"accepted", "rejected", "completed", "failed"})
TERMINAL: Final[frozenset[str]] = frozenset({"rejected", "completed", "failed"})
MIN_RETENTION_S: Final = 48 * 3600.0


class UnknownCommandError(StoreError, KeyError):
    """The command id was never recorded with :meth:`CommandLedger.record_received`."""


class StatusTransitionError(StoreError, ValueError):
    """A terminal status cannot be changed into a different one."""


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """A seen command. Times are Unix seconds; ``completed`` means a terminal status."""

    command_id: str
    command: str
    connector_id: int | None
    params: dict[str, Any]
    received_at: float
    status: CommandStatus | None
    message: str | None
    details: dict[str, Any] | None
    status_at: float | None
    completed: bool

    def status_payload(self) -> dict[str, Any] | None:
        """The ``POST /v1/device/command-status`` body for the last status (None if none)."""
        if self.status is None or self.status_at is None:
            return None
        body: dict[str, Any] = {
            "command_id": self.command_id,
            "status": self.status,
            "timestamp": to_iso(self.status_at, millis=True),
        }
        if self.message is not None:
            body["message"] = self.message
        if self.details is not None:
            body["details"] = self.details
        return body


class Received(NamedTuple):
    """Result of :meth:`CommandLedger.record_received`."""

    entry: LedgerEntry
    is_new: bool


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One row of the append-only command audit log."""

    id: int
    at: float
    source: str
    command_id: str | None
    command: str | None
    params: dict[str, Any] | None
    outcome: str
    message: str | None


def _ts(value: float | datetime | None) -> float | None:
    if value is None or isinstance(value, float | int):
        return value
    if value.tzinfo is None:
        raise ValueError("datetime bounds must be timezone-aware")
    return value.timestamp()


_LEDGER_COLS = (
    "command_id, command, connector_id, params, received_at, status, message, details, "
    "status_at, completed"
)


def _ledger_entry(row: Sequence[Any]) -> LedgerEntry:
    return LedgerEntry(
        command_id=str(row[0]),
        command=str(row[1]),
        connector_id=None if row[2] is None else int(row[2]),
        params=json.loads(row[3]),
        received_at=float(row[4]),
        status=row[5],
        message=row[6],
        details=None if row[7] is None else json.loads(row[7]),
        status_at=None if row[8] is None else float(row[8]),
        completed=bool(row[9]),
    )


def _select(conn: sqlite3.Connection, command_id: str) -> LedgerEntry | None:
    row = conn.execute(
        f"SELECT {_LEDGER_COLS} FROM command_ledger WHERE command_id = ?", (command_id,)
    ).fetchone()
    return _ledger_entry(row) if row is not None else None


class CommandLedger:
    """Persisted seen commands and the audit log. Pass ``outbox`` to have status updates
    queue their ``command_status`` report atomically (recommended)."""

    def __init__(
        self,
        db: StateDB,
        outbox: Outbox | None = None,
        *,
        retention_s: float = MIN_RETENTION_S,
    ) -> None:
        """Raises ``ValueError`` if ``retention_s`` is below 48 h."""
        if retention_s < MIN_RETENTION_S:
            raise ValueError(
                f"command retention must be at least 48 h ({MIN_RETENTION_S:.0f} s), "
                f"got {retention_s} s"
            )
        self._db = db
        self._outbox = outbox
        self.retention_s = retention_s

    # -- ledger --------------------------------------------------------------------------

    async def seen(self, command_id: str) -> LedgerEntry | None:
        """The ledger entry for ``command_id``, or None if it was never received (or purged)."""
        return await self._db.run(lambda conn: _select(conn, command_id), durable=False)

    async def record_received(
        self,
        command_id: str,
        command: str,
        connector_id: int | None,
        params: Mapping[str, Any],
        *,
        received_at: float | None = None,
    ) -> Received:
        """Insert ``command_id`` unless it is known; return the stored entry and whether this
        call inserted it. A repeated delivery returns ``is_new=False`` and the first entry."""
        encoded = encode_payload(params)
        at = time.time() if received_at is None else received_at

        def job(conn: sqlite3.Connection) -> Received:
            cur = conn.execute(
                "INSERT OR IGNORE INTO command_ledger (command_id, command, connector_id, params, "
                "received_at, last_activity_at) VALUES (?, ?, ?, ?, ?, ?)",
                (command_id, command, connector_id, encoded, at, at),
            )
            entry = _select(conn, command_id)
            assert entry is not None
            return Received(entry, cur.rowcount > 0)

        result = await self._db.run(job)
        log.info(
            "command.received" if result.is_new else "command.duplicate",
            command_id=command_id,
            command=command,
            connector_id=connector_id,
        )
        return result

    async def update_status(
        self,
        command_id: str,
        status: CommandStatus,
        *,
        message: str | None = None,
        details: Mapping[str, Any] | None = None,
        at: float | None = None,
        report: bool = True,
    ) -> LedgerEntry:
        """Store ``status`` for ``command_id`` and, if ``report`` and an outbox is attached,
        queue its command-status report in the same transaction.

        Setting the same terminal status again is a no-op returning the stored entry. Raises
        :class:`UnknownCommandError` for an unknown id and :class:`StatusTransitionError` when
        a terminal status would change.
        """
        if status not in STATUSES:
            raise ValueError(f"unknown command status {status!r}")
        details_enc = None if details is None else encode_payload(details)
        when = time.time() if at is None else at

        def job(conn: sqlite3.Connection, txn: OutboxTxn | None) -> LedgerEntry:
            entry = _select(conn, command_id)
            if entry is None:
                raise UnknownCommandError(command_id)
            if entry.completed:
                if entry.status == status:
                    return entry
                raise StatusTransitionError(
                    f"command {command_id} is already {entry.status}; cannot become {status}"
                )
            key = f"{command_id}:{status}"
            if entry.status == status:
                # a repeated non-terminal status (e.g. ``accepted`` with new ``details.progress``)
                # is a report of its own; only an identical repeat is de-duplicated
                digest = hashlib.sha256(f"{message}\x00{details_enc}".encode()).hexdigest()[:16]
                key = f"{key}:{digest}"
            conn.execute(
                "UPDATE command_ledger SET status = ?, message = ?, details = ?, status_at = ?, "
                "completed = ?, last_activity_at = max(last_activity_at, ?) WHERE command_id = ?",
                (status, message, details_enc, when, int(status in TERMINAL), when, command_id),
            )
            updated = _select(conn, command_id)
            assert updated is not None
            payload = updated.status_payload()
            if txn is not None and report and payload is not None:
                txn.put("command_status", encode_payload(payload), key)
            return updated

        entry = await self._run_reporting(job)
        log.info("command.status", command_id=command_id, status=status)
        return entry

    async def _run_reporting(self, job: Callable[[sqlite3.Connection, OutboxTxn | None], T]) -> T:
        """Run a job that may queue a status report (one transaction with the outbox)."""
        if self._outbox is None:
            return await self._db.run(lambda conn: job(conn, None))
        return await self._outbox.unit_of_work(job, room_for="command_status")

    async def resend_last_status(self, command_id: str) -> int | None:
        """Queue the last stored status of ``command_id`` again (a repeated delivery of a known
        command: the earlier report may have been lost). Returns the outbox id, or None if the
        command is unknown or has no status yet. Needs an outbox."""
        if self._outbox is None:
            raise RuntimeError("resend_last_status needs a CommandLedger with an outbox")

        def job(conn: sqlite3.Connection, txn: OutboxTxn | None) -> int | None:
            entry = _select(conn, command_id)
            payload = entry.status_payload() if entry is not None else None
            if payload is None or txn is None:
                return None
            return txn.put("command_status", encode_payload(payload))

        return await self._outbox.unit_of_work(job, room_for="command_status")

    async def non_terminal(self) -> list[LedgerEntry]:
        """Commands without a terminal status (e.g. interrupted by a restart), oldest first."""

        def job(conn: sqlite3.Connection) -> list[LedgerEntry]:
            rows = conn.execute(
                f"SELECT {_LEDGER_COLS} FROM command_ledger WHERE completed = 0 "
                f"ORDER BY received_at"
            ).fetchall()
            return [_ledger_entry(r) for r in rows]

        return await self._db.run(job, durable=False)

    async def purge(self, now: float | None = None) -> int:
        """Delete terminal entries whose last activity is older than ``retention_s``; return
        how many. Non-terminal entries are never purged."""
        cutoff = (time.time() if now is None else now) - self.retention_s

        def job(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "DELETE FROM command_ledger WHERE completed = 1 AND last_activity_at < ?",
                (cutoff,),
            )
            return max(cur.rowcount, 0)

        purged = await self._db.run(job)
        if purged:
            log.info("command.ledger_purged", entries=purged)
        return purged

    # -- audit ---------------------------------------------------------------------------

    async def audit(
        self,
        source: str,
        command_id: str | None,
        command: str | None,
        params: Mapping[str, Any] | None,
        outcome: str,
        message: str | None = None,
        *,
        at: float | None = None,
    ) -> int:
        """Append one audit row (who asked for what, and what happened); return its id."""
        params_enc = None if params is None else encode_payload(params)
        when = time.time() if at is None else at

        def job(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "INSERT INTO command_audit (at, source, command_id, command, params, outcome, "
                "message) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (when, source, command_id, command, params_enc, outcome, message),
            )
            return int(cur.lastrowid or 0)

        return await self._db.run(job)

    async def audit_entries(
        self,
        since: float | datetime | None = None,
        until: float | datetime | None = None,
        *,
        limit: int | None = None,
    ) -> list[AuditEntry]:
        """Audit rows with ``since <= at < until`` (either bound optional), oldest first."""
        lo, hi = _ts(since), _ts(until)

        def job(conn: sqlite3.Connection) -> list[AuditEntry]:
            sql = (
                "SELECT id, at, source, command_id, command, params, outcome, message "
                "FROM command_audit WHERE (? IS NULL OR at >= ?) AND (? IS NULL OR at < ?) "
                "ORDER BY at, id LIMIT ?"
            )
            rows = conn.execute(sql, (lo, lo, hi, hi, -1 if limit is None else limit)).fetchall()
            return [
                AuditEntry(
                    id=int(r[0]),
                    at=float(r[1]),
                    source=str(r[2]),
                    command_id=r[3],
                    command=r[4],
                    params=None if r[5] is None else json.loads(r[5]),
                    outcome=str(r[6]),
                    message=r[7],
                )
                for r in rows
            ]

        return await self._db.run(job, durable=False)
