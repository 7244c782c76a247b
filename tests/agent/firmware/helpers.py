"""Shared pieces of the firmware tests: keys, bundles, a range-capable HTTP server, fakes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from agent.firmware import boot
from agent.firmware.build import BuildResult, build_bundle
from agent.firmware.bundle import Bundle, generate_keypair, private_key_pem, public_key_b64
from agent.firmware.config import FirmwareConfig
from agent.firmware.installers import default_installers
from agent.firmware.manager import FirmwareManager
from agent.firmware.params import FirmwareUpgradeParams

ROOT = Path(__file__).resolve().parents[3]


@dataclass
class Keys:
    private_pem: Path
    public_b64: str


def make_keys(directory: Path, name: str = "signing") -> Keys:
    directory.mkdir(parents=True, exist_ok=True)
    private, public = generate_keypair()
    pem = directory / f"{name}.pem"
    pem.write_bytes(private_key_pem(private))
    return Keys(pem, public_key_b64(public))


def fake_bundle(directory: Path, keys: Keys, version: str = "0.2.0", size: int = 2 * 1024 * 1024, suffix: str = ".whl") -> BuildResult:
    """A signed bundle whose payload is random bytes (for installs that do not run pip)."""
    payload_dir = directory / f"payload-{version}"
    payload_dir.mkdir(parents=True, exist_ok=True)
    payload = payload_dir / (f"charger_agent-{version}-py3-none-any.whl" if suffix == ".whl" else f"update-{version}{suffix}")
    payload.write_bytes(os.urandom(size))
    return build_bundle(version=version, key=keys.private_pem, out_dir=directory / "dist", payload=payload)


# ----------------------------------------------------------------------------- release layout


def write_script(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n", encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def fake_release(root: Path, version: str, *, exit_code: int = 0) -> Path:
    """``releases/<version>/bin/charger-agent`` printing its version (or crashing)."""
    rel = root / "releases" / version
    if exit_code == 0:
        write_script(rel / "bin" / "charger-agent", f'echo "charger-agent {version}"')
    else:
        write_script(rel / "bin" / "charger-agent", f'echo "charger-agent {version} crashed" >&2; exit {exit_code}')
    return rel


def layout(root: Path, version: str = "0.1.0") -> None:
    fake_release(root, version)
    boot.switch_link(root, "current", version)


class FakeBuilder:
    """Stands in for the venv build: a release whose charger-agent prints the version (or crashes)."""

    def __init__(self, exit_code: int = 0, fail: str | None = None) -> None:
        self.exit_code = exit_code
        self.fail = fail
        self.calls: list[tuple[str, Path]] = []

    async def __call__(self, bundle: Bundle, target: Path) -> None:
        from agent.firmware.installers import InstallError

        self.calls.append((bundle.manifest.version, target))
        assert bundle.payload_path.is_file()
        if self.fail:
            target.mkdir(parents=True)
            raise InstallError(self.fail)
        if self.exit_code == 0:  # print the bundle's version, not the directory name
            write_script(target / "bin" / "charger-agent", f'echo "charger-agent {bundle.manifest.version}"')
        else:
            write_script(
                target / "bin" / "charger-agent",
                f'echo "charger-agent {bundle.manifest.version} crashed" >&2; exit {self.exit_code}',
            )


def run_current(root: Path) -> tuple[int, str]:
    import subprocess

    proc = subprocess.run([str(root / "current" / "bin" / "charger-agent"), "--version"], capture_output=True, text=True)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


# ----------------------------------------------------------------------------- HTTP


@dataclass
class FileServer:
    """Serves files with ETag / Range / If-Range; can cut the first response short."""

    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[dict[str, str]] = field(default_factory=list)
    drop_after: int | None = None  # bytes of the next full response before the connection is cut
    status_override: int | None = None
    base: str = ""
    runner: web.AppRunner | None = None

    def add(self, name: str, data: bytes) -> str:
        self.files[name] = data
        return f"{self.base}/fw/{name}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.requests.append(dict(request.headers))
        if self.status_override is not None:
            return web.Response(status=self.status_override)
        data = self.files.get(name)
        if data is None:
            return web.Response(status=404)
        etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
        start = 0
        rng = request.headers.get("Range")
        if rng and request.headers.get("If-Range", etag) == etag:
            m = re.fullmatch(r"bytes=(\d+)-", rng)
            assert m, rng
            start = int(m.group(1))
            if start >= len(data):
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
        body = data[start:]
        resp = web.StreamResponse(status=206 if start else 200)
        resp.headers["ETag"] = etag
        if start:
            resp.headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        resp.content_length = len(body)
        await resp.prepare(request)
        if self.drop_after is not None:
            cut, self.drop_after = self.drop_after, None
            await resp.write(body[:cut])
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.close()
            return resp
        for i in range(0, len(body), 65536):
            await resp.write(body[i : i + 65536])
        await resp.write_eof()
        return resp

    async def start(self) -> FileServer:
        app = web.Application()
        app.router.add_get("/fw/{name}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


# ----------------------------------------------------------------------------- fakes of the agent


class MemKV:
    """A KV store that survives a "restart" (the same object is handed to the next manager)."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    async def get(self, key: str, default: Any = None) -> Any:
        return json.loads(self.data[key]) if key in self.data else default

    async def set(self, key: str, value: Any) -> None:
        self.data[key] = json.dumps(value)

    async def delete(self, key: str) -> bool:
        return self.data.pop(key, None) is not None


