"""The durable outbox: everything the agent must deliver to the platform, in send order.

Contract
--------
* **Committed before sent.** ``await put(...)`` returns the item id only after the row is
  committed with ``synchronous=FULL`` (see :mod:`agent.store.db`): it survives ``kill -9`` and
  a power cut. If ``put`` raises, nothing was stored (the caller still owns the data) -- except
  after :class:`~agent.store.db.StoreIOError`, where the outcome is unknown: put again with the
  same key.
* **Removed only when acknowledged.** Items leave the outbox through :meth:`Outbox.ack`
  (platform accepted), :meth:`Outbox.dead_letter` (platform rejected it permanently, 1001/1002:
  moved to the ``outbox_dead`` table, never deleted) or, for telemetry only, thinning.
* **Send order.** :meth:`Outbox.next_batch` returns ``command_status``, then
  ``charging_record``, ``event``, ``firmware_status`` and finally ``telemetry``; oldest first
  (insertion order, immune to wall-clock jumps) within a kind. ``next_batch`` does not lease:
  an item is returned again until it is acked, nacked-and-retried or dead-lettered, so use one
  consumer per set of kinds. :meth:`Outbox.nack` records an attempt and keeps the item in place
  (order is preserved; back-off is the uplink's job).
* **Exactly once per key.** ``put(..., key=k)`` is a no-op returning the first item's id if
  the same ``(kind, k)`` was put before -- while queued, after it was delivered (remembered for
  ``delivered_key_retention_s``) and after it was dead-lettered (remembered for ever). This is
  what makes a restart-replayed session close produce one charging record.
* **Bounded disk, telemetry only.** When telemetry rows exceed ``max_telemetry_rows``, every
  other row of the oldest half is dropped (the first and last of that half are kept), which
  halves the resolution of the oldest data instead of cutting it off. When the database uses
  more than ``max_bytes``, telemetry is thinned repeatedly, down to nothing if needed. Records,
  events, command and firmware statuses are never dropped: if they alone exceed the budget,
  the :attr:`Outbox.storage_alarm` flag is raised (logged once on the transition, once on the
  clear) and puts keep succeeding while the disk has room.
* **Full disk.** If SQLite reports the disk full, ``put`` (and the atomic writers built on
  the outbox: ``finalize_session``, ``update_status``) makes room from telemetry only --
  the oldest half of it for a telemetry sample, all of it for any other kind -- and retries
  once; if it is still full it raises :class:`~agent.store.db.StoreFullError` and sets the
  storage alarm (cleared by the next successful write); the caller keeps the data and retries
  later.
* **Corrupt or newer database.** Handled when the database is opened (:mod:`agent.store.db`).

Payloads are JSON objects, encoded before the call first suspends (``await put(...)`` copies
the dict before anything else runs), so later mutations are never seen. Payloads are never
logged (they may hold a VIN).

Why one module of ~700 lines: put, batch, ack/nack, dead letters, the unit of work and the
disk-budget thinning share one writer connection, one lock and one set of in-memory
counters; split apart, each half would have to reach into the other's private state.
"""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar, get_args

import structlog

from agent.store.db import StateDB, StoreConfig, StoreFullError

log = structlog.get_logger(__name__)

T = TypeVar("T")

OutboxKind = Literal["command_status", "charging_record", "event", "firmware_status", "telemetry"]

