"""Shared by the end-to-end benchmarks: the agent as a subprocess against an in-process emulator.

Same approach as ``agent/cli/demo.py``: the platform emulator runs on 127.0.0.1 in the benchmark's
own event loop, the agent is started as ``python -m agent run`` on a config with the in-process
simulated charger, its logs go to a file in a fresh temporary directory.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.emulator import Emulator
from agent.emulator.operator_models import RequestKind

SIM_CONFIG = ROOT / "config" / "sim.toml"


class BenchFailed(Exception):
    """A precondition of the measurement did not happen (the message says which)."""


def quiet_logs() -> None:
    """The emulator logs through structlog in this process: keep it to warnings."""
    from agent.service import logs

    logs.configure(level="warning", fmt="console")


def filesystem_of(path: Path) -> str:
    """The mount type holding ``path`` (from /proc/mounts), e.g. ext4 or tmpfs."""
    best, fstype = "", "unknown"
    try:
        resolved = str(path.resolve())
        with open("/proc/mounts") as fh:
            for line in fh:
                parts = line.split()
                mount = parts[1]
                if resolved.startswith(mount) and len(mount) > len(best):
                    best, fstype = mount, parts[2]
    except OSError:
        pass
    return fstype


def source_state() -> dict[str, Any]:
    """The commit measured and whether agent/ or hal/ had uncommitted changes (figures depend on them)."""
    import subprocess

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
            ).stdout.rstrip("\n")
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [
        line[3:]
        for line in git("status", "--porcelain", "--", "agent", "hal").splitlines()
        if line[:2].strip() and not line.startswith("??")
    ]
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or None, "uncommitted": dirty}


def describe_source(src: dict[str, Any]) -> str:
    text = f"agent at {src.get('commit') or '?'}"
    if src.get("uncommitted"):
        text += f" + uncommitted changes in {', '.join(src['uncommitted'])}"
    return text


class AgentUnderTest:
    """One emulator + one agent process; use as ``async with``."""

    def __init__(
        self,
        *,
        config: Path = SIM_CONFIG,
        rate_limits_enabled: bool = True,
        workdir: Path | None = None,
        keep: bool = False,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.extra_env = dict(extra_env or {})
        self.exec_at: float | None = None  # time.monotonic() right before the agent's exec
        self.emulator = Emulator(token_ttl=3600, rate_limits_enabled=rate_limits_enabled)
        # a caller's workdir is the caller's to remove (its other processes may still write there)
        self._owns_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="charger-bench-"))
        self.log_path = self.workdir / "agent.log"
        self.keep = keep
        self.proc: asyncio.subprocess.Process | None = None
        self.exit_code: int | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def __aenter__(self) -> Self:
        await self.emulator.start(host="127.0.0.1", port=0)
        with self.log_path.open("w") as log_file:
            self.exec_at = time.monotonic()
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "agent",
                "run",
                "--config",
                str(self.config),
                "--platform-url",
                self.emulator.api_url,
                "--state-dir",
                str(self.workdir / "state"),
                "--sim-root",
                str(self.workdir / "sim"),
                stdout=log_file,
                stderr=log_file,
                cwd=str(ROOT),
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env},
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self.proc is not None and self.proc.returncode is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.exit_code = await asyncio.wait_for(self.proc.wait(), 30)
                except TimeoutError:
                    self.proc.kill()
                    await self.proc.wait()
        finally:
            await self.emulator.stop()
        if self._owns_workdir and not self.keep and exc[0] is None:
            import shutil

            shutil.rmtree(self.workdir, ignore_errors=True)

    async def until(
        self,
        what: str,
        check: Callable[[], Any | Awaitable[Any]],
        timeout: float,
        step: float = 0.1,
    ) -> Any:
        """Poll ``check`` until truthy; fail if the agent exits or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.returncode is not None:
                raise BenchFailed(
                    f"the agent exited (status {self.proc.returncode}) while waiting for {what}; log: {self.log_path}"
                )
            value = check()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
            await asyncio.sleep(step)
        raise BenchFailed(
            f"timed out after {timeout:.0f} s waiting for {what}; log: {self.log_path}"
        )

    def events(
        self, event_type: str | None = None, connector_id: int | None = None
    ) -> list[dict[str, Any]]:
        out = []
        for r in self.emulator.received(kind=RequestKind.EVENTS):
            if not r.accepted or not isinstance(r.body, dict):
                continue
            if event_type is not None and r.body.get("event_type") != event_type:
                continue
            if connector_id is not None and r.body.get("connector_id") != connector_id:
                continue
            out.append(r.body)
        return out

    async def wait_registered(self, timeout: float = 60.0) -> None:
        await self.until(
            "the agent to register and send its first heartbeat",
            lambda: any(r.accepted for r in self.emulator.received(kind=RequestKind.HEARTBEAT)),
            timeout,
        )

    async def wait_plugged(self, connector_id: int, timeout: float = 60.0) -> None:
        await self.until(
            f"a plug_in event on connector {connector_id}",
            lambda: self.events("plug_in", connector_id),
            timeout,
        )

    def control_url(self) -> str:
        port = int((self.workdir / "sim" / "control.port").read_text())
        return f"http://127.0.0.1:{port}"
