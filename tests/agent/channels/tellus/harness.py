"""Wires the real uplink (PlatformHttp + TokenManager + Uplink) to the real emulator on
127.0.0.1 and a real :class:`agent.store.Store`, all on one event loop's clock."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.emulator import Emulator, RequestKind
from agent.emulator.operator_models import ReceivedRequest
from agent.store import Credentials, Store
from agent.channels.tellus.auth import Identity, TokenManager
from agent.channels.tellus.client import PlatformHttp
from agent.channels.tellus.uplink import Uplink

IDENTITY = Identity(
    sn="SN-UPLINK-1", model="TP-DC180", manufacturer="Tellus Power", firmware_version="260420.0107"
)

TELEMETRY = {
    "timestamp": "2025-03-15T10:30:05Z",
    "connector_id": 1,
    "state": "charging",
    "voltage": 400.0,
    "current": 100.0,
    "power": 40.0,
    "energy_delivered": 3.2,
}


def telemetry(n: int, connector_id: int = 1) -> dict[str, Any]:
    """Sample ``n``: the strict emulator refuses unknown fields, so ``n`` travels as the
    energy value (read it back with :func:`telemetry_seq`)."""
    return {**TELEMETRY, "connector_id": connector_id, "energy_delivered": float(n)}


def telemetry_seq(body: dict[str, Any]) -> int:
    return int(body["energy_delivered"])


def event(n: int, connector_id: int = 1) -> dict[str, Any]:
    return {
        "timestamp": "2025-03-15T10:36:00Z",
        "event_type": "start",
        "connector_id": connector_id,
        "data": {"reason": f"remote_start-{n}"},
    }


def record(record_id: str, connector_id: int = 1) -> dict[str, Any]:
    return {
        "record_id": record_id,
        "connector_id": connector_id,
        "start_time": "2025-03-15T09:00:00Z",
        "end_time": "2025-03-15T10:30:00Z",
        "energy": 15.2,
        "max_power": 7.2,
        "avg_power": 6.8,
        "meter_start": 12345.6,
        "meter_end": 12360.8,
    }


def command_status(command_id: str, status: str = "accepted") -> dict[str, Any]:
    return {"command_id": command_id, "status": status, "timestamp": "2025-03-15T10:00:00Z"}


def firmware_status(progress: int) -> dict[str, Any]:
    return {"firmware_version": "2.2.0", "status": "downloading", "progress": progress}


@dataclass
class Delivered:
    command: dict[str, Any]
    channel: str
    connector_id: int | None


@dataclass
class Harness:
    emu: Emulator
    store: Store
    state_dir: Path
    connector_ids: list[int]
    delivered: list[Delivered] = field(default_factory=list)
    status: tuple[str, int] = ("online", 0)
    uplink_kwargs: dict[str, Any] = field(default_factory=dict)
    #: (loop time, entry) for every request the emulator logged
    log: list[tuple[float, ReceivedRequest]] = field(default_factory=list)
    on_deliver: Callable[[Delivered], Awaitable[None]] | None = None
    _uplinks: list[Uplink] = field(default_factory=list)

    async def deliver(self, cmd: dict[str, Any], channel: str, connector_id: int | None) -> None:
        item = Delivered(cmd, channel, connector_id)
        self.delivered.append(item)
        if self.on_deliver is not None:
            await self.on_deliver(item)

    def times(self, kind: RequestKind, *, accepted: bool | None = None) -> list[float]:
        """Loop times at which the emulator logged requests of ``kind``."""
        return [
            t
            for t, r in self.log
            if r.kind == kind and (accepted is None or r.accepted == accepted)
        ]

    def make_uplink(self, **overrides: Any) -> Uplink:
        loop = asyncio.get_running_loop()
        http = PlatformHttp(self.emu.api_url, timeout_s=15.0)
        tokens = TokenManager(
            http,
            self.store.credentials,
            IDENTITY,
            lambda device_id, secret: Credentials(device_id=device_id, device_secret=secret),
            clock=loop.time,
            rng=random.Random(1),
        )
        kwargs: dict[str, Any] = {
            "http": http,
            "tokens": tokens,
            "outbox": self.store.outbox,
            "deliver": self.deliver,
            "heartbeat_status": lambda: self.status,
            "connector_ids": self.connector_ids,
            "heartbeat_interval_s": 30.0,
            "long_poll_wait_s": 30,
            "clock": loop.time,
            "rng": random.Random(2),
        }
        kwargs.update(self.uplink_kwargs)
        kwargs.update(overrides)
        uplink = Uplink(**kwargs)
        self._uplinks.append(uplink)
        return uplink

    async def started(self, **overrides: Any) -> Uplink:
        uplink = self.make_uplink(**overrides)
        await uplink.start()
        await wait_for(lambda: uplink.online, timeout=30)
        return uplink

    async def wait_delivered(self, n: int, timeout: float = 60.0) -> None:
        await wait_for(lambda: len(self.delivered) >= n, timeout=timeout)

    def received(self, kind: RequestKind | None = None) -> list[ReceivedRequest]:
        return self.emu.received(kind=kind)

    def accepted(self, kind: RequestKind) -> list[ReceivedRequest]:
        return [r for r in self.emu.received(kind=kind) if r.accepted]

    async def drained(self, timeout: float = 600.0) -> None:
        await wait_for(lambda: self.store.outbox.total_depth() == 0, timeout=timeout)


async def wait_for(predicate: Any, *, timeout: float, step: float | None = None) -> None:
    """Poll ``predicate`` every ``step`` (loop time; default ``timeout / 200``, at least
    0.25 s: every poll costs a little real time) until true; fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    step = step if step is not None else max(0.25, timeout / 200)
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(step)


@contextlib.asynccontextmanager
async def harness(
    state_dir: Path,
    *,
    connector_ids: list[int] | None = None,
    token_ttl: float = 86400.0,
    rate_limits_enabled: bool = False,
    **uplink_kwargs: Any,
) -> AsyncIterator[Harness]:
    """An emulator (on this loop's clock) + an opened store; uplinks made through the
    harness are stopped (without a final heartbeat) on exit."""
    loop = asyncio.get_running_loop()
    emu = Emulator(token_ttl=token_ttl, rate_limits_enabled=rate_limits_enabled, clock=loop.time)
    await emu.start(port=0)
    store = await Store.open(state_dir)
    track = getattr(loop, "track", None)
    if track is not None:  # virtual time: a commit on the writer thread takes no virtual time
        submit = store.db.submit

        def tracked_submit(fn: Any, **kwargs: Any) -> Any:
            future = submit(fn, **kwargs)
            track(future)
            return future

        store.db.submit = tracked_submit  # type: ignore[method-assign]
    h = Harness(
        emu,
        store,
        state_dir,
        [1] if connector_ids is None else connector_ids,
        uplink_kwargs=uplink_kwargs,
    )
    emu_store = emu.context.store
    record_request = emu_store.record_request

    def logged(**kwargs: Any) -> ReceivedRequest:
        entry = record_request(**kwargs)
        h.log.append((loop.time(), entry))
        return entry

    emu_store.record_request = logged  # type: ignore[method-assign]
    try:
        yield h
    finally:
        for uplink in h._uplinks:
            await uplink.stop(final_heartbeat=False)
        await store.close()
        await emu.stop()
