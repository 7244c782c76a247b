"""``./tools/demo --ocpp``: the OCPP channel end to end, next to the Tellus channel.

1. the Tellus platform emulator and the local CSMS (:mod:`agent.csms`, validating every
   OCPP frame against the 1.6 schemas both ways) start on 127.0.0.1;
2. the agent runs ``config/sim.toml`` plus an ``[ocpp]`` section (written to a temporary
   file): BootNotification, StatusNotification, its simulated vehicle plugs in (Preparing);
3. a card is tapped on the simulated reader (the simulator's control endpoint):
   Authorize -> StartTransaction -> MeterValues every 5 s;
4. after ``--duration`` s the CSMS sends RemoteStopTransaction -> StopTransaction; the
   Tellus platform receives the charging record carrying the OCPP transactionId;
5. every OCPP frame is printed as it passes, with the Tellus requests beside them.

Exit status 0 only when every step happened, no frame broke the schemas and the platform
rejected nothing.
"""

from __future__ import annotations

import asyncio
import json
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from ocpp.v16 import call

from agent.cli.demo import DemoFailed, _print, _until, spawn_agent
from agent.csms import Csms
from agent.emulator import Emulator
from agent.emulator.operator_models import RequestKind

CARD = "04A1B2C3D4E5F6"
PASSWORD = "demo-ocpp-password"


def _frame_line(text: str, direction: str) -> str | None:
    try:
        msg = json.loads(text)
    except ValueError:
        return f"ocpp {direction} (not JSON) {text[:80]}"
    arrow = "CP -> CSMS" if direction == "in" else "CSMS -> CP"
    if msg[0] == 2:
        payload = json.dumps(msg[3], separators=(",", ":"))
        return f"ocpp {arrow}  {msg[2]:<22} {payload[:110]}"
    kind = "result" if msg[0] == 3 else f"ERROR {msg[2]}"
    payload = json.dumps(msg[2] if msg[0] == 3 else msg[3], separators=(",", ":"))
    return f"ocpp {arrow}  {kind:<22} {payload[:110]}"


async def run_ocpp_demo(config: Path, *, duration_s: float = 20.0) -> int:
    from agent.service import logs

    logs.configure(level="warning", fmt="console")
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="charger-demo-ocpp-"))
    log_path = workdir / "agent.log"
    emulator = Emulator(token_ttl=3600)
    await emulator.start(host="127.0.0.1", port=0)
    csms = Csms(password=PASSWORD, heartbeat_interval=60)
    await csms.start()
    cfg_path = workdir / "sim-ocpp.toml"
    cfg_path.write_text(config.read_text() + f'\n[ocpp]\nurl = "{csms.url}"\npassword = "{PASSWORD}"\nsend_metadata = true\n')
    _print(f"platform emulator   {emulator.api_url}")
    _print(f"local CSMS          {csms.url}  (OCPP 1.6-J, schema validation both ways)")
    proc: asyncio.subprocess.Process | None = None
    printer = asyncio.create_task(_print_traffic(csms, emulator))
    try:
        with log_path.open("w") as log_file:
            proc = await spawn_agent(cfg_path, emulator.api_url, workdir, log_file)
        _print(f"agent               pid {proc.pid}, logs in {log_path}")
        tx = await _scenario(csms, emulator, proc, workdir, duration_s)
        records = await _until("the Tellus charging record", _records(emulator), 20, proc)
        await asyncio.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
        await asyncio.sleep(0.3)
        printer.cancel()
        rejected = [r for r in emulator.received() if not r.accepted and r.http_status != 0]
        record = records[0]
        _print("")
        _print(f"transaction         OCPP transactionId {tx}; Tellus record {record['record_id']} transaction_id {record.get('transaction_id')}")
        _print(f"energy              {record['energy']} kWh (meter {record['meter_start']} -> {record['meter_end']} kWh)")
        counts: dict[str, int] = {}
        for c in csms.calls:
            counts[c.action] = counts.get(c.action, 0) + 1
        _print("OCPP calls received " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        _print(f"schema violations   {len(csms.violations)}  {'; '.join(csms.violations)[:200]}")
        _print(f"Tellus rejected     {len(rejected)}")
        _print(f"agent exit          status {code}; demo finished in {time.monotonic() - started:.0f} s")
        ok = code == 0 and not csms.violations and not rejected and record.get("transaction_id") == str(tx)
        return 0 if ok else 1
    except DemoFailed as exc:
        _print(f"\nDEMO FAILED: {exc}\n(agent log: {log_path})")
        return 1
    finally:
        printer.cancel()
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await csms.stop()
        await emulator.stop()


async def _print_traffic(csms: Csms, emulator: Emulator) -> None:
    """Every OCPP frame, and the Tellus requests other than telemetry, as they pass."""
    shown_frames = 0
    shown_requests = 0
    while True:
        for frame in csms.frames[shown_frames:]:
            line = _frame_line(frame.text, frame.direction)
            if line:
                _print(line)
        shown_frames = len(csms.frames)
        received = emulator.received()
        for r in received[shown_requests:]:
            if r.kind in (RequestKind.TELEMETRY, RequestKind.COMMANDS):
                continue
            body = json.dumps(r.body, separators=(",", ":"))[:100] if isinstance(r.body, dict) else ""
            _print(f"tellus CP -> platform {r.kind.value:<16} {r.http_status} {body}")
        shown_requests = len(received)
        await asyncio.sleep(0.1)


async def _scenario(csms: Csms, emulator: Emulator, proc: asyncio.subprocess.Process, workdir: Path, duration_s: float) -> int:
    cp_id = "SIM-0000001"

    async def booted() -> bool:
        return csms.connected(cp_id)

    await _until("BootNotification accepted", booted, 30, proc)
    assert (await csms.call(cp_id, call.ChangeConfiguration(key="MeterValueSampleInterval", value="5"))).status == "Accepted"

    async def preparing() -> bool:
        return any(c.payload.get("connectorId") == 1 and c.payload.get("status") == "Preparing" for c in csms.calls_of("StatusNotification"))

    await _until("the vehicle to plug in (Preparing)", preparing, 30, proc)
    port = int((workdir / "sim" / "control.port").read_text())
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{port}/auth/1/tap", json={"id_tag": CARD}) as resp:
            if not (await resp.json()).get("ok"):
                raise DemoFailed("the simulator refused the card tap")
    _print(f"driver              taps card {CARD} on connector 1")

    async def started() -> Any:
        return _tx_id(csms)

    tx = int(await _until("StartTransaction answered", started, 60, proc))
    await asyncio.sleep(duration_s)
    _print(f"operator            RemoteStopTransaction {tx}")
    answer = await csms.call(cp_id, call.RemoteStopTransaction(transaction_id=tx))
    if answer.status != "Accepted":
        raise DemoFailed(f"RemoteStopTransaction {answer.status}")

    async def stopped() -> bool:
        return bool(csms.calls_of("StopTransaction"))

    await _until("StopTransaction", stopped, 30, proc)
    return tx


def _tx_id(csms: Csms) -> int | None:
    for frame in csms.frames:
        msg = frame.message
        if frame.direction == "out" and msg and msg[0] == 3 and isinstance(msg[2], dict) and "transactionId" in msg[2]:
            return int(msg[2]["transactionId"])
    return None


def _records(emulator: Emulator) -> Any:
    async def check() -> Any:
        return [r.body for r in emulator.received(kind=RequestKind.CHARGING_RECORDS) if r.accepted]

    return check
