"""Remote power limits (``set_power_limit`` / ``pause_charging``) with automatic revert.

Each limit lasts ``duration`` seconds; limits stack: the newest unexpired one is in
force, and when it elapses the previous one (if still running) applies again, else
no remote limit -- "revert to the previous limit" (platform-api §8.3). Limits are
persisted in the key/value store with their wall-clock end, so a restart keeps them.
When every connector entry of a command has elapsed, the command is reported
``completed``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import structlog

from agent.charging.connector import Connector

log = structlog.get_logger(__name__)

KV_KEY = "power_limits"
SOURCE = "remote_limit"


@dataclass
class LimitEntry:
    command_id: str
    connector_id: int
    kw: float
    ends_at: float  # unix time
    reason: str | None = None


class PowerLimits:
    def __init__(
        self,
        kv: Any,
        connectors: dict[int, Connector],
        on_completed: Callable[[str, dict[str, Any]], None],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.kv = kv
        self.connectors = connectors
        self.on_completed = on_completed
        self.clock = clock
        self.entries: list[LimitEntry] = []

    async def load(self) -> None:
        stored = await self.kv.get(KV_KEY, [])
        self.entries = [LimitEntry(**e) for e in stored if isinstance(e, dict)]
        await self.tick()

    async def _persist(self) -> None:
        await self.kv.set(KV_KEY, [asdict(e) for e in self.entries])

    async def add(self, command_id: str, connector_ids: list[int], percent: float, duration_s: float, reason: str | None) -> dict[int, float]:
        """Apply ``percent`` of each connector's rated power for ``duration_s``; return kW per connector."""
        ends = self.clock() + duration_s
        applied = {}
        for cid in connector_ids:
            kw = round(self.connectors[cid].config.max_power_kw * percent / 100.0, 3)
            self.entries.append(LimitEntry(command_id, cid, kw, ends, reason))
            applied[cid] = kw
        await self._persist()
        self.apply()
        return applied

    def apply(self) -> None:
        for cid, connector in self.connectors.items():
            mine = [e for e in self.entries if e.connector_id == cid]
            connector.set_limit(SOURCE, mine[-1].kw if mine else None)

    async def tick(self) -> None:
        """Drop elapsed limits, report finished commands, re-apply what is left."""
        now = self.clock()
        expired = [e for e in self.entries if e.ends_at <= now]
        if not expired:
            return
        self.entries = [e for e in self.entries if e.ends_at > now]
        await self._persist()
        self.apply()
        live_ids = {e.command_id for e in self.entries}
        for command_id in sorted({e.command_id for e in expired} - live_ids):
            log.info("power_limit_reverted", command_id=command_id)
            self.on_completed(command_id, {"reverted": True})
