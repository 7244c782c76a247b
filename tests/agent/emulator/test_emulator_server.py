"""Library lifecycle, create_app, operator config and the command line entry point."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from agent.emulator import Emulator, OperatorClient, create_app
from agent.emulator.cli import build_parser
from tests.agent.emulator.emu_testkit import (
    HEARTBEAT,
    REGISTRATION,
    assert_ok,
    call,
    register_device,
)

REPO = Path(__file__).resolve().parents[3]


async def test_start_binds_loopback_on_a_free_port_and_stop_is_idempotent() -> None:
    emu = Emulator()
    with pytest.raises(RuntimeError):
        _ = emu.port
    port = await emu.start()
    try:
        assert port > 0 and emu.port == port
        assert emu.base_url == f"http://127.0.0.1:{port}"
        assert emu.api_url == f"http://127.0.0.1:{port}/v1"
        assert emu.operator_url == f"http://127.0.0.1:{port}/emulator"
        with pytest.raises(RuntimeError):
            await emu.start()
        async with OperatorClient(emu.operator_url) as op:
            assert await op.health()
    finally:
        await emu.stop()
    await emu.stop()
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            await call(http, "GET", f"http://127.0.0.1:{port}/emulator/health", timeout=2)


async def test_stop_releases_a_held_long_poll() -> None:
    async with aiohttp.ClientSession() as http:
        emu = Emulator()
        await emu.start()
        device = await register_device(http, emu.api_url)
        poll = asyncio.create_task(device.poll({"connector_id": "1", "wait": "30"}))
        deadline = time.monotonic() + 5
        while emu.context.broker.waiting == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        started = time.monotonic()
        await emu.stop()
        reply = await asyncio.wait_for(poll, 5)
        assert time.monotonic() - started < 5
        assert_ok(reply)
        assert reply.data is None


async def test_create_app_works_with_aiohttp_test_server() -> None:
    async with TestClient(TestServer(create_app())) as client:
        resp = await client.post("/v1/device/register", json=REGISTRATION)
        assert resp.status == 200
        body = await resp.json()
        assert body["code"] == 0 and body["data"]["device_id"]


async def test_library_shortcuts_and_context_manager() -> None:
    async with Emulator(token_ttl=5) as emu, aiohttp.ClientSession() as http:
        device = await register_device(http, emu.api_url)
        command_id = emu.queue_command(command="reboot")
        reply = await device.heartbeat()
        assert [c["command_id"] for c in reply.data["commands"]] == [command_id]
        assert emu.expire_tokens() == 1
        assert (await device.heartbeat()).status == 401
        assert len(emu.received()) == 4
        emu.reset()
        assert emu.received() == []


async def test_runtime_config_changes_token_ttl(
    emulator: Emulator, http: aiohttp.ClientSession, operator: OperatorClient
) -> None:
    assert (await operator.get_config()).token_ttl == 60
    updated = await operator.update_config(token_ttl=5, secret_ttl=3600)
    assert (updated.token_ttl, updated.secret_ttl) == (5, 3600)
    reg = await call(http, "POST", emulator.api_url + "/device/register", json_body=REGISTRATION)
    assert reg.data["expires_in"] == 3600
    tok = await call(http, "POST", emulator.api_url + "/device/token", json_body={
        "device_id": reg.data["device_id"], "device_secret": reg.data["device_secret"],
        "grant_type": "client_credentials"})
    assert tok.body["expires_in"] == 5


def test_cli_defaults_bind_loopback() -> None:
    args = build_parser().parse_args([])
    assert (args.host, args.port, args.token_ttl, args.no_rate_limit) == (
        "127.0.0.1", 8080, 86400.0, False)


def test_cli_runs_until_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.emulator", "--port", "0", "--token-ttl", "30"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert proc.stdout is not None
        url = ""
        deadline = time.monotonic() + 20
        while not url and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.startswith("emulator listening on "):
                url = line.split()[-1]
        assert url.startswith("http://127.0.0.1:")

        async def exercise() -> None:
            async with aiohttp.ClientSession() as http:
                device = await register_device(http, url + "/v1")
                reply = await call(http, "POST", url + "/v1/device/heartbeat",
                                   json_body=HEARTBEAT, token=device.token)
                assert_ok(reply)

        asyncio.run(exercise())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
