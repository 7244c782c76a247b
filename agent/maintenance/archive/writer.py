"""The agent's writer of ``archive.db``: buffered samples, sessions begun and ended, compaction
and reads, all on one worker thread (see :mod:`agent.maintenance.archive` for the contract).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import structlog

from agent.maintenance.archive.compaction import _compact, _release_free_pages, _used_bytes
from agent.maintenance.archive.model import (
    ARCHIVE_FILENAME,
    ArchiveConfig,
    ArchiveError,
    CompactReport,
    MAX_BUFFERED,
    SampleRow,
    SessionInfo,
    _STORED,
    _enc,
    _unix,
)
from agent.maintenance.archive.schema import (
    _computed_summary,
    _open_or_replace,
    _q_get,
    _q_list,
    _q_samples,
)
from agent.store.engine import StoreError
from hal.tasks import stop_task

log = structlog.get_logger(__name__)

T = TypeVar("T")


#: record_id, connector_id, t_ms, then the stored value columns in _VALUES order
_Buffered = tuple[str, int, int, int | None, int | None, int | None, int | None, int | None, int | None]


class SessionArchive:
    """The agent's writer of ``archive.db``. Create with :meth:`open`; see the module contract."""

    def __init__(self, path: Path, config: ArchiveConfig) -> None:
        """Use :meth:`open`."""
        self.path = path
        self.config = config
        self.dropped_samples = 0
        self.disabled_reason: str | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # touched only on the worker thread
        self._buffer: list[_Buffered] = []
        self._active: set[str] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def open(cls, state_dir: str | os.PathLike[str], config: ArchiveConfig | None = None) -> SessionArchive:
        """Open (creating and migrating if needed) ``{state_dir}/archive.db``; start the flusher.

        Never raises because of the file or the directory: when the archive cannot be used
        (``enabled = false``, a newer schema, an unwritable directory) the returned archive
        has ``available`` False, ``disabled_reason`` says why (logged), writes are no-ops and
        reads return nothing. A disabled archive creates no file.
        """
        cfg = config or ArchiveConfig()
        archive = cls(Path(state_dir) / ARCHIVE_FILENAME, cfg)
        if not cfg.enabled:
            archive.disabled_reason = "disabled in config ([archive] enabled = false)"
            log.info("archive.disabled", path=str(archive.path))
            return archive
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="archive")
        loop = asyncio.get_running_loop()

        def connect() -> None:
            archive.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            archive._conn = _open_or_replace(archive.path)

        try:
            await loop.run_in_executor(executor, connect)
        except (StoreError, OSError, sqlite3.Error) as exc:
            executor.shutdown(wait=False)
            archive.disabled_reason = str(exc)
            log.error("archive.unavailable", path=str(archive.path), error=str(exc))
            return archive
        archive._executor = executor
        archive._flusher = asyncio.create_task(archive._flush_loop(), name="archive-flush")
        log.info("archive.opened", path=str(archive.path))
        return archive

    @property
    def available(self) -> bool:
        """True while the archive records (opened, enabled, not closed)."""
        return self._executor is not None and not self._closed

    # -- plumbing -------------------------------------------------------------------

    def _in_transaction(self, fn: Callable[[sqlite3.Connection], T], write: bool | None) -> T:
        """Run ``fn`` on the worker thread: in a write or read transaction, or (None) bare."""
        conn = self._conn
        assert conn is not None
        if write is None:
            return fn(conn)
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            result = fn(conn)
            conn.execute("COMMIT")
            return result
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    async def _job(self, fn: Callable[[sqlite3.Connection], T], *, write: bool | None) -> T:
        if self._executor is None or self._conn is None:
            raise ArchiveError("the archive is not open")
        loop = asyncio.get_running_loop()
        # shielded: a job, once submitted, runs even if its waiter is cancelled (close() cancels
        # the flusher), so a swapped-out batch is never lost unnoticed
        return await asyncio.shield(loop.run_in_executor(self._executor, self._in_transaction, fn, write))

    async def _write(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T | None:
        """Run a write job; storage errors are logged and give None (never raised).

        ``fn`` must return a value other than None so success and failure differ.
        """
        try:
            return await self._job(fn, write=True)
        except (sqlite3.Error, OSError) as exc:
            log.warning("archive.write_failed", what=what, error=str(exc))
            return None

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.flush_interval_s)
            await self.flush()

    # -- writing --------------------------------------------------------------------

    def add_sample(
        self,
        record_id: str,
        connector_id: int,
        t_unix: float,
        power_kw: float | None,
        voltage: float | None,
        current: float | None,
        soc: float | None,
        temperature: float | None,
        energy_kwh: float | None,
    ) -> None:
        """Buffer one sample (``energy_kwh`` = energy of this session so far). Never blocks or raises.

        A sample for a record that was never begun creates its session row at the next
        commit (start time = the first sample). Two samples of one record with the same
        millisecond keep the first. No-op when the archive is not available.
        """
        if not self.available:
            return
        if len(self._buffer) >= MAX_BUFFERED:
            del self._buffer[0]
            self.dropped_samples += 1
        t_ms = _enc(t_unix, 1000.0)
        if t_ms is None:
            self.dropped_samples += 1
            return
        self._buffer.append(
            (
                record_id,
                int(connector_id),
                t_ms,
                _enc(power_kw, 1000.0),
                _enc(voltage, 10.0),
                _enc(current, 100.0),
                _enc(soc, 10.0),
                _enc(temperature, 10.0),
                _enc(energy_kwh, 1000.0),
            )
        )

    async def flush(self) -> bool:
        """Commit the buffered samples now. False (batch dropped and counted) if that failed."""
        if not self._buffer or not self.available:
            return True
        batch, self._buffer = self._buffer, []

        def insert(conn: sqlite3.Connection) -> bool:
            ids: dict[str, int] = {}
            rows = []
            for record_id, connector_id, t_ms, *values in batch:
                sid = ids.get(record_id)
                if sid is None:
                    conn.execute(
                        "INSERT OR IGNORE INTO sessions (record_id, connector_id, start_time) VALUES (?, ?, ?)",
                        (record_id, connector_id, t_ms / 1000.0),
                    )
                    sid = int(conn.execute("SELECT id FROM sessions WHERE record_id = ?", (record_id,)).fetchone()[0])
                    ids[record_id] = sid
                rows.append((sid, t_ms, *values))
            conn.executemany(
                f"INSERT OR IGNORE INTO samples_1s (session_id, t_ms, {_STORED}) VALUES (?,?,?,?,?,?,?,?)", rows
            )
            return True

        if await self._write("samples", insert) is None:
            self.dropped_samples += len(batch)
            return False
        return True

    async def begin_session(
        self, record_id: str, connector_id: int, start_time: datetime | float, mode: str | None = "charge"
    ) -> bool:
        """Register a session (it is then *recording*: never trimmed until it ends).

        On a record that exists (a resumed session, or samples that arrived first) the row is
        updated and reopened: end time and summary are cleared, samples kept.
        """
        if not self.available:
            return False
        self._active.add(record_id)
        start = _unix(start_time)

        def upsert(conn: sqlite3.Connection) -> bool:
            conn.execute(
                "INSERT INTO sessions (record_id, connector_id, mode, start_time) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (record_id) DO UPDATE SET connector_id = excluded.connector_id, "
                "mode = excluded.mode, start_time = excluded.start_time, end_time = NULL, summary = NULL",
                (record_id, int(connector_id), mode, start),
            )
            return True

        return await self._write("begin_session", upsert) is not None

    async def end_session(
        self, record_id: str, summary: Mapping[str, Any], *, end_time: datetime | float | None = None
    ) -> bool:
        """Close a session with its summary; False if the record is unknown or the write failed.

        The stored summary is computed from the samples (``energy_kwh``, ``max_power_kw``,
        ``avg_power_kw``, ``soc_start``, ``soc_end``, ``duration_s``, ``samples_recorded``,
        ``stop_reason`` None) and then overlaid with ``summary`` -- the caller's values win,
        extra keys are kept. ``end_time`` defaults to start + the summary's ``duration_s``,
        else the last sample, else the start. The session stops *recording*.
        """
        if not self.available:
            return False
        await self.flush()
        self._active.discard(record_id)
        given = dict(summary)
        explicit_end = None if end_time is None else _unix(end_time)

        def close(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT id, start_time FROM sessions WHERE record_id = ?", (record_id,)).fetchone()
            if row is None:
                return False
            sid, start = int(row[0]), float(row[1])
            end = explicit_end
            duration = given.get("duration_s")
            if end is None and isinstance(duration, (int, float)):
                end = start + float(duration)
            merged = _computed_summary(conn, sid, start, end)
            merged.update(given)
            if end is None:
                end = start + float(merged.get("duration_s") or 0.0)
            conn.execute(
                "UPDATE sessions SET end_time = ?, summary = ? WHERE id = ?",
                (end, json.dumps(merged, default=str), sid),
            )
            return True

        done = await self._write("end_session", close)
        if done is False:
            log.warning("archive.end_unknown_session", record_id=record_id)
        return bool(done)

    async def compact(self, now: datetime | float | None = None) -> CompactReport | None:
        """Apply tiers and bounds as of ``now`` (default: the wall clock); see the module contract.

        Runs in one transaction; None if it failed (logged, nothing changed).
        """
        if not self.available:
            return None
        await self.flush()
        now_ms = round(_unix(now if now is not None else time.time()) * 1000)
        cfg = self.config
        active = frozenset(self._active)
        report = await self._write("compact", lambda conn: _compact(conn, now_ms, cfg, active))
        if report is None:
            return None
        try:
            await self._job(_release_free_pages, write=None)
        except sqlite3.Error as exc:
            log.warning("archive.write_failed", what="incremental_vacuum", error=str(exc))
        log.info("archive.compacted", **asdict(report))
        return report

    # -- reading --------------------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], T], empty: T) -> T:
        if self._closed:
            raise ArchiveError("the archive is closed")
        if not self.available:
            return empty
        await self.flush()
        try:
            return await self._job(fn, write=False)
        except sqlite3.Error as exc:
            raise ArchiveError(f"cannot read {self.path}: {exc}") from exc

    async def list_sessions(self, limit: int = 50) -> list[SessionInfo]:
        """The newest ``limit`` sessions, newest first. Raises :class:`ArchiveError` when closed."""
        return await self._read(lambda c: _q_list(c, limit), [])

    async def get_session(self, record_id: str) -> SessionInfo | None:
        """The session of ``record_id`` or None."""
        return await self._read(lambda c: _q_get(c, record_id), None)

    async def samples(self, record_id: str) -> list[SampleRow]:
        """Every kept sample of ``record_id`` in time order, each tagged ``"1s"`` or ``"1min"``."""
        return await self._read(lambda c: _q_samples(c, record_id), [])

    async def bytes_used(self) -> int:
        """Bytes of pages in use in ``archive.db`` (what ``max_bytes`` bounds)."""
        return await self._read(_used_bytes, 0)

    # -- closing --------------------------------------------------------------------

    async def close(self) -> None:
        """Commit the buffer, checkpoint the WAL and close. Idempotent; later writes are no-ops."""
        if self._closed:
            return
        await stop_task(self._flusher)
        await self.flush()
        self._closed = True
        executor, self._executor = self._executor, None
        if executor is None:
            return

        def shut() -> None:
            conn, self._conn = self._conn, None
            if conn is not None:
                try:
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                finally:
                    conn.close()

        try:
            await asyncio.get_running_loop().run_in_executor(executor, shut)
        except sqlite3.Error as exc:
            log.warning("archive.close_failed", error=str(exc))
        finally:
            executor.shutdown(wait=False)
        log.info("archive.closed", path=str(self.path), dropped_samples=self.dropped_samples)
