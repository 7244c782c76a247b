"""The agent on ``config/sim.toml`` plus an ``[ocpp]`` section, against the local CSMS
(:class:`agent.csms.Csms`, validating every frame both ways) and the Tellus emulator."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from ocpp.v16 import call

from agent.csms import Csms
from agent.emulator import Emulator
from tests.e2e.harness import SIM_CONFIG, AgentRun, Rig

T = TypeVar("T")
CP_ID = "SIM-0000001"
PASSWORD = "ocpp-e2e-secret"


def ocpp_config(workdir: Path, csms_url: str, extra: str = "") -> Path:
    """config/sim.toml with an [ocpp] section appended (the repo's file is not changed)."""
    path = workdir / "sim-ocpp.toml"
    path.write_text(
        SIM_CONFIG.read_text()
        + f'\n[ocpp]\nurl = "{csms_url}"\npassword = "{PASSWORD}"\nreconnect_max_s = 20\ncall_timeout_s = 10\n{extra}\n'
    )
    return path


@dataclass
class OcppRig(Rig):
    csms: Csms | None = None
    config: Path | None = None

    async def start(self) -> AgentRun:
        assert not self.runs or self.run.proc.returncode is not None, "previous run still alive"
        assert self.config is not None
        index = len(self.runs) + 1
        sim_root = self.workdir / f"sim-{index}"
        log_path = self.workdir / f"agent-{index}.log"
        with log_path.open("w") as log_file:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent", "run",
                "--config", str(self.config),
                "--platform-url", self.emulator.api_url,
                "--state-dir", str(self.state_dir),
                "--sim-root", str(sim_root),
                stdout=log_file, stderr=log_file, stdin=asyncio.subprocess.DEVNULL,
                cwd=str(self.workdir),
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        run = AgentRun(index, proc, log_path, sim_root, self.last_seq())
        self.runs.append(run)
        return run

    @property
    def cs(self) -> Csms:
        assert self.csms is not None
        return self.csms

    def payloads(self, action: str, since: int = 0) -> list[dict[str, Any]]:
        return [c.payload for c in self.cs.calls_of(action)[since:]]

    async def booted(self) -> None:
        await self.until("boot accepted at the CSMS", lambda: self.cs.connected(CP_ID), timeout=30)

    async def remote_start(self, tag: str, *, sample_interval_s: int = 5) -> None:
        """Start the agent, wait for boot and plug-in, set MeterValueSampleInterval, RemoteStart ``tag``."""
        await self.start()
        await self.booted()
        await self.plugged()
        interval = call.ChangeConfiguration(key="MeterValueSampleInterval", value=str(sample_interval_s))
        assert (await self.cs.call(CP_ID, interval)).status == "Accepted"
        assert (await self.cs.call(CP_ID, call.RemoteStartTransaction(id_tag=tag, connector_id=1))).status == "Accepted"

    async def control(self, path: str, body: dict[str, Any] | None = None) -> Any:
        port = (self.run.sim_root / "control.port").read_text().strip()
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{port}{path}", json=body or {}) as resp:
                return await resp.json()


async def with_ocpp_rig(workdir: Path, scenario: Callable[[OcppRig], Awaitable[T]], extra: str = "") -> T:
    emulator = Emulator(token_ttl=3600)
    await emulator.start(host="127.0.0.1", port=0)
    csms = Csms(password=PASSWORD, heartbeat_interval=60)
    await csms.start()
    rig = OcppRig(emulator, workdir, csms=csms, config=ocpp_config(workdir, csms.url, extra))
    try:
        return await scenario(rig)
    finally:
        await rig.close()
        await csms.stop()
        await emulator.stop()


def run_ocpp_scenario(tmp_path_factory: Any, name: str, scenario: Callable[[OcppRig], Awaitable[OcppRig]], extra: str = "") -> OcppRig:
    workdir: Path = tmp_path_factory.mktemp(name)
    return asyncio.run(with_ocpp_rig(workdir, scenario, extra))
