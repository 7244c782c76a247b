"""Command latency: queued on the platform -> ``accepted`` status received by the platform.

    python bench/command_latency.py [--n 200] [--n-paced 100] [--pace 1.25] [--burst 0] [--json]

The agent runs as its own process (``python -m agent run`` on config/sim.toml, simulated
charger in-process) against the platform emulator in this process, exactly like
``tools/demo``. Each command is ``set_power_limit`` {power_limit_percent: 80, duration: 600}
queued for connector 1, so it is handed out by connector 1's long-poll and answered
``accepted`` as soon as the limit is stored and applied (no ``completed`` comes within the
run: the limits last 600 s).

Latency = emulator's ``received_at`` of the ``accepted`` report - emulator's ``queued_at``
(same clock, same process). It is split into
  pickup   queued -> handed to the agent's held long-poll (long-poll wake-up; or the time the
           agent needs to re-open its poll after the previous command),
  report   handed out -> ``accepted`` received: the agent parses, de-duplicates (SQLite
           ledger), applies the limit (persisted), queues the status in the durable outbox, the
           sender takes it, waits for a token of its reporting bucket and POSTs it.

The platform allows 60 requests/min per device for events + charging records + command
status together; the agent shapes that class itself with a token bucket (50/min, burst 1
when this was written; the run reads and prints the defaults of ``agent.channels.tellus.uplink.Uplink``)
-- in the agent, not configurable, whatever the platform does. So:

(a) rate limits as published (emulator enforces them):
    sequential   N commands, each queued as soon as the previous one was accepted. The first
                 (burst) ones go at once, then every report waits for a token: latency
                 ~1.2 s (60/50) -- this is the shaping, not the agent's processing time.
(b) emulator rate limits disabled:
    paced        N commands, one at a time, at most one per ``--pace`` s (default 1.25 s,
                 slower than the bucket refills), so the bucket never runs dry: the agent's own
                 end-to-end latency.
    sequential   a short unpaced run (``--n-check``, default 15) showing the shaping stays
                 when the platform stops enforcing limits (it is the agent's, not the 429s').
``--burst B`` adds to each phase B commands queued at once (latency of the i-th grows by
~1.2 s per command beyond the bucket's burst).

Caveat: the limits last 600 s; a run longer than that (large ``--n``) also gets their
``completed`` reports, which share the same bucket.

Every phase starts a fresh emulator and agent, waits for registration and the simulated
vehicle's plug-in, then ~8 s for the reporting bucket to refill before measuring.

Duration: (a) takes ~1.2 s per command (4 min for the default 200), (b) ~2.5 min, a burst
of B ~1.2 x B s per phase: ~7.5 min in all with the defaults; ``--n 50 --n-paced 50`` gives
the same medians in ~3 min.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _agent_proc import (
    AgentUnderTest,
    BenchFailed,
    describe_source,
    filesystem_of,
    quiet_logs,
    source_state,
)

PARAMS = {"power_limit_percent": 80, "duration": 600}
SETTLE_S = 8.0  # the reporting bucket refills (5 tokens at 50/min would take 6 s)
ACCEPT_TIMEOUT_S = 60.0


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(values_ms: list[float]) -> dict[str, float]:
    return {
        "n": len(values_ms),
        "p50_ms": percentile(values_ms, 50),
        "p90_ms": percentile(values_ms, 90),
        "p99_ms": percentile(values_ms, 99),
        "max_ms": max(values_ms) if values_ms else float("nan"),
        "min_ms": min(values_ms) if values_ms else float("nan"),
    }


class Probe:
    """Queues commands on the in-process emulator and wakes up when their ``accepted`` arrives."""

    def __init__(self, aut: AgentUnderTest) -> None:
        self.aut = aut
        self.store = aut.emulator.context.store
        self._waiters: dict[str, asyncio.Future[None]] = {}
        original = self.store.report_status

        def report_status(device_id: str, report: Any) -> Any:  # instance-level wrapper
            record = original(device_id, report)
            fut = self._waiters.get(record.command_id)
            if fut is not None and not fut.done() and record.statuses[-1].status == "accepted":
                fut.set_result(None)
            return record

        self.store.report_status = report_status  # type: ignore[method-assign]

    def queue(self) -> tuple[str, asyncio.Future[None]]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        cid = self.aut.emulator.queue_command(
            command="set_power_limit", connector_id=1, params=dict(PARAMS)
        )
        self._waiters[cid] = fut
        return cid, fut

    async def wait(self, cid: str, fut: asyncio.Future[None]) -> None:
        deadline = time.monotonic() + ACCEPT_TIMEOUT_S
        while not fut.done():
            if self.aut.proc is not None and self.aut.proc.returncode is not None:
                raise BenchFailed(
                    f"the agent exited while command {cid} was pending; log: {self.aut.log_path}"
                )
            if time.monotonic() > deadline:
                last = [s.status for s in self.store.command(cid).statuses]
                raise BenchFailed(
                    f"no 'accepted' for {cid} within {ACCEPT_TIMEOUT_S:.0f} s (statuses {last}); log: {self.aut.log_path}"
                )
            try:
                await asyncio.wait_for(asyncio.shield(fut), 1.0)
            except TimeoutError:
                pass

    def timing(self, cid: str) -> dict[str, Any]:
        rec = self.store.command(cid)
        accepted = next(s for s in rec.statuses if s.status == "accepted")
        delivered = rec.deliveries[0].delivered_at
        return {
            "total_ms": (accepted.received_at - rec.queued_at).total_seconds() * 1000.0,
            "pickup_ms": (delivered - rec.queued_at).total_seconds() * 1000.0,
            "report_ms": (accepted.received_at - delivered).total_seconds() * 1000.0,
            "accepted_at": accepted.received_at.timestamp(),
            "channel": rec.deliveries[0].channel.value,
        }

    async def sequential(self, n: int, pace_s: float = 0.0) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            t0 = time.monotonic()
            cid, fut = self.queue()
            await self.wait(cid, fut)
            out.append(self.timing(cid))
            if pace_s > 0:
                await asyncio.sleep(max(0.0, t0 + pace_s - time.monotonic()))
        return out

    async def burst(self, n: int) -> list[dict[str, Any]]:
        queued = [self.queue() for _ in range(n)]
        for cid, fut in queued:
            await self.wait(cid, fut)
        return [self.timing(cid) for cid, _ in queued]


def agent_shaping() -> dict[str, Any]:
    """The agent's reporting-class bucket, read from the ``Uplink`` constructor defaults."""
    from agent.channels.tellus.uplink import Uplink

    nothing: Any = None  # the constructor only stores its collaborators and builds the buckets
    uplink = Uplink(
        http=nothing,
        tokens=nothing,
        outbox=nothing,
        deliver=nothing,
        heartbeat_status=nothing,
        connector_ids=[],
    )
    return {"per_minute": round(uplink.other.rate * 60.0, 3), "burst": uplink.other.burst}


