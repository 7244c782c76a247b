"""Issue requirement: a platform outage of several minutes loses nothing, the backlog drains
within the rate limits, and there are never more than 5 reconnects in 10 minutes.

Time is simulated: the whole test (uplink, store, emulator and its rate limiter/outage
timer) runs on a :class:`~tests.agent.channels.tellus.vtime.VirtualTimeLoop`, whose clock jumps to the
next timer whenever nothing is in flight. About 17 minutes of platform time take a few
seconds; the traffic is still real HTTP between the real uplink and the real emulator on
127.0.0.1, with the emulator's documented rate limits enforced on the same clock.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from agent.emulator import OutageMode, RequestKind
from tests.agent.channels.tellus.harness import (
    Delivered,
    Harness,
    command_status,
    event,
    harness,
    record,
    telemetry,
    telemetry_seq,
)
from agent.channels.tellus.uplink import ENDPOINT_BY_KIND, PROBE_AFTER_S
from tests.agent.channels.tellus.vtime import virtual_time

OUTAGE_START = 60.0
OUTAGE_503_S = 240.0  # first 4 minutes: the platform answers 503
OUTAGE_DROP_S = 300.0  # next 5 minutes: connections are dropped
OUTAGE_END = OUTAGE_START + OUTAGE_503_S + OUTAGE_DROP_S  # 9 minutes in all
PRODUCE_UNTIL = OUTAGE_END + 120.0
TICK = 5.0

OTHER_KINDS = {RequestKind.EVENTS, RequestKind.CHARGING_RECORDS, RequestKind.COMMAND_STATUS}
HIGH_KINDS = {RequestKind.HEARTBEAT, RequestKind.TELEMETRY}


def max_in_window(times: list[float], window: float) -> int:
    """The most timestamps inside any half-open window ``[t, t + window)``."""
    times = sorted(times)
    best, j = 0, 0
    for i, start in enumerate(times):
        while j < len(times) and times[j] < start + window:
            j += 1
        best = max(best, j - i)
    return best


class Charger:
    """What the rest of the agent would put into the outbox: two busy connectors."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.telemetry: set[tuple[int, int]] = set()
        self.events: set[str] = set()
        self.records: set[str] = set()
        self.statuses: set[tuple[str, str]] = set()
        self.commands: list[str] = []
        self.to_complete: list[str] = []

    async def on_deliver(self, item: Delivered) -> None:  # the dispatcher's part
        command_id = item.command["command_id"]
        self.commands.append(command_id)
        await self.put_status(command_id, "accepted")
        self.to_complete.append(command_id)

    async def put_status(self, command_id: str, status: str) -> None:
        self.statuses.add((command_id, status))
        await self.h.store.outbox.put("command_status", command_status(command_id, status))

    async def run(self, start: float, until: float) -> None:
        loop = asyncio.get_running_loop()
        outbox = self.h.store.outbox
        n = 0
        while loop.time() < until:
            for cid in (1, 2):  # telemetry every 5 s per charging connector
                await outbox.put("telemetry", telemetry(n, cid))
                self.telemetry.add((cid, n))
            marker = f"{n}"
            await outbox.put("event", event(n, 1 + n % 2))  # an event every 5 s
            self.events.add(f"remote_start-{marker}")
            if n % 12 == 0:  # a CDR every minute
                self.records.add(f"rec-{n}")
                await outbox.put("charging_record", record(f"rec-{n}", 1 + n % 2), key=f"rec-{n}")
            if n % 6 == 0 and self.to_complete:  # a command finishes every 30 s
                await self.put_status(self.to_complete.pop(0), "completed")
            n += 1
            await asyncio.sleep(start + n * TICK - loop.time())


