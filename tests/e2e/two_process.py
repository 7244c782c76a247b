"""The two-process bench as tests run it: ``charger-agent sim`` and ``charger-agent run`` (or
``probe``) as separate processes on ``config/bench-udp.toml``, CAN frames between them over
python-can's ``udp_multicast``, Modbus on loopback TCP, the platform emulator as a third
process.

Every test gets its own copy of the config with a unique multicast group and port, its own
loopback TCP ports, simulator root and state directory, so tests running in parallel never
hear each other (on Linux every socket bound to a UDP port receives every multicast group
joined on that port, hence the unique port).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH_UDP = REPO / "config" / "bench-udp.toml"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port nobody on 127.0.0.1 uses right now (TCP by default, ``SOCK_DGRAM`` for UDP)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sub(pattern: str, replacement: str, text: str) -> str:
    new, count = re.subn(pattern, replacement, text, count=1, flags=re.M)
    if count != 1:
        raise AssertionError(f"config/bench-udp.toml no longer has {pattern!r}")
    return new


def derive_config(workdir: Path) -> Path:
    """A copy of bench-udp.toml whose bus, ports and directories are this test's alone."""
    text = BENCH_UDP.read_text()
    group = f"239.74.{random.randrange(1, 255)}.{random.randrange(1, 255)}"
    text = _sub(r'^channel = "239\.[0-9.]+"', f'channel = "{group}"', text)
    text = _sub(r"options = \{ port = \d+, hop_limit = 0 \}",
                f"options = {{ port = {free_port(socket.SOCK_DGRAM)}, hop_limit = 0 }}", text)
    text = _sub(r"^tcp_port = 15030", f"tcp_port = {free_port()}", text)
    text = _sub(r"^tcp_port = 15031", f"tcp_port = {free_port()}", text)
    text = _sub(r"^control_port = \d+", f"control_port = {free_port()}", text)
    text = _sub(r'^root = "/tmp/charger-sim-udp"', f'root = "{workdir / "sim"}"', text)
    text = _sub(r'^state_dir = "[^"]*"', f'state_dir = "{workdir / "state"}"', text)
    path = workdir / "bench-udp.toml"
    path.write_text(text)
    return path


@dataclass
class Proc:
    """One child process with its output in a file."""

    name: str
    proc: asyncio.subprocess.Process
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def wait_line(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """Wait until the process output contains ``pattern`` (a regex); fail if it exits."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            found = re.search(pattern, self.log())
            if found:
                return found
            if self.proc.returncode is not None:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}):\n{self.log()[-3000:]}")
            if loop.time() > deadline:
                raise AssertionError(f"{self.name}: no {pattern!r} within {timeout:g} s:\n{self.log()[-3000:]}")
            await asyncio.sleep(0.05)

    async def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        return self.proc.returncode


@dataclass
class Bench:
    """The processes of one two-process bench, stopped in reverse order by :meth:`close`."""

    workdir: Path
    config: Path
    procs: list[Proc] = field(default_factory=list)

    async def spawn(self, name: str, *args: str) -> Proc:
        log_path = self.workdir / f"{name}.log"
        with log_path.open("w") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent", *args,
                stdout=out, stderr=out, stdin=asyncio.subprocess.DEVNULL, cwd=str(self.workdir),
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        p = Proc(name, proc, log_path)
        self.procs.append(p)
        return p

    async def emulator(self) -> str:
        """Start the platform emulator process; returns its base URL (``.../v1`` is the API)."""
        p = await self.spawn("emulator", "emulator", "--", "--port", "0", "--log-level", "warning")
        return (await p.wait_line(r"emulator listening on (http://\S+)")).group(1)

    async def sim(self) -> Proc:
        p = await self.spawn("sim", "sim", "--config", str(self.config), "--log-level", "warning")
        await p.wait_line(r"can bus modules: udp_multicast")
        return p

    async def close(self) -> None:
        for p in reversed(self.procs):
            await p.stop()
