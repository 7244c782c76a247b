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

import asyncio
import concurrent.futures
import fcntl
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Generic, Literal, TypeVar

import structlog
from pydantic import BaseModel, ConfigDict, Field

from agent.store.engine import (
    Migration,
    StoreClosedError,
    StoreCorruptError,
    StoreError,
    StoreFullError,
    StoreIOError,
    StoreLockedError,
    StoreMigrationError,
    StoreVersionError,
    fsync_dir,
    map_sqlite_error,
    open_database,
)
from agent.store.schema import MIGRATIONS

__all__ = [
    "DB_FILENAME",
    "LOCK_FILENAME",
    "MIGRATIONS",
    "Migration",
    "StateDB",
    "StoreClosedError",
    "StoreConfig",
    "StoreCorruptError",
    "StoreError",
    "StoreFullError",
    "StoreIOError",
    "StoreLockedError",
    "StoreMigrationError",
    "StoreVersionError",
    "acquire_state_lock",
    "fsync_dir",
    "map_sqlite_error",
]

log = structlog.get_logger(__name__)

T = TypeVar("T")

DB_FILENAME: Final = "agent.db"
LOCK_FILENAME: Final = "agent.lock"
#: Upper bound of jobs committed in one group transaction.
_MAX_GROUP: Final = 512

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
            conn = open_database(
                self.path,
                migrations=self._migrations,
                synchronous="FULL",
                integrity_check=self._integrity_check,
                on_damage="refuse",
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
