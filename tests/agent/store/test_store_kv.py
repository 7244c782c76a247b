"""KVStore and SessionStore: JSON values with expiry, open sessions, atomic finalize."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import structlog

from agent.store import (
    Outbox,
    SessionExistsError,
    SessionMismatchError,
    SessionStore,
    StateDB,
    Store,
)


async def test_kv_roundtrip_prefix_and_expiry(store: Store) -> None:
    kv = store.kv
    assert await kv.get("missing", "dflt") == "dflt"
    await kv.set("power_limit", {"kw": 11.0, "reason": "grid"}, expires_at=time.time() + 60)
    await kv.set("schedule/sch_1", {"type": "daily"})
    await kv.set("schedule/sch_2", {"type": "once"})
    await kv.set("schedulex", 1)
    await kv.set("pending_reboot_report", True)
    assert await kv.get("power_limit") == {"kw": 11.0, "reason": "grid"}
    assert await kv.items("schedule/") == {
        "schedule/sch_1": {"type": "daily"},
        "schedule/sch_2": {"type": "once"},
    }
    await kv.set("schedule/sch_1", {"type": "weekly"})  # same id replaces
    assert (await kv.items("schedule/"))["schedule/sch_1"] == {"type": "weekly"}

    later = time.time() + 120
    assert await kv.get("power_limit", now=later) is None  # expired reads as absent
    entry = await kv.get_entry("power_limit")
    assert entry is not None and entry.expired(later)
    assert "power_limit" not in await kv.items(now=later)
    assert await kv.purge_expired(now=later) == 1
    assert await kv.get_entry("power_limit") is None
    assert await kv.delete("schedulex") and not await kv.delete("schedulex")
    with pytest.raises(ValueError):
        await kv.set("bad", math.inf)


async def test_kv_survives_reopen(state_dir: Path) -> None:
    store = await Store.open(state_dir)
    await store.kv.set("counter", {"boots": 3})
    await store.close()
    store = await Store.open(state_dir)
    try:
        assert await store.kv.get("counter") == {"boots": 3}
    finally:
        await store.close()


START = {"start_time": "2025-03-15T09:00:00Z", "meter_start": 12345.6}


def _record(record_id: str, **extra: Any) -> dict[str, Any]:
    return {"record_id": record_id, "connector_id": 1, "energy": 15.2, **extra}


async def test_open_session_rules(store: Store) -> None:
    s = store.sessions
    opened = await s.open_session(1, "rec-a", START)
    assert opened.start == START and opened.running is None
    assert await s.open_session(1, "rec-a", START) == opened  # idempotent
    with pytest.raises(SessionExistsError):
        await s.open_session(1, "rec-b", START)  # connector busy
    with pytest.raises(SessionExistsError):
        await s.open_session(2, "rec-a", START)  # record id in use
    with pytest.raises(ValueError):
        await s.open_session(0, "rec-c", START)
    assert [x.record_id for x in await s.open_sessions()] == ["rec-a"]


async def test_update_session_is_coalesced(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    s = store.sessions
    await s.open_session(1, "rec-a", START)
    await s.open_session(2, "rec-b", START)
    # hold the writer thread until the burst is queued: otherwise it may pick the first
    # update up while the loop is still making the others (a second write, by design)
    release = threading.Event()
    blocker = store.db.submit(lambda conn: release.wait(10.0))
    submits = 0
    real_submit = store.db.submit

    def counting_submit(*args: Any, **kwargs: Any) -> Any:
        nonlocal submits
        submits += 1
        return real_submit(*args, **kwargs)

    monkeypatch.setattr(store.db, "submit", counting_submit)
    futures = [s.update_session(1 + i % 2, {"energy": float(i)}) for i in range(100)]
    release.set()
    await asyncio.gather(blocker, *futures)
    assert submits == 1  # one write for a burst of 100 updates
    monkeypatch.undo()
    one, two = await s.open_sessions()
    assert one.running == {"energy": 98.0} and two.running == {"energy": 99.0}
    # A cancelled waiter does not cancel the shared write.
    fut = s.update_session(1, {"energy": 1000.0})
    fut.cancel()
    await s.update_session(2, {"energy": 1001.0})
    session = await s.get(1)
    assert session is not None and session.running == {"energy": 1000.0}


async def test_update_without_session_is_harmless(store: Store) -> None:
    await store.sessions.update_session(3, {"energy": 1.0})
    assert await store.sessions.open_sessions() == []


async def test_finalize_is_atomic_and_exactly_once(store: Store) -> None:
    s, ob = store.sessions, store.outbox
    await s.open_session(1, "rec-a", START)
    await s.update_session(1, {"energy": 15.2, "max_power": 7.2})
    stop = {
        "timestamp": "2025-03-15T10:30:00Z",
        "event_type": "stop",
        "connector_id": 1,
        "data": {"reason": "power_loss"},
    }
    result = await s.finalize_session(1, _record("rec-a", stop_reason="power_loss"), [stop])
    assert not result.already_finalized
    assert result.session is not None and result.session.running == {
        "energy": 15.2,
        "max_power": 7.2,
    }
    assert await s.get(1) is None
    items = await ob.next_batch(10)
    assert [(i.kind, i.key) for i in items] == [
        ("charging_record", "rec-a"),
        ("event", "rec-a/event/0"),
    ]
    assert items[0].payload["stop_reason"] == "power_loss"
    # A replay (e.g. the agent restarted before it noticed the commit) changes nothing ...
    replay = await s.finalize_session(1, _record("rec-a"), [stop])
    assert replay.already_finalized
    assert (replay.record_item_id, replay.event_item_ids) == (
        result.record_item_id,
        result.event_item_ids,
    )
    # ... also after the record was delivered.
    await ob.ack(result.record_item_id)
    assert (await s.finalize_session(1, _record("rec-a"))).already_finalized
    assert ob.depth()["charging_record"] == 0
    # And the finished session cannot be re-opened by a replayed start.
    with pytest.raises(SessionExistsError, match="already finalized"):
        await s.open_session(1, "rec-a", START)


async def test_finalize_mismatch_changes_nothing(store: Store) -> None:
    s = store.sessions
    await s.open_session(1, "rec-a", START)
    with pytest.raises(SessionMismatchError):
        await s.finalize_session(1, _record("rec-z"))
    assert (await s.get(1)) is not None
    assert store.outbox.total_depth() == 0
    with pytest.raises(ValueError):
        await s.finalize_session(1, {"energy": 1.0})


async def test_finalize_without_open_session_still_queues(store: Store) -> None:
    with structlog.testing.capture_logs() as logs:
        result = await store.sessions.finalize_session(2, _record("rec-orphan"))
    assert not result.already_finalized and result.session is None
    assert store.outbox.depth()["charging_record"] == 1
    assert any(e["event"] == "session.finalized_without_open_session" for e in logs)


async def test_close_session_discards_without_record(store: Store) -> None:
    s = store.sessions
    await s.open_session(1, "rec-a", START)
    s.update_session(1, {"energy": 0.0})
    closed = await s.close_session(1)
    assert closed is not None and closed.record_id == "rec-a"
    assert await s.close_session(1) is None
    assert store.outbox.total_depth() == 0
    # A new session on the same connector is not touched by the old pending update.
    await s.open_session(1, "rec-b", START)
    await asyncio.sleep(0.05)
    fresh = await s.get(1)
    assert fresh is not None and fresh.running is None


async def test_open_sessions_after_restart(state_dir: Path) -> None:
    store = await Store.open(state_dir)
    await store.sessions.open_session(2, "rec-b", START)
    await store.sessions.open_session(1, "rec-a", START)
    await store.sessions.update_session(1, {"energy": 3.3})
    await store.close()
    store = await Store.open(state_dir)
    try:
        sessions = await store.sessions.open_sessions()
        assert [(x.connector_id, x.record_id) for x in sessions] == [(1, "rec-a"), (2, "rec-b")]
        assert sessions[0].running == {"energy": 3.3}
    finally:
        await store.close()


async def test_finalize_on_full_disk_makes_room_from_telemetry(state_dir: Path) -> None:
    db = await StateDB.open(state_dir, max_page_count=100)  # ~400 KB hard ceiling
    outbox = Outbox(db, max_telemetry_rows=100_000, max_bytes=1 << 30)
    await outbox.load()
    sessions = SessionStore(db, outbox)
    try:
        await sessions.open_session(1, "rec-full", START)
        for i in range(400):  # fill the disk with telemetry
            await outbox.put("telemetry", {"i": i, "blob": "t" * 1500})
        record = _record("rec-full", blob="r" * 200_000)  # fits only without telemetry
        result = await sessions.finalize_session(1, record)
        assert not result.already_finalized
        assert outbox.depth() == {**outbox.depth(), "telemetry": 0, "charging_record": 1}
        assert await sessions.open_sessions() == []
    finally:
        await db.close()
