"""The OCPP channel's durable state: ``{state_dir}/ocpp.db`` (SQLite, WAL, ``synchronous=FULL``).

Contract:

* **Transaction messages** (StartTransaction, MeterValues of a transaction,
  StopTransaction) are appended to ``queue`` *before* anything tries to send them, in
  the order they happened, and leave it only when the CSMS answered them (or they were
  dead-lettered). Every method resolves after its ``COMMIT`` returned, so an appended
  message survives ``kill -9`` and a power cut.
* **Transactions** (``tx``): one row per local transaction, keyed by the session's
  ``record_id``. The CSMS's ``transactionId`` is stored in the same commit that removes
  the answered StartTransaction, so a later message can never be sent without it
  and a replay after a crash can never start a second transaction.
* **Dead letters**: a message the CSMS kept refusing moves to ``dead`` in one commit
  (the queue never stalls on it).
* ``kv``: configuration keys, availability, local authorization list and cache.

One worker thread owns the only connection; jobs run in submission order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    action TEXT NOT NULL,
    payload TEXT NOT NULL,
    local_tx TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS dead (
    seq INTEGER PRIMARY KEY,
    action TEXT NOT NULL,
    payload TEXT NOT NULL,
    local_tx TEXT,
    attempts INTEGER NOT NULL,
    error TEXT NOT NULL,
    dead_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tx (
    local_tx TEXT PRIMARY KEY,
    connector INTEGER NOT NULL,
    id_tag TEXT NOT NULL,
    meter_start INTEGER NOT NULL,
    last_wh INTEGER NOT NULL,
    transaction_id INTEGER,
    open INTEGER NOT NULL DEFAULT 1,
    started_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class QueuedMessage:
    seq: int
    action: str
    payload: dict[str, Any]
    local_tx: str | None
    attempts: int


@dataclass(frozen=True)
class TxRow:
    local_tx: str
    connector: int
    id_tag: str
    meter_start: int
    last_wh: int
    transaction_id: int | None
    open: bool
    started_at: str


class Journal:
    """Async facade over ``ocpp.db``; open with :meth:`open`, close with :meth:`close`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ocpp-journal")
        self._conn: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, state_dir: Path) -> "Journal":
        state_dir.mkdir(parents=True, exist_ok=True)
        journal = cls(state_dir / "ocpp.db")
        await journal._run(journal._connect)
        return journal

    def _connect(self, _c: Any = None) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.executescript(SCHEMA)
        self._conn = conn

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._pool, conn.close)
        self._pool.shutdown(wait=True)

    async def _run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        def work() -> T:
            conn = self._conn
            if conn is None:
                return job(None)  # type: ignore[arg-type]  # only _connect runs without a connection
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = job(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        return await asyncio.get_running_loop().run_in_executor(self._pool, work)

    # ------------------------------------------------------------------ transactions

    async def start_transaction(self, row: TxRow, payload: dict[str, Any]) -> bool:
        """Record a new local transaction and queue its StartTransaction (False: known already)."""

        def job(c: sqlite3.Connection) -> bool:
            cur = c.execute(
                "INSERT OR IGNORE INTO tx (local_tx, connector, id_tag, meter_start, last_wh, transaction_id, open, started_at)"
                " VALUES (?, ?, ?, ?, ?, NULL, 1, ?)",
                (row.local_tx, row.connector, row.id_tag, row.meter_start, row.last_wh, row.started_at),
            )
            if cur.rowcount == 0:
                return False
            _append(c, "StartTransaction", payload, row.local_tx)
            return True

        return await self._run(job)

    async def meter_values(self, local_tx: str, payload: dict[str, Any], register_wh: int | None) -> None:
        """Queue a MeterValues of a transaction; remember the highest register reported."""

        def job(c: sqlite3.Connection) -> None:
            _append(c, "MeterValues", payload, local_tx)
            if register_wh is not None:
                c.execute("UPDATE tx SET last_wh = max(last_wh, ?) WHERE local_tx = ?", (register_wh, local_tx))

        await self._run(job)

    async def stop_transaction(self, local_tx: str, payload: dict[str, Any]) -> bool:
        """Close the local transaction and queue its StopTransaction, exactly once."""

        def job(c: sqlite3.Connection) -> bool:
            cur = c.execute("UPDATE tx SET open = 0 WHERE local_tx = ? AND open = 1", (local_tx,))
            if cur.rowcount == 0:
                return False
            _append(c, "StopTransaction", payload, local_tx)
            return True

        return await self._run(job)

    async def transactions(self, *, open_only: bool = True) -> list[TxRow]:
        def job(c: sqlite3.Connection) -> list[TxRow]:
            sql = "SELECT local_tx, connector, id_tag, meter_start, last_wh, transaction_id, open, started_at FROM tx"
            if open_only:
                sql += " WHERE open = 1"
            return [TxRow(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), r[7]) for r in c.execute(sql + " ORDER BY rowid")]

        return await self._run(job)

    async def transaction(self, local_tx: str) -> TxRow | None:
        rows = [r for r in await self.transactions(open_only=False) if r.local_tx == local_tx]
        return rows[0] if rows else None

    async def purge_closed(self, keep: int = 200) -> None:
        """Forget closed transactions whose messages are all gone (the newest ``keep`` stay)."""

        def job(c: sqlite3.Connection) -> None:
            c.execute(
                "DELETE FROM tx WHERE open = 0 AND local_tx NOT IN (SELECT local_tx FROM queue WHERE local_tx IS NOT NULL)"
                " AND rowid NOT IN (SELECT rowid FROM tx ORDER BY rowid DESC LIMIT ?)",
                (keep,),
            )

        await self._run(job)

    # ------------------------------------------------------------------ the queue

    async def head(self) -> QueuedMessage | None:
        def job(c: sqlite3.Connection) -> QueuedMessage | None:
            r = c.execute("SELECT seq, action, payload, local_tx, attempts FROM queue ORDER BY seq LIMIT 1").fetchone()
            return None if r is None else QueuedMessage(r[0], r[1], json.loads(r[2]), r[3], r[4])

        return await self._run(job)

    async def depth(self) -> int:
        return int(await self._run(lambda c: c.execute("SELECT count(*) FROM queue").fetchone()[0]))

    async def delivered(self, seq: int, local_tx: str | None = None, transaction_id: int | None = None) -> None:
        """The CSMS answered ``seq``; a StartTransaction's ``transaction_id`` commits with it."""

        def job(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM queue WHERE seq = ?", (seq,))
            if transaction_id is not None and local_tx is not None:
                c.execute("UPDATE tx SET transaction_id = ? WHERE local_tx = ?", (transaction_id, local_tx))

        await self._run(job)

    async def failed_attempt(self, seq: int) -> int:
        def job(c: sqlite3.Connection) -> int:
            c.execute("UPDATE queue SET attempts = attempts + 1 WHERE seq = ?", (seq,))
            r = c.execute("SELECT attempts FROM queue WHERE seq = ?", (seq,)).fetchone()
            return int(r[0]) if r else 0

        return await self._run(job)

    async def dead_letter(self, seq: int, error: str) -> None:
        def job(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT OR REPLACE INTO dead (seq, action, payload, local_tx, attempts, error, dead_at)"
                " SELECT seq, action, payload, local_tx, attempts, ?, ? FROM queue WHERE seq = ?",
                (error, time.time(), seq),
            )
            c.execute("DELETE FROM queue WHERE seq = ?", (seq,))

        await self._run(job)

    async def dead_count(self) -> int:
        return int(await self._run(lambda c: c.execute("SELECT count(*) FROM dead").fetchone()[0]))

    # ------------------------------------------------------------------ key/value

    async def kv_get(self, key: str, default: Any = None) -> Any:
        def job(c: sqlite3.Connection) -> Any:
            r = c.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
            return default if r is None else json.loads(r[0])

        return await self._run(job)

    async def kv_set(self, key: str, value: Any) -> None:
        text = json.dumps(value, sort_keys=True)
        await self._run(lambda c: c.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, text)))


def _append(c: sqlite3.Connection, action: str, payload: dict[str, Any], local_tx: str | None) -> None:
    c.execute(
        "INSERT INTO queue (action, payload, local_tx, attempts, created) VALUES (?, ?, ?, 0, ?)",
        (action, json.dumps(payload, sort_keys=True), local_tx, time.time()),
    )
