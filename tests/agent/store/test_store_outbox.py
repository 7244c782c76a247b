"""Outbox: send order, idempotency keys, ack/nack/dead-letter, thinning, disk budget, waking."""

from __future__ import annotations

import asyncio
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.store import (
    KINDS,
    PRIORITY,
    Outbox,
    StateDB,
    Store,
    StoreConfig,
    StoreFullError,
)
from agent.store.outbox import OutboxKind

kinds_st = st.sampled_from(KINDS)


async def _open_outbox(state_dir: Path, **limits: int) -> tuple[StateDB, Outbox]:
    db = await StateDB.open(state_dir)
    outbox = Outbox(db, **limits)
    await outbox.load()
    return db, outbox


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(kinds_st, min_size=1, max_size=40), st.integers(min_value=1, max_value=50))
def test_send_order_is_priority_then_age(kinds: list[str], limit: int) -> None:
    async def scenario(state_dir: Path) -> None:
        db, outbox = await _open_outbox(state_dir)
        try:
            ids = []
            for seq, kind in enumerate(kinds):
                ids.append(await outbox.put(kind, {"seq": seq}))  # type: ignore[arg-type]
            expected = sorted(range(len(kinds)), key=lambda s: (PRIORITY[kinds[s]], s))
            batch = await outbox.next_batch(limit)
            assert [item.payload["seq"] for item in batch] == expected[:limit]
            assert [item.id for item in batch] == [ids[s] for s in expected[:limit]]
            assert sum(outbox.depth().values()) == len(kinds)
        finally:
            await db.close()

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(Path(tmp)))


async def test_kinds_filter_and_depth(store: Store) -> None:
    ob = store.outbox
    t = await ob.put("telemetry", {"n": 1})
    e = await ob.put("event", {"n": 2})
    r = await ob.put("charging_record", {"n": 3})
    assert [i.id for i in await ob.next_batch(10, kinds=["telemetry", "event"])] == [e, t]
    assert [i.id for i in await ob.next_batch(10, kinds=["telemetry"])] == [t]
    assert [i.id for i in await ob.next_batch(1)] == [r]
    assert await ob.next_batch(10, kinds=[]) == []
    assert ob.depth() == {
        k: (1 if k in ("telemetry", "event", "charging_record") else 0) for k in KINDS
    }
    assert ob.total_depth(["event", "telemetry"]) == 2


