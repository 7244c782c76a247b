"""The agent's state database: ``{state_dir}/agent.db`` (SQLite, WAL) behind one writer thread.

Everything that must survive a restart or a power cut -- the outbox, dead letters, the
command ledger and audit log, small key/value state and the open session per connector --
lives in this one file. Credentials do not: they live in a 0600 file next to it
(:mod:`agent.store.credentials`).

Contract
--------
* **Durability.** The database runs in WAL mode with ``synchronous=FULL``: a job's awaitable
  resolves only after its transaction's ``COMMIT`` returned, and in that mode SQLite has
  fsync'ed the WAL before ``COMMIT`` returns. A result therefore survives ``kill -9`` *and* a
  power cut (on storage that honours fsync). The only exception is a job submitted with
  ``durable=False`` (used for the coalesced running-session update): it survives a process
  crash but a power cut may roll it back -- never anything committed before it -- until the
  next durable commit, which syncs the WAL it shares.
* **Atomicity.** Every job runs inside a transaction (a savepoint inside a group commit, see
  below): either all of its writes are committed or none. A crash in the middle of a job
  leaves no partial rows; SQLite's WAL recovery discards the uncommitted tail on the next open.
* **Order.** Jobs run one at a time, in submission order, on a dedicated thread that owns the
  only connection; the event loop never touches the disk. Jobs queued while a commit is in
  progress are committed together in the next transaction (group commit): one fsync covers
  the whole group, each job in its own savepoint so a failing job rolls back alone.
* **Cancellation.** Cancelling the task that awaits a job does not withdraw the job: once
  submitted it runs and, if it succeeds, is committed.
* **Errors.** A job that raises resolves its awaitable with that exception and none of its
  writes are kept. SQLite errors are mapped: disk full -> :class:`StoreFullError`, I/O error
  -> :class:`StoreIOError`, corruption -> :class:`StoreCorruptError`. After an I/O error on
  ``COMMIT`` the outcome is unknown to the caller; every writer in this package is idempotent
  (keys, ``INSERT OR IGNORE``) so retrying is safe.
* **Corrupt file.** :meth:`StateDB.open` runs ``PRAGMA quick_check`` (configurable). A file
  that is not a database or fails the check raises :class:`StoreCorruptError` and is left
  exactly as it is: the agent refuses to start rather than delete unsent charging records.
  The message carries the recovery command (``python -m agent.store recover --state-dir DIR``,
  see :func:`recover_database`), which moves the damaged files aside as
  ``agent.db.corrupt-<UTC timestamp>`` (kept, never deleted), creates a fresh database and
  copies every row that can still be read into it.
* **Schema.** Migrations are an ordered list; ``PRAGMA user_version`` is the number applied.
  Each step and its ``user_version`` bump commit in one transaction, so a crash or a failing
  step leaves the previous version intact. A file with a *newer* version than this code knows
  raises :class:`StoreVersionError` and is not touched (downgrade protection).
* **One process.** :meth:`StateDB.open` takes an exclusive ``flock`` on
  ``{state_dir}/agent.lock``; a second agent on the same state directory gets
  :class:`StoreLockedError` instead of double-sending the outbox. The kernel releases the lock
  when the process dies, however it dies.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import fcntl
import os
import queue
import shutil
import sqlite3
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Generic, Literal, TypeVar

import structlog
from pydantic import BaseModel, ConfigDict, Field
from agent.utctime import file_stamp

log = structlog.get_logger(__name__)

T = TypeVar("T")

DB_FILENAME: Final = "agent.db"
LOCK_FILENAME: Final = "agent.lock"
#: Suffixes SQLite uses next to the main file in WAL mode; they move together with it.
_SIDE_SUFFIXES: Final = ("-wal", "-shm")
#: Upper bound of jobs committed in one group transaction.
_MAX_GROUP: Final = 512

# SQLite primary result codes (``sqlite_errorcode & 0xFF``).
_SQLITE_IOERR: Final = 10
_SQLITE_CORRUPT: Final = 11
_SQLITE_FULL: Final = 13
_SQLITE_NOTADB: Final = 26


# --------------------------------------------------------------------------- errors


class StoreError(Exception):
    """Base of every error raised by :mod:`agent.store`."""


class StoreClosedError(StoreError):
    """The database was closed (or its writer thread stopped) before the job could run."""


class StoreLockedError(StoreError):
    """Another process holds the state directory's lock (another agent is running)."""


