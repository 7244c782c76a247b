"""No credential or token in any log line or log bundle.

``charger-agent run`` (config/sim.toml, every device simulated) runs as a subprocess with
``[logging] file`` set and level ``debug``, against the platform emulator. It registers
(device secret), gets an access token, lives through a platform outage (error paths log
failed requests), is told to ``force_reconnect`` (a second token) and uploads a log
bundle (``fetch_logs``) to a local upload server. Then every line it wrote -- the log
file and its rotations, its stdout/stderr -- and every file in the uploaded bundle is
scanned for the device secret, each issued access token, the ``Authorization`` header
value and a trailing fragment of each (a truncated header in an error message leaks too).

The test also insists that the log file exists and holds the agent's JSON lines: if file
logging breaks, this test fails rather than passing on an empty file. That is its job.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
import signal
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.emulator import Emulator, RequestKind

REPO = Path(__file__).resolve().parents[3]
SIM_CONFIG = REPO / "config" / "sim.toml"
TERMINAL = ("completed", "failed", "rejected")

pytestmark = pytest.mark.slow


async def until(what: str, check: Callable[[], Any], timeout: float, proc: asyncio.subprocess.Process, out: Path) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc.returncode is not None:
            raise AssertionError(f"agent exited ({proc.returncode}) while waiting for {what}\n{tail(out)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail(out)}")
        await asyncio.sleep(0.1)


def tail(path: Path, lines: int = 30) -> str:
    """The end of the agent's output, and of its log file (the agent.log next to it)."""
    log_file = path.parent / "logs" / "agent.log"
    if log_file.exists() and path.name != "agent.log":
        return _tail(path, lines) + "\n-- agent.log --\n" + _tail(log_file, lines)
    return _tail(path, lines)


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


class UploadServer:
    """Stands in for the object store a ``fetch_logs`` bundle goes to."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        async def store(request: web.Request) -> web.Response:
            self.bodies.append(await request.read())
            return web.Response(text="stored")

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/bundles/{name}", store)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self.runner.addresses[0][1])

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def bundle_files(body: bytes) -> dict[str, bytes]:
    """Every member of an uploaded .tar.gz bundle, decompressed (nested .gz too)."""
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
        for member in tar.getmembers():
            fh = tar.extractfile(member)
            if fh is None:
                continue
            data = fh.read()
            if member.name.endswith(".gz"):
                data = gzip.decompress(data)
            files[member.name] = data
    return files


async def test_no_secret_in_logs_or_bundle(tmp_path: Path) -> None:
    emulator = Emulator(token_ttl=3600.0)
    await emulator.start(host="127.0.0.1", port=0)
    tokens: list[str] = []
    issue = emulator.context.store.issue_token

    def capture(request: Any) -> Any:
        token, device = issue(request)
        tokens.append(token)
        return token, device

    emulator.context.store.issue_token = capture  # type: ignore[method-assign]
    uploads = UploadServer()
    await uploads.start()

    log_file = tmp_path / "logs" / "agent.log"
    log_file.parent.mkdir()
    config = tmp_path / "agent.toml"
    config.write_text(
        SIM_CONFIG.read_text(encoding="utf-8")
        + f'\n[logging]\nlevel = "debug"\nformat = "json"\nfile = "{log_file}"\n',
        encoding="utf-8",
    )
    state_dir = tmp_path / "state"
    out = tmp_path / "agent.out"  # stdout + stderr: whatever does not go to the file
    with out.open("wb") as fh:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", "run",
            "--config", str(config),
            "--platform-url", emulator.api_url,
            "--state-dir", str(state_dir),
            "--sim-root", str(tmp_path / "sim"),
            stdout=fh, stderr=fh, stdin=asyncio.subprocess.DEVNULL, cwd=str(tmp_path),
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def statuses(command_id: str) -> list[str]:
        return [s.status for s in emulator.context.store.command(command_id).view().statuses]

    def heartbeats() -> int:
        return sum(1 for r in emulator.received(kind=RequestKind.HEARTBEAT) if r.accepted)

    try:
        await until("the first heartbeat", lambda: heartbeats() >= 1, 45, proc, out)

        # an outage: failed requests, a reconnect, their error logs. A command queued now
        # comes back through the long poll held since before the outage; its status report
        # (rejected: a bad upload URL) then meets the 503 at once.
        seen = heartbeats()
        emulator.start_outage(60.0)
        emulator.queue_command(command="fetch_logs", params={"upload_url": "ftp://nowhere/x"}, command_id="bad-1")
        await until(
            "a request to fail in the outage",
            lambda: any(r.http_status == 503 for r in emulator.received()), 45, proc, out,
        )
        emulator.context.store.end_outage()
        await until("a heartbeat after the outage", lambda: heartbeats() > seen, 45, proc, out)

        # a second token: force_reconnect drops the connections and fetches a new one
        # (the second reconnect in the window: the reconnect budget lets it through at once)
        emulator.queue_command(command="force_reconnect", command_id="reconnect-1")
        await until("force_reconnect to end", lambda: any(s in TERMINAL for s in statuses("reconnect-1")), 45, proc, out)
        await until("a second access token", lambda: len(tokens) >= 2, 30, proc, out)

        # a log bundle, uploaded to a loopback "object store"
        url = f"http://127.0.0.1:{uploads.port}/bundles/logs.tar.gz?X-Amz-Signature=feedc0de"
        emulator.queue_command(command="fetch_logs", params={"upload_url": url}, command_id="logs-1")
        await until("fetch_logs to end", lambda: any(s in TERMINAL for s in statuses("logs-1")), 60, proc, out)
        assert "completed" in statuses("logs-1"), statuses("logs-1")
        assert uploads.bodies, "fetch_logs completed but nothing was uploaded"

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0, tail(out)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await uploads.stop()
        await emulator.stop()

    # -- what to look for
    creds = json.loads((state_dir / "credentials.json").read_text())
    secrets = {d.secret for d in emulator.context.store.devices()} | {str(creds["device_secret"])} | set(tokens)
    secrets.discard("")
    assert len(tokens) >= 2 and creds["device_secret"], "the scenario did not authenticate twice"
    needles = {f"secret {s[:6]}...": s for s in secrets}
    needles |= {f"fragment of {s[:6]}...": s[-16:] for s in secrets}
    needles |= {f"Authorization of {t[:6]}...": f"Bearer {t}" for t in tokens}

    # -- where to look
    log_files = sorted(log_file.parent.glob("agent.log*"))
    haystacks = {str(p.relative_to(tmp_path)): p.read_bytes() for p in log_files}
    haystacks["agent stdout/stderr"] = out.read_bytes()
    for i, body in enumerate(uploads.bodies):
        for name, data in bundle_files(body).items():
            haystacks[f"bundle {i}: {name}"] = data

    # the file log must be there and be the agent's: an empty or missing log proves nothing
    text = log_file.read_text(encoding="utf-8")
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    events = {line.get("event") for line in lines}
    assert {"agent_started", "agent_stopped"} <= events, f"log file lacks the agent's lifecycle: {sorted(events)[:20]}"
    assert all("level" in line and "timestamp" in line for line in lines)
    bundled = {name: data for name, data in haystacks.items() if name.startswith("bundle")}
    assert any(b"agent_started" in data for data in bundled.values()), f"the bundle lacks the log file: {sorted(bundled)}"

    leaks = [
        f"{what} in {where}"
        for where, data in haystacks.items()
        for what, needle in needles.items()
        if needle.encode() in data
    ]
    assert not leaks, "credentials leaked:\n" + "\n".join(leaks)
