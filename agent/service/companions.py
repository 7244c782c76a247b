"""Services bound to one build of the connectors (see :class:`agent.service.hardware.Companion`).

Each is attached after the connectors start and detached after they stop, so a soft
reset re-binds them to the fresh state machines:

* :class:`TelemetryCompanion`: one :class:`~agent.channels.tellus.telemetry.TelemetrySampler`
  task per connector, woken early by state changes;
* :class:`ArchiveCompanion`: the session-archive recorder (detached last of the
  producers, so sessions the connectors just ended get closed in the archive);
* :class:`HealthCompanion`: persists the component-health counters when detached.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from agent.channels.tellus.telemetry import TelemetrySampler
from agent.charging.connector import Connector
from agent.maintenance.archive import SessionArchive, SessionRecorder
from agent.maintenance.health import ComponentHealth
from hal.interfaces import Thermal
from hal.tasks import stop_tasks


class TelemetryCompanion:
    """Telemetry samplers putting bodies through ``put`` (the outbox) at the configured cadence."""

    def __init__(
        self,
        put: Callable[[dict[str, Any]], Awaitable[Any]],
        *,
        active_s: float,
        idle_s: float,
        component_health: Callable[[Connector], dict[str, Any] | None] | None,
    ) -> None:
        self.put = put
        self.active_s = active_s
        self.idle_s = idle_s
        self.component_health = component_health
        self.samplers: dict[int, TelemetrySampler] = {}
        self._tasks: list[asyncio.Task[Any]] = []

    async def attach(self, connectors: dict[int, Connector], thermal: Thermal | None) -> None:
        self.samplers = {
            cid: TelemetrySampler(
                c, self.put, active_s=self.active_s, idle_s=self.idle_s, component_health=self.component_health
            )
            for cid, c in connectors.items()
        }
        self._tasks = [asyncio.create_task(s.run(), name=f"telemetry-{cid}") for cid, s in self.samplers.items()]

    async def detach(self) -> None:
        await stop_tasks(self._tasks)
        self._tasks = []

    def state_changed(self, connector_id: int, _state: Any) -> None:
        """A connector changed state: sample it now rather than at the next interval."""
        sampler = self.samplers.get(connector_id)
        if sampler is not None:
            sampler.state_changed()


class ArchiveCompanion:
    """Runs the :class:`SessionRecorder` over the current connectors."""

    def __init__(self, archive: SessionArchive) -> None:
        self.archive = archive
        self._stop = asyncio.Event()
        self._task: asyncio.Task[Any] | None = None

    async def attach(self, connectors: dict[int, Connector], thermal: Thermal | None) -> None:
        self._stop = asyncio.Event()
        recorder = SessionRecorder(self.archive, list(connectors.values()))
        self._task = asyncio.create_task(recorder.run(self._stop), name="session-archive")

    async def detach(self) -> None:
        if self._task is not None:
            self._stop.set()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


class HealthCompanion:
    """Persists component-health counters of the connectors when they go away."""

    def __init__(self, health: ComponentHealth) -> None:
        self.health = health
        self._connectors: list[Connector] = []

    async def attach(self, connectors: dict[int, Connector], thermal: Thermal | None) -> None:
        self._connectors = list(connectors.values())

    async def detach(self) -> None:
        await self.health.sync(self._connectors)