class StoreFullError(StoreError):
    """The disk (or the configured page ceiling) is full; the job's writes were not kept."""


class StoreIOError(StoreError):
    """The storage reported an I/O error; the job's outcome may be unknown (retry is safe)."""


class StoreVersionError(StoreError):
    """The database was written by a newer agent (``user_version`` above what we know)."""


class StoreMigrationError(StoreError):
    """A migration step failed; the database stays at the previous ``user_version``."""


class StoreCorruptError(StoreError):
    """The database file is damaged or not a database. The file is left untouched."""

    def __init__(self, path: Path, detail: str) -> None:
        self.path = path
        self.detail = detail
        state_dir = path.parent
        super().__init__(
            f"state database {path} is corrupt ({detail}). The agent will not start on it, "
            f"because it may hold unsent charging records. Stop the agent, then run "
            f"`python -m agent.store recover --state-dir {state_dir}`: it keeps the damaged "
            f"file as {path.name}.corrupt-<timestamp>, creates a fresh database and copies "
            f"every readable row into it."
        )


def map_sqlite_error(exc: BaseException, path: Path | None = None) -> BaseException:
    """Translate a :class:`sqlite3.Error` into the matching :class:`StoreError`.

    Any other exception (including SQLite errors without a special meaning, such as a
    constraint violation) is returned unchanged. ``path`` names the database in messages.
    """
    if not isinstance(exc, sqlite3.Error):
        return exc
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    mapped: StoreError
    if primary == _SQLITE_FULL:
        mapped = StoreFullError(f"database or disk is full: {exc}")
    elif primary == _SQLITE_IOERR:
        mapped = StoreIOError(f"disk I/O error: {exc}")
    elif primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        mapped = StoreCorruptError(path or Path(DB_FILENAME), str(exc))
    else:
        return exc
    mapped.__cause__ = exc
    return mapped


# --------------------------------------------------------------------------- config


class StoreConfig(BaseModel):
    """Tunables of the state store (the ``[store]`` table of the agent config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_telemetry_rows: int = Field(
        default=50_000, ge=10, description="telemetry rows kept before the oldest half is thinned"
    )
    max_bytes: int = Field(
        default=128 * 1024 * 1024,
        ge=64 * 1024,
        description="database size budget; above it telemetry is thinned down to nothing, "
        "then a storage alarm is raised (records, events and statuses are never dropped). "
        "The WAL beside it adds up to about 4 MiB.",
    )
    command_retention_s: float = Field(
        default=48 * 3600.0,
        ge=48 * 3600.0,
        description="seen command ids are kept at least this long",
    )
    delivered_key_retention_s: float = Field(
        default=7 * 24 * 3600.0,
        ge=3600.0,
        description="how long the idempotency key of a delivered outbox item is remembered",
    )
    integrity_check: Literal["quick", "full", "off"] = Field(
        default="quick", description="check run when the database is opened"
    )
    busy_timeout_ms: int = Field(default=5_000, ge=0, le=600_000)


# --------------------------------------------------------------------------- migrations

MigrationStep = str | Callable[[sqlite3.Connection], None]


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema step. ``step`` is SQL (one or more statements) or a callable run inside the
    migration's transaction. Migration ``n`` (1-based) brings ``user_version`` from n-1 to n."""

    description: str
    step: MigrationStep


