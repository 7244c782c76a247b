"""``./tools/demo``: the main job end to end on simulated hardware.

1. a local platform emulator starts on 127.0.0.1;
2. the agent starts as its own process (``charger-agent run``) on config/sim.toml,
   registers, and its simulated vehicle plugs into connector 1;
3. the demo queues ``start_charging`` on the emulator, as an operator would;
4. while the session runs, a live line shows the connector state (as reported to
   the platform) and SOC / kW / kWh (read from the simulated charger);
5. after ``--duration`` seconds a ``stop_charging`` ends it, the charging record is
   accepted by the emulator, the agent is stopped with SIGTERM (final heartbeat
   ``offline``) and a summary is printed.

Exit status 0 only when every step happened and the emulator rejected nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Awaitable, Callable

import aiohttp

from agent.emulator import Emulator
from agent.emulator.operator_models import RequestKind


class DemoFailed(Exception):
    pass


def _print(line: str) -> None:
    print(line, flush=True)


async def _until(what: str, check: Callable[[], Awaitable[Any]], timeout: float, proc: asyncio.subprocess.Process) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise DemoFailed(f"the agent exited (status {proc.returncode}) while waiting for {what}")
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.2)
    raise DemoFailed(f"timed out after {timeout:.0f} s waiting for {what}")


async def spawn_agent(config: Path, api_url: str, workdir: Path, log_file: IO[str]) -> asyncio.subprocess.Process:
    """``charger-agent run`` as a child process on ``config``, state and simulator under ``workdir``."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "run",
        "--config", str(config),
        "--platform-url", api_url,
        "--state-dir", str(workdir / "state"),
        "--sim-root", str(workdir / "sim"),
        stdout=log_file, stderr=log_file,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def run_demo(config: Path, *, duration_s: float = 25.0) -> int:
    from agent.service import logs

    logs.configure(level="warning", fmt="console")  # the emulator runs in this process
    started = time.monotonic()
    tty = sys.stdout.isatty()
    workdir = Path(tempfile.mkdtemp(prefix="charger-demo-"))
    log_path = workdir / "agent.log"
    emulator = Emulator(token_ttl=3600)
    await emulator.start(host="127.0.0.1", port=0)
    _print(f"platform emulator   {emulator.api_url}")
    proc: asyncio.subprocess.Process | None = None
    try:
        with log_path.open("w") as log_file:
            proc = await spawn_agent(config, emulator.api_url, workdir, log_file)
        _print(f"agent               pid {proc.pid}, logs in {log_path}")
        async with aiohttp.ClientSession() as http:
            result = await _scenario(emulator, http, proc, workdir, duration_s, tty)
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
        final = [r for r in emulator.received(kind=RequestKind.HEARTBEAT) if isinstance(r.body, dict) and r.body.get("status") == "offline"]
        # a long-poll the agent closed at shutdown was not answered: that is no rejection
        rejected = [r for r in emulator.received() if not r.accepted and r.http_status != 0]
        _summary(result, emulator, code, bool(final), rejected, time.monotonic() - started)
        return 0 if code == 0 and final and not rejected else 1
    except DemoFailed as exc:
        _print(f"\nDEMO FAILED: {exc}\n(agent log: {log_path})")
        return 1
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await emulator.stop()