async def test_put_rejects_bad_input(store: Store) -> None:
    with pytest.raises(ValueError, match="unknown outbox kind"):
        await store.outbox.put("heartbeat", {})  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await store.outbox.put("event", {"x": math.nan})
    with pytest.raises(TypeError):
        await store.outbox.put("event", ["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await store.outbox.put("event", {"x": object()})
    assert store.outbox.total_depth() == 0


async def test_payload_is_copied_when_put_runs(store: Store) -> None:
    payload = {"energy": 1.0}
    pending = store.outbox.put("charging_record", payload)
    task = asyncio.ensure_future(pending)
    await asyncio.sleep(0)  # put() has started and suspended on the commit
    payload["energy"] = 999.0
    item_id = await task
    (item,) = await store.outbox.next_batch(1)
    assert item.id == item_id and item.payload == {"energy": 1.0}


async def test_idempotency_key(store: Store) -> None:
    ob = store.outbox
    first = await ob.put("charging_record", {"record_id": "r1", "energy": 1}, key="r1")
    again = await ob.put("charging_record", {"record_id": "r1", "energy": 2}, key="r1")
    assert again == first
    assert ob.depth()["charging_record"] == 1
    (item,) = await ob.next_batch(5)
    assert item.payload["energy"] == 1 and item.key == "r1"
    # Same key, other kind: a different item.
    other = await ob.put("event", {"e": 1}, key="r1")
    assert other != first
    # After delivery the key is still remembered: a replay stores nothing.
    assert await ob.ack(first)
    assert await ob.put("charging_record", {"record_id": "r1"}, key="r1") == first
    assert ob.depth()["charging_record"] == 0


async def test_concurrent_puts_with_same_key_store_one(store: Store) -> None:
    ids = await asyncio.gather(
        *(store.outbox.put("charging_record", {"i": i}, key="same") for i in range(20))
    )
    assert len(set(ids)) == 1
    assert store.outbox.depth()["charging_record"] == 1


async def test_ack_nack(store: Store) -> None:
    ob = store.outbox
    a = await ob.put("event", {"n": "a"})
    b = await ob.put("event", {"n": "b"})
    assert await ob.nack(a, "HTTP 503")
    assert await ob.nack(a, "timeout " + "x" * 5000)
    head, second = await ob.next_batch(2)
    assert head.id == a and head.attempts == 2  # keeps its place after a failure
    assert head.last_error is not None and head.last_error.startswith("timeout")
    assert len(head.last_error) == 1000
    assert second.id == b and second.attempts == 0
    assert await ob.ack(a)
    assert not await ob.ack(a)  # twice is harmless
    assert not await ob.nack(a, "gone")
    assert [i.id for i in await ob.next_batch(5)] == [b]
    assert ob.depth()["event"] == 1


async def test_dead_letter_keeps_billing_data(store: Store) -> None:
    ob = store.outbox
    rec = await ob.put("charging_record", {"record_id": "r9", "energy": 3.2}, key="r9")
    await ob.nack(rec, "1001 invalid energy")
    assert await ob.dead_letter(rec, "1001: details.field=energy")
    assert not await ob.dead_letter(rec, "again")
    assert await ob.next_batch(5) == []
    assert ob.depth()["charging_record"] == 0
    (dead,) = await ob.dead_letters()
    assert dead.id == rec and dead.kind == "charging_record"
    assert dead.payload == {"record_id": "r9", "energy": 3.2}
    assert dead.reason == "1001: details.field=energy" and dead.attempts == 1
    assert ob.stats().dead_letters == 1
    # A replay of the same record does not resurrect it behind the operator's back.
    assert await ob.put("charging_record", {"record_id": "r9"}, key="r9") == rec
    assert ob.depth()["charging_record"] == 0
    # The operator can requeue it.
    new_id = await ob.requeue_dead_letter(rec)
    assert new_id != rec
    (item,) = await ob.next_batch(5)
    assert item.id == new_id and item.payload["energy"] == 3.2 and item.key == "r9"
    assert await ob.dead_letters() == []
    with pytest.raises(KeyError):
        await ob.requeue_dead_letter(rec)


async def test_row_cap_thins_every_other_of_oldest_half(state_dir: Path) -> None:
    db, ob = await _open_outbox(state_dir, max_telemetry_rows=10)
    try:
        tele = [await ob.put("telemetry", {"t": i}) for i in range(10)]
        assert ob.depth()["telemetry"] == 10
        tele.append(await ob.put("telemetry", {"t": 10}))  # 11 > 10: thin
        left = [i.payload["t"] for i in await ob.next_batch(100, kinds=["telemetry"])]
        # Oldest half t0..t4: drop t1 and t3, keep the first and last of that half.
        assert left == [0, 2, 4, 5, 6, 7, 8, 9, 10]
        assert ob.depth()["telemetry"] == 9
        assert ob.stats().telemetry_thinned == 2
    finally:
        await db.close()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from(["telemetry"] * 4 + list(KINDS)), min_size=20, max_size=150),
    st.integers(min_value=10, max_value=20),
)
def test_thinning_never_touches_other_kinds(kinds: list[str], cap: int) -> None:

    async def scenario(state_dir: Path) -> None:
        db, ob = await _open_outbox(state_dir, max_telemetry_rows=cap)
        try:
            for seq, kind in enumerate(kinds):
                await ob.put(kind, {"seq": seq})  # type: ignore[arg-type]
            items = await ob.next_batch(1000)
            kept = {i.payload["seq"] for i in items}
            others = {s for s, k in enumerate(kinds) if k != "telemetry"}
            tele = [s for s, k in enumerate(kinds) if k == "telemetry"]
            assert others <= kept
            kept_tele = sorted(kept - others)
            assert len(kept_tele) <= cap
            if tele:
                assert kept_tele[0] == tele[0]  # the oldest sample survives (first of the half)
                assert kept_tele[-1] == tele[-1]  # the newest sample is never thinned
            assert ob.depth()["telemetry"] == len(kept_tele)
            assert sum(ob.depth().values()) == len(items)
            assert ob.stats().telemetry_thinned == len(tele) - len(kept_tele)
        finally:
            await db.close()

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(Path(tmp)))


