"""Durable agent state in one state directory.

``{state_dir}/agent.db`` (SQLite, WAL, ``synchronous=FULL``, migrations on ``user_version``)
holds the outbox, the command ledger and audit log, key/value state and open sessions; it is
written by one thread so the event loop never waits on the disk. ``{state_dir}/credentials.json``
(mode 0600) holds the device credentials. Each module's docstring states its crash, full-disk
and corrupt-file behaviour.

Typical start-up::

    store = await Store.open(state_dir, config.store)
    for session in await store.sessions.open_sessions():
        ...  # build the record (stop_reason "power_loss") and finalize_session() it
    ...
    await store.close()
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from agent.store.commands import (
    AuditEntry,
    CommandLedger,
    CommandStatus,
    LedgerEntry,
    Received,
    StatusTransitionError,
    UnknownCommandError,
)
from agent.store.credentials import Credentials, CredentialsError, CredentialStore
from agent.store.db import (
    MIGRATIONS,
    Migration,
    StateDB,
    StoreClosedError,
    StoreConfig,
    StoreCorruptError,
    StoreError,
    StoreFullError,
    StoreIOError,
    StoreLockedError,
    StoreMigrationError,
    StoreVersionError,
)
from agent.store.kv import (
    FinalizeResult,
    KVEntry,
    KVStore,
    OpenSession,
    SessionExistsError,
    SessionMismatchError,
    SessionStore,
)
from agent.store.outbox import (
    KINDS,
    PRIORITY,
    DeadLetter,
    Outbox,
    OutboxItem,
    OutboxKind,
    OutboxStats,
)
from agent.store.recovery import RecoveryReport, check_database, recover_database


@dataclass(frozen=True, slots=True)
class Store:
    """Every durable component over one state directory, opened together."""

    db: StateDB
    outbox: Outbox
    ledger: CommandLedger
    kv: KVStore
    sessions: SessionStore
    credentials: CredentialStore

    @classmethod
    async def open(
        cls, state_dir: str | os.PathLike[str], config: StoreConfig | None = None
    ) -> Store:
        """Open the database (see :meth:`StateDB.open` for its errors) and wire the parts."""
        cfg = config or StoreConfig()
        db = await StateDB.open(state_dir, config=cfg)
        try:
            outbox = await Outbox.open(db, cfg)
        except BaseException:
            await db.close()
            raise
        return cls(
            db=db,
            outbox=outbox,
            ledger=CommandLedger(db, outbox, retention_s=cfg.command_retention_s),
            kv=KVStore(db),
            sessions=SessionStore(db, outbox),
            credentials=CredentialStore(Path(state_dir)),
        )

    async def close(self) -> None:
        """Commit everything already submitted and close the database."""
        await self.db.close()


__all__ = [
    "KINDS",
    "MIGRATIONS",
    "PRIORITY",
    "AuditEntry",
    "CommandLedger",
    "CommandStatus",
    "CredentialStore",
    "Credentials",
    "CredentialsError",
    "DeadLetter",
    "FinalizeResult",
    "KVEntry",
    "KVStore",
    "LedgerEntry",
    "Migration",
    "OpenSession",
    "Outbox",
    "OutboxItem",
    "OutboxKind",
    "OutboxStats",
    "Received",
    "RecoveryReport",
    "SessionExistsError",
    "SessionMismatchError",
    "SessionStore",
    "StateDB",
    "StatusTransitionError",
    "Store",
    "StoreClosedError",
    "StoreConfig",
    "StoreCorruptError",
    "StoreError",
    "StoreFullError",
    "StoreIOError",
    "StoreLockedError",
    "StoreMigrationError",
    "StoreVersionError",
    "UnknownCommandError",
    "check_database",
    "recover_database",
]
