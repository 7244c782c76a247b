"""Child process for the crash-durability tests (run as a script, killed with SIGKILL).

    python crash_child.py outbox   STATE_DIR SEED
    python crash_child.py sessions STATE_DIR SEED

``outbox``: puts items forever, alone and in concurrent groups, and prints ``<seq> <id>`` on
stdout only AFTER the put resolved (i.e. after the commit). Payloads are a pure function of
``seq`` (see :func:`payload_for`) so the parent can verify every row byte for byte.

``sessions``: one task per connector opens a session, streams running updates and finalizes
it with a charging record and a stop event, forever (record ids ``s<SEED>-c<connector>-<n>``
are unique per run); prints ``open <record_id>`` after
``open_session`` resolved and ``final <record_id>`` after ``finalize_session`` resolved.

Logs go to stderr so stdout carries only acknowledgements.
"""

from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path
from typing import Any

import structlog

KINDS = ("telemetry", "event", "charging_record", "command_status", "firmware_status")


def payload_for(seq: int) -> tuple[str, dict[str, Any], str | None]:
    """The kind, payload and key the child uses for item number ``seq``."""
    kind = KINDS[seq % len(KINDS)]
    key = f"key-{seq}" if kind == "charging_record" else None
    return kind, {"seq": seq, "blob": "x" * (seq % 997), "nested": {"n": [seq, -seq]}}, key


async def run_outbox(state_dir: Path, rng: random.Random, seed: int) -> None:
    from agent.store import Store

    store = await Store.open(state_dir)
    seq = 0

    async def one(n: int) -> None:
        kind, payload, key = payload_for(n)
        item_id = await store.outbox.put(kind, payload, key=key)  # type: ignore[arg-type]
        print(f"{n} {item_id}", flush=True)

    while True:
        group = rng.choice((1, 1, 2, 8, 32))
        await asyncio.gather(*(one(seq + i) for i in range(group)))
        seq += group


async def run_sessions(state_dir: Path, rng: random.Random, seed: int) -> None:
    from agent.store import Store

    store = await Store.open(state_dir)

    async def connector(cid: int) -> None:
        n = 0
        while True:
            rid = f"s{seed}-c{cid}-{n}"
            await store.sessions.open_session(cid, rid, {"meter_start": float(n)})
            print(f"open {rid}", flush=True)
            for step in range(rng.randint(0, 4)):
                store.sessions.update_session(cid, {"energy": float(step)})
                await asyncio.sleep(0)
            record = {"record_id": rid, "connector_id": cid, "energy": 1.0}
            stop = {"event_type": "stop", "connector_id": cid, "data": {"reason": "user"}}
            await store.sessions.finalize_session(cid, record, [stop])
            print(f"final {rid}", flush=True)
            n += 1

    await asyncio.gather(*(connector(c) for c in (1, 2, 3)))


def main() -> None:
    """Entry point: see the module docstring."""
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    mode, state_dir, seed = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    runner = run_outbox if mode == "outbox" else run_sessions
    asyncio.run(runner(state_dir, rng, seed))


if __name__ == "__main__":
    main()
