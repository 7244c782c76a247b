"""Outbox throughput: durable puts per second and drain rate, medians over several runs.

    python bench/outbox_rate.py [--items N] [--runs R] [--dir PATH] [--json]

Every put is committed with ``synchronous=FULL`` (one fsync per commit group) in a fresh state
directory under ``--dir`` (default: the system temp dir; point it at the controller's eMMC/SD
to measure the real device -- a tmpfs makes fsync free and the figures meaningless).

Scenarios:
  put/record, put/telemetry  one producer awaiting each put in turn (the control loop's case)
  put/record x8, x64         8 or 64 concurrent producers (shows group commit)
  drain                      next_batch(50) then ack each item in turn (the uploader's case)
  drain/acks x50             next_batch(50) then the 50 acks concurrently
  session update             coalesced running-session updates, each awaited (NORMAL sync)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import structlog

from agent.store import OutboxKind, Store

RECORD = {
    "record_id": "0f8fad5b-d9cb-469f-a165-70867728950e",
    "connector_id": 1,
    "start_time": "2025-03-15T09:00:00Z",
    "end_time": "2025-03-15T10:30:00Z",
    "energy": 15.2,
    "max_power": 7.2,
    "avg_power": 6.8,
    "cost": 12.16,
    "meter_start": 12345.6,
    "meter_end": 12360.8,
    "stop_reason": "ev_disconnected",
    "vehicle_info": {"soc_start": 20, "soc_end": 90},
}
TELEMETRY = {
    "timestamp": "2025-03-15T10:30:05Z",
    "connector_id": 1,
    "state": "charging",
    "voltage": 230.1,
    "current": 16.0,
    "power": 11.04,
    "energy_delivered": 3.2,
    "temperature": 31.5,
    "phase_details": {
        "phase_a": {"voltage": 230.4, "current": 16.0},
        "phase_b": {"voltage": 229.8, "current": 15.9},
        "phase_c": {"voltage": 230.1, "current": 16.1},
    },
}

Scenario = Callable[[Store, int], Awaitable[float]]


async def put_sequential(store: Store, n: int, kind: OutboxKind, payload: dict[str, Any]) -> float:
    start = time.perf_counter()
    for i in range(n):
        key = f"rec-{i}" if kind == "charging_record" else None
        await store.outbox.put(kind, payload, key=key)
    return n / (time.perf_counter() - start)


async def put_concurrent(store: Store, n: int, producers: int) -> float:
    per = n // producers

    async def producer(p: int) -> None:
        for i in range(per):
            await store.outbox.put("charging_record", RECORD, key=f"rec-{p}-{i}")

    start = time.perf_counter()
    await asyncio.gather(*(producer(p) for p in range(producers)))
    return per * producers / (time.perf_counter() - start)


async def _fill(store: Store, n: int) -> None:
    futures = []
    for i in range(n):
        kind: OutboxKind = "telemetry" if i % 2 else "event"
        futures.append(store.outbox.put(kind, TELEMETRY))
        if len(futures) == 256:
            await asyncio.gather(*futures)
            futures.clear()
    await asyncio.gather(*futures)


async def drain(store: Store, n: int, concurrent_acks: bool) -> float:
    await _fill(store, n)
    start = time.perf_counter()
    drained = 0
    while True:
        batch = await store.outbox.next_batch(50)
        if not batch:
            break
        if concurrent_acks:
            await asyncio.gather(*(store.outbox.ack(item.id) for item in batch))
        else:
            for item in batch:
                await store.outbox.ack(item.id)
        drained += len(batch)
    elapsed = time.perf_counter() - start
    assert drained == n
    return drained / elapsed


async def session_updates(store: Store, n: int) -> float:
    await store.sessions.open_session(1, "rec-bench", {"meter_start": 0.0})
    start = time.perf_counter()
    for i in range(n):
        await store.sessions.update_session(1, {"energy": i / 1000.0, "max_power": 7.2})
    return n / (time.perf_counter() - start)


SCENARIOS: dict[str, Scenario] = {
    "put/record": lambda s, n: put_sequential(s, n, "charging_record", RECORD),
    "put/telemetry": lambda s, n: put_sequential(s, n, "telemetry", TELEMETRY),
    "put/record x8": lambda s, n: put_concurrent(s, n, 8),
    "put/record x64": lambda s, n: put_concurrent(s, n, 64),
    "drain": lambda s, n: drain(s, n, concurrent_acks=False),
    "drain/acks x50": lambda s, n: drain(s, n, concurrent_acks=True),
    "session update": session_updates,
}


async def run_once(name: str, base: Path, items: int) -> float:
    with tempfile.TemporaryDirectory(dir=base, prefix="outbox-bench-") as tmp:
        store = await Store.open(Path(tmp) / "state")
        try:
            return await SCENARIOS[name](store, items)
        finally:
            await store.close()


def filesystem_of(path: Path) -> str:
    """The mount type holding ``path`` (from /proc/mounts), e.g. ext4 or tmpfs."""
    best, fstype = "", "unknown"
    try:
        resolved = str(path.resolve())
        with open("/proc/mounts") as fh:
            for line in fh:
                parts = line.split()
                mount = parts[1]
                if resolved.startswith(mount) and len(mount) > len(best):
                    best, fstype = mount, parts[2]
    except OSError:
        pass
    return fstype


def main() -> int:
    """Run every scenario ``--runs`` times and print medians."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=2000, help="items per run (default 2000)")
    parser.add_argument("--runs", type=int, default=5, help="runs per scenario (default 5)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    results: dict[str, dict[str, float]] = {}
    for name in SCENARIOS:
        rates = [asyncio.run(run_once(name, args.dir, args.items)) for _ in range(args.runs)]
        results[name] = {
            "median_per_s": statistics.median(rates),
            "min_per_s": min(rates),
            "max_per_s": max(rates),
        }
    meta = {
        "items": args.items,
        "runs": args.runs,
        "dir": str(args.dir),
        "filesystem": filesystem_of(args.dir),
        "python": sys.version.split()[0],
        "sqlite": __import__("sqlite3").sqlite_version,
        "cpus": os.cpu_count(),
    }
    if args.json:
        print(json.dumps({"meta": meta, "results": results}, indent=2))
        return 0
    print(
        f"outbox_rate: {args.items} items x {args.runs} runs in {meta['dir']} "
        f"({meta['filesystem']}), SQLite {meta['sqlite']}, synchronous=FULL"
    )
    print(f"{'scenario':<18}{'median/s':>12}{'min/s':>12}{'max/s':>12}")
    for name, r in results.items():
        print(
            f"{name:<18}{r['median_per_s']:>12,.0f}{r['min_per_s']:>12,.0f}{r['max_per_s']:>12,.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