async def _scenario(
    emulator: Emulator, http: aiohttp.ClientSession, proc: asyncio.subprocess.Process, workdir: Path, duration_s: float, tty: bool
) -> dict[str, Any]:
    def events() -> list[dict[str, Any]]:
        return [r.body for r in emulator.received(kind=RequestKind.EVENTS) if r.accepted]

    async def registered() -> bool:
        return any(r.accepted for r in emulator.received(kind=RequestKind.HEARTBEAT))

    await _until("the agent to register and send its first heartbeat", registered, 30, proc)
    _print("agent registered    first heartbeat received")

    async def plugged() -> bool:
        return any(e["event_type"] == "plug_in" and e["connector_id"] == 1 for e in events())

    await _until("the simulated vehicle to plug in", plugged, 30, proc)
    _print("vehicle             plugged into connector 1")
    start_id = emulator.queue_command(command="start_charging", connector_id=1, params={"transaction_id": "demo-0001"})
    _print(f"operator            queued start_charging ({start_id})")

    control_port = int((workdir / "sim" / "control.port").read_text())
    sim_state_url = f"http://127.0.0.1:{control_port}/state"

    async def sim_connector() -> dict[str, Any]:
        async with http.get(sim_state_url) as resp:
            state = await resp.json()
        return next(dict(c) for c in state["connectors"] if c["id"] == 1)

    first = await sim_connector()
    meter_start = float(first["meter"]["energy_import_kwh"])

    async def charging() -> bool:
        return any(e["event_type"] == "start" and e["connector_id"] == 1 for e in events())

    t0 = time.monotonic()
    stop_at: float | None = None
    stop_id: str | None = None
    last_print = 0.0
    while True:
        if proc.returncode is not None:
            raise DemoFailed(f"the agent exited (status {proc.returncode})")
        evs = [e for e in events() if e["connector_id"] == 1]
        types = [e["event_type"] for e in evs]
        state = "stopped" if "stop" in types else "charging" if "start" in types else "preparing"
        sim = await sim_connector()
        soc = float(sim["soc"])
        kw = float(sim["meter"]["power_kw"])
        kwh = float(sim["meter"]["energy_import_kwh"]) - meter_start
        now = time.monotonic()
        line = f"[{now - t0:5.1f} s] connector 1  {state:<10} SOC {soc:5.1f} %  {kw:6.1f} kW  {kwh:7.3f} kWh"
        if tty:
            print("\r" + line, end="", flush=True)
        elif now - last_print >= 2.0:
            _print(line)
            last_print = now
        if stop_at is None and await charging():
            stop_at = now + duration_s
        if stop_at is not None and stop_id is None and now >= stop_at:
            stop_id = emulator.queue_command(command="stop_charging", connector_id=1, params={"reason": "user_request"})
            if tty:
                print()
            _print(f"operator            queued stop_charging ({stop_id})")
        if state == "stopped":
            break
        if now - t0 > duration_s + 60:
            raise DemoFailed("the session did not start and stop in time")
        await asyncio.sleep(0.25)
    if tty:
        print()

    records = await _until("the charging record", _records(emulator), 20, proc)

    async def statuses_done() -> bool:
        return all(_terminal(emulator, cid) for cid in (start_id, stop_id) if cid)

    await _until("the command statuses", statuses_done, 20, proc)
    return {"start_id": start_id, "stop_id": stop_id, "record": records[0]}


def _records(emulator: Emulator) -> Callable[[], Awaitable[Any]]:
    async def check() -> Any:
        return [r.body for r in emulator.received(kind=RequestKind.CHARGING_RECORDS) if r.accepted]

    return check


def _terminal(emulator: Emulator, command_id: str) -> bool:
    view = emulator.context.store.command(command_id)
    return any(s.status in ("completed", "failed", "rejected") for s in view.statuses)


def _summary(result: dict[str, Any], emulator: Emulator, code: int | None, final_offline: bool, rejected: list[Any], wall: float) -> None:
    rec = result["record"]
    _print("")
    _print("charging record accepted by the platform")
    for key in ("record_id", "connector_id", "start_time", "end_time", "energy", "max_power", "avg_power", "meter_start", "meter_end", "stop_reason", "transaction_id"):
        if key in rec:
            _print(f"  {key:<15} {rec[key]}")
    if "vehicle_info" in rec:
        _print(f"  {'vehicle_info':<15} {json.dumps(rec['vehicle_info'])}")
    _print(f"  energy check    meter_end - meter_start = {rec['meter_end'] - rec['meter_start']:.3f} kWh")
    for label, cid in (("start_charging", result["start_id"]), ("stop_charging", result["stop_id"])):
        view = emulator.context.store.command(cid)
        _print(f"command {label:<15} " + " -> ".join(s.status for s in view.statuses))
    counts: dict[str, int] = {}
    for r in emulator.received():
        counts[r.kind.value] = counts.get(r.kind.value, 0) + 1
    _print("requests received   " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    _print(f"rejected requests   {len(rejected)}")
    _print(f"agent exit          status {code}, final heartbeat offline: {'yes' if final_offline else 'NO'}")
    _print(f"demo finished in {wall:.0f} s")
