"""The agent's one-second housekeeping tick and the outbox canary.

:class:`Housekeeping` runs everything periodic that is not a connector's control loop,
on one timer instead of many:

* every tick (1 s, on the shared tick grid of :mod:`hal.tick`): power-limit expiry, the charger-wide fault checks (cabinet
  temperature, fans, reconnect storm), component-health persistence, a watchdog beat;
* every 5 ticks: the schedule engine and the systemd ``STATUS=`` line;
* every 3600 ticks (from the first): purge finished schedules, old ledger entries and
  maintain the outbox.

A check that raises is logged and the tick goes on: one broken part never stops the
others, and the watchdog keeps being fed only while the loop itself runs.
"""

from __future__ import annotations

from typing import Callable

import structlog

from agent.charging.connector import Connector
from agent.charging.limits import PowerLimits
from agent.charging.scheduler import Scheduler
from agent.channels.tellus.reporter import Reporter
from agent.maintenance.health import ComponentHealth
from agent.service.sdnotify import Watchdog
from agent.store import Store
from hal.tick import sleep_to_grid

log = structlog.get_logger(__name__)

TICK_S = 1.0
CANARY_INTERVAL_S = 5.0


class Housekeeping:
    """See the module contract."""

    def __init__(
        self,
        *,
        limits: PowerLimits,
        scheduler: Scheduler,
        store: Store,
        health: ComponentHealth,
        connectors: dict[int, Connector],
        watchdog: Watchdog,
        checks: list[Callable[[], None]],
        update_status: Callable[[], None],
    ) -> None:
        self.limits = limits
        self.scheduler = scheduler
        self.store = store
        self.health = health
        self.connectors = connectors
        self.watchdog = watchdog
        self.checks = checks
        self.update_status = update_status

    async def run(self) -> None:
        ticks = 0
        while True:
            await self.limits.tick()
            for check in self.checks:
                try:
                    check()
                except Exception:
                    log.exception("housekeeping_check_failed", check=getattr(check, "__qualname__", repr(check)))
            self.watchdog.beat("housekeeping")
            if ticks % 5 == 0:
                self.update_status()
            await self.health.sync(self.connectors.values())
            if ticks % 5 == 0:
                self.scheduler.evaluate()
            if ticks % 3600 == 0:
                await self.scheduler.purge_finished()
                await self.store.ledger.purge()
                await self.store.outbox.maintain()
            ticks += 1
            await sleep_to_grid(TICK_S)


async def outbox_canary(reporter: Reporter, watchdog: Watchdog) -> None:
    """Proves the reporter -> store path still commits (the outbox is critical)."""
    while True:
        await reporter.drain()
        watchdog.beat("outbox")
        await sleep_to_grid(CANARY_INTERVAL_S)