_SCHEMA_V1: Final = """
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    kind            TEXT    NOT NULL CHECK (kind IN ('command_status', 'charging_record',
                                                     'event', 'firmware_status', 'telemetry')),
    priority        INTEGER NOT NULL,
    idem_key        TEXT,
    payload         TEXT    NOT NULL CHECK (json_valid(payload)),
    created_at      REAL    NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    last_attempt_at REAL
);
CREATE INDEX outbox_send_order ON outbox (priority, id);

CREATE TABLE outbox_keys (
    kind       TEXT    NOT NULL,
    idem_key   TEXT    NOT NULL,
    item_id    INTEGER NOT NULL,
    state      TEXT    NOT NULL CHECK (state IN ('queued', 'delivered', 'dead')),
    updated_at REAL    NOT NULL,
    PRIMARY KEY (kind, idem_key)
) WITHOUT ROWID;
CREATE INDEX outbox_keys_item ON outbox_keys (item_id);
CREATE INDEX outbox_keys_state ON outbox_keys (state, updated_at);

CREATE TABLE outbox_dead (
    id         INTEGER PRIMARY KEY,
    kind       TEXT    NOT NULL,
    idem_key   TEXT,
    payload    TEXT    NOT NULL,
    created_at REAL    NOT NULL,
    attempts   INTEGER NOT NULL,
    last_error TEXT,
    reason     TEXT    NOT NULL,
    dead_at    REAL    NOT NULL
);

CREATE TABLE command_ledger (
    command_id   TEXT    PRIMARY KEY,
    command      TEXT    NOT NULL,
    connector_id INTEGER,
    params       TEXT    NOT NULL CHECK (json_valid(params)),
    received_at  REAL    NOT NULL,
    status       TEXT    CHECK (status IS NULL
                                OR status IN ('accepted', 'rejected', 'completed', 'failed')),
    message      TEXT,
    details      TEXT    CHECK (details IS NULL OR json_valid(details)),
    status_at    REAL,
    completed    INTEGER NOT NULL DEFAULT 0 CHECK (completed IN (0, 1)),
    last_activity_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX command_ledger_purge ON command_ledger (completed, last_activity_at);

CREATE TABLE command_audit (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    at           REAL    NOT NULL,
    source       TEXT    NOT NULL,
    command_id   TEXT,
    command      TEXT,
    params       TEXT    CHECK (params IS NULL OR json_valid(params)),
    outcome      TEXT    NOT NULL,
    message      TEXT
);
CREATE INDEX command_audit_at ON command_audit (at);
CREATE TRIGGER command_audit_no_update BEFORE UPDATE ON command_audit
BEGIN SELECT RAISE(ABORT, 'command_audit is append-only'); END;
CREATE TRIGGER command_audit_no_delete BEFORE DELETE ON command_audit
BEGIN SELECT RAISE(ABORT, 'command_audit is append-only'); END;

CREATE TABLE kv (
    key        TEXT PRIMARY KEY,
    value      TEXT NOT NULL CHECK (json_valid(value)),
    updated_at REAL NOT NULL,
    expires_at REAL
) WITHOUT ROWID;

CREATE TABLE open_session (
    connector_id INTEGER PRIMARY KEY CHECK (connector_id >= 1),
    record_id    TEXT    NOT NULL UNIQUE,
    opened_at    REAL    NOT NULL,
    start        TEXT    NOT NULL CHECK (json_valid(start)),
    running      TEXT    CHECK (running IS NULL OR json_valid(running)),
    updated_at   REAL    NOT NULL
);
"""

#: The schema history. Append new steps; never edit or reorder a released one.
MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(
        "outbox, delivered keys, dead letters, command ledger and audit, kv, open sessions",
        _SCHEMA_V1,
    ),
)


def _user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _check_version(conn: sqlite3.Connection, path: Path, target: int) -> int:
    """Return the file's schema version; raise :class:`StoreVersionError` if it is newer."""
    current = _user_version(conn)
    if current > target:
        raise StoreVersionError(
            f"state database {path} has schema version {current}, but this agent only knows "
            f"versions up to {target}: it was written by a newer agent. Run that newer version "
            f"(or restore a backup of the state directory); the file was not modified."
        )
    return current