#: Send priority per kind; lower is sent first.
PRIORITY: Final[dict[str, int]] = {
    "command_status": 0,
    "charging_record": 1,
    "event": 2,
    "firmware_status": 3,
    "telemetry": 4,
}
KINDS: Final[tuple[OutboxKind, ...]] = get_args(OutboxKind)
#: Kinds that are never dropped to save space.
DURABLE_KINDS: Final[frozenset[str]] = frozenset(KINDS) - {"telemetry"}
_TELEMETRY_PRIORITY: Final = PRIORITY["telemetry"]
_MAX_ERROR_LEN: Final = 1000
#: Near the row cap, count exactly: in-memory counters lag by at most one commit group.
_MAX_UNCOMMITTED: Final = 512


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One queued item as returned by :meth:`Outbox.next_batch`. ``created_at`` is Unix time."""

    id: int
    kind: OutboxKind
    payload: dict[str, Any]
    created_at: float
    attempts: int
    last_error: str | None = None
    key: str | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An item the platform rejected permanently, kept for an operator (``outbox_dead``)."""

    id: int
    kind: OutboxKind
    payload: dict[str, Any]
    created_at: float
    attempts: int
    last_error: str | None
    reason: str
    dead_at: float
    key: str | None = None


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """A snapshot for status pages and heartbeats; reading it never touches the disk."""

    depth: dict[str, int]
    dead_letters: int
    used_bytes: int
    max_bytes: int
    storage_alarm: bool
    telemetry_thinned: int


def encode_payload(payload: Mapping[str, Any]) -> str:
    """Encode a payload as compact JSON. Raises ``TypeError``/``ValueError`` for anything that
    is not a JSON object of JSON values (NaN and infinities included)."""
    if not isinstance(payload, Mapping):
        raise TypeError(f"payload must be a mapping, not {type(payload).__name__}")
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def check_kind(kind: str) -> OutboxKind:
    """Return ``kind`` if it is an outbox kind, else raise ``ValueError``."""
    if kind not in PRIORITY:
        raise ValueError(f"unknown outbox kind {kind!r}; expected one of {', '.join(KINDS)}")
    return kind  # type: ignore[return-value]


@dataclass(slots=True)
class _Delta:
    """Changes a job made, applied to the in-memory counters only after its commit."""

    counts: dict[str, int] = field(default_factory=dict)
    dead: int = 0
    thinned: int = 0
    inserted: bool = False
    used_bytes: int | None = None
    alarm: bool | None = None

    def add(self, kind: str, n: int) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + n


@dataclass(frozen=True, slots=True)
class _PutResult:
    item_id: int
    inserted: bool


class OutboxTxn:
    """Queues outbox items inside a :meth:`Outbox.unit_of_work` transaction (writer thread only)."""

    def __init__(self, outbox: Outbox, conn: sqlite3.Connection, delta: _Delta, now: float) -> None:
        self._outbox = outbox
        self._conn = conn
        self.delta = delta
        self.now = now
        self.wrote = False

    def put(self, kind: OutboxKind, encoded: str, key: str | None = None) -> int:
        """Queue the encoded payload (see :func:`encode_payload`); return its item id.

        With ``key``, an item already stored under ``(kind, key)`` is not stored again and
        its id is returned.
        """
        check_kind(kind)
        self.wrote = True
        return self._outbox._txn_put(self._conn, kind, encoded, key, self.now, self.delta).item_id


def _used_bytes(conn: sqlite3.Connection) -> int:
    page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
    free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
    return (pages - free) * page_size


def _count_telemetry(conn: sqlite3.Connection) -> int:
    row = conn.execute(
        "SELECT count(*) FROM outbox WHERE priority = ?", (_TELEMETRY_PRIORITY,)
    ).fetchone()
    return int(row[0])


def _thin_pass(conn: sqlite3.Connection, telemetry_rows: int) -> int:
    """Drop every other row of the oldest half of telemetry, keeping that half's first and last."""
    ids = [
        int(r[0])
        for r in conn.execute(
            "SELECT id FROM outbox WHERE priority = ? ORDER BY id LIMIT ?",
            (_TELEMETRY_PRIORITY, telemetry_rows // 2),
        )
    ]
    victims = ids[1:-1:2]
    _delete_telemetry(conn, victims)
    return len(victims)


def _delete_telemetry(conn: sqlite3.Connection, ids: list[int]) -> None:
    conn.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])
    conn.executemany("DELETE FROM outbox_keys WHERE item_id = ?", [(i,) for i in ids])


def _item_from_row(row: tuple[Any, ...]) -> OutboxItem:
    return OutboxItem(
        id=int(row[0]),
        kind=check_kind(str(row[1])),
        key=row[2],
        payload=json.loads(row[3]),
        created_at=float(row[4]),
        attempts=int(row[5]),
        last_error=row[6],
    )