class MemOutbox:
    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []

    async def put(self, kind: Any, payload: Any, *, key: str | None = None) -> int:
        self.items.append((kind, dict(payload)))
        return len(self.items)

    def firmware(self) -> list[dict[str, Any]]:
        return [p for k, p in self.items if k == "firmware_status"]


class Statuses:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str | None, dict[str, Any] | None]] = []

    def __call__(self, command_id: str, status: str, message: str | None = None, details: dict[str, Any] | None = None) -> None:
        self.calls.append((command_id, status, message, details))

    def statuses(self) -> list[str]:
        return [c[1] for c in self.calls]

    def last(self) -> tuple[str, str, str | None, dict[str, Any] | None]:
        return self.calls[-1]


class FakeTime:
    """``clock``/``sleep`` pair: sleeping advances the clock instantly."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.001)
        await asyncio.sleep(0)


@dataclass
class Rig:
    """One charger: install root, state dir, persistent KV/outbox/statuses across "restarts"."""

    tmp: Path
    keys: Keys
    time: FakeTime = field(default_factory=FakeTime)
    kv: MemKV = field(default_factory=MemKV)
    outbox: MemOutbox = field(default_factory=MemOutbox)
    statuses: Statuses = field(default_factory=Statuses)
    restarts: list[str] = field(default_factory=list)
    session: bool = False
    holds: list[str | None] = field(default_factory=list)
    restart_error: Exception | None = None

    @property
    def root(self) -> Path:
        return self.tmp / "opt"

    @property
    def state(self) -> Path:
        return self.tmp / "state"

    def config(self, **overrides: Any) -> FirmwareConfig:
        values: dict[str, Any] = {
            "public_key": self.keys.public_b64,
            "install_root": self.root,
            "health_timeout_s": 120.0,
            "max_boot_attempts": 3,
            "download_attempts": 3,
        }
        values.update(overrides)
        return FirmwareConfig(**values)

    def manager(
        self, running: str, builder: Any = None, *, installers: Any = None, progress_interval_s: float = 0.0, **cfg: Any
    ) -> FirmwareManager:
        config = self.config(**cfg)

        async def restart(kind: str) -> None:
            if self.restart_error is not None:
                raise self.restart_error
            self.restarts.append(kind)

        async def hold(reason: str | None) -> bool:
            if reason is not None and self.session:
                return False
            self.holds.append(reason)
            return True

        if installers is None and builder is not None:
            installers = default_installers(config, self.state, clock=self.time.clock, builder=builder)
        return FirmwareManager(
            config,
            state_dir=self.state,
            kv=self.kv,
            outbox=self.outbox,
            command_status=self.statuses,
            running_version=running,
            any_session=lambda: self.session,
            request_restart=restart,
            hold_charging=hold,
            installers=installers,
            clock=self.time.clock,
            sleep=self.time.sleep,
            poll_s=1.0,
            download_backoff_s=0.01,
            progress_interval_s=progress_interval_s,
        )


def params(result: BuildResult, url: str, **overrides: Any) -> FirmwareUpgradeParams:
    values = {**result.params(), "url": url}
    values.update(overrides)
    values = {k: v for k, v in values.items() if v is not None}
    return FirmwareUpgradeParams.model_validate(values)
