"""The one SQLite engine: open, configure, check and migrate a database file.

Both SQLite files of the agent -- the state database (:mod:`agent.store.db`, ``agent.db``) and
the session archive (:mod:`agent.maintenance.archive`, ``archive.db``) -- are opened by
:func:`open_database`. What differs between them is a parameter, not a second copy:

* **Durability** (``synchronous``): ``"FULL"`` makes every ``COMMIT`` survive a power cut
  (the WAL is fsync'ed before ``COMMIT`` returns); ``"NORMAL"`` survives a process crash
  but a power cut may roll back the last commits. Both run in WAL mode (a warning
  ``<log_name>.no_wal`` is logged when the file system refuses it), with foreign keys on,
  the WAL truncated to 4 MiB after checkpoints and, in a file without tables yet,
  ``auto_vacuum=INCREMENTAL`` (freed pages can be handed back to the file system).
* **Damaged-file policy** (``on_damage``): a file that is not a database, or fails the
  configured ``integrity_check``, raises :class:`StoreCorruptError` and is left exactly as
  it is with ``"refuse"``; with ``"replace"`` it is moved aside as
  ``<name>.corrupt-<UTC timestamp>`` (its ``-wal``/``-shm`` with it, kept, never deleted,
  see :func:`move_aside`) and a fresh database is created in its place.
* **Checks before settings.** The schema version and integrity are checked before any
  setting is written, so a refused file is not modified at all. A file whose
  ``user_version`` is above the number of known migrations raises
  :class:`StoreVersionError` (downgrade protection) whatever the damage policy.
* **Migrations** are an ordered list; ``PRAGMA user_version`` is the number applied. Each
  step and its version bump commit in one transaction, so a crash or a failing step leaves
  the previous version intact (:class:`StoreMigrationError`).
* **Errors.** SQLite errors are mapped by :func:`map_sqlite_error`: disk full ->
  :class:`StoreFullError`, I/O error -> :class:`StoreIOError`, corruption ->
  :class:`StoreCorruptError`; others pass unchanged.

The connection returned belongs to the calling thread (``check_same_thread``) and runs in
autocommit mode (``isolation_level=None``): callers open their own transactions.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import structlog

from agent.utctime import file_stamp

log = structlog.get_logger(__name__)

Durability = Literal["FULL", "NORMAL"]
IntegrityCheck = Literal["quick", "full", "off"]
OnDamage = Literal["refuse", "replace"]

#: Suffixes SQLite uses next to the main file in WAL mode; they move together with it.
SIDE_SUFFIXES: Final = ("-wal", "-shm")

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
        mapped = StoreCorruptError(path or Path("agent.db"), str(exc))
    else:
        return exc
    mapped.__cause__ = exc
    return mapped


# --------------------------------------------------------------------------- migrations

MigrationStep = str | Callable[[sqlite3.Connection], None]


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema step. ``step`` is SQL (one or more statements) or a callable run inside the
    migration's transaction. Migration ``n`` (1-based) brings ``user_version`` from n-1 to n."""

    description: str
    step: MigrationStep


def user_version(conn: sqlite3.Connection) -> int:
    """The schema version recorded in the file (``PRAGMA user_version``)."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _check_version(conn: sqlite3.Connection, path: Path, target: int) -> int:
    """Return the file's schema version; raise :class:`StoreVersionError` if it is newer."""
    current = user_version(conn)
    if current > target:
        raise StoreVersionError(
            f"database {path} has schema version {current}, but this agent only knows "
            f"versions up to {target}: it was written by a newer agent. Run that newer version "
            f"(or restore a backup of the state directory); the file was not modified."
        )
    return current


def _migrate(
    conn: sqlite3.Connection, path: Path, migrations: Sequence[Migration], log_name: str
) -> int:
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
        log.info(f"{log_name}.migrated", path=str(path), version=version, step=migration.description)
    return target


# --------------------------------------------------------------------------- opening


def open_database(
    path: Path,
    *,
    migrations: Sequence[Migration],
    synchronous: Durability,
    integrity_check: IntegrityCheck = "off",
    on_damage: OnDamage = "refuse",
    busy_timeout_ms: int = 5_000,
    max_page_count: int | None = None,
    log_name: str = "store",
) -> sqlite3.Connection:
    """Open, check, configure and migrate ``path`` (see the module contract).

    ``max_page_count`` is a hard ceiling on the file (SQLite pages); reaching it behaves like
    a full disk (meant for tests of the full-disk path).
    """
    try:
        return _open(path, migrations, synchronous, integrity_check, busy_timeout_ms, max_page_count, log_name)
    except StoreCorruptError as exc:
        if on_damage == "refuse":
            raise
        kept = move_aside(path)
        log.warning(f"{log_name}.damaged_file_replaced", path=str(path), kept_as=str(kept), error=exc.detail)
        return _open(path, migrations, synchronous, integrity_check, busy_timeout_ms, max_page_count, log_name)


def _open(
    path: Path,
    migrations: Sequence[Migration],
    synchronous: Durability,
    integrity_check: IntegrityCheck,
    busy_timeout_ms: int,
    max_page_count: int | None,
    log_name: str,
) -> sqlite3.Connection:
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
        if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
            # Must precede the first table: lets thinning hand freed pages back to the file system.
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
        if mode != "wal":
            log.warning(f"{log_name}.no_wal", path=str(path), journal_mode=mode)
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA journal_size_limit = 4194304")
        if max_page_count is not None:
            conn.execute(f"PRAGMA max_page_count = {int(max_page_count):d}")
        _migrate(conn, path, migrations, log_name)
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


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection to ``path`` (``mode=ro``; in WAL mode it never blocks the writer)."""
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)


# --------------------------------------------------------------------------- files


def move_aside(path: Path) -> Path:
    """Rename ``path`` and its ``-wal``/``-shm`` to ``<name>.corrupt-<UTC ts>``; return the new
    path. The directory is fsync'ed so the rename survives a power cut. Nothing is deleted."""
    kept = path.with_name(f"{path.name}.corrupt-{file_stamp()}")
    os.replace(path, kept)
    for suffix in SIDE_SUFFIXES:
        side = Path(str(path) + suffix)
        if side.exists():
            os.replace(side, Path(str(kept) + suffix))
    fsync_dir(path.parent)
    return kept


def fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename or create inside it survives a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