def describe(timings: list[dict[str, Any]], skip: int) -> dict[str, Any]:
    total = [t["total_ms"] for t in timings]
    # after the bucket's burst: the steady state
    accepted_at = sorted(t["accepted_at"] for t in timings)[skip:]
    gaps = [(b - a) * 1000.0 for a, b in itertools.pairwise(accepted_at)]
    channels: dict[str, int] = {}
    for t in timings:
        channels[t["channel"]] = channels.get(t["channel"], 0) + 1
    out: dict[str, Any] = {
        "total": summary(total),
        "pickup": summary([t["pickup_ms"] for t in timings]),
        "report": summary([t["report_ms"] for t in timings]),
        "first5_ms": [round(x, 1) for x in total[:5]],
        "after_burst": summary(total[skip:]) if len(total) > skip else None,
        "accept_interval_p50_ms_after_burst": statistics.median(gaps) if gaps else None,
        "accepted_per_min_after_burst": (len(accepted_at) - 1)
        / (accepted_at[-1] - accepted_at[0])
        * 60.0
        if len(accepted_at) > 1 and accepted_at[-1] > accepted_at[0]
        else None,
        "channels": channels,
    }
    return out


async def run_phase(
    name: str, *, rate_limits: bool, steps: list[tuple[str, str, int, float]], keep: bool, skip: int
) -> dict[str, Any]:
    """``steps``: (label, mode, n, pace_s) with mode "sequential" or "burst"."""
    async with AgentUnderTest(rate_limits_enabled=rate_limits, keep=keep) as aut:
        t_start = time.monotonic()
        await aut.wait_registered()
        await aut.wait_plugged(1)
        probe = Probe(aut)
        results: dict[str, Any] = {}
        for label, mode, n, pace in steps:
            if n <= 0:
                continue
            await asyncio.sleep(SETTLE_S)
            seen = len(aut.emulator.received())
            t0 = time.monotonic()
            timings = await probe.burst(n) if mode == "burst" else await probe.sequential(n, pace)
            wall = time.monotonic() - t0
            window = aut.emulator.received()[seen:]
            limited = [r for r in window if r.http_status == 429]
            res = describe(timings, skip)
            res.update(
                mode=mode,
                pace_s=pace,
                wall_s=wall,
                http_429=len(limited),
                http_429_by_kind={
                    k.value: sum(1 for r in limited if r.kind == k)
                    for k in {r.kind for r in limited}
                },
            )
            results[label] = res
        all_429 = sum(1 for r in aut.emulator.received() if r.http_status == 429)
        return {
            "phase": name,
            "rate_limits_enabled": rate_limits,
            "steps": results,
            "http_429_whole_run": all_429,
            "phase_wall_s": time.monotonic() - t_start,
            "workdir": str(aut.workdir) if keep else None,
        }


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:,.1f}"