def _migrate(conn: sqlite3.Connection, path: Path, migrations: Sequence[Migration]) -> int:
    """Bring the schema to ``len(migrations)``; each step commits with its version bump."""
    target = len(migrations)
    current = _check_version(conn, path, target)
    for version in range(current + 1, target + 1):
        migration = migrations[version - 1]
        try:
            if isinstance(migration.step, str):
                # executescript() COMMITs an open transaction before it starts, so the BEGIN is
                # part of the script; it stops at the first failing statement, leaving the
                # transaction open for the ROLLBACK below.
                bump = f"PRAGMA user_version = {version:d};"
                conn.executescript(f"BEGIN IMMEDIATE;\n{migration.step}\n;{bump}\nCOMMIT;")
            else:
                conn.execute("BEGIN IMMEDIATE")
                migration.step(conn)
                conn.execute(f"PRAGMA user_version = {version:d}")
                conn.execute("COMMIT")
        except Exception as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            mapped = map_sqlite_error(exc, path)
            if isinstance(mapped, (StoreFullError, StoreIOError)):
                raise mapped from exc
            raise StoreMigrationError(
                f"migration {version} ({migration.description}) of {path} failed: {exc}; "
                f"the database stays at schema version {version - 1}"
            ) from exc
        log.info("store.migrated", path=str(path), version=version, step=migration.description)
    return target


def _open_connection(
    path: Path,
    *,
    migrations: Sequence[Migration],
    integrity_check: Literal["quick", "full", "off"],
    busy_timeout_ms: int,
    max_page_count: int | None,
) -> sqlite3.Connection:
    """Open, configure, check and migrate ``path``; the connection belongs to the calling thread."""
    fresh = not path.exists() or path.stat().st_size == 0
    conn = sqlite3.connect(
        path, isolation_level=None, timeout=busy_timeout_ms / 1000.0, check_same_thread=True
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms):d}")
        # Checks first, settings after: a file we refuse is not modified at all.
        _check_version(conn, path, len(migrations))
        if integrity_check != "off":
            pragma = "quick_check" if integrity_check == "quick" else "integrity_check"
            rows = [str(r[0]) for r in conn.execute(f"PRAGMA {pragma}(20)").fetchall()]
            if rows != ["ok"]:
                raise StoreCorruptError(path, "; ".join(rows[:5]))
        if fresh:
            # Must precede the first table: lets thinning hand freed pages back to the file system.
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
        if mode != "wal":
            log.warning("store.no_wal", path=str(path), journal_mode=mode)
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA journal_size_limit = 4194304")
        if max_page_count is not None:
            conn.execute(f"PRAGMA max_page_count = {int(max_page_count):d}")
        _migrate(conn, path, migrations)
        return conn
    except StoreError:
        conn.close()
        raise
    except sqlite3.Error as exc:
        conn.close()
        mapped = map_sqlite_error(exc, path)
        if isinstance(mapped, StoreCorruptError):
            raise StoreCorruptError(path, str(exc)) from exc
        raise mapped from exc
    except BaseException:
        conn.close()
        raise


# --------------------------------------------------------------------------- the writer


@dataclass(slots=True, eq=False)
class _Job(Generic[T]):
    fn: Callable[[sqlite3.Connection], T]
    future: asyncio.Future[T]
    loop: asyncio.AbstractEventLoop
    durable: bool
    on_commit: Callable[[T], None] | None


_STOP: Final = object()