async def test_byte_budget_drops_telemetry_then_raises_alarm(state_dir: Path) -> None:
    budget = 256 * 1024
    db, ob = await _open_outbox(state_dir, max_telemetry_rows=100_000, max_bytes=budget)
    try:
        blob = "t" * 1000
        for i in range(600):  # ~600 KB of telemetry against a 256 KB budget
            await ob.put("telemetry", {"i": i, "blob": blob})
        stats = ob.stats()
        assert stats.used_bytes <= budget
        assert 0 < stats.depth["telemetry"] < 600 and stats.telemetry_thinned > 0
        assert not ob.storage_alarm

        records = [
            await ob.put("charging_record", {"r": i, "blob": "r" * 1000}) for i in range(400)
        ]
        assert ob.depth()["telemetry"] == 0  # thinned down to nothing
        assert ob.storage_alarm  # records alone exceed the budget
        assert ob.depth()["charging_record"] == 400  # ... and none was dropped
        got = await ob.next_batch(1000, kinds=["charging_record"])
        assert [i.id for i in got] == records

        for rid in records:
            await ob.ack(rid)
        assert not ob.storage_alarm  # cleared once the backlog drained
    finally:
        await db.close()


async def test_full_disk_drops_telemetry_and_retries_then_raises(state_dir: Path) -> None:
    db = await StateDB.open(state_dir, max_page_count=100)  # ~400 KB hard ceiling
    ob = Outbox(db, max_telemetry_rows=100_000, max_bytes=1 << 30)
    await ob.load()
    try:
        blob = "t" * 1500
        for i in range(400):  # ~600 KB of samples: each full disk drops the oldest half
            await ob.put("telemetry", {"i": i, "blob": blob})
        left = [item.payload["i"] for item in await ob.next_batch(1000)]
        assert 0 < len(left) < 400 and left[-1] == 399  # the newest sample got in
        assert ob.stats().telemetry_thinned == 400 - len(left)
        assert not ob.storage_alarm
        # At least half the space holds telemetry, so this record only fits once all
        # telemetry made way for it.
        big = "r" * 200_000
        rec = await ob.put("charging_record", {"record_id": "r1", "blob": big}, key="r1")
        assert ob.depth()["telemetry"] == 0
        assert ob.depth()["charging_record"] == 1
        # Fill with records until nothing fits any more: the error reaches the caller.
        stored = [rec]
        with pytest.raises(StoreFullError):
            for i in range(10_000):
                stored.append(await ob.put("event", {"i": i, "blob": "e" * 1500}))
        assert ob.storage_alarm
        items = await ob.next_batch(10_000)
        assert sorted(i.id for i in items) == sorted(stored)  # nothing committed was lost
    finally:
        await db.close()


async def test_wait_for_items(store: Store) -> None:
    ob = store.outbox
    assert not await ob.wait_for_items(timeout=0.05)
    waiter = asyncio.create_task(ob.wait_for_items(kinds=["command_status"]))
    await asyncio.sleep(0.01)
    await ob.put("telemetry", {"x": 1})  # another kind: keeps sleeping
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await ob.put("command_status", {"command_id": "c1", "status": "accepted"})
    assert await asyncio.wait_for(waiter, 2.0) is True
    assert await ob.wait_for_items(timeout=0)  # returns at once when something is queued


async def test_survives_reopen(state_dir: Path) -> None:
    cfg = StoreConfig()
    store = await Store.open(state_dir, cfg)
    ids: dict[OutboxKind, int] = {}
    for kind in KINDS:
        ids[kind] = await store.outbox.put(kind, {"kind": kind}, key=f"k-{kind}")
    await store.outbox.nack(ids["event"], "offline")
    await store.close()

    store = await Store.open(state_dir, cfg)
    try:
        assert store.outbox.depth() == dict.fromkeys(KINDS, 1)
        items = await store.outbox.next_batch(10)
        assert [i.kind for i in items] == sorted(KINDS, key=PRIORITY.__getitem__)
        assert {i.kind: i.id for i in items} == ids
        assert next(i for i in items if i.kind == "event").attempts == 1
        assert await store.outbox.wait_for_items(timeout=0)
        # Keys survive the restart as well.
        assert await store.outbox.put("event", {}, key="k-event") == ids["event"]
    finally:
        await store.close()


async def test_maintain_forgets_old_delivered_keys(store: Store) -> None:
    ob = store.outbox
    first = await ob.put("charging_record", {"r": 1}, key="r1")
    await ob.ack(first)
    assert await ob.maintain() == 0  # still within the retention window
    assert await ob.put("charging_record", {"r": 1}, key="r1") == first
    import time

    assert await ob.maintain(now=time.time() + 8 * 24 * 3600) == 1
    assert await ob.put("charging_record", {"r": 1}, key="r1") != first