@virtual_time(real_timeout=45.0)
async def test_outage_of_nine_minutes_loses_nothing_and_drains_within_the_limits(
    tmp_path: Path,
) -> None:
    loop = asyncio.get_running_loop()
    async with harness(
        tmp_path / "state", connector_ids=[1, 2], rate_limits_enabled=True, long_poll_wait_s=30
    ) as h:
        charger = Charger(h)
        h.on_deliver = charger.on_deliver
        t0 = loop.time()
        uplink = await h.started()
        for _ in range(12):  # work for the dispatcher: 12 device-level commands
            h.emu.queue_command(command="reboot")
        producer = asyncio.create_task(charger.run(t0, t0 + PRODUCE_UNTIL))

        await asyncio.sleep(t0 + OUTAGE_START - loop.time())
        assert uplink.online and len(charger.commands) == 12
        h.emu.start_outage(OUTAGE_503_S, OutageMode.HTTP_503)
        await asyncio.sleep(OUTAGE_503_S)
        h.emu.start_outage(OUTAGE_DROP_S, OutageMode.DROP)
        await asyncio.sleep(OUTAGE_DROP_S)
        backlog = h.store.outbox.depth()
        await producer
        await h.drained(timeout=900)
        drained_at = loop.time()
        await asyncio.sleep(60)
        await uplink.stop(final_heartbeat=True)

        # ---- nothing lost, nothing twice
        assert await h.store.outbox.dead_letters() == []
        accepted = [r for _, r in h.log if r.accepted]
        got_telemetry = [
            (r.body["connector_id"], telemetry_seq(r.body))
            for r in accepted
            if r.kind == RequestKind.TELEMETRY
        ]
        assert (
            len(got_telemetry) == len(set(got_telemetry))
            and set(got_telemetry) == charger.telemetry
        )
        got_events = [r.body["data"]["reason"] for r in accepted if r.kind == RequestKind.EVENTS]
        assert len(got_events) == len(set(got_events)) and set(got_events) == charger.events
        stored = h.emu.context.store.charging_records()
        assert sorted(r.record_id for r in stored) == sorted(charger.records)
        assert all(r.duplicate_attempts == 0 for r in stored)
        got_statuses = [
            (c.command_id, s.status) for c in h.emu.context.store.commands() for s in c.statuses
        ]
        assert len(got_statuses) == len(set(got_statuses)) and set(got_statuses) == charger.statuses
        assert len(charger.statuses) == 12 + len(
            [s for s in charger.statuses if s[1] == "completed"]
        )

        # ---- the uplink stayed under the documented limits: the emulator never said 429
        assert [r for _, r in h.log if r.code == 5001] == []
        other = [t for t, r in h.log if r.kind in OTHER_KINDS and r.http_status not in (0, 503)]
        high = [t for t, r in h.log if r.kind in HIGH_KINDS and r.http_status not in (0, 503)]
        other_per_min = max_in_window(other, 60.0)
        high_per_s = max_in_window(high, 1.0)
        assert other_per_min <= 60 and high_per_s <= 10

        # ---- never more than 5 reconnects in any 10 minutes
        reconnects = list(uplink.stats.reconnect_times)
        worst_window = max_in_window(reconnects, 600.0)
        assert 1 <= worst_window <= 5
        # cross-check on the platform side: every failed request during the outage is either
        # one reconnect attempt, or one of the few an endpoint makes (its own backoff: 1 s,
        # 2 s, ...) before the heartbeat probe finds that every request fails (a 503 on one
        # request is that request's problem, not yet the link's)
        failed = [t for t, r in h.log if r.http_status in (0, 503) and t < drained_at]
        first_reconnect = reconnects[0]
        noticing = [t for t in failed if t < first_reconnect]
        assert first_reconnect - (t0 + OUTAGE_START) <= PROBE_AFTER_S + 5
        assert len(noticing) <= 3 * (len(ENDPOINT_BY_KIND) + 2) + 1  # per endpoint, polls, probe
        assert len(failed) - len(noticing) <= len(reconnects) + 4
        assert all(t0 + OUTAGE_START <= t < t0 + OUTAGE_END for t in failed)

        # ---- the backlog drained, at the shaped rate, soon after the platform came back
        back_online = next(t for t in reconnects if t >= t0 + OUTAGE_END)
        assert back_online - (t0 + OUTAGE_END) <= 125  # one budget slot at most
        drain_other = [t for t in other if back_online <= t <= back_online + 60]
        if len(drain_other) < 45:
            for t, r in h.log:
                if back_online - 200 <= t <= back_online + 60:
                    print("TRACE", round(t - t0, 2), r.kind.value, r.http_status, r.code)
            print("RECONNECTS", [round(t - t0, 2) for t in reconnects])
        assert len(drain_other) >= 45  # ~50/min while the backlog lasts
        assert drained_at - back_online < 400

        summary: dict[str, Any] = {
            "outage_s": OUTAGE_END - OUTAGE_START,
            "backlog_at_outage_end": backlog,
            "reconnect_attempts": [round(t - t0, 1) for t in reconnects],
            "max_reconnects_per_600s": worst_window,
            "reconnected_s_after_outage_end": round(back_online - (t0 + OUTAGE_END), 1),
            "backlog_drained_s_after_reconnect": round(drained_at - back_online, 1),
            "max_other_per_60s": other_per_min,
            "max_high_per_1s": high_per_s,
            "other_first_minute_after_reconnect": len(drain_other),
            "sent": dict(uplink.stats.sent),
            "failed_requests_during_outage": len(failed),
            "virtual_s": round(loop.time() - t0, 1),
        }
        print("OUTAGE SUMMARY", summary)
