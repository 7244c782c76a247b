"""StateDB: pragmas, migrations, downgrade refusal, corruption, lock, writer-thread semantics."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from agent.store import (
    MIGRATIONS,
    Migration,
    Outbox,
    StateDB,
    Store,
    StoreClosedError,
    StoreCorruptError,
    StoreLockedError,
    StoreMigrationError,
    StoreVersionError,
    recover_database,
)
from tests.agent.store.helpers import _raw, _sha


async def test_fresh_database_is_wal_full_sync_migrated(state_dir: Path) -> None:
    db = await StateDB.open(state_dir)
    try:

        def probe(conn: sqlite3.Connection) -> tuple[str, int, int, int, int]:
            return (
                conn.execute("PRAGMA journal_mode").fetchone()[0],
                conn.execute("PRAGMA synchronous").fetchone()[0],
                conn.execute("PRAGMA foreign_keys").fetchone()[0],
                conn.execute("PRAGMA user_version").fetchone()[0],
                threading.get_ident(),
            )

        mode, sync, fk, version, ident = await db.run(probe)
    finally:
        await db.close()
    assert mode == "wal"
    assert sync == 2  # FULL
    assert fk == 1
    assert version == len(MIGRATIONS)
    assert ident != threading.get_ident()  # the loop thread never touches the disk
    assert (state_dir / "agent.db").exists()
    assert state_dir.stat().st_mode & 0o777 == 0o700


async def test_empty_file_is_migrated(state_dir: Path) -> None:
    state_dir.mkdir()
    (state_dir / "agent.db").write_bytes(b"")
    db = await StateDB.open(state_dir)
    await db.close()
    with _raw(state_dir / "agent.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"outbox", "outbox_dead", "command_ledger", "command_audit", "kv"} <= tables


async def test_later_migration_upgrades_existing_data(state_dir: Path) -> None:
    store = await Store.open(state_dir)
    await store.kv.set("keep", {"v": 1})
    await store.close()

    def add_column(conn: sqlite3.Connection) -> None:
        conn.execute("ALTER TABLE kv ADD COLUMN note TEXT")
        conn.execute("UPDATE kv SET note = 'migrated'")

    db = await StateDB.open(state_dir, migrations=(*MIGRATIONS, Migration("kv note", add_column)))
    try:
        rows = await db.run(lambda c: c.execute("SELECT key, note FROM kv").fetchall())
        version = await db.run(lambda c: c.execute("PRAGMA user_version").fetchone()[0])
    finally:
        await db.close()
    assert rows == [("keep", "migrated")]
    assert version == len(MIGRATIONS) + 1


async def test_failing_migration_rolls_back_and_keeps_version(state_dir: Path) -> None:
    bad = Migration("half-done", "CREATE TABLE half (a); INSERT INTO no_such_table VALUES (1);")
    with pytest.raises(StoreMigrationError, match="stays at schema version 1"):
        await StateDB.open(state_dir, migrations=(*MIGRATIONS, bad))
    with _raw(state_dir / "agent.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'half'").fetchone() is None
    db = await StateDB.open(state_dir)  # the lock was released, the file is usable
    await db.close()


async def test_newer_user_version_is_refused_and_untouched(state_dir: Path) -> None:
    db = await StateDB.open(state_dir)
    await db.close()
    path = state_dir / "agent.db"
    with _raw(path) as conn:
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 5}")
    before = _sha(path)
    with pytest.raises(StoreVersionError, match="newer agent"):
        await StateDB.open(state_dir)
    assert _sha(path) == before


async def test_not_a_database_is_refused_with_recovery_hint(state_dir: Path) -> None:
    state_dir.mkdir()
    path = state_dir / "agent.db"
    path.write_bytes(b"this is certainly not an sqlite database file" * 200)
    before = _sha(path)
    with pytest.raises(StoreCorruptError) as info:
        await StateDB.open(state_dir)
    assert "python -m agent.store recover --state-dir" in str(info.value)
    assert _sha(path) == before  # never deleted or rewritten


async def test_second_process_is_locked_out(state_dir: Path) -> None:
    db = await StateDB.open(state_dir)
    try:
        with pytest.raises(StoreLockedError, match="in use by another agent"):
            await StateDB.open(state_dir)
    finally:
        await db.close()
    again = await StateDB.open(state_dir)
    await again.close()


async def test_failing_job_rolls_back_alone_in_a_group(state_dir: Path) -> None:
    db = await StateDB.open(state_dir)
    try:

        def insert(key: str) -> object:
            def job(conn: sqlite3.Connection) -> None:
                conn.execute("INSERT INTO kv (key, value, updated_at) VALUES (?, '1', 0)", (key,))

            return job

        def insert_then_fail(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO kv (key, value, updated_at) VALUES ('bad', '1', 0)")
            raise RuntimeError("boom")

        futures = [
            db.submit(insert("a")),  # type: ignore[arg-type]
            db.submit(insert_then_fail),
            db.submit(insert("c")),  # type: ignore[arg-type]
        ]
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert results[0] is None and results[2] is None
        assert isinstance(results[1], RuntimeError)
        keys = await db.run(lambda c: [r[0] for r in c.execute("SELECT key FROM kv ORDER BY key")])
        assert keys == ["a", "c"]
    finally:
        await db.close()


async def test_jobs_after_close_are_refused(state_dir: Path) -> None:
    db = await StateDB.open(state_dir)
    await db.close()
    await db.close()  # idempotent
    with pytest.raises(StoreClosedError):
        await db.run(lambda c: None)


async def test_cancelled_waiter_does_not_withdraw_the_write(state_dir: Path) -> None:
    store = await Store.open(state_dir)
    try:
        task = asyncio.create_task(store.outbox.put("event", {"event_type": "plug_in"}))
        await asyncio.sleep(0)  # the job is queued
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        items = await store.outbox.next_batch(10)
        assert [i.payload for i in items] == [{"event_type": "plug_in"}]
    finally:
        await store.close()


async def test_outbox_needs_sane_row_cap(state_dir: Path) -> None:
    db = await StateDB.open(state_dir)
    try:
        with pytest.raises(ValueError):
            Outbox(db, max_telemetry_rows=3)
    finally:
        await db.close()


async def test_store_open_reports_corruption_with_path(state_dir: Path) -> None:
    state_dir.mkdir()
    (state_dir / "agent.db").write_bytes(b"\x00garbage" * 1000)
    with pytest.raises(StoreCorruptError) as info:
        await Store.open(state_dir)
    assert info.value.path == state_dir / "agent.db"
    # The refused open released the lock: recovery can run right away.
    report = recover_database(state_dir)
    assert report.moved_to is not None and report.salvaged.get("outbox", 0) == 0
    store = await Store.open(state_dir)
    await store.close()
