"""The Tellus Open Platform channel as the rest of the agent sees it.

:class:`TellusChannel` builds the HTTP client, token manager and :class:`Uplink` from
config, and offers the few operations other parts need: start, a bounded stop that
lets urgent reports out first, ``force_reconnect`` with a deadline, the heartbeat
status projection of the fault board (platform-api §6), the reconnect-storm fault
(F-0302), and its part of the status snapshot. A second channel (OCPP) sits beside
it under :mod:`agent.channels` with the same shape; neither depends on the other.

Nothing here blocks charging: every method returns within its stated bound even
when the platform is unreachable.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

import structlog

from agent import __version__
from agent.channels.tellus.auth import Identity, TokenManager
from agent.channels.tellus.client import PlatformHttp
from agent.channels.tellus.uplink import Uplink
from agent.charging.faults import FaultBoard, Severity, most_severe, numeric_code
from agent.config import AgentConfig
from agent.service.sdnotify import IDLE
from agent.store import Credentials, Store

log = structlog.get_logger(__name__)

#: Outbox kinds a clean shutdown tries to deliver before the final heartbeat.
URGENT_KINDS = ("command_status", "charging_record", "event", "firmware_status")
SHUTDOWN_DRAIN_S = 5.0


def heartbeat_status(faults: FaultBoard) -> tuple[str, int]:
    """``fault`` + the most severe error's numeric code when an error is active, else ``online``/0 (§6)."""
    errors = [f for f in faults.active() if f.definition.severity is Severity.ERROR]
    worst = most_severe(errors)
    return ("fault", numeric_code(worst.fault_id)) if worst else ("online", 0)


class TellusChannel:
    """The platform uplink built from ``[platform]``; see the module contract."""

    def __init__(
        self,
        cfg: AgentConfig,
        store: Store,
        faults: FaultBoard,
        deliver: Callable[[Any, str, int | None], Awaitable[None]],
        connector_ids: list[int],
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.faults = faults
        p = cfg.platform
        http = PlatformHttp(p.url, ca_file=p.ca_file, timeout_s=p.request_timeout_s)
        c = cfg.charger
        identity = Identity(sn=c.serial_number, model=c.model, manufacturer=c.manufacturer, firmware_version=__version__, mac=c.mac)
        tokens = TokenManager(http, store.credentials, identity, lambda i, s: Credentials(device_id=i, device_secret=s))
        self.uplink = Uplink(
            http=http,
            tokens=tokens,
            outbox=store.outbox,
            deliver=deliver,
            heartbeat_status=lambda: heartbeat_status(faults),
            connector_ids=sorted(connector_ids),
            heartbeat_interval_s=p.heartbeat_interval_s,
            long_poll_wait_s=p.long_poll_wait_s,
        )

    @property
    def online(self) -> bool:
        return self.uplink.online

    async def start(self) -> None:
        await self.uplink.start()

    async def stop(self) -> None:
        """Give urgent queued reports up to :data:`SHUTDOWN_DRAIN_S` while online, then the final heartbeat."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SHUTDOWN_DRAIN_S
        while self.uplink.online and self.store.outbox.total_depth(URGENT_KINDS) and loop.time() < deadline:
            await asyncio.sleep(0.1)
        await self.uplink.stop(final_heartbeat=True)

    def fault_changed(self) -> None:
        """A fault was raised or cleared: send the heartbeat (with its status) soon."""
        self.uplink.heartbeat_soon()

    async def force_reconnect(self) -> bool:
        """Rebuild the connection; True once back online within ``[diagnostics] reconnect_timeout_s``."""
        await self.uplink.force_reconnect()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.diagnostics.reconnect_timeout_s
        await asyncio.sleep(0.05)
        while loop.time() < deadline:
            if self.uplink.online:
                return True
            await asyncio.sleep(0.1)
        return False

    def check_reconnect_storm(self) -> None:
        """F-0302 while the reconnect budget of the last 10 minutes is used up."""
        used = self.uplink.budget.used()
        self.faults.set("F-0302", None, used >= self.uplink.budget.limit, reconnects_10min=used)

    def reached_platform(self) -> bool:
        """The firmware health gate: a heartbeat got through since start."""
        return self.uplink.stats.last_heartbeat_ok is not None

    def progress(self) -> Any:
        """Watchdog probe: heartbeat attempts while online; idle (not watched) while offline."""
        return self.uplink.stats.heartbeats_attempted if self.uplink.online else IDLE

    def status(self) -> dict[str, Any]:
        """The ``uplink`` part of the status snapshot (:func:`agent.service.status.build_status`)."""
        up = self.uplink
        return {
            "enabled": True,
            "online": up.online,
            "last_heartbeat_at": up.stats.last_heartbeat_ok,
            "reconnects_10min": up.budget.used(),
            "reconnect_limit": up.budget.limit,
            "reconnects_total": up.stats.reconnects,
            "last_error": up.stats.last_error,
        }
