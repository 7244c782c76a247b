"""Read-only access to ``archive.db`` for tools (``charger-agent sessions``): ``mode=ro``, so it
reads while the agent writes and never blocks it.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Self, TypeVar

from agent.maintenance.archive.model import (
    ARCHIVE_FILENAME,
    ArchiveError,
    ArchiveNotFoundError,
    SampleRow,
    SessionInfo,
)
from agent.maintenance.archive.schema import SCHEMA_VERSION, _q_find, _q_get, _q_list, _q_samples
from agent.store.engine import connect_read_only

T = TypeVar("T")

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
            conn = connect_read_only(path)
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