def _deliver(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # cancelled by the waiter; the job still ran
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


@dataclass(slots=True)
class _BatchOutcome:
    done: list[tuple[_Job[Any], Any]] = field(default_factory=list)
    failed: list[tuple[_Job[Any], BaseException]] = field(default_factory=list)


class StateDB:
    """The open state database and its writer thread. Create with :meth:`open`.

    All access goes through :meth:`run` / :meth:`submit`, which execute a function with the
    writer thread's connection inside a transaction (see the module contract). Reads use the
    same path, so a read always sees every write submitted before it.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        migrations: Sequence[Migration] = MIGRATIONS,
        integrity_check: Literal["quick", "full", "off"] = "quick",
        busy_timeout_ms: int = 5_000,
        max_page_count: int | None = None,
    ) -> None:
        """Prepare (but do not open) the database in ``state_dir``; use :meth:`open` instead.

        ``max_page_count`` is a hard ceiling on the file (SQLite pages); reaching it behaves
        like a full disk. It exists to test the full-disk path and is not meant for production.
        """
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / DB_FILENAME
        self._migrations = tuple(migrations)
        self._integrity_check = integrity_check
        self._busy_timeout_ms = busy_timeout_ms
        self._max_page_count = max_page_count
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None
        self._closed = False
        self._close_requested = False
        self._stopped = threading.Event()
        self._submit_lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        state_dir: str | os.PathLike[str],
        *,
        config: StoreConfig | None = None,
        migrations: Sequence[Migration] = MIGRATIONS,
        max_page_count: int | None = None,
    ) -> StateDB:
        """Open (creating if needed) ``{state_dir}/agent.db`` and start its writer thread.

        Creates ``state_dir`` with mode 0700 if it does not exist, takes the state
        directory's lock, checks integrity and applies pending migrations -- all before
        returning. Raises :class:`StoreLockedError`, :class:`StoreCorruptError` or
        :class:`StoreVersionError` (the file was not modified), or :class:`StoreMigrationError`
        (the file stays at the last fully applied schema version), each with a message meant
        for the operator; the lock is released again in every case.
        """
        cfg = config or StoreConfig()
        db = cls(
            Path(state_dir),
            migrations=migrations,
            integrity_check=cfg.integrity_check,
            busy_timeout_ms=cfg.busy_timeout_ms,
            max_page_count=max_page_count,
        )
        await db._start()
        return db

    async def _start(self) -> None:
        self._lock_fd = acquire_state_lock(self.state_dir)
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._thread_main, args=(ready,), name="store-writer", daemon=True
        )
        self._thread.start()
        try:
            await asyncio.wrap_future(ready)
        except BaseException:
            await asyncio.to_thread(self._thread.join)
            self._release_lock()
            self._closed = True
            raise
        log.info("store.opened", path=str(self.path))

    async def close(self) -> None:
        """Run every job already submitted, then stop the writer and release the lock.

        Idempotent. Jobs submitted after ``close()`` started raise :class:`StoreClosedError`.
        """
        with self._submit_lock:
            first = not self._close_requested
            self._close_requested = True
            self._closed = True
            if first:
                self._queue.put(_STOP)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._release_lock()  # also after the writer stopped by itself
        if first:
            log.info("store.closed", path=str(self.path))

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called or the writer thread stopped."""
        return self._closed or self._stopped.is_set()

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    # -- jobs --------------------------------------------------------------------------

    def submit(
        self,
        fn: Callable[[sqlite3.Connection], T],
        *,
        durable: bool = True,
        on_commit: Callable[[T], None] | None = None,
    ) -> asyncio.Future[T]:
        """Queue ``fn`` for the writer thread and return a future of its result.

        Must be called from the event loop's thread. ``fn`` runs in a transaction and may be
        re-run from scratch if SQLite rolls back the surrounding group (it must only touch
        the database). ``on_commit`` runs on the writer thread right after the commit that
        made ``fn``'s writes durable (it must be quick and must not raise). The future
        resolves after the commit. ``durable=False`` relaxes only power-loss durability (see
        module contract).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        job = _Job(fn=fn, future=future, loop=loop, durable=durable, on_commit=on_commit)
        with self._submit_lock:
            if self.closed:
                raise StoreClosedError(f"state database {self.path} is closed")
            self._queue.put(job)
        return future

    async def run(
        self,
        fn: Callable[[sqlite3.Connection], T],
        *,
        durable: bool = True,
        on_commit: Callable[[T], None] | None = None,
    ) -> T:
        """Run ``fn`` on the writer thread in a transaction; return once it is committed."""
        return await self.submit(fn, durable=durable, on_commit=on_commit)

    # -- writer thread -----------------------------------------------------------------

    def _thread_main(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            conn = _open_connection(
                self.path,
                migrations=self._migrations,
                integrity_check=self._integrity_check,
                busy_timeout_ms=self._busy_timeout_ms,
                max_page_count=self._max_page_count,
            )
        except BaseException as exc:  # noqa: BLE001 - handed to the opener, re-raised there
            self._stopped.set()
            ready.set_exception(exc)
            return
        ready.set_result(None)
        sync_full = True
        try:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    break
                batch: list[_Job[Any]] = [item]
                stop = False
                while len(batch) < _MAX_GROUP:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is _STOP:
                        stop = True
                        break
                    batch.append(nxt)
                want_full = any(job.durable for job in batch)
                if want_full != sync_full:
                    conn.execute(f"PRAGMA synchronous = {'FULL' if want_full else 'NORMAL'}")
                    sync_full = want_full
                self._run_batch(conn, batch)
                if stop:
                    break
        except BaseException as exc:  # noqa: BLE001 - a bug in the machinery: log, fail queued jobs
            log.error("store.writer_crashed", error=repr(exc))
        finally:
            self._stopped.set()
            with self._submit_lock:
                self._closed = True
            self._fail_queued()
            try:
                if not sync_full:
                    conn.execute("PRAGMA synchronous = FULL")
                conn.execute("PRAGMA optimize")
            except sqlite3.Error:
                pass
            conn.close()

    def _fail_queued(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP:
                self._resolve(job, None, StoreClosedError(f"state database {self.path} closed"))

    @staticmethod
    def _resolve(job: _Job[Any], result: Any, error: BaseException | None) -> None:
        try:
            job.loop.call_soon_threadsafe(_deliver, job.future, result, error)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Job[Any]]) -> None:
        pending = batch
        while pending:
            outcome = _BatchOutcome()
            restart = False
            try:
                conn.execute("BEGIN IMMEDIATE")
                for job in pending:
                    conn.execute("SAVEPOINT job")
                    try:
                        result = job.fn(conn)
                    except Exception as exc:  # noqa: BLE001 - becomes the job's result
                        if conn.in_transaction:
                            conn.execute("ROLLBACK TO job")
                            conn.execute("RELEASE job")
                            outcome.failed.append((job, map_sqlite_error(exc, self.path)))
                            continue
                        # SQLite rolled the whole group back (e.g. disk full): this job fails,
                        # every other unfailed job is run again from scratch.
                        outcome.failed.append((job, map_sqlite_error(exc, self.path)))
                        restart = True
                        break
                    conn.execute("RELEASE job")
                    outcome.done.append((job, result))
                if not restart:
                    conn.execute("COMMIT")
            except Exception as exc:  # noqa: BLE001 - fails every job of the group
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                error = map_sqlite_error(exc, self.path)
                log.warning("store.commit_failed", error=str(error), jobs=len(pending))
                failed_jobs = {id(job) for job, _ in outcome.failed}
                for job, err in outcome.failed:
                    self._resolve(job, None, err)
                for job in pending:
                    if id(job) not in failed_jobs:
                        self._resolve(job, None, error)
                return
            for job, err in outcome.failed:
                self._resolve(job, None, err)
            if restart:
                failed_ids = {id(job) for job, _ in outcome.failed}
                pending = [job for job in pending if id(job) not in failed_ids]
                continue
            for job, result in outcome.done:
                if job.on_commit is not None:
                    try:
                        job.on_commit(result)
                    except Exception as exc:  # noqa: BLE001 - the commit stands; report the bug
                        log.error("store.on_commit_failed", error=repr(exc))
                self._resolve(job, result, None)
            return


# --------------------------------------------------------------------------- lock


def acquire_state_lock(state_dir: Path) -> int:
    """Create ``state_dir`` (0700) if needed and take its exclusive lock; return the fd.

    Raises :class:`StoreLockedError` naming the holder's pid when another process has it.
    """
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock_path = state_dir / LOCK_FILENAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise StoreLockedError(
            f"state directory {state_dir} is in use by another agent process (pid {holder}); "
            f"stop it first"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


# --------------------------------------------------------------------------- recovery

#: Tables copied by :func:`recover_database`, in an order that respects their meaning.
SALVAGE_TABLES: Final = (
    "outbox",
    "outbox_keys",
    "outbox_dead",
    "open_session",
    "command_ledger",
    "command_audit",
    "kv",
)


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What :func:`recover_database` did."""

    moved_to: Path | None
    salvaged: dict[str, int]
    errors: dict[str, str]


def _salvage_rows(
    src: sqlite3.Connection, table: str
) -> tuple[list[str], list[tuple[Any, ...]], str | None]:
    """Read as many rows of ``table`` as possible, from both ends around damaged pages."""
    try:
        columns = [str(r[1]) for r in src.execute(f"PRAGMA table_info({table})").fetchall()]
    except sqlite3.Error as exc:
        return [], [], str(exc)
    if not columns:
        return [], [], "table missing"
    rows: dict[Any, tuple[Any, ...]] = {}
    error: str | None = None
    col_list = ", ".join(columns)
    for order in ("ASC", "DESC"):
        try:
            cur = src.execute(f"SELECT rowid, {col_list} FROM {table} ORDER BY rowid {order}")
        except sqlite3.Error:
            try:  # WITHOUT ROWID tables
                cur = src.execute(f"SELECT NULL, {col_list} FROM {table}")
            except sqlite3.Error as exc:
                error = str(exc)
                continue
        try:
            for row in cur:
                key = row[0] if row[0] is not None else row[1:]
                rows.setdefault(key, tuple(row[1:]))
        except sqlite3.Error as exc:
            error = str(exc)
    return columns, list(rows.values()), error


def recover_database(state_dir: str | os.PathLike[str]) -> RecoveryReport:
    """Move a damaged ``agent.db`` aside and rebuild it from every row that can be read.

    Must run while no agent uses the state directory (takes its lock). The damaged files
    (``agent.db`` and its ``-wal``/``-shm``) are *renamed* to ``agent.db.corrupt-<ts>`` and
    kept; a scratch copy is read so the evidence stays byte-for-byte intact. A fresh database
    with the current schema is created and each table's readable rows are copied in (columns
    matched by name, duplicates ignored). Nothing is ever deleted. When there is no database
    file, a fresh one is created and ``moved_to`` is None.
    """
    directory = Path(state_dir)
    lock_fd = acquire_state_lock(directory)
    try:
        path = directory / DB_FILENAME
        moved_to: Path | None = None
        salvaged: dict[str, int] = {}
        errors: dict[str, str] = {}
        if path.exists():
            moved_to = directory / f"{DB_FILENAME}.corrupt-{file_stamp()}"
            os.replace(path, moved_to)
            for suffix in _SIDE_SUFFIXES:
                side = Path(str(path) + suffix)
                if side.exists():
                    os.replace(side, Path(str(moved_to) + suffix))
            fsync_dir(directory)
        fresh = _open_connection(
            path,
            migrations=MIGRATIONS,
            integrity_check="off",
            busy_timeout_ms=5_000,
            max_page_count=None,
        )
        try:
            if moved_to is not None:
                scratch = directory / f".salvage-{os.getpid()}.db"
                try:
                    shutil.copyfile(moved_to, scratch)
                    for suffix in _SIDE_SUFFIXES:
                        side = Path(str(moved_to) + suffix)
                        if side.exists():
                            shutil.copyfile(side, Path(str(scratch) + suffix))
                    src = sqlite3.connect(scratch, isolation_level=None)
                    try:
                        for table in SALVAGE_TABLES:
                            columns, rows, error = _salvage_rows(src, table)
                            if error is not None:
                                errors[table] = error
                            salvaged[table] = _insert_salvaged(fresh, table, columns, rows)
                    finally:
                        src.close()
                finally:
                    for p in (scratch, *(Path(str(scratch) + s) for s in _SIDE_SUFFIXES)):
                        p.unlink(missing_ok=True)
        finally:
            fresh.close()
        log.warning(
            "store.recovered",
            path=str(path),
            moved_to=str(moved_to) if moved_to else None,
            salvaged=salvaged,
            errors=errors,
        )
        return RecoveryReport(moved_to=moved_to, salvaged=salvaged, errors=errors)
    finally:
        os.close(lock_fd)


def _insert_salvaged(
    dst: sqlite3.Connection, table: str, columns: list[str], rows: list[tuple[Any, ...]]
) -> int:
    if not rows:
        return 0
    known = {str(r[1]) for r in dst.execute(f"PRAGMA table_info({table})").fetchall()}
    keep = [i for i, c in enumerate(columns) if c in known]
    names = ", ".join(columns[i] for i in keep)
    marks = ", ".join("?" for _ in keep)
    count = 0
    dst.execute("BEGIN IMMEDIATE")
    try:
        for row in rows:
            try:
                cur = dst.execute(
                    f"INSERT OR IGNORE INTO {table} ({names}) VALUES ({marks})",
                    [row[i] for i in keep],
                )
                count += max(cur.rowcount, 0)
            except sqlite3.IntegrityError:
                continue  # a damaged value that violates a CHECK; the evidence file keeps it
        dst.execute("COMMIT")
    except BaseException:
        if dst.in_transaction:
            dst.execute("ROLLBACK")
        raise
    return count


def fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename or create inside it survives a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_database(state_dir: str | os.PathLike[str]) -> list[str]:
    """Run a full ``integrity_check`` on a state database; return SQLite's findings.

    ``["ok"]`` means healthy. Opens the file read-only and does not need the agent stopped.
    """
    path = Path(state_dir) / DB_FILENAME
    if not path.is_file():
        return [f"no state database at {path}"]
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        return [str(exc)]
    try:
        return [str(r[0]) for r in conn.execute("PRAGMA integrity_check(50)").fetchall()]
    except sqlite3.Error as exc:
        return [str(exc)]
    finally:
        conn.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m agent.store {check,recover} --state-dir DIR``.

    Exit codes: 0 ok, 1 damaged database or failed recovery, 2 bad usage.
    """
    parser = argparse.ArgumentParser(
        prog="python -m agent.store", description="Inspect or repair the agent's state database."
    )
    sub = parser.add_subparsers(dest="verb", required=True)
    recover_help = (
        "move a damaged agent.db aside and rebuild it from its readable rows (stop the agent first)"
    )
    for verb, text in (
        ("check", "run a full integrity check (read-only; safe while the agent runs)"),
        ("recover", recover_help),
    ):
        p = sub.add_parser(verb, help=text, description=text)
        p.add_argument("--state-dir", required=True, help="the agent's state directory")
    args = parser.parse_args(argv)
    if args.verb == "check":
        findings = check_database(args.state_dir)
        print("\n".join(findings))
        return 0 if findings == ["ok"] else 1
    try:
        report = recover_database(args.state_dir)
    except StoreError as exc:
        print(f"recover failed: {exc}", file=sys.stderr)
        return 1
    if report.moved_to is not None:
        print(f"damaged database kept as {report.moved_to}")
    for table, count in report.salvaged.items():
        note = f"  (stopped early: {report.errors[table]})" if table in report.errors else ""
        print(f"{table:16s} {count:8d} rows salvaged{note}")
    return 0
