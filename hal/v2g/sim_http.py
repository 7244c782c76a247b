"""The simulated V2G stage, reached over the simulator's loopback control channel.

No publicly documented protocol for a bidirectional DC/AC stage was available to
this project (the bidirectional InfyPower BEG1K075G register commands are known
from a single driver only), so the V2G stage has a HAL contract
(:class:`hal.interfaces.Bidirectional`) and this backend, which talks HTTP/JSON to
the simulator's control endpoint (``GET``/``POST /v2g/<connector>``): the
simulator may run in the agent's process or in its own (bench), and the same code
path is used. A real stage plugs in as another driver behind the same contract.

Behaviour: polled every ``poll_interval_s``; a status older than ``stale_after_s``
is withheld (health STALE ``comm_timeout``). ``discharge``/``stop_discharge`` raise
``RuntimeError`` when the stage does not answer within ``request_timeout_s``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from pydantic import Field

from hal.config import StrictModel
from hal.context import BuildContext
from hal.interfaces import BidirectionalStatus, Health, HealthState
from hal.tasks import stop_task

log = structlog.get_logger(__name__)


class SimHttpBidirectional:
    class Options(StrictModel):
        control_port_file: str = Field(..., min_length=1, description="file holding the simulator's control port")
        poll_interval_s: float = Field(0.5, gt=0.0, le=10.0)
        stale_after_s: float = Field(3.0, gt=0.0, le=60.0)
        request_timeout_s: float = Field(2.0, gt=0.0, le=30.0)

    def __init__(self, name: str, options: "SimHttpBidirectional.Options", ctx: BuildContext) -> None:
        if ctx.connector_id is None:
            raise ValueError("the V2G stage belongs to a connector")
        self.name = name
        self.options = options
        self.connector_id = ctx.connector_id
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._status: dict[str, Any] | None = None
        self._status_at = 0.0
        self._error: str | None = None

    def _url(self) -> str:
        port = int(Path(self.options.control_port_file).read_text().strip())
        return f"http://127.0.0.1:{port}/v2g/{self.connector_id}"

    async def start(self) -> None:
        if self._task is not None:
            return
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.options.request_timeout_s))
        await self._poll_once()
        self._task = asyncio.create_task(self._poll(), name=f"{self.name}-poll")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)
        if self._session is not None:
            try:
                await self._post({"power_kw": 0.0})
            except RuntimeError:
                pass
            await self._session.close()
            self._session = None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.options.poll_interval_s)
            await self._poll_once()

    async def _poll_once(self) -> None:
        assert self._session is not None
        try:
            async with self._session.get(self._url()) as resp:
                body = await resp.json()
            if not isinstance(body, dict):
                raise ValueError("unexpected answer")
            self._status, self._status_at, self._error = body, time.monotonic(), None
        except (OSError, ValueError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            if self._error is None:
                log.warning("v2g_stage_unreachable", stage=self.name, error=str(exc))
            self._error = f"{type(exc).__name__}: {exc}"

    async def _post(self, body: dict[str, Any]) -> None:
        if self._session is None:
            raise RuntimeError("V2G stage not started")
        try:
            async with self._session.post(self._url(), json=body) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"V2G stage refused: HTTP {resp.status} {await resp.text()}")
        except (OSError, ValueError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise RuntimeError(f"V2G stage not answering: {exc}") from None
        await self._poll_once()

    async def discharge(self, voltage: float, power_kw: float) -> None:
        await self._post({"power_kw": max(0.0, power_kw), "voltage": voltage})

    async def stop_discharge(self) -> None:
        await self._post({"power_kw": 0.0})

    def _fresh(self) -> dict[str, Any] | None:
        if self._status is None or time.monotonic() - self._status_at > self.options.stale_after_s:
            return None
        return self._status

    def health(self) -> Health:
        if self._fresh() is None:
            return Health(HealthState.STALE, "comm_timeout", self._error or "no status from the V2G stage")
        return Health()

    def status(self) -> BidirectionalStatus:
        s = self._fresh()
        if s is None:
            return BidirectionalStatus(False, None, False, 0, None, self.health())
        return BidirectionalStatus(
            active=bool(s.get("active")),
            power_kw=float(s.get("power_kw", 0.0)),
            grid_synced=bool(s.get("synced", True)),
            cycles=int(s.get("cycles", 0)),
            harmonic_distortion_pct=s.get("thd_pct"),
        )

    def describe(self) -> dict[str, Any]:
        return {"driver": "sim_http", "connector": self.connector_id, "status": self._fresh()}
