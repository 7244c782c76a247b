"""CommandLedger: de-duplication, status reports queued atomically, retention, audit log."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime

import pytest

from agent.store import (
    CommandLedger,
    StatusTransitionError,
    Store,
    UnknownCommandError,
)

H = 3600.0


async def test_record_received_dedups(store: Store) -> None:
    ledger = store.ledger
    assert await ledger.seen("c1") is None
    first = await ledger.record_received("c1", "start_charging", 1, {"duration": 60})
    assert first.is_new
    assert first.entry.params == {"duration": 60} and first.entry.status is None
    again = await ledger.record_received("c1", "start_charging", 1, {"duration": 99})
    assert not again.is_new
    assert again.entry == first.entry
    seen = await ledger.seen("c1")
    assert seen is not None and seen.command == "start_charging" and seen.connector_id == 1


async def test_simultaneous_deliveries_execute_once(store: Store) -> None:
    # The same command from the heartbeat response and the long-poll at the same moment.
    results = await asyncio.gather(
        *(store.ledger.record_received("dup", "stop_charging", 2, {}) for _ in range(10))
    )
    assert sum(r.is_new for r in results) == 1


async def test_update_status_queues_report_atomically(store: Store) -> None:
    ledger, ob = store.ledger, store.outbox
    await ledger.record_received("c2", "start_charging", 1, {})
    at = datetime(2025, 3, 15, 10, 30, tzinfo=UTC).timestamp()
    accepted = await ledger.update_status("c2", "accepted", at=at)
    assert accepted.status == "accepted" and not accepted.completed
    done = await ledger.update_status(
        "c2",
        "completed",
        message="Charging finished",
        details={"energy_delivered": 7.0, "duration": 3600},
        at=at + 3600,
    )
    assert done.completed
    items = await ob.next_batch(10, kinds=["command_status"])
    assert [i.payload for i in items] == [
        {"command_id": "c2", "status": "accepted", "timestamp": "2025-03-15T10:30:00Z"},
        {
            "command_id": "c2",
            "status": "completed",
            "timestamp": "2025-03-15T11:30:00Z",
            "message": "Charging finished",
            "details": {"energy_delivered": 7.0, "duration": 3600},
        },
    ]
    assert [i.key for i in items] == ["c2:accepted", "c2:completed"]


async def test_terminal_status_is_final(store: Store) -> None:
    ledger = store.ledger
    await ledger.record_received("c3", "set_power_limit", None, {"power_limit_percent": 50})
    await ledger.update_status("c3", "rejected", message="expired")
    same = await ledger.update_status("c3", "rejected", message="expired again")
    assert same.message == "expired"  # no-op
    with pytest.raises(StatusTransitionError):
        await ledger.update_status("c3", "completed")
    with pytest.raises(UnknownCommandError):
        await ledger.update_status("nope", "accepted")
    with pytest.raises(ValueError):
        await ledger.update_status("c3", "queued")  # type: ignore[arg-type]
    assert store.outbox.depth()["command_status"] == 1


async def test_resend_last_status_after_delivery(store: Store) -> None:
    ledger, ob = store.ledger, store.outbox
    await ledger.record_received("c4", "stop_charging", 1, {})
    assert await ledger.resend_last_status("c4") is None  # no status yet
    await ledger.update_status("c4", "completed")
    (item,) = await ob.next_batch(5)
    await ob.ack(item.id)
    resent = await ledger.resend_last_status("c4")
    assert resent is not None and resent != item.id
    (again,) = await ob.next_batch(5)
    assert again.payload == item.payload


async def test_retention_is_at_least_48h(store: Store) -> None:
    with pytest.raises(ValueError, match="48 h"):
        CommandLedger(store.db, retention_s=47 * H)


async def test_purge_keeps_48h_and_non_terminal(store: Store) -> None:
    ledger = store.ledger
    t0 = 1_700_000_000.0
    await ledger.record_received("done-old", "stop_charging", 1, {}, received_at=t0)
    await ledger.update_status("done-old", "completed", at=t0 + 60)
    await ledger.record_received("pending-old", "start_charging", 1, {}, received_at=t0)
    await ledger.update_status("pending-old", "accepted", at=t0 + 60)
    await ledger.record_received("never-started", "set_schedule", 1, {}, received_at=t0)
    await ledger.record_received("done-late", "start_charging", 2, {}, received_at=t0)
    await ledger.update_status("done-late", "failed", at=t0 + 40 * H)

    assert await ledger.purge(now=t0 + 47.9 * H) == 0  # nothing terminal is 48 h old yet
    assert await ledger.purge(now=t0 + 48.5 * H) == 1  # done-old only
    assert await ledger.seen("done-old") is None
    assert await ledger.seen("done-late") is not None  # last activity 40 h in
    assert await ledger.purge(now=t0 + 88.5 * H) == 1
    assert await ledger.purge(now=t0 + 10_000 * H) == 0
    left = {e.command_id for e in await ledger.non_terminal()}
    assert left == {"pending-old", "never-started"}  # never purged, whatever their age


async def test_audit_is_append_only(store: Store) -> None:
    ledger = store.ledger
    t0 = 1_700_000_000.0
    ids = [
        await ledger.audit(
            "long_poll", "c1", "start_charging", {"duration": 60}, "accepted", at=t0
        ),
        await ledger.audit(
            "heartbeat",
            "c1",
            "start_charging",
            None,
            "duplicate",
            "re-sent last status",
            at=t0 + 10,
        ),
        await ledger.audit("local", None, "reboot", None, "rejected", "session active", at=t0 + 20),
    ]
    assert ids == sorted(ids)
    all_rows = await ledger.audit_entries()
    assert [r.outcome for r in all_rows] == ["accepted", "duplicate", "rejected"]
    assert all_rows[0].params == {"duration": 60} and all_rows[1].params is None
    window = await ledger.audit_entries(since=t0 + 5, until=t0 + 20)
    assert [r.id for r in window] == [ids[1]]
    since_dt = await ledger.audit_entries(since=datetime.fromtimestamp(t0 + 10, UTC))
    assert [r.id for r in since_dt] == ids[1:]
    assert len(await ledger.audit_entries(limit=2)) == 2

    def tamper_update(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE command_audit SET outcome = 'completed'")

    def tamper_delete(conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM command_audit")

    for tamper in (tamper_update, tamper_delete):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            await store.db.run(tamper)
    assert await ledger.audit_entries() == all_rows
