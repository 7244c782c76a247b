"""Per-session telemetry archive: every charging session's 1 s samples, kept locally by record id.

platform-api §14.4 proposes an operator endpoint serving the per-second telemetry of a
completed session, with tiered retention (1 s for 30 days, 1-minute means for 90 days, a
summary after that) and no charger-side upload path yet. Project choice: the agent keeps that
archive itself, keyed by the charging record's ``record_id``, bounded by ``[archive]`` in the
config, so it can be inspected locally (``charger-agent sessions``) and uploaded once an
endpoint exists. The live 5 s telemetry is unaffected.

Storage layout
--------------
``{state_dir}/archive.db``: a SQLite file of its own (never ``agent.db``: losing it must never
touch the outbox), schema version in ``PRAGMA user_version``::

    sessions     (id INTEGER PRIMARY KEY, record_id TEXT UNIQUE, connector_id, mode,
                  start_time REAL, end_time REAL, summary JSON)    -- times in Unix seconds
    samples_1s   (session_id, t_ms, power_w, voltage_dv, current_ca, soc_dp, temp_dc, energy_wh)
    samples_1min (same columns; t_ms = start of the UTC minute, values = means, energy = last)

Both sample tables are ``WITHOUT ROWID`` tables keyed by ``(session_id, t_ms)``. Values are
scaled integers -- ms, W, 0.1 V, 0.01 A, 0.1 %, 0.1 °C, Wh -- 20 to 30 bytes a row, so the
default 200 MiB holds about 2,000 session-hours at 1 s. ``energy`` is the energy moved in
*this session* so far (import when charging, export when discharging), not the meter register.

Contract
--------
* **Durability.** WAL with ``synchronous=NORMAL``: this is diagnostic data, so a commit
  survives a process crash but a power cut may roll back the last few commits. The file is
  never left inconsistent. Samples are buffered in memory and committed every
  ``flush_interval_s``; a crash loses at most that much. Charging records never depend on it.
* **Never in the charging path.** :meth:`SessionArchive.add_sample` only appends to a memory
  buffer. No write method raises because of storage: a failing write is logged
  (``archive.write_failed``) and reported by its return value (``False`` / ``None``); a batch
  of samples that cannot be written is dropped and counted in ``dropped_samples``. The buffer
  holds at most :data:`MAX_BUFFERED` samples; beyond that the oldest are dropped.
* **Threading.** One worker thread owns the only read-write connection; every SQLite call
  runs there, one job at a time in submission order, each job in one transaction. The event
  loop never touches the disk. Call the archive from the event-loop thread only.
* **Read your writes.** Every read (and :meth:`~SessionArchive.end_session`,
  :meth:`~SessionArchive.compact`) first commits the buffered samples, so it sees every
  sample added before it.
* **Tiers** (:meth:`SessionArchive.compact`, with an injectable ``now``): 1 s samples older
  than ``full_resolution_days`` (whole minutes only) are replaced by one row per minute (mean
  power, voltage, current, SOC, temperature; last energy); samples of either kind older than
  ``minute_means_days`` are deleted; the session's summary stays.
* **Bounds.** At most ``max_sessions`` sessions keep samples (the oldest lose theirs first,
  their summaries stay) and at most ``max_summaries`` sessions are listed at all. When the
  data (pages in use) exceeds ``max_bytes``, the oldest sessions lose their samples, then
  their summaries, until it fits. Sessions currently recording (begun and not ended here) are
  never trimmed. Freed pages are returned to the file system (``auto_vacuum=INCREMENTAL``).
* **Open sessions.** A session that is neither ended nor recording and saw no sample for
  :data:`STALE_OPEN_S` (the agent died mid-session and nobody closed it) is closed by
  compaction with a summary computed from its samples and ``"interrupted": true``. Samples are
  never dropped from a session without a summary: one is computed first the same way.
  :meth:`~SessionArchive.begin_session` on an existing record reopens it (a resumed session
  continues under its record) and clears its summary until it ends again.
* **Damaged file.** A file that is not a database is renamed ``archive.db.corrupt-<UTC ts>``
  and a fresh archive is created (the data is diagnostic; the evidence is kept). A file
  written by a newer agent (higher ``user_version``) is not touched: the archive stays
  disabled (``available`` is False) and the agent runs on without it.
* **Readers.** :class:`ArchiveReader` opens the file read-only (``mode=ro``); thanks to WAL it
  can read while the agent writes and never blocks it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Self, TypeVar

import structlog

from hal.tick import sleep_to_grid
from pydantic import Field, model_validator

from hal.config import StrictModel

if TYPE_CHECKING:
    from agent.charging.connector import Connector
    from agent.charging.session import Session

log = structlog.get_logger(__name__)

T = TypeVar("T")

ARCHIVE_FILENAME: Final = "archive.db"
#: Samples kept in memory between two commits; beyond this the oldest are dropped.
MAX_BUFFERED: Final = 20_000
#: A session neither ended nor recording, silent this long, is closed by :meth:`compact`.
STALE_OPEN_S: Final = 6 * 3600.0
_MIB: Final = 1024 * 1024
_DAY_MS: Final = 86_400_000
_MINUTE_MS: Final = 60_000
_INT_LIMIT: Final = 2**62

Resolution = Literal["1s", "1min"]

#: (public name, stored column, scale): stored = round(value * scale)
_VALUES: Final = (
    ("power_kw", "power_w", 1000.0),
    ("voltage", "voltage_dv", 10.0),
    ("current", "current_ca", 100.0),
    ("soc", "soc_dp", 10.0),
    ("temperature", "temp_dc", 10.0),
    ("energy_kwh", "energy_wh", 1000.0),
)
_STORED: Final = ", ".join(col for _, col, _ in _VALUES)


# --------------------------------------------------------------------------- config


class ArchiveConfig(StrictModel):
    """The ``[archive]`` table: tiered, bounded retention of per-session 1 s telemetry."""

    enabled: bool = Field(True, description="record every session's 1 s samples in archive.db")
    full_resolution_days: int = Field(30, ge=1, le=365, description="1 s samples kept this long")
    minute_means_days: int = Field(
        90, ge=1, le=3650, description="1-minute means kept this long; after that only the summary"
    )
    max_sessions: int = Field(
        2000, ge=1, le=100_000, description="sessions that keep samples; the oldest lose theirs first"
    )
    max_summaries: int = Field(
        50_000, ge=1, le=1_000_000, description="sessions kept at all (summary only beyond max_sessions)"
    )
    max_bytes: int = Field(
        200 * _MIB,
        ge=1 * _MIB,
        le=64 * 1024 * _MIB,
        description="data size budget of archive.db (the WAL beside it adds up to 4 MiB)",
    )
    flush_interval_s: float = Field(5.0, ge=0.5, le=60.0, description="buffered samples are committed this often")
    compact_interval_s: float = Field(3600.0, ge=60.0, le=86_400.0, description="tiers and bounds applied this often")

    @model_validator(mode="after")
    def _ordered(self) -> ArchiveConfig:
        if self.minute_means_days < self.full_resolution_days:
            raise ValueError("minute_means_days must be at least full_resolution_days")
        if self.max_summaries < self.max_sessions:
            raise ValueError("max_summaries must be at least max_sessions")
        return self


# --------------------------------------------------------------------------- errors and rows


class ArchiveError(Exception):
    """The archive cannot be read (missing, damaged, closed, or a schema this code does not know)."""


class ArchiveNotFoundError(ArchiveError):
    """There is no ``archive.db`` in the given state directory."""


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One archived session. Times are Unix seconds; ``summary`` is ``{}`` while it is open.

    ``resolution`` is what is kept of its samples: ``"1s"``, ``"1min"``, ``"1s+1min"`` (a
    session straddling the tier boundary) or ``"summary"`` (samples gone).
    """

    record_id: str
    connector_id: int
    mode: str | None
    start_time: float
    end_time: float | None
    summary: dict[str, Any]
    samples_1s: int
    samples_1min: int

    @property
    def resolution(self) -> str:
        if self.samples_1s and self.samples_1min:
            return "1s+1min"
        if self.samples_1s:
            return "1s"
        if self.samples_1min:
            return "1min"
        return "summary"

    @property
    def is_open(self) -> bool:
        return self.end_time is None

    @property
    def duration_s(self) -> float | None:
        value = self.summary.get("duration_s")
        if isinstance(value, (int, float)):
            return float(value)
        return None if self.end_time is None else max(self.end_time - self.start_time, 0.0)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready view: ISO 8601 UTC times plus the derived ``resolution``."""
        out = asdict(self)
        out["start_time"] = iso_utc(self.start_time)
        out["end_time"] = iso_utc(self.end_time) if self.end_time is not None else None
        out["resolution"] = self.resolution
        return out


@dataclass(frozen=True, slots=True)
class SampleRow:
    """One stored sample. ``t`` is Unix seconds (the minute's start for ``"1min"`` rows)."""

    t: float
    resolution: Resolution
    power_kw: float | None
    voltage: float | None
    current: float | None
    soc: float | None
    temperature: float | None
    energy_kwh: float | None


#: Column order of :class:`SampleRow` (CSV header of ``sessions show --csv``).
SAMPLE_COLUMNS: Final = ("t", "resolution", *(name for name, _, _ in _VALUES))


@dataclass(frozen=True, slots=True)
class CompactReport:
    """What one :meth:`SessionArchive.compact` did."""

    finalized: int  # stale open sessions closed with a computed summary
    minute_rows_created: int
    second_rows_merged: int
    expired_rows: int  # samples older than minute_means_days deleted
    sessions_trimmed: int  # sessions whose samples were dropped for max_sessions / max_bytes
    summaries_dropped: int  # sessions removed entirely for max_summaries / max_bytes
    bytes_used: int


# --------------------------------------------------------------------------- helpers


def iso_utc(t: float) -> str:
    """Unix seconds as ISO 8601 UTC with a trailing Z, second precision."""
    return datetime.fromtimestamp(t, UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _unix(value: datetime | float) -> float:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.timestamp()
    return float(value)


def _enc(value: float | None, scale: float) -> int | None:
    if value is None:
        return None
    try:
        x = float(value) * scale
    except (TypeError, ValueError):
        return None
    if not math.isfinite(x):
        return None
    return max(-_INT_LIMIT, min(_INT_LIMIT, math.floor(x + 0.5)))  # half up, not to even


def _dec(value: Any, scale: float) -> float | None:
    return None if value is None else value / scale


def _utc_stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


# --------------------------------------------------------------------------- schema

_SCHEMA_V1: Final = f"""
CREATE TABLE sessions (
    id           INTEGER PRIMARY KEY,
    record_id    TEXT    NOT NULL UNIQUE,
    connector_id INTEGER NOT NULL,
    mode         TEXT,
    start_time   REAL    NOT NULL,
    end_time     REAL,
    summary      TEXT    CHECK (summary IS NULL OR json_valid(summary))
);
CREATE INDEX sessions_start ON sessions (start_time);
CREATE TABLE samples_1s (
    session_id INTEGER NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    t_ms       INTEGER NOT NULL,
    {", ".join(f"{col} INTEGER" for _, col, _ in _VALUES)},
    PRIMARY KEY (session_id, t_ms)
) WITHOUT ROWID;
CREATE TABLE samples_1min (
    session_id INTEGER NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    t_ms       INTEGER NOT NULL,
    {", ".join(f"{col} INTEGER" for _, col, _ in _VALUES)},
    PRIMARY KEY (session_id, t_ms)
) WITHOUT ROWID;
"""

#: The schema history; ``user_version`` is the number applied. Append, never edit.
_MIGRATIONS: Final[tuple[str, ...]] = (_SCHEMA_V1,)
SCHEMA_VERSION: Final = len(_MIGRATIONS)


class _NewerSchema(Exception):
    pass


def _check_version(conn: sqlite3.Connection, path: Path) -> int:
    current = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if current > SCHEMA_VERSION:
        raise _NewerSchema(
            f"{path} has schema version {current}; this agent knows up to {SCHEMA_VERSION} "
            f"(written by a newer agent); the archive stays disabled and the file untouched"
        )
    return current


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    current = _check_version(conn, path)
    for version in range(current + 1, SCHEMA_VERSION + 1):
        # executescript() commits first; BEGIN..COMMIT makes the step and its bump atomic
        try:
            conn.executescript(
                f"BEGIN IMMEDIATE;\n{_MIGRATIONS[version - 1]}\nPRAGMA user_version = {version:d};\nCOMMIT;"
            )
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        log.info("archive.migrated", path=str(path), version=version)


def _connect_rw(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        _check_version(conn, path)  # before anything writes to the file
        if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
            # only possible before the first table exists
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("PRAGMA journal_mode = WAL").fetchone()
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA journal_size_limit = 4194304")
        _migrate(conn, path)
        return conn
    except BaseException:
        conn.close()
        raise


def _is_damage(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.DatabaseError) and isinstance(code, int) and code & 0xFF in (11, 26)


def _open_or_replace(path: Path) -> sqlite3.Connection:
    """Open ``path`` read-write; a damaged file is moved aside once and a fresh one created."""
    try:
        return _connect_rw(path)
    except sqlite3.DatabaseError as exc:
        if not _is_damage(exc):
            raise
        aside = path.with_name(f"{path.name}.corrupt-{_utc_stamp()}")
        os.replace(path, aside)
        for suffix in ("-wal", "-shm"):
            side = Path(str(path) + suffix)
            if side.exists():
                os.replace(side, Path(str(aside) + suffix))
        log.warning("archive.damaged_file_replaced", path=str(path), kept_as=str(aside), error=str(exc))
        return _connect_rw(path)


# --------------------------------------------------------------------------- queries (any connection)

_SESSION_COLUMNS: Final = """
    s.record_id, s.connector_id, s.mode, s.start_time, s.end_time, s.summary,
    (SELECT count(*) FROM samples_1s WHERE session_id = s.id),
    (SELECT count(*) FROM samples_1min WHERE session_id = s.id)
"""


def _session_info(row: Sequence[Any]) -> SessionInfo:
    summary = json.loads(row[5]) if row[5] else {}
    return SessionInfo(
        record_id=str(row[0]),
        connector_id=int(row[1]),
        mode=row[2],
        start_time=float(row[3]),
        end_time=None if row[4] is None else float(row[4]),
        summary=summary if isinstance(summary, dict) else {},
        samples_1s=int(row[6]),
        samples_1min=int(row[7]),
    )


def _q_list(conn: sqlite3.Connection, limit: int) -> list[SessionInfo]:
    rows = conn.execute(
        f"SELECT {_SESSION_COLUMNS} FROM sessions s ORDER BY s.start_time DESC, s.id DESC LIMIT ?",
        (max(int(limit), 0),),
    ).fetchall()
    return [_session_info(r) for r in rows]


def _q_get(conn: sqlite3.Connection, record_id: str) -> SessionInfo | None:
    row = conn.execute(f"SELECT {_SESSION_COLUMNS} FROM sessions s WHERE s.record_id = ?", (record_id,)).fetchone()
    return None if row is None else _session_info(row)


def _q_find(conn: sqlite3.Connection, prefix: str) -> list[str]:
    pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    rows = conn.execute(
        "SELECT record_id FROM sessions WHERE record_id LIKE ? ESCAPE '\\' ORDER BY start_time DESC LIMIT 20",
        (pattern,),
    ).fetchall()
    return [str(r[0]) for r in rows]


def _q_samples(conn: sqlite3.Connection, record_id: str) -> list[SampleRow]:
    row = conn.execute("SELECT id FROM sessions WHERE record_id = ?", (record_id,)).fetchone()
    if row is None:
        return []
    sid = int(row[0])
    cur = conn.execute(
        f"SELECT t_ms, '1min', {_STORED} FROM samples_1min WHERE session_id = ? "
        f"UNION ALL SELECT t_ms, '1s', {_STORED} FROM samples_1s WHERE session_id = ? ORDER BY 1",
        (sid, sid),
    )
    return [
        SampleRow(
            r[0] / 1000.0,
            r[1],
            *(_dec(r[2 + i], scale) for i, (_, _, scale) in enumerate(_VALUES)),
        )
        for r in cur
    ]


def _computed_summary(conn: sqlite3.Connection, sid: int, start_time: float, end_time: float | None) -> dict[str, Any]:
    """Summary fields derived from the stored samples (both tiers) of session ``sid``."""
    union = (
        f"SELECT t_ms, {_STORED} FROM samples_1s WHERE session_id = :sid "
        f"UNION ALL SELECT t_ms, {_STORED} FROM samples_1min WHERE session_id = :sid"
    )
    agg = conn.execute(
        f"SELECT count(*), max(t_ms), max(abs(power_w)), avg(power_w) FROM ({union})", {"sid": sid}
    ).fetchone()
    count, last_ms, max_w, avg_w = agg

    def edge(column: str, order: str) -> Any:
        row = conn.execute(
            f"SELECT {column} FROM ({union}) WHERE {column} IS NOT NULL ORDER BY t_ms {order} LIMIT 1",
            {"sid": sid},
        ).fetchone()
        return None if row is None else row[0]

    end = end_time if end_time is not None else (last_ms / 1000.0 if last_ms is not None else start_time)
    duration = max(end - start_time, 0.0)
    energy_wh = edge("energy_wh", "DESC")
    soc_start, soc_end = edge("soc_dp", "ASC"), edge("soc_dp", "DESC")
    energy = None if energy_wh is None else round(energy_wh / 1000.0, 3)
    avg_kw: float | None
    if energy is not None:
        avg_kw = round(energy / (max(duration, 1.0) / 3600.0), 3)
        if max_w is not None:
            avg_kw = min(avg_kw, max_w / 1000.0)
    else:
        avg_kw = None if avg_w is None else round(avg_w / 1000.0, 3)
    return {
        "energy_kwh": energy,
        "max_power_kw": None if max_w is None else round(max_w / 1000.0, 3),
        "avg_power_kw": avg_kw,
        "soc_start": None if soc_start is None else soc_start / 10.0,
        "soc_end": None if soc_end is None else soc_end / 10.0,
        "stop_reason": None,
        "duration_s": round(duration, 1),
        "samples_recorded": int(count),
    }


# --------------------------------------------------------------------------- read-only access


class ArchiveReader:
    """Read-only access to ``{state_dir}/archive.db`` (the CLI), safe while the agent writes.

    Synchronous; the connection is opened with ``mode=ro`` so this never changes the file.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path

    @classmethod
    def open(cls, state_dir: str | os.PathLike[str]) -> ArchiveReader:
        """Open the archive of ``state_dir``.

        Raises :class:`ArchiveNotFoundError` when there is no archive file, and
        :class:`ArchiveError` when it cannot be read or has a schema version this code does
        not read (an older file is migrated by the next agent start).
        """
        path = Path(state_dir) / ARCHIVE_FILENAME
        if not path.is_file():
            raise ArchiveNotFoundError(f"no session archive at {path}")
        try:
            conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
        except sqlite3.Error as exc:
            raise ArchiveError(f"cannot open {path}: {exc}") from exc
        try:
            conn.execute("PRAGMA busy_timeout = 5000")
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        except sqlite3.Error as exc:
            conn.close()
            raise ArchiveError(f"cannot read {path}: {exc}") from exc
        if version != SCHEMA_VERSION:
            conn.close()
            raise ArchiveError(
                f"{path} has schema version {version}; this tool reads version {SCHEMA_VERSION}"
            )
        return cls(conn, path)

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return fn(self._conn)
        except sqlite3.Error as exc:
            raise ArchiveError(f"cannot read {self.path}: {exc}") from exc

    def list_sessions(self, limit: int = 50) -> list[SessionInfo]:
        """The newest ``limit`` sessions, newest first."""
        return self._read(lambda c: _q_list(c, limit))

    def get_session(self, record_id: str) -> SessionInfo | None:
        """The session of ``record_id``, or None."""
        return self._read(lambda c: _q_get(c, record_id))

    def find(self, prefix: str) -> list[str]:
        """Record ids starting with ``prefix`` (at most 20, newest first)."""
        return self._read(lambda c: _q_find(c, prefix))

    def samples(self, record_id: str) -> list[SampleRow]:
        """Every kept sample of ``record_id`` in time order (``[]`` if unknown)."""
        return self._read(lambda c: _q_samples(c, record_id))

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- the archive

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
        except (_NewerSchema, OSError, sqlite3.Error) as exc:
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
            await sleep_to_grid(self.config.flush_interval_s)
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
        if self._flusher is not None:
            self._flusher.cancel()
            try:
                await self._flusher
            except asyncio.CancelledError:
                pass
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


# --------------------------------------------------------------------------- compaction


def _used_bytes(conn: sqlite3.Connection) -> int:
    size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
    free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
    return size * (pages - free)


def _release_free_pages(conn: sqlite3.Connection) -> None:
    """Return the free pages to the file system (outside a transaction).

    ``execute()`` steps a statement once, which frees a single page; ``executescript()`` runs
    the pragma to completion in its own transaction.
    """
    conn.executescript("PRAGMA incremental_vacuum;")


def _finalize(conn: sqlite3.Connection, sid: int) -> None:
    """Give an open session a summary computed from its samples (``interrupted``)."""
    row = conn.execute("SELECT start_time, end_time, summary FROM sessions WHERE id = ?", (sid,)).fetchone()
    if row is None or row[2] is not None:
        return
    summary = _computed_summary(conn, sid, float(row[0]), row[1])
    summary["interrupted"] = True
    end = row[1] if row[1] is not None else float(row[0]) + summary["duration_s"]
    conn.execute("UPDATE sessions SET end_time = ?, summary = ? WHERE id = ?", (end, json.dumps(summary), sid))


def _drop_samples(conn: sqlite3.Connection, sid: int) -> None:
    _finalize(conn, sid)
    conn.execute("DELETE FROM samples_1s WHERE session_id = ?", (sid,))
    conn.execute("DELETE FROM samples_1min WHERE session_id = ?", (sid,))


def _drop_session(conn: sqlite3.Connection, sid: int) -> None:
    conn.execute("DELETE FROM samples_1s WHERE session_id = ?", (sid,))
    conn.execute("DELETE FROM samples_1min WHERE session_id = ?", (sid,))
    conn.execute("DELETE FROM sessions WHERE id = ?", (sid,))


_HAS_SAMPLES: Final = (
    "(EXISTS (SELECT 1 FROM samples_1s WHERE session_id = s.id) "
    "OR EXISTS (SELECT 1 FROM samples_1min WHERE session_id = s.id))"
)


def _active_ids(conn: sqlite3.Connection, active: Iterable[str]) -> set[int]:
    ids: set[int] = set()
    for record_id in active:
        row = conn.execute("SELECT id FROM sessions WHERE record_id = ?", (record_id,)).fetchone()
        if row is not None:
            ids.add(int(row[0]))
    return ids


def _compact(conn: sqlite3.Connection, now_ms: int, cfg: ArchiveConfig, active: frozenset[str]) -> CompactReport:
    keep = _active_ids(conn, active)

    # stale open sessions (agent died mid-session, nobody closed them)
    stale_before = now_ms - STALE_OPEN_S * 1000
    finalized = 0
    open_rows = conn.execute(
        "SELECT s.id, max(coalesce((SELECT max(t_ms) FROM samples_1s WHERE session_id = s.id), 0), "
        "coalesce((SELECT max(t_ms) FROM samples_1min WHERE session_id = s.id), 0), "
        "CAST(s.start_time * 1000 AS INTEGER)) FROM sessions s WHERE s.end_time IS NULL"
    ).fetchall()
    for sid, last_ms in open_rows:
        if sid not in keep and last_ms < stale_before:
            _finalize(conn, int(sid))
            finalized += 1

    # tier 1: 1 s -> 1-minute means, whole minutes older than the cut only
    cut1 = (now_ms - cfg.full_resolution_days * _DAY_MS) // _MINUTE_MS * _MINUTE_MS
    old1 = "SELECT id FROM sessions WHERE start_time < :cut / 1000.0"
    # energy_wh is a bare column: SQLite takes it from the row where max(t_ms) is found
    means = ", ".join(
        "energy_wh" if col == "energy_wh" else f"CAST(round(avg({col})) AS INTEGER) AS {col}"
        for _, col, _ in _VALUES
    )
    created = conn.execute(
        f"INSERT OR IGNORE INTO samples_1min (session_id, t_ms, {_STORED}) "
        f"SELECT session_id, m, {_STORED} FROM ("
        f"  SELECT session_id, (t_ms / {_MINUTE_MS}) * {_MINUTE_MS} AS m, max(t_ms) AS last_t, {means} "
        f"  FROM samples_1s WHERE session_id IN ({old1}) AND t_ms < :cut GROUP BY session_id, m)",
        {"cut": cut1},
    ).rowcount
    merged = conn.execute(
        f"DELETE FROM samples_1s WHERE session_id IN ({old1}) AND t_ms < :cut", {"cut": cut1}
    ).rowcount

    # tier 2: older than minute_means_days -> summary only
    cut2 = now_ms - cfg.minute_means_days * _DAY_MS
    expiring = conn.execute(
        f"SELECT DISTINCT session_id FROM samples_1min WHERE session_id IN ({old1}) AND t_ms < :cut "
        f"UNION SELECT DISTINCT session_id FROM samples_1s WHERE session_id IN ({old1}) AND t_ms < :cut",
        {"cut": cut2},
    ).fetchall()
    for (sid,) in expiring:
        if int(sid) not in keep:
            _finalize(conn, int(sid))
    expired = 0
    for table in ("samples_1min", "samples_1s"):
        expired += conn.execute(
            f"DELETE FROM {table} WHERE session_id IN ({old1}) AND t_ms < :cut", {"cut": cut2}
        ).rowcount

    # bounds: sessions with samples, sessions at all
    trimmed = 0
    with_samples = [
        int(r[0])
        for r in conn.execute(
            f"SELECT s.id FROM sessions s WHERE {_HAS_SAMPLES} ORDER BY s.start_time DESC, s.id DESC"
        ).fetchall()
    ]
    for sid in with_samples[cfg.max_sessions :]:
        if sid not in keep:
            _drop_samples(conn, sid)
            trimmed += 1
    dropped = 0
    for (sid,) in conn.execute(
        "SELECT id FROM sessions ORDER BY start_time DESC, id DESC LIMIT -1 OFFSET ?", (cfg.max_summaries,)
    ).fetchall():
        if int(sid) not in keep:
            _drop_session(conn, int(sid))
            dropped += 1

    # byte budget: oldest samples first, then oldest summaries
    used = _used_bytes(conn)
    while used > cfg.max_bytes:
        limit = len(keep) + 1  # the oldest session not recording is among these
        victims = conn.execute(
            f"SELECT s.id FROM sessions s WHERE {_HAS_SAMPLES} ORDER BY s.start_time, s.id LIMIT ?", (limit,)
        ).fetchall()
        candidates = [int(r[0]) for r in victims if int(r[0]) not in keep]
        if candidates:
            _drop_samples(conn, candidates[0])
            trimmed += 1
        else:
            rows = conn.execute("SELECT id FROM sessions ORDER BY start_time, id LIMIT ?", (limit,)).fetchall()
            spare = [int(r[0]) for r in rows if int(r[0]) not in keep]
            if not spare:
                log.warning("archive.over_budget", bytes_used=used, max_bytes=cfg.max_bytes)
                break
            _drop_session(conn, spare[0])
            dropped += 1
        used = _used_bytes(conn)

    return CompactReport(
        finalized=finalized,
        minute_rows_created=max(created, 0),
        second_rows_merged=max(merged, 0),
        expired_rows=max(expired, 0),
        sessions_trimmed=trimmed,
        summaries_dropped=dropped,
        bytes_used=_used_bytes(conn),
    )


# --------------------------------------------------------------------------- recording connectors


def summary_from_session(session: Session, end_time: datetime | float) -> dict[str, Any]:
    """The archive summary of a finished :class:`~agent.charging.session.Session` (CDR arithmetic)."""
    start = _unix(session.start_time)
    duration = max(_unix(end_time) - start, 0.0)
    energy = round(session.energy_kwh, 3)
    avg = energy / (max(duration, 1.0) / 3600.0)
    if session.max_power_kw > 0:
        avg = min(avg, session.max_power_kw)
    return {
        "energy_kwh": energy,
        "max_power_kw": round(max(session.max_power_kw, avg), 3),
        "avg_power_kw": round(avg, 3),
        "soc_start": session.soc_start,
        "soc_end": session.soc_now,
        "stop_reason": session.stop_reason,
        "duration_s": round(duration, 1),
        "mode": session.request.mode,
    }


def summary_from_record(record: Mapping[str, Any], stop_reason: str | None = None) -> dict[str, Any]:
    """The archive summary of a charging record (ChargingRecordUpload body).

    For sessions closed outside a running connector, e.g. from a checkpoint after a restart.
    ``stop_reason`` overrides the record's (absent when CDR extensions are off).
    """
    vehicle = record.get("vehicle_info") or {}
    start = datetime.fromisoformat(str(record["start_time"]))
    end = datetime.fromisoformat(str(record["end_time"]))
    return {
        "energy_kwh": record.get("energy"),
        "max_power_kw": record.get("max_power"),
        "avg_power_kw": record.get("avg_power"),
        "soc_start": vehicle.get("soc_start"),
        "soc_end": vehicle.get("soc_end"),
        "stop_reason": stop_reason if stop_reason is not None else record.get("stop_reason"),
        "duration_s": max((end - start).total_seconds(), 0.0),
    }


class SessionRecorder:
    """Feeds a :class:`SessionArchive` from the connectors: one sample a second per session.

    Each :meth:`poll` looks at every connector's ``session``: a new one is begun in the
    archive, a running one gets a sample (meter power/voltage/current, session energy from the
    import -- or, discharging, export -- register, the vehicle's SOC, the outlet sensor's
    temperature or else the meter's), and one that disappeared with a ``stop_reason`` is ended
    with :func:`summary_from_session`. One that disappeared without a stop reason was
    suspended for a shutdown: it stays open for the resume. A connector whose devices raise
    is skipped for that poll (logged); the recorder never fails the agent.
    """

    def __init__(
        self,
        archive: SessionArchive,
        connectors: Sequence[Connector],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.archive = archive
        self.connectors = list(connectors)
        self._clock = clock
        self._seen: dict[int, Session] = {}
        self._compaction: asyncio.Task[CompactReport | None] | None = None

    async def poll(self) -> None:
        """One step: notice begun/ended sessions, sample every running one."""
        now = self._clock()
        for connector in self.connectors:
            current = connector.session
            previous = self._seen.get(connector.id)
            if previous is not None and previous is not current:
                del self._seen[connector.id]
                if previous.stop_reason is not None:
                    await self.archive.end_session(
                        previous.record_id, summary_from_session(previous, now), end_time=now
                    )
            if current is None:
                continue
            if previous is not current:
                self._seen[connector.id] = current
                await self.archive.begin_session(
                    current.record_id, connector.id, current.start_time, current.request.mode
                )
            try:
                self._sample(connector, current, now)
            except Exception as exc:  # noqa: BLE001 - a driver bug must not stop the recording
                log.warning("archive.sample_failed", connector=connector.id, error=repr(exc))

    def _sample(self, connector: Connector, session: Session, now: float) -> None:
        reading = connector.hw.meter.reading()
        soc = connector.hw.vehicle.status().soc
        temperature: float | None = None
        thermal, sensor = connector.hw.thermal, connector.config.outlet_sensor
        if thermal is not None and sensor:
            found = thermal.temperatures().get(sensor)
            temperature = found.celsius if found is not None else None
        energy: float | None = None
        power = voltage = current = None
        if reading is not None:
            power, voltage, current = reading.power_kw, reading.voltage, reading.current
            if temperature is None:
                temperature = reading.temperature
            register = reading.energy_export_kwh if session.request.mode == "discharge" else reading.energy_import_kwh
            energy = max(register - session.meter_start, 0.0)
        self.archive.add_sample(
            session.record_id, connector.id, now, power, voltage, current,
            None if soc is None else float(soc), temperature, energy,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Poll every second and compact every ``compact_interval_s`` (first at once) until ``stop``.

        Set ``stop`` only after the connectors have stopped: a last poll then closes the
        sessions the shutdown ended. Compaction runs beside the polling, never two at once.
        """
        loop = asyncio.get_running_loop()
        next_poll = loop.time()
        next_compact = next_poll
        while not stop.is_set():
            if loop.time() >= next_compact and (self._compaction is None or self._compaction.done()):
                self._compaction = asyncio.create_task(self.archive.compact(), name="archive-compact")
                next_compact = loop.time() + self.archive.config.compact_interval_s
            await self.poll()
            next_poll += 1.0
            delay = next_poll - loop.time()
            if delay < 0:  # fell behind (slow disk, suspended process): skip, do not burst
                next_poll, delay = loop.time() + 1.0, 1.0
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass
        await self.poll()
        if self._compaction is not None:
            await self._compaction
