"""Crash durability: a child process is SIGKILLed at a random moment, then the state is checked.

* Outbox: every item whose id the child printed (it prints only after ``put`` resolved) is
  present with exactly the payload it was given; no row is partial or foreign.
* Sessions: for every session, either the open row or the charging record exists -- never
  neither, never both -- and a record never exists without its stop event.
* Torn WAL (a disk that lost the tail of the log): the database opens, passes its integrity
  check and holds an exact prefix of the committed items, never a partial one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent.store import Store

sys.path.insert(0, str(Path(__file__).parent))
from crash_child import payload_for

pytestmark = pytest.mark.slow

CHILD = Path(__file__).with_name("crash_child.py")
ROOT = Path(__file__).resolve().parents[3]


def run_and_kill(mode: str, state_dir: Path, seed: int, kill_after: int, delay: float) -> list[str]:
    """Start the child, wait for ``kill_after`` acknowledgements plus ``delay`` seconds, SIGKILL
    it, and return every complete line it printed (including those still in the pipe)."""
    errors = (state_dir.parent / f"child-{mode}-{seed}.err").open("wb")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), mode, str(state_dir), str(seed)],
        stdout=subprocess.PIPE,
        stderr=errors,
        env=env,
    )
    watchdog = threading.Timer(30.0, proc.kill)
    watchdog.start()
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        while len(lines) < kill_after:
            raw = proc.stdout.readline()
            if not raw:
                break
            lines.append(raw.decode())
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        tail = proc.stdout.read().decode()
    finally:
        watchdog.cancel()
        proc.stdout.close()
        errors.close()
    if proc.returncode != -signal.SIGKILL:
        log = (state_dir.parent / f"child-{mode}-{seed}.err").read_text(errors="replace")
        pytest.fail(f"the child died before it was killed:\n{log[-3000:]}")
    # Lines still in the pipe were acknowledged too; a line cut by the kill was not.
    complete = [line + "\n" for line in tail.split("\n")[:-1]]
    return [line.rstrip("\n") for line in lines + complete if line.endswith("\n")]


def _rows(state_dir: Path, sql: str) -> list[tuple[Any, ...]]:
    import sqlite3

    conn = sqlite3.connect(state_dir / "agent.db", isolation_level=None)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def test_outbox_puts_survive_sigkill(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    rng = random.Random(1234)
    keyed_ids: dict[int, int] = {}
    for run in range(8):
        delay = rng.choice((0.0, 0.0, rng.random() / 50))
        lines = run_and_kill(
            "outbox", state_dir, seed=run, kill_after=rng.randint(1, 400), delay=delay
        )
        assert lines
        for line in lines:
            seq, item_id = map(int, line.split())
            if payload_for(seq)[2] is not None:
                # Each run restarts at seq 0: a keyed put replayed after a crash is a no-op
                # that returns the id committed the first time.
                assert keyed_ids.setdefault(seq, item_id) == item_id

        store = await Store.open(state_dir)  # includes the integrity check
        try:
            rows = await store.db.run(
                lambda c: c.execute("SELECT id, kind, idem_key, payload FROM outbox").fetchall()
            )
            depth = store.outbox.depth()
        finally:
            await store.close()
        by_id = {int(r[0]): (r[1], r[2], json.loads(r[3])) for r in rows}
        assert sum(depth.values()) == len(rows)
        for seq_line in lines:
            seq, item_id = map(int, seq_line.split())
            kind, payload, key = payload_for(seq)
            assert by_id.get(item_id) == (kind, key, payload), f"acknowledged item {seq} lost"
        for kind, key, payload in by_id.values():  # no partial or foreign rows
            assert (kind, payload, key) == payload_for(payload["seq"])
        keyed = [v for v in by_id.values() if v[1] is not None]
        assert len({v[1] for v in keyed}) == len(keyed)  # one row per key, across crashes


async def test_finalize_session_is_atomic_under_sigkill(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    rng = random.Random(99)
    for run in range(5):
        lines = run_and_kill(
            "sessions", state_dir, seed=run, kill_after=rng.randint(1, 120), delay=rng.random() / 50
        )
        opened = {line.split()[1] for line in lines if line.startswith("open ")}
        final = {line.split()[1] for line in lines if line.startswith("final ")}
        assert opened

        open_rows = {
            r[0]: r[1] for r in _rows(state_dir, "SELECT record_id, connector_id FROM open_session")
        }
        records = {
            r[0]
            for r in _rows(state_dir, "SELECT idem_key FROM outbox WHERE kind = 'charging_record'")
        }
        events = {
            r[0] for r in _rows(state_dir, "SELECT idem_key FROM outbox WHERE kind = 'event'")
        }
        assert not (set(open_rows) & records), "a session is both open and finalized"
        for rid in opened:
            assert rid in open_rows or rid in records, f"session {rid} vanished"
        assert final <= records and not (final & set(open_rows))
        for rid in records:
            assert f"{rid}/event/0" in events, "record committed without its stop event"
        assert len(set(open_rows.values())) == len(open_rows)  # one per connector

        # What the agent does at start-up: close every interrupted session exactly once.
        store = await Store.open(state_dir)
        try:
            for session in await store.sessions.open_sessions():
                record = {"record_id": session.record_id, "stop_reason": "power_loss"}
                stop = {"event_type": "stop", "data": {"reason": "power_loss"}}
                await store.sessions.finalize_session(session.connector_id, record, [stop])
            assert await store.sessions.open_sessions() == []
            batch = await store.outbox.next_batch(100_000, kinds=["charging_record"])
        finally:
            await store.close()
        keys = [item.key for item in batch]
        assert len(keys) == len(set(keys))
        assert opened <= set(keys)


def _wal_backfilled(state_dir: Path) -> int:
    shm = state_dir / "agent.db-shm"
    data = shm.read_bytes()
    return struct.unpack("=I", data[96:100])[0]  # WalCkptInfo.nBackfill


async def test_torn_wal_tail_leaves_a_consistent_prefix(tmp_path: Path) -> None:
    rng = random.Random(7)
    for run in range(3):
        state_dir = tmp_path / f"state{run}"
        lines = run_and_kill("outbox", state_dir, seed=run, kill_after=rng.randint(5, 60), delay=0)
        wal = state_dir / "agent.db-wal"
        # Only a tail that was never checkpointed can be lost by a disk; check the premise.
        assert _wal_backfilled(state_dir) == 0
        size = wal.stat().st_size
        cut = rng.randint(32, size)
        torn = tmp_path / f"torn{run}"
        shutil.copytree(state_dir, torn)
        os.truncate(torn / "agent.db-wal", cut)

        store = await Store.open(torn)  # opens, recovers the WAL, passes quick_check
        try:
            rows = await store.db.run(
                lambda c: c.execute(
                    "SELECT id, kind, idem_key, payload FROM outbox ORDER BY id"
                ).fetchall()
            )
        finally:
            await store.close()
        ids = [int(r[0]) for r in rows]
        assert ids == list(range(1, len(ids) + 1)), "not a prefix of the committed items"
        for _, kind, key, payload in rows:
            assert (kind, json.loads(payload), key) == payload_for(json.loads(payload)["seq"])
        assert len(ids) <= len(lines) + 32  # never more than the child committed