def print_table(meta: dict[str, Any], phases: list[dict[str, Any]]) -> None:
    print(
        f"command_latency: set_power_limit via connector 1's long-poll, queued -> 'accepted' received "
        f"(emulator clock); agent state dir on {meta['filesystem']}, Python {meta['python']}, {meta['cpus']} CPUs"
    )
    print(
        "  total = queued -> accepted received; pickup = queued -> handed to the long-poll; report = handed out -> accepted received;"
    )
    print(f"  {describe_source(meta['agent_source'])}")
    sh = meta["agent_shaping"]
    print(
        f"  the agent's reporting bucket: {sh['per_minute']:g}/min, burst {sh['burst']:g} (read from agent.channels.tellus.uplink.Uplink)"
    )
    print(
        f"  acc/min = accepted reports per minute after the first {meta['skip']} (the bucket's burst); 429s = rate-limit rejections in the step"
    )
    header = f"{'phase / step':<34}{'n':>5}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'max ms':>10}   {'pickup p50':>10}{'report p50':>11}{'acc/min':>9}{'429s':>6}"
    print(header)
    print("-" * len(header))
    for ph in phases:
        for label, r in ph["steps"].items():
            t = r["total"]
            print(
                f"{ph['phase'] + ' / ' + label:<34}{t['n']:>5}{fmt(t['p50_ms']):>10}{fmt(t['p90_ms']):>10}"
                f"{fmt(t['p99_ms']):>10}{fmt(t['max_ms']):>10}   {fmt(r['pickup']['p50_ms']):>10}"
                f"{fmt(r['report']['p50_ms']):>11}{fmt(r['accepted_per_min_after_burst']):>9}{r['http_429']:>6}"
            )
    print()
    for ph in phases:
        for label, r in ph["steps"].items():
            line = f"{ph['phase']} / {label}: first 5 {r['first5_ms']} ms"
            if r["after_burst"]:
                a = r["after_burst"]
                line += f"; after the first {meta['skip']}: p50 {fmt(a['p50_ms'])} / p99 {fmt(a['p99_ms'])} ms"
                line += f", accepted every {fmt(r['accept_interval_p50_ms_after_burst'])} ms (median gap)"
            line += f"; took {r['wall_s']:.0f} s"
            print(line)
    print()
    print("What the numbers mean:")
    print(
        "  (a) published: the emulator enforces 60/min on events+records+command-status. The agent's own"
    )
    print(
        f"      token bucket ({sh['per_minute']:g}/min, burst {sh['burst']:g}) paces its reports, so after the first {meta['skip']}"
    )
    print(
        f"      command(s) every 'accepted' waits ~{60000 / sh['per_minute']:.0f} ms for a token: p50/p90/p99 there measure"
    )
    print(
        f"      the shaping, and 'acc/min' shows the ~{sh['per_minute']:g}/min ceiling. '429s' = rate-limit rejections the"
    )
    print(
        "      emulator sent (0 = the agent stayed under the limit). A burst of B commands finishes after"
    )
    print(
        f"      ~(B-{meta['skip']}) x {60 / sh['per_minute']:.1f} s; its i-th command waits ~(i-{meta['skip']}) x {60 / sh['per_minute']:.1f} s."
    )
    print(
        "  (b) limits off / paced: one command at a time, no faster than the bucket refills, so no"
    )
    print(
        "      report waits for a token: total = the agent's own latency (long-poll wake-up, dispatch,"
    )
    print(
        "      SQLite ledger + outbox commits with fsync, sender wake-up, HTTP POST) on this machine."
    )
    print(
        "  (b) limits off / sequential: same as (a) sequential although the emulator no longer limits:"
    )
    print("      the shaping is the agent's (client side), independent of the platform.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--n",
        type=int,
        default=200,
        help="(a) sequential commands under published limits (default 200)",
    )
    parser.add_argument(
        "--n-paced",
        type=int,
        default=100,
        help="(b) paced commands, emulator limits off (default 100)",
    )
    parser.add_argument(
        "--pace",
        type=float,
        default=1.25,
        help="(b) at most one command per this many s (default 1.25)",
    )
    parser.add_argument(
        "--n-check",
        type=int,
        default=15,
        help="(b) unpaced sequential commands, emulator limits off (default 15)",
    )
    parser.add_argument(
        "--burst",
        type=int,
        default=0,
        help="also queue this many at once in each phase (default 0: off)",
    )
    parser.add_argument("--only", choices=["a", "b"], help="run one phase only")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temp dirs (agent logs, state)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    quiet_logs()

    plans = []
    if args.only in (None, "a"):
        plans.append(
            (
                "a) published",
                True,
                [("sequential", "sequential", args.n, 0.0), ("burst", "burst", args.burst, 0.0)],
            )
        )
    if args.only in (None, "b"):
        plans.append(
            (
                "b) limits off",
                False,
                [
                    ("paced", "sequential", args.n_paced, args.pace),
                    ("sequential", "sequential", args.n_check, 0.0),
                    ("burst", "burst", args.burst, 0.0),
                ],
            )
        )
    source = source_state()  # before the run: others may edit the tree meanwhile
    shaping = agent_shaping()
    skip = max(1, int(shaping["burst"]))
    started = time.monotonic()
    phases = []
    try:
        for name, limits, steps in plans:
            if not args.json:
                print(f"running {name} ...", file=sys.stderr, flush=True)
            phases.append(
                asyncio.run(
                    run_phase(name, rate_limits=limits, steps=steps, keep=args.keep, skip=skip)
                )
            )
    except BenchFailed as exc:
        print(f"BENCHMARK FAILED: {exc}", file=sys.stderr)
        return 1
    import tempfile

    meta: dict[str, Any] = {
        "command": "set_power_limit",
        "params": PARAMS,
        "connector_id": 1,
        "filesystem": filesystem_of(Path(tempfile.gettempdir())),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "wall_s": time.monotonic() - started,
        "loadavg_end": os.getloadavg(),
        "agent_shaping": shaping,
        "skip": skip,
        "agent_source": source,
        "platform_limit": "60/min events+records+command-status",
    }
    if args.json:
        print(json.dumps({"meta": meta, "phases": phases}, indent=2))
    else:
        print_table(meta, phases)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
