"""The bench as two processes on any machine: ``charger-agent sim`` and ``charger-agent run``
on config/bench-udp.toml, CAN over python-can's udp_multicast, Modbus on loopback TCP, the
platform emulator as a third process; and ``probe`` reading the simulated charger from a
second process."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from agent.emulator.operator_client import OperatorClient
from agent.emulator.operator_models import RequestKind
from tests.e2e.two_process import Bench, derive_config

pytestmark = pytest.mark.slow

TX = "two-process-1"


async def _events(op: OperatorClient, connector: int) -> list[str]:
    return [
        r.body["event_type"]
        for r in await op.received(RequestKind.EVENTS)
        if r.accepted and isinstance(r.body, dict) and r.body.get("connector_id") == connector
    ]


async def _until(what: str, check, bench: Bench, timeout: float = 45.0):  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await check()
        if value:
            return value
        for p in bench.procs:
            if p.proc.returncode is not None:
                raise AssertionError(f"{p.name} exited ({p.proc.returncode}) waiting for {what}:\n{p.log()[-3000:]}")
        if loop.time() > deadline:
            agent = next((p for p in bench.procs if p.name == "agent"), None)
            raise AssertionError(f"timed out waiting for {what}\n{agent.log()[-3000:] if agent else ''}")
        await asyncio.sleep(0.2)


async def test_session_with_simulator_agent_and_emulator_as_three_processes(tmp_path: Path) -> None:
    bench = Bench(tmp_path, derive_config(tmp_path))
    try:
        url = await bench.emulator()
        await bench.sim()
        agent = await bench.spawn(
            "agent", "run", "--config", str(bench.config), "--platform-url", url + "/v1",
            "--state-dir", str(tmp_path / "state"),
        )
        async with OperatorClient(url) as op:
            await _until("the vehicle's plug_in on connector 1",
                         lambda: _async_in("plug_in", _events(op, 1)), bench)
            start = await op.queue_command("start_charging", {"transaction_id": TX}, connector_id=1)
            await _until("charging on connector 1", lambda: _async_in("start", _events(op, 1)), bench, 60.0)
            await op.wait_for_status(start, "accepted", timeout=30)
            await asyncio.sleep(3.0)  # charge a little: energy flows through the udp_multicast modules
            stop = await op.queue_command("stop_charging", {}, connector_id=1)
            records = await _until("the charging record", lambda: _records(op), bench, 60.0)
            await op.wait_for_status(stop, "completed", timeout=30)
            start_statuses = [s.status for s in (await op.command(start)).statuses]
            received = await op.received(RequestKind.CHARGING_RECORDS)
        assert len(records) == 1
        assert "failed" not in start_statuses and "rejected" not in start_statuses
        record = records[0].body
        assert record["transaction_id"] == TX and records[0].duplicate_attempts == 0
        assert record["energy"] > 0
        assert record["energy"] == pytest.approx(record["meter_end"] - record["meter_start"], abs=1e-3)
        assert any(r.accepted for r in received)  # the platform accepted the record
        assert await agent.stop() == 0
        log = agent.log()
        assert "udp_multicast" in log  # the agent's bus was the multicast one
    finally:
        await bench.close()


async def _async_in(item: str, coro) -> bool:  # type: ignore[no-untyped-def]
    return item in await coro


async def _records(op: OperatorClient) -> list:  # type: ignore[type-arg]
    return [r for r in await op.charging_records() if r.body.get("transaction_id") == TX]


async def test_probe_reads_the_simulated_charger_over_udp_multicast(tmp_path: Path) -> None:
    bench = Bench(tmp_path, derive_config(tmp_path))
    try:
        await bench.sim()
        probe = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", "probe", "--config", str(bench.config), "--json",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(probe.communicate(), 60)
        assert probe.returncode == 0, err.decode()[-3000:]
        report = json.loads(out)
        devices = {d["name"]: d for d in report["devices"]}
        modules = devices["connector1.modules"]
        assert modules["ok"], modules
        bus = modules["readings"]["bus"]
        assert bus["interface"] == "udp_multicast" and bus["options"]["hop_limit"] == 0
        assert bus["channel"].startswith("239.74.")
        assert [m["address"] for m in modules["readings"]["modules"]] == [0, 1]
        assert all(m["online"] and m["ratings"]["max_current"] == 60.0 for m in modules["readings"]["modules"])
        assert report["ok"] and len(devices) == 9
        # the table form names the interface and options too
        table = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", "probe", "--config", str(bench.config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        text, _ = await asyncio.wait_for(table.communicate(), 60)
        assert f"interface udp_multicast channel '{bus['channel']}'  options {{hop_limit=0, port={bus['options']['port']}}}" in text.decode()
    finally:
        await bench.close()
