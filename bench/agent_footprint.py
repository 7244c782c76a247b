"""Agent footprint: RSS and CPU time per hour with both simulated connectors charging.

    python bench/agent_footprint.py [--seconds 120] [--interval 1.0] [--json]

Setup (like ``tools/demo``): the platform emulator in this process, the agent as its own
process on a copy of config/sim.toml with a second simulated vehicle appended for connector 2
(AC, 3 phases, 32 A) -- connector 1's DC vehicle is kept. Both vehicles plug in ~3 s after
start; ``start_charging`` is queued for each connector; the measurement starts once the
emulator has received telemetry with state "charging" for both connectors.

Measurement window (``--seconds``, default 120): every ``--interval`` s the agent's
/proc/<pid>/status (VmRSS) and /proc/<pid>/stat (utime + stime, all threads) are read.
Reported: RSS median and max (MiB), CPU seconds used in the window, extrapolated to CPU
seconds per hour and as a share of one CPU, and the heartbeat / telemetry requests the
emulator received in the window (telemetry: one request per connector sample, every 5 s
per charging connector).

The agent process also hosts the simulated charger (physics every 50 ms, the virtual CAN
bus, the pymodbus TCP/RTU servers, the sysfs-like files): the figures are agent +
simulator, an upper bound for the agent alone on real hardware (where the drivers talk to
real devices instead). Log level is the config's (info), written to a file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _agent_proc import (
    SIM_CONFIG,
    AgentUnderTest,
    BenchFailed,
    describe_source,
    filesystem_of,
    quiet_logs,
    source_state,
)

from agent.emulator.operator_models import RequestKind

SECOND_VEHICLE = """
# -- appended by bench/agent_footprint.py: a vehicle on connector 2 (AC) too ---------
[[sim.vehicles]]
connector = 2
plug_in_after_s = 3
soc = 20
target_soc = 100
capacity_kwh = 75
ac_max_current = 32
"""

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def derive_config(workdir: Path) -> Path:
    text = SIM_CONFIG.read_text()
    # text append is valid TOML only while [[sim.vehicles]] is the file's last table
    last_header = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("[")][-1]
    if not last_header.startswith("[[sim.vehicles]]"):
        raise BenchFailed(
            f"config/sim.toml no longer ends with [[sim.vehicles]] (last table {last_header!r})"
        )
    path = workdir / "sim-two-vehicles.toml"
    path.write_text(text.rstrip("\n") + "\n" + SECOND_VEHICLE)
    return path


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), seconds."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread, keyed "comm/tid" (threads that exit in between are lost)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            raw = (task / "stat").read_text()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        out[f"{comm}/{task.name}"] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def status_fields(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
            out[key] = int(value.split()[0])  # kB, or a count for Threads
    return out


def last_telemetry_state(aut: AgentUnderTest) -> dict[int, str]:
    states: dict[int, str] = {}
    for r in aut.emulator.received(kind=RequestKind.TELEMETRY):
        bodies = r.body if isinstance(r.body, list) else [r.body]
        for b in bodies:
            if r.accepted and isinstance(b, dict) and "connector_id" in b:
                states[int(b["connector_id"])] = str(b.get("state"))
    return states


async def measure(seconds: float, interval: float, keep: bool) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="charger-footprint-"))
    config = derive_config(workdir)
    async with AgentUnderTest(config=config, workdir=workdir, keep=keep) as aut:
        t_launch = time.monotonic()
        await aut.wait_registered()
        await aut.wait_plugged(1)
        await aut.wait_plugged(2)
        commands = {
            cid: aut.emulator.queue_command(
                command="start_charging",
                connector_id=cid,
                params={"transaction_id": f"bench-{cid}"},
            )
            for cid in (1, 2)
        }
        store = aut.emulator.context.store
        await aut.until(
            "start_charging accepted on both connectors",
            lambda: all(
                any(s.status == "accepted" for s in store.command(c).statuses)
                for c in commands.values()
            ),
            60,
        )
        await aut.until(
            "telemetry state 'charging' on both connectors",
            lambda: all(last_telemetry_state(aut).get(c) == "charging" for c in (1, 2)),
            90,
        )
        charging_after = time.monotonic() - t_launch
        await asyncio.sleep(2.0)  # let the session-start burst (events, first samples) pass

        pid = aut.pid
        seq0 = len(aut.emulator.received())
        rss_kib: list[int] = []
        threads: list[int] = []
        t0 = time.monotonic()
        cpu0 = cpu_seconds(pid)
        tcpu0 = thread_cpu(pid)
        next_at = t0
        while True:
            if aut.proc is not None and aut.proc.returncode is not None:
                raise BenchFailed(f"the agent exited during the measurement; log: {aut.log_path}")
            st = status_fields(pid)
            rss_kib.append(st["VmRSS"])
            threads.append(st.get("Threads", 0))
            now = time.monotonic()
            if now - t0 >= seconds:
                break
            next_at += interval
            await asyncio.sleep(max(0.0, min(next_at, t0 + seconds) - time.monotonic()))
        cpu1 = cpu_seconds(pid)
        tcpu1 = thread_cpu(pid)
        t1 = time.monotonic()
        final = status_fields(pid)
        window = aut.emulator.received()[seq0:]
        states_end = last_telemetry_state(aut)
        sim_state: dict[str, Any] = {}
        try:
            import aiohttp

            async with (
                aiohttp.ClientSession() as http,
                http.get(aut.control_url() + "/state") as resp,
            ):
                snap = await resp.json()
            for c in snap.get("connectors", []):
                meter = c.get("meter", {})
                sim_state[str(c.get("id"))] = {
                    "soc": c.get("soc"),
                    "power_kw": meter.get("power_kw"),
                }
        except (aiohttp.ClientError, OSError, ValueError) as exc:  # informational only
            sim_state = {"error": str(exc)}

        elapsed = t1 - t0
        cpu = cpu1 - cpu0
        kinds: dict[str, int] = {}
        for r in window:
            kinds[r.kind.value] = kinds.get(r.kind.value, 0) + 1
        tel_by_conn: dict[str, int] = {}
        for r in window:
            if r.kind == RequestKind.TELEMETRY and isinstance(r.body, dict):
                k = str(r.body.get("connector_id"))
                tel_by_conn[k] = tel_by_conn.get(k, 0) + 1
        main_key = next((k for k in tcpu1 if k.endswith(f"/{pid}")), None)
        main_cpu = tcpu1.get(main_key, 0.0) - tcpu0.get(main_key, 0.0) if main_key else 0.0
        return {
            "window_s": elapsed,
            "samples": len(rss_kib),
            "rss_median_mib": statistics.median(rss_kib) / 1024.0,
            "rss_max_mib": max(rss_kib) / 1024.0,
            "rss_min_mib": min(rss_kib) / 1024.0,
            "vm_hwm_mib": final.get("VmHWM", 0) / 1024.0,
            "rss_anon_mib_end": final.get("RssAnon", 0) / 1024.0,
            "rss_file_mib_end": final.get("RssFile", 0) / 1024.0,
            "threads_max": max(threads) if threads else None,
            "cpu_s_window": cpu,
            "cpu_s_per_hour": cpu / elapsed * 3600.0,
            "cpu_share_pct": cpu / elapsed * 100.0,
            "cpu_s_since_launch": cpu1,
            "cpu_s_window_main_thread": main_cpu,
            "requests_in_window": kinds,
            "heartbeat_requests": kinds.get("heartbeat", 0),
            "telemetry_requests": kinds.get("telemetry", 0),
            "telemetry_by_connector": tel_by_conn,
            "rejected_in_window": sum(1 for r in window if not r.accepted and r.http_status != 0),
            "telemetry_state_end": {str(k): v for k, v in states_end.items()},
            "sim_state_end": sim_state,
            "both_charging_after_s": charging_after,
            "pid": pid,
            "workdir": str(workdir) if keep else None,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=120.0, help="measurement window (default 120)"
    )
    parser.add_argument(
        "--interval", type=float, default=1.0, help="sampling interval, s (default 1)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temp dir (agent log, state, config)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    quiet_logs()
    source = source_state()  # before the run: others may edit the tree meanwhile
    try:
        r = asyncio.run(measure(args.seconds, args.interval, args.keep))
    except BenchFailed as exc:
        print(f"BENCHMARK FAILED: {exc}", file=sys.stderr)
        return 1
    meta: dict[str, Any] = {
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "filesystem": filesystem_of(Path(tempfile.gettempdir())),
        "clk_tck": CLK_TCK,
        "loadavg_end": os.getloadavg(),
        "config": "config/sim.toml + [[sim.vehicles]] connector 2 (AC)",
        "agent_source": source,
    }
    if args.json:
        print(json.dumps({"meta": meta, "result": r}, indent=2))
        return 0
    ok = (
        all(v == "charging" for v in r["telemetry_state_end"].values())
        and len(r["telemetry_state_end"]) >= 2
    )
    print(
        f"agent_footprint: agent + in-process simulator, connectors 1 (DC) and 2 (AC) charging, "
        f"{r['window_s']:.0f} s window, {r['samples']} samples; Python {meta['python']}, {meta['cpus']} CPUs, "
        f"state dir on {meta['filesystem']}"
    )
    print(
        f"  {describe_source(meta['agent_source'])}; load average at the end {meta['loadavg_end'][0]:.2f}"
    )
    print(f"{'RSS median':<28}{r['rss_median_mib']:>10.1f} MiB")
    print(
        f"{'RSS max':<28}{r['rss_max_mib']:>10.1f} MiB   (min {r['rss_min_mib']:.1f}, peak since start VmHWM {r['vm_hwm_mib']:.1f})"
    )
    print(
        f"{'RSS anon / file at end':<28}{r['rss_anon_mib_end']:>10.1f} / {r['rss_file_mib_end']:.1f} MiB"
    )
    print(
        f"{'CPU in window':<28}{r['cpu_s_window']:>10.2f} s   (user+system, {r['threads_max']} threads)"
    )
    print(
        f"{'  of which main thread':<28}{r['cpu_s_window_main_thread']:>10.2f} s   (the event loop: agent and simulator; the rest: SQLite/executor threads)"
    )
    print(
        f"{'CPU per hour':<28}{r['cpu_s_per_hour']:>10.0f} s/h  = {r['cpu_share_pct']:.2f} % of one CPU"
    )
    print(f"{'heartbeat requests':<28}{r['heartbeat_requests']:>10}")
    print(
        f"{'telemetry requests':<28}{r['telemetry_requests']:>10}   "
        + ", ".join(f"connector {k}: {v}" for k, v in sorted(r["telemetry_by_connector"].items()))
    )
    print(
        f"{'all requests in window':<28}{sum(r['requests_in_window'].values()):>10}   {json.dumps(r['requests_in_window'], sort_keys=True)}"
    )
    print(f"{'rejected by the emulator':<28}{r['rejected_in_window']:>10}")
    print(
        f"{'still charging at the end':<28}{'yes' if ok else 'NO':>10}   telemetry {r['telemetry_state_end']}, "
        f"simulator {r['sim_state_end']}"
    )
    print(
        "CPU s/h = CPU seconds in the window / window length x 3600 (both connectors charging the whole time);\n"
        "the process includes the simulated charger, so this is an upper bound for the agent alone."
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
