"""Small durable state: a JSON key/value table and the open charging session per connector.

Contract
--------
* Every awaitable resolves after the change is committed with ``synchronous=FULL`` (survives
  ``kill -9`` and power loss), except :meth:`SessionStore.update_session`, which is coalesced
  and committed with ``synchronous=NORMAL``: it survives a process crash, and a power cut loses
  at most the running totals written since the last durable commit of the database (any
  outbox put, e.g. the 5 s telemetry sample, is one). The session row itself, created by
  :meth:`SessionStore.open_session`, is always durable.
* **Exactly one record per session.** :meth:`SessionStore.finalize_session` deletes the open
  session row and queues its charging record (key = ``record_id``) plus any events in ONE
  transaction. After any crash exactly one of the two exists: the open row (the agent closes
  it at start-up, e.g. with stop reason ``power_loss``) or the queued/delivered record. A
  replayed finalize is a no-op that returns the ids queued the first time.
* Values are JSON, encoded before the call first suspends (later changes to the caller's
  objects are not seen); a value that is not JSON raises ``TypeError``/``ValueError`` at once.
* A full disk raises :class:`~agent.store.db.StoreFullError` and changes nothing; before
  giving up, :meth:`SessionStore.finalize_session` lets the outbox drop queued telemetry to
  make room for the record (see :mod:`agent.store.outbox`).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from agent.store.db import StateDB, StoreError
from agent.store.outbox import Outbox, OutboxTxn, encode_payload

log = structlog.get_logger(__name__)


# --------------------------------------------------------------------------- key/value


@dataclass(frozen=True, slots=True)
class KVEntry:
    """A stored value with its bookkeeping (Unix times)."""

    key: str
    value: Any
    updated_at: float
    expires_at: float | None

    def expired(self, now: float | None = None) -> bool:
        """True if the entry has an expiry that is not after ``now``."""
        return self.expires_at is not None and self.expires_at <= (
            time.time() if now is None else now
        )


def _encode_value(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class KVStore:
    """Durable JSON values by string key, for agent state such as the active power limit
    (with ``expires_at``), stored schedules (``schedule/<schedule_id>``) or a pending reboot
    report. Expired entries read as absent and are deleted by :meth:`purge_expired`.
    Expiry uses the wall clock (Unix time), like the platform's own expiry fields."""

    def __init__(self, db: StateDB) -> None:
        """Bind to an open :class:`StateDB`."""
        self._db = db

    async def set(self, key: str, value: Any, *, expires_at: float | None = None) -> None:
        """Store ``value`` under ``key`` (replacing any previous value), durably."""
        encoded = _encode_value(value)
        now = time.time()

        def job(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO kv (key, value, updated_at, expires_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
                "updated_at = excluded.updated_at, expires_at = excluded.expires_at",
                (key, encoded, now, expires_at),
            )

        await self._db.run(job)

    async def get_entry(self, key: str) -> KVEntry | None:
        """Return the entry for ``key`` even if it expired (the caller decides), or None."""

        def job(conn: sqlite3.Connection) -> KVEntry | None:
            row = conn.execute(
                "SELECT key, value, updated_at, expires_at FROM kv WHERE key = ?", (key,)
            ).fetchone()
            return _entry(row) if row is not None else None

        return await self._db.run(job, durable=False)

    async def get(self, key: str, default: Any = None, *, now: float | None = None) -> Any:
        """Return the value for ``key``, or ``default`` if it is missing or expired."""
        entry = await self.get_entry(key)
        if entry is None or entry.expired(now):
            return default
        return entry.value

    async def delete(self, key: str) -> bool:
        """Delete ``key``; return whether it existed."""

        def job(conn: sqlite3.Connection) -> bool:
            return conn.execute("DELETE FROM kv WHERE key = ?", (key,)).rowcount > 0

        return await self._db.run(job)

    async def items(
        self, prefix: str = "", *, include_expired: bool = False, now: float | None = None
    ) -> dict[str, Any]:
        """Return ``{key: value}`` for keys starting with ``prefix``, in key order."""

        def job(conn: sqlite3.Connection) -> list[KVEntry]:
            rows = conn.execute(
                "SELECT key, value, updated_at, expires_at FROM kv "
                "WHERE substr(key, 1, ?) = ? ORDER BY key",
                (len(prefix), prefix),
            ).fetchall()
            return [_entry(r) for r in rows]

        entries = await self._db.run(job, durable=False)
        return {e.key: e.value for e in entries if include_expired or not e.expired(now)}

    async def purge_expired(self, now: float | None = None) -> int:
        """Delete every expired entry; return how many were deleted."""
        cutoff = time.time() if now is None else now

        def job(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "DELETE FROM kv WHERE expires_at IS NOT NULL AND expires_at <= ?", (cutoff,)
            )
            return max(cur.rowcount, 0)

        return await self._db.run(job)


def _entry(row: Sequence[Any]) -> KVEntry:
    return KVEntry(
        key=str(row[0]),
        value=json.loads(row[1]),
        updated_at=float(row[2]),
        expires_at=None if row[3] is None else float(row[3]),
    )


# --------------------------------------------------------------------------- sessions


class SessionExistsError(StoreError):
    """A different session is already open on the connector, or the record id is taken."""


class SessionMismatchError(StoreError):
    """The record to finalize does not belong to the session open on that connector."""


@dataclass(frozen=True, slots=True)
class OpenSession:
    """A session as persisted: ``start`` fields from :meth:`SessionStore.open_session`,
    ``running`` from the latest committed :meth:`SessionStore.update_session` (or None)."""

    connector_id: int
    record_id: str
    opened_at: float
    start: dict[str, Any]
    running: dict[str, Any] | None
    updated_at: float


@dataclass(frozen=True, slots=True)
class FinalizeResult:
    """Outcome of :meth:`SessionStore.finalize_session`.

    ``already_finalized`` is True when the record had been queued (or delivered) before:
    nothing was written and the ids are those of the first finalize. ``session`` is the open
    row that was removed (None if there was none).
    """

    record_item_id: int
    event_item_ids: tuple[int, ...]
    session: OpenSession | None
    already_finalized: bool


def _session(row: Sequence[Any]) -> OpenSession:
    return OpenSession(
        connector_id=int(row[0]),
        record_id=str(row[1]),
        opened_at=float(row[2]),
        start=json.loads(row[3]),
        running=None if row[4] is None else json.loads(row[4]),
        updated_at=float(row[5]),
    )


_SESSION_COLS = "connector_id, record_id, opened_at, start, running, updated_at"


class SessionStore:
    """The open session per connector, and its atomic hand-over to the outbox."""

    def __init__(self, db: StateDB, outbox: Outbox) -> None:
        """Bind to an open :class:`StateDB` and the :class:`Outbox` records are queued in."""
        self._db = db
        self._outbox = outbox
        self._plock = threading.Lock()
        self._pending: dict[int, str] = {}
        self._flush: asyncio.Future[None] | None = None

    def _drop_pending(self, connector_id: int) -> None:
        with self._plock:
            self._pending.pop(connector_id, None)

    async def open_session(
        self, connector_id: int, record_id: str, start: Mapping[str, Any]
    ) -> OpenSession:
        """Durably record that a session with ``record_id`` started on ``connector_id``.

        Idempotent for the same ``(connector_id, record_id)`` (returns the stored session).
        Raises :class:`SessionExistsError` if another session is open on the connector, if
        ``record_id`` is open on another connector, or if it was already finalized.
        """
        if connector_id < 1:
            raise ValueError("connector_id must be >= 1")
        if not record_id:
            raise ValueError("record_id must not be empty")
        encoded = encode_payload(start)
        self._drop_pending(connector_id)

        def job(conn: sqlite3.Connection) -> OpenSession:
            row = conn.execute(
                f"SELECT {_SESSION_COLS} FROM open_session WHERE connector_id = ? OR record_id = ?",
                (connector_id, record_id),
            ).fetchone()
            if row is not None:
                existing = _session(row)
                if existing.connector_id == connector_id and existing.record_id == record_id:
                    return existing
                raise SessionExistsError(
                    f"cannot open session {record_id} on connector {connector_id}: session "
                    f"{existing.record_id} is open on connector {existing.connector_id}"
                )
            done = conn.execute(
                "SELECT 1 FROM outbox_keys WHERE kind = 'charging_record' AND idem_key = ?",
                (record_id,),
            ).fetchone()
            if done is not None:
                raise SessionExistsError(f"session {record_id} was already finalized")
            now = time.time()
            conn.execute(
                "INSERT INTO open_session (connector_id, record_id, opened_at, start, running, "
                "updated_at) VALUES (?, ?, ?, ?, NULL, ?)",
                (connector_id, record_id, now, encoded, now),
            )
            return OpenSession(connector_id, record_id, now, json.loads(encoded), None, now)

        session = await self._db.run(job)
        log.info("session.opened", connector_id=connector_id, record_id=record_id)
        return session

    def update_session(self, connector_id: int, running: Mapping[str, Any]) -> asyncio.Future[None]:
        """Replace the running accounting fields of the open session on ``connector_id``.

        Cheap and coalesced: updates made before the previous one reached the disk are merged
        into one write of the latest values per connector. Returns a future that resolves
        once these values (or newer ones) are committed; awaiting it is optional (a failure is
        logged either way). No-op if no session is open. See the module contract for the
        power-loss durability of these writes.
        """
        encoded = encode_payload(running)
        with self._plock:
            self._pending[connector_id] = encoded
            if self._flush is None:
                snapshot: dict[int, str] | None = None

                def job(conn: sqlite3.Connection) -> None:
                    nonlocal snapshot
                    if snapshot is None:  # first run; a re-run after a group rollback reuses it
                        with self._plock:
                            snapshot, self._pending = self._pending, {}
                            self._flush = None
                    now = time.time()
                    conn.executemany(
                        "UPDATE open_session SET running = ?, updated_at = ? "
                        "WHERE connector_id = ?",
                        [(enc, now, cid) for cid, enc in snapshot.items()],
                    )

                self._flush = self._db.submit(job, durable=False)
                self._flush.add_done_callback(_log_flush_failure)
            flush = self._flush
        return _follow(flush)

    async def get(self, connector_id: int) -> OpenSession | None:
        """The session open on ``connector_id``, or None."""

        def job(conn: sqlite3.Connection) -> OpenSession | None:
            row = conn.execute(
                f"SELECT {_SESSION_COLS} FROM open_session WHERE connector_id = ?",
                (connector_id,),
            ).fetchone()
            return _session(row) if row is not None else None

        return await self._db.run(job, durable=False)

    async def open_sessions(self) -> list[OpenSession]:
        """Every open session, by connector: at start-up these are the sessions a crash or
        power cut interrupted; the agent resumes or finalizes each one."""

        def job(conn: sqlite3.Connection) -> list[OpenSession]:
            rows = conn.execute(
                f"SELECT {_SESSION_COLS} FROM open_session ORDER BY connector_id"
            ).fetchall()
            return [_session(r) for r in rows]

        return await self._db.run(job, durable=False)

    async def close_session(self, connector_id: int) -> OpenSession | None:
        """Remove the open session WITHOUT queueing a record and return what was stored.

        Only for sessions that must not be billed (e.g. authorisation failed before energy
        flowed). A session that produces a charging record ends with :meth:`finalize_session`.
        """
        self._drop_pending(connector_id)

        def job(conn: sqlite3.Connection) -> OpenSession | None:
            row = conn.execute(
                f"SELECT {_SESSION_COLS} FROM open_session WHERE connector_id = ?",
                (connector_id,),
            ).fetchone()
            if row is None:
                return None
            conn.execute("DELETE FROM open_session WHERE connector_id = ?", (connector_id,))
            return _session(row)

        session = await self._db.run(job)
        if session is not None:
            log.info(
                "session.closed_without_record",
                connector_id=connector_id,
                record_id=session.record_id,
            )
        return session

    async def finalize_session(
        self,
        connector_id: int,
        record: Mapping[str, Any],
        events: Sequence[Mapping[str, Any]] = (),
    ) -> FinalizeResult:
        """In ONE transaction: delete the open session on ``connector_id``, queue ``record``
        as a ``charging_record`` with key ``record["record_id"]``, and queue ``events`` (e.g.
        the ``stop`` event) with keys ``<record_id>/event/<index>``.

        Replays are no-ops (``already_finalized``). Raises :class:`SessionMismatchError` (and
        changes nothing) if a session with a different record id is open on the connector.
        Without an open session the record is still queued (billing data is never dropped)
        and a warning is logged.
        """
        record_id = record.get("record_id")
        if not isinstance(record_id, str) or not record_id:
            raise ValueError("record must carry a non-empty string 'record_id'")
        rec_encoded = encode_payload(record)
        ev_encoded = [encode_payload(e) for e in events]
        self._drop_pending(connector_id)
        outbox = self._outbox

        def job(conn: sqlite3.Connection, txn: OutboxTxn) -> FinalizeResult:
            known = conn.execute(
                "SELECT item_id FROM outbox_keys WHERE kind = 'charging_record' AND idem_key = ?",
                (record_id,),
            ).fetchone()
            if known is not None:
                ev_ids = []
                for i in range(len(ev_encoded)):
                    r = conn.execute(
                        "SELECT item_id FROM outbox_keys WHERE kind = 'event' AND idem_key = ?",
                        (f"{record_id}/event/{i}",),
                    ).fetchone()
                    if r is not None:
                        ev_ids.append(int(r[0]))
                return FinalizeResult(int(known[0]), tuple(ev_ids), None, True)
            row = conn.execute(
                f"SELECT {_SESSION_COLS} FROM open_session WHERE connector_id = ?",
                (connector_id,),
            ).fetchone()
            session = _session(row) if row is not None else None
            if session is not None and session.record_id != record_id:
                raise SessionMismatchError(
                    f"connector {connector_id} has session {session.record_id} open, "
                    f"not {record_id}"
                )
            if session is not None:
                conn.execute("DELETE FROM open_session WHERE connector_id = ?", (connector_id,))
            rec_id = txn.put("charging_record", rec_encoded, record_id)
            ev_ids = [txn.put("event", enc, f"{record_id}/event/{i}") for i, enc in enumerate(ev_encoded)]
            return FinalizeResult(rec_id, tuple(ev_ids), session, False)

        result = await outbox.unit_of_work(job, room_for="charging_record")
        if result.already_finalized:
            log.info("session.finalize_replayed", connector_id=connector_id, record_id=record_id)
        elif result.session is None:
            log.warning(
                "session.finalized_without_open_session",
                connector_id=connector_id,
                record_id=record_id,
            )
        else:
            log.info(
                "session.finalized",
                connector_id=connector_id,
                record_id=record_id,
                item_id=result.record_item_id,
            )
        return result


def _follow(inner: asyncio.Future[None]) -> asyncio.Future[None]:
    """A per-caller view of a shared flush: cancelling it leaves the flush and the other
    callers alone, and an ignored failure is not reported again (``_log_flush_failure`` did)."""
    outer: asyncio.Future[None] = inner.get_loop().create_future()

    def copy(done: asyncio.Future[None]) -> None:
        if outer.done():
            return
        if done.cancelled():
            outer.cancel()
            return
        exc = done.exception()
        if exc is None:
            outer.set_result(None)
        else:
            outer.set_exception(exc)
            outer.exception()  # marks it retrieved; awaiting it still raises

    inner.add_done_callback(copy)
    return outer


def _log_flush_failure(future: asyncio.Future[None]) -> None:
    if future.cancelled():
        return
    exc = future.exception()
    if exc is not None:
        log.warning("session.update_failed", error=str(exc))