class Outbox:
    """The durable, prioritised send queue. Create with :meth:`open` on an open :class:`StateDB`.

    Every coroutine method is safe to call from the event loop: the work runs on the store's
    writer thread. :meth:`depth`, :meth:`stats` and :attr:`storage_alarm` read in-memory
    counters that follow the committed state and never block.
    """

    def __init__(
        self,
        db: StateDB,
        *,
        max_telemetry_rows: int = 50_000,
        max_bytes: int = 128 * 1024 * 1024,
        delivered_key_retention_s: float = 7 * 24 * 3600.0,
    ) -> None:
        """Bind to ``db``; call :meth:`load` (or use :meth:`open`) before use."""
        if max_telemetry_rows < 10:
            raise ValueError("max_telemetry_rows must be at least 10")
        self._db = db
        self._max_rows = max_telemetry_rows
        self._max_bytes = max_bytes
        self._key_retention_s = delivered_key_retention_s
        self._lock = threading.Lock()
        self._counts: dict[str, int] = dict.fromkeys(KINDS, 0)
        self._dead = 0
        self._thinned = 0
        self._used_bytes = 0
        self._alarm = False
        self._event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    async def open(cls, db: StateDB, config: StoreConfig | None = None) -> Outbox:
        """Create the outbox over ``db`` with ``config``'s limits and load its counters."""
        cfg = config or StoreConfig()
        outbox = cls(
            db,
            max_telemetry_rows=cfg.max_telemetry_rows,
            max_bytes=cfg.max_bytes,
            delivered_key_retention_s=cfg.delivered_key_retention_s,
        )
        await outbox.load()
        return outbox

    async def load(self) -> None:
        """Read the per-kind counts and enforce the disk budget once (call again after a
        configuration change)."""
        self._loop = asyncio.get_running_loop()

        def job(conn: sqlite3.Connection) -> _Delta:
            delta = _Delta()
            counts: dict[str, int] = dict.fromkeys(KINDS, 0)
            for kind, n in conn.execute("SELECT kind, count(*) FROM outbox GROUP BY kind"):
                counts[str(kind)] = int(n)
            dead = int(conn.execute("SELECT count(*) FROM outbox_dead").fetchone()[0])
            with self._lock:
                self._counts = counts
                self._dead = dead
            self._enforce_budget(conn, delta)
            return delta

        await self._db.run(job, on_commit=self._after_commit)
        if self.total_depth() > 0:
            self._event.set()

    # -- writing -----------------------------------------------------------------------

    async def put(
        self, kind: OutboxKind, payload: Mapping[str, Any], *, key: str | None = None
    ) -> int:
        """Durably queue ``payload``; return its id once committed (see module contract).

        With ``key``, a second put of the same ``(kind, key)`` stores nothing and returns the
        first item's id. Raises ``ValueError``/``TypeError`` for an unknown kind or a payload
        that is not JSON, :class:`~agent.store.db.StoreFullError` when the disk stays full
        after telemetry made room (see module contract).
        """
        check_kind(kind)
        encoded = encode_payload(payload)
        return await self._with_room(kind, lambda: self._put_encoded(kind, encoded, key))

    async def _with_room(self, kind: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run ``attempt``; on a full disk make room from telemetry only -- the oldest half of
        it for a telemetry sample, all of it for anything else -- and run it once more.

        Also the retry of :meth:`unit_of_work`.
        """
        try:
            return await attempt()
        except StoreFullError:
            share = 0.5 if kind == "telemetry" else 1.0
            log.warning("outbox.disk_full", kind=kind, dropping_telemetry_share=share)
            await self._purge_telemetry(share)
            try:
                return await attempt()
            except StoreFullError:
                self._set_alarm(True, reason="disk full")
                raise

    async def _put_encoded(self, kind: str, encoded: str, key: str | None) -> int:
        def job(conn: sqlite3.Connection) -> tuple[int, _Delta]:
            delta = _Delta()
            res = self._txn_put(conn, kind, encoded, key, time.time(), delta)
            self._enforce_budget(conn, delta)
            return res.item_id, delta

        item_id, _ = await self._db.run(job, on_commit=self._after_commit_pair)
        return item_id

    async def unit_of_work(self, job: Callable[[sqlite3.Connection, OutboxTxn], T], *, room_for: str) -> T:
        """Run ``job`` in one transaction together with the items it queues through its
        :class:`OutboxTxn`: the caller's own writes and those items commit together or not at
        all (writer thread; ``job`` must not block on anything else).

        The disk budget is enforced before the commit; on a full disk telemetry makes room
        as for :meth:`put` (``room_for`` is the kind being written) and ``job`` runs once
        more, so it must be repeatable. Exceptions from ``job`` roll everything back and
        propagate. This is the one way other stores (open sessions, the command ledger)
        queue items atomically with their own rows.
        """

        def run(conn: sqlite3.Connection) -> tuple[T, _Delta]:
            txn = OutboxTxn(self, conn, _Delta(), time.time())
            result = job(conn, txn)
            if txn.wrote:
                self._enforce_budget(conn, txn.delta)
            return result, txn.delta

        result, _ = await self._with_room(room_for, lambda: self._db.run(run, on_commit=self._after_commit_pair))
        return result

    def _txn_put(
        self,
        conn: sqlite3.Connection,
        kind: str,
        encoded: str,
        key: str | None,
        now: float,
        delta: _Delta,
    ) -> _PutResult:
        """Insert one item inside the caller's transaction (writer thread only).

        Other stores reach it only through :meth:`unit_of_work`.
        """
        if key is not None:
            row = conn.execute(
                "SELECT item_id FROM outbox_keys WHERE kind = ? AND idem_key = ?", (kind, key)
            ).fetchone()
            if row is not None:
                return _PutResult(int(row[0]), inserted=False)
        cur = conn.execute(
            "INSERT INTO outbox (kind, priority, idem_key, payload, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (kind, PRIORITY[kind], key, encoded, now),
        )
        item_id = int(cur.lastrowid or 0)
        if key is not None:
            conn.execute(
                "INSERT INTO outbox_keys (kind, idem_key, item_id, state, updated_at) "
                "VALUES (?, ?, ?, 'queued', ?)",
                (kind, key, item_id, now),
            )
        delta.add(kind, 1)
        delta.inserted = True
        return _PutResult(item_id, inserted=True)

    def _enforce_budget(self, conn: sqlite3.Connection, delta: _Delta) -> None:
        """Thin telemetry to the row cap and the byte budget; decide the alarm (writer thread)."""
        with self._lock:
            telemetry = self._counts["telemetry"]
        telemetry += delta.counts.get("telemetry", 0)
        if telemetry + _MAX_UNCOMMITTED > self._max_rows:
            # The counters lag by the uncommitted jobs of the current group: count exactly.
            telemetry = _count_telemetry(conn)
        while telemetry > self._max_rows:
            removed = _thin_pass(conn, telemetry)
            if removed == 0:  # cannot happen for max_rows >= 10; guard against a bad config
                break
            telemetry -= removed
            delta.add("telemetry", -removed)
            delta.thinned += removed
        used = _used_bytes(conn)
        if used > self._max_bytes:
            telemetry = _count_telemetry(conn)
        if used > self._max_bytes and telemetry > 0:
            dropped = 0
            while used > self._max_bytes and telemetry > 0:
                removed = _thin_pass(conn, telemetry)
                if removed == 0:
                    ids = [
                        int(r[0])
                        for r in conn.execute(
                            "SELECT id FROM outbox WHERE priority = ?", (_TELEMETRY_PRIORITY,)
                        )
                    ]
                    _delete_telemetry(conn, ids)
                    removed = len(ids)
                telemetry -= removed
                dropped += removed
                used = _used_bytes(conn)
            conn.execute("PRAGMA incremental_vacuum").fetchall()
            delta.add("telemetry", -dropped)
            delta.thinned += dropped
        delta.used_bytes = used
        delta.alarm = used > self._max_bytes

    async def _purge_telemetry(self, share: float) -> None:
        """Delete the oldest ``share`` of queued telemetry (at least one row)."""

        def job(conn: sqlite3.Connection) -> _Delta:
            delta = _Delta()
            total = _count_telemetry(conn)
            ids = [
                int(r[0])
                for r in conn.execute(
                    "SELECT id FROM outbox WHERE priority = ? ORDER BY id LIMIT ?",
                    (_TELEMETRY_PRIORITY, max(1, math.ceil(total * share))),
                )
            ]
            _delete_telemetry(conn, ids)
            delta.add("telemetry", -len(ids))
            delta.thinned += len(ids)
            conn.execute("PRAGMA incremental_vacuum").fetchall()
            return delta

        try:
            await self._db.run(job, on_commit=self._after_commit)
        except StoreFullError:  # even the delete could not be written; the caller learns below
            log.error("outbox.telemetry_purge_failed")

    # -- after commit (writer thread) ----------------------------------------------------

    def _after_commit_pair(self, result: tuple[Any, _Delta]) -> None:
        self._after_commit(result[1])

    def _after_commit(self, delta: _Delta) -> None:
        """Apply a committed job's changes to the counters and wake waiters (writer thread)."""
        with self._lock:
            for kind, n in delta.counts.items():
                self._counts[kind] = max(0, self._counts[kind] + n)
            self._dead += delta.dead
            self._thinned += delta.thinned
            if delta.used_bytes is not None:
                self._used_bytes = delta.used_bytes
        if delta.thinned:
            log.info("outbox.telemetry_thinned", dropped=delta.thinned)
        if delta.alarm is not None:
            self._set_alarm(delta.alarm, reason="over max_bytes")
        if delta.inserted and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._event.set)
            except RuntimeError:  # loop closed
                pass

    def _set_alarm(self, on: bool, *, reason: str) -> None:
        with self._lock:
            changed = on != self._alarm
            self._alarm = on
            used = self._used_bytes
        if not changed:
            return
        if on:
            log.error(
                "outbox.storage_alarm",
                reason=reason,
                used_bytes=used,
                max_bytes=self._max_bytes,
                note="no telemetry left to drop; records, events and statuses are kept",
            )
        else:
            log.info("outbox.storage_alarm_cleared", used_bytes=used, max_bytes=self._max_bytes)

    # -- reading and acknowledging ---------------------------------------------------------

    async def next_batch(
        self, limit: int = 50, kinds: Iterable[OutboxKind] | None = None
    ) -> list[OutboxItem]:
        """Return up to ``limit`` items in send order (priority, then age), optionally only of
        ``kinds``. Nothing is leased or changed."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        prios = sorted({PRIORITY[check_kind(k)] for k in kinds}) if kinds is not None else None
        if prios is not None and not prios:
            return []

        def job(conn: sqlite3.Connection) -> list[OutboxItem]:
            cols = "id, kind, idem_key, payload, created_at, attempts, last_error"
            if prios is None:
                rows = conn.execute(
                    f"SELECT {cols} FROM outbox ORDER BY priority, id LIMIT ?", (limit,)
                ).fetchall()
            else:
                # One index range per priority, merged: keeps each lookup on the index.
                rows = []
                for prio in prios:
                    rows.extend(
                        conn.execute(
                            f"SELECT {cols} FROM outbox WHERE priority = ? ORDER BY id LIMIT ?",
                            (prio, limit - len(rows)),
                        ).fetchall()
                    )
                    if len(rows) >= limit:
                        break
            return [_item_from_row(tuple(r)) for r in rows]

        return await self._db.run(job, durable=False)

    async def ack(self, item_id: int) -> bool:
        """The platform accepted ``item_id``: delete it durably. Returns False if it was not
        queued (already acked, dead-lettered or thinned) -- acking twice is harmless."""

        def job(conn: sqlite3.Connection) -> tuple[bool, _Delta]:
            delta = _Delta()
            row = conn.execute("SELECT kind FROM outbox WHERE id = ?", (item_id,)).fetchone()
            if row is None:
                return False, delta
            conn.execute("DELETE FROM outbox WHERE id = ?", (item_id,))
            conn.execute(
                "UPDATE outbox_keys SET state = 'delivered', updated_at = ? WHERE item_id = ?",
                (time.time(), item_id),
            )
            delta.add(str(row[0]), -1)
            delta.used_bytes = _used_bytes(conn)
            with self._lock:
                alarm_on = self._alarm
            if alarm_on:  # acks only ever clear the alarm
                delta.alarm = delta.used_bytes > self._max_bytes
            return True, delta

        found, _ = await self._db.run(job, on_commit=self._after_commit_pair)
        return found

    async def nack(self, item_id: int, error: str) -> bool:
        """A send attempt failed transiently: count it and keep ``error`` (truncated to 1000
        characters). The item keeps its place. Returns False if it is not queued."""
        message = str(error)[:_MAX_ERROR_LEN]

        def job(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?, last_attempt_at = ? "
                "WHERE id = ?",
                (message, time.time(), item_id),
            )
            return cur.rowcount > 0

        return await self._db.run(job)

    async def dead_letter(self, item_id: int, reason: str) -> bool:
        """The platform rejected ``item_id`` permanently (1001/1002): move it, with ``reason``,
        to the dead-letter table in one transaction. Returns False if it is not queued."""
        message = str(reason)[:_MAX_ERROR_LEN]

        def job(conn: sqlite3.Connection) -> tuple[str | None, _Delta]:
            delta = _Delta()
            row = conn.execute(
                "SELECT kind, idem_key FROM outbox WHERE id = ?", (item_id,)
            ).fetchone()
            if row is None:
                return None, delta
            now = time.time()
            conn.execute(
                "INSERT INTO outbox_dead (id, kind, idem_key, payload, created_at, attempts, "
                "last_error, reason, dead_at) SELECT id, kind, idem_key, payload, created_at, "
                "attempts, last_error, ?, ? FROM outbox WHERE id = ?",
                (message, now, item_id),
            )
            conn.execute("DELETE FROM outbox WHERE id = ?", (item_id,))
            conn.execute(
                "UPDATE outbox_keys SET state = 'dead', updated_at = ? WHERE item_id = ?",
                (now, item_id),
            )
            delta.add(str(row[0]), -1)
            delta.dead += 1
            return str(row[0]), delta

        kind, _ = await self._db.run(job, on_commit=self._after_commit_pair)
        if kind is None:
            return False
        level = log.error if kind in DURABLE_KINDS else log.warning
        level("outbox.dead_lettered", item_id=item_id, kind=kind, reason=message)
        return True

    async def dead_letters(
        self, limit: int = 100, kind: OutboxKind | None = None
    ) -> list[DeadLetter]:
        """List dead-lettered items, oldest first."""
        if kind is not None:
            check_kind(kind)

        def job(conn: sqlite3.Connection) -> list[DeadLetter]:
            sql = (
                "SELECT id, kind, idem_key, payload, created_at, attempts, last_error, reason, "
                "dead_at FROM outbox_dead"
            )
            params: tuple[Any, ...] = (limit,)
            if kind is not None:
                sql += " WHERE kind = ?"
                params = (kind, limit)
            rows = conn.execute(sql + " ORDER BY id LIMIT ?", params).fetchall()
            return [
                DeadLetter(
                    id=int(r[0]),
                    kind=check_kind(str(r[1])),
                    key=r[2],
                    payload=json.loads(r[3]),
                    created_at=float(r[4]),
                    attempts=int(r[5]),
                    last_error=r[6],
                    reason=str(r[7]),
                    dead_at=float(r[8]),
                )
                for r in rows
            ]

        return await self._db.run(job, durable=False)

    async def requeue_dead_letter(self, dead_id: int) -> int:
        """Put a dead letter back at the end of its kind's queue (e.g. after a fix); return the
        new item id. Raises ``KeyError`` if there is no such dead letter."""

        def job(conn: sqlite3.Connection) -> tuple[int | None, _Delta]:
            delta = _Delta()
            row = conn.execute(
                "SELECT kind, idem_key, payload FROM outbox_dead WHERE id = ?", (dead_id,)
            ).fetchone()
            if row is None:
                return None, delta
            kind, key, payload = str(row[0]), row[1], str(row[2])
            if key is not None:
                conn.execute("DELETE FROM outbox_keys WHERE kind = ? AND idem_key = ?", (kind, key))
            res = self._txn_put(conn, kind, payload, key, time.time(), delta)
            conn.execute("DELETE FROM outbox_dead WHERE id = ?", (dead_id,))
            delta.dead -= 1
            return res.item_id, delta

        new_id, _ = await self._db.run(job, on_commit=self._after_commit_pair)
        if new_id is None:
            raise KeyError(f"no dead letter with id {dead_id}")
        log.info("outbox.requeued", dead_id=dead_id, item_id=new_id)
        return new_id

    async def maintain(self, now: float | None = None) -> int:
        """Housekeeping for a periodic task (e.g. hourly): forget delivered keys older than
        ``delivered_key_retention_s``, re-count the queue, enforce the disk budget and give
        free pages back to the file system. Returns the number of keys forgotten."""
        cutoff = (time.time() if now is None else now) - self._key_retention_s

        def job(conn: sqlite3.Connection) -> tuple[int, _Delta]:
            cur = conn.execute(
                "DELETE FROM outbox_keys WHERE state = 'delivered' AND updated_at < ?", (cutoff,)
            )
            delta = _Delta()
            counts: dict[str, int] = dict.fromkeys(KINDS, 0)
            for kind, n in conn.execute("SELECT kind, count(*) FROM outbox GROUP BY kind"):
                counts[str(kind)] = int(n)
            with self._lock:
                for kind in KINDS:
                    delta.add(kind, counts[kind] - self._counts[kind])
            self._enforce_budget(conn, delta)
            conn.execute("PRAGMA incremental_vacuum").fetchall()
            return max(cur.rowcount, 0), delta

        forgotten, _ = await self._db.run(job, on_commit=self._after_commit_pair)
        return forgotten

    # -- observing -----------------------------------------------------------------------

    def depth(self) -> dict[str, int]:
        """Queued items per kind (every kind present), as of the last commit. Never blocks."""
        with self._lock:
            return dict(self._counts)

    def total_depth(self, kinds: Iterable[str] | None = None) -> int:
        """Queued items over ``kinds`` (all kinds by default)."""
        with self._lock:
            if kinds is None:
                return sum(self._counts.values())
            return sum(self._counts[check_kind(k)] for k in kinds)

    @property
    def storage_alarm(self) -> bool:
        """True while over ``max_bytes`` with no telemetry left, or while the disk is full."""
        with self._lock:
            return self._alarm

    def stats(self) -> OutboxStats:
        """Counters for status reporting."""
        with self._lock:
            return OutboxStats(
                depth=dict(self._counts),
                dead_letters=self._dead,
                used_bytes=self._used_bytes,
                max_bytes=self._max_bytes,
                storage_alarm=self._alarm,
                telemetry_thinned=self._thinned,
            )

    async def wait_for_items(
        self, kinds: Iterable[OutboxKind] | None = None, timeout: float | None = None
    ) -> bool:
        """Sleep until at least one item of ``kinds`` (any kind by default) is queued.

        Returns True at once if something is queued, False if ``timeout`` seconds passed
        with nothing queued. No wake-up is lost: a put committed while this checks is seen.
        """
        wanted = [check_kind(k) for k in kinds] if kinds is not None else None
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.total_depth(wanted) == 0:
            self._event.clear()
            if deadline is None:
                await self._event.wait()
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 or math.isnan(remaining):
                return False
            try:
                await asyncio.wait_for(self._event.wait(), remaining)
            except TimeoutError:
                return self.total_depth(wanted) > 0
        return True
