"""The hardware stack: drivers, the calibrated thermal view, fan runtime and the connectors.

One :class:`HardwareStack` owns everything that lives as long as one build of the
drivers: the :class:`hal.interfaces.DeviceSet`, the connector state machines (kept in
one shared ``connectors`` dict that the dispatcher, limits and scheduler hold), their
control-loop tasks and the :class:`Companion` services bound to them (telemetry
samplers, the session archive recorder, component-health persistence).

Contract:

* :meth:`start` builds and starts the drivers (a driver that fails to start within
  15 s stays unhealthy and blocks only its connector), then the connectors and their
  companions. Outputs are forced safe by each connector before its loop runs.
* :meth:`stop` stops sessions (closed, or suspended for a resume), waits up to 20 s
  for each connector loop (then cancels it), detaches the companions in order, and
  stops every driver (10 s each, errors logged, never raised).
* :meth:`rebuild` (soft reset) is atomic for whoever awaits :meth:`wait_ready`: the
  dispatcher does so before every command, so a command never meets a connector that
  is being torn down or a half-built set.
* :attr:`lock` serialises exclusive hardware work (rebuild, self test).
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Callable, Protocol

import structlog

from agent.charging.connector import Connector, ConnectorHardware
from agent.charging.events import ConnectorListener
from agent.charging.faults import FaultBoard
from agent.config import AgentConfig
from agent.maintenance.calibration import CalibratedThermal, Calibration
from agent.maintenance.counters import FanRuntime
from agent.service.devices import build_devices, make_context
from agent.service.sdnotify import IDLE, Watchdog, hal_probe
from agent.store.kv import KVStore
from hal.context import BuildContext
from hal.interfaces import DeviceSet, Thermal
from hal.tasks import stop_tasks

log = structlog.get_logger(__name__)

DEVICE_START_TIMEOUT_S = 15.0
DEVICE_STOP_TIMEOUT_S = 10.0
CONNECTOR_STOP_TIMEOUT_S = 20.0


class Companion(Protocol):
    """Work bound to one build of the connectors (it may subscribe to their events on attach).

    ``detach`` must return within seconds."""

    async def attach(self, connectors: dict[int, Connector], thermal: Thermal | None) -> None: ...
    async def detach(self) -> None: ...


class HardwareStack:
    """Drivers and connector state machines of the charger; see the module contract."""

    def __init__(
        self,
        cfg: AgentConfig,
        kv: KVStore,
        faults: FaultBoard,
        listener: ConnectorListener,
        *,
        companions: list[Companion] | None = None,
        on_built: Callable[[], None] | None = None,
        watchdog: Watchdog | None = None,
        connectors: dict[int, Connector] | None = None,
    ) -> None:
        """``connectors``: the shared dict to (re)build the state machines in (default: a new one)."""
        self.cfg = cfg
        self.kv = kv
        self.faults = faults
        self.listener = listener
        self.companions = list(companions or [])
        self.on_built = on_built
        self.watchdog = watchdog
        self.connectors: dict[int, Connector] = connectors if connectors is not None else {}
        self.devices: DeviceSet | None = None
        self.ctx: BuildContext | None = None
        self.thermal: Thermal | None = None  # calibrated view of the thermal driver
        self.calibration: Calibration | None = None
        self.fan_runtime: FanRuntime | None = None
        self.lock = asyncio.Lock()
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Build and start drivers, connectors and companions; then mark the stack ready."""
        cfg = self.cfg
        self.ctx = make_context(cfg)
        self.devices = build_devices(cfg, self.ctx)
        await asyncio.gather(*(_start_device(d) for d in self.devices.all()))
        self.calibration = Calibration(self.kv, cfg.calibration, thermal=self.devices.thermal, modules=self.devices.power_modules)
        await self.calibration.load()
        self.thermal = CalibratedThermal(self.devices.thermal, self.calibration) if self.devices.thermal else None
        self.fan_runtime = FanRuntime(self.kv, self.devices.thermal)
        await self.fan_runtime.load()
        await self.fan_runtime.start()
        self._build_connectors()
        self._tasks = [asyncio.create_task(c.run(), name=f"connector-{cid}") for cid, c in self.connectors.items()]
        for companion in self.companions:
            await companion.attach(self.connectors, self.thermal)
        self._ready.set()

    async def stop(self, reason: str, *, suspend: bool = False) -> None:
        """Stop sessions (closed or suspended), connector loops, companions and drivers."""
        self._ready.clear()
        for connector in self.connectors.values():
            await connector.shutdown(reason, suspend=suspend)
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=CONNECTOR_STOP_TIMEOUT_S)
            for task in pending:
                log.error("connector_stop_timeout", task=task.get_name())
            await stop_tasks(self._tasks)
        self._tasks = []
        for companion in self.companions:  # after the connectors: sessions they ended get recorded
            try:
                await companion.detach()
            except Exception:
                log.exception("companion_detach_failed", companion=type(companion).__name__)
        if self.fan_runtime is not None:
            await self.fan_runtime.stop()
        if self.devices is not None:
            for device in reversed(self.devices.all()):
                try:
                    await asyncio.wait_for(device.stop(), DEVICE_STOP_TIMEOUT_S)
                except Exception:
                    log.exception("device_stop_failed", device=getattr(device, "name", "?"))
        if self.ctx is not None:
            await self.ctx.close()
        self.thermal = None

    async def rebuild(self, reason: str = "remote_stop") -> dict[str, Any]:
        """Soft reset: close sessions, stop and rebuild drivers and connectors in this process.

        Connector-scoped faults are cleared for the fresh build, except a weld (F-0101):
        the rebuilt connector clears it itself once the fresh driver confirms the
        contacts open, and keeps it otherwise.
        """
        async with self.lock:
            started = asyncio.get_running_loop().time()
            if self.watchdog is not None:  # stopped loops must not look stalled
                self.watchdog.unregister_prefix("connector-")
                self.watchdog.unregister_prefix("hal-")
            await self.stop(reason)
            for fault in self.faults.active():
                if fault.connector_id is not None and fault.fault_id != "F-0101":
                    self.faults.clear(fault.fault_id, fault.connector_id)
            await self.start()
            if self.watchdog is not None:
                self.watch(self.watchdog)
            assert self.devices is not None
            return {
                "connectors": sorted(self.connectors),
                "devices": len(self.devices.all()),
                "duration_s": round(asyncio.get_running_loop().time() - started, 2),
            }

    async def wait_ready(self) -> None:
        """Return once the connectors are built and running (at once outside a rebuild)."""
        await self._ready.wait()

    # ------------------------------------------------------------------ supervision

    def watch(self, watchdog: Watchdog) -> None:
        """Register connector loops and driver probes with the systemd watchdog (replacing old ones)."""
        watchdog.unregister_prefix("connector-")
        watchdog.unregister_prefix("hal-")
        for task in self._tasks:  # named connector-<id>
            connector = self.connectors[int(task.get_name().split("-", 1)[1])]
            watchdog.register(task.get_name(), 90.0, task=task, probe=functools.partial(getattr, connector, "ticks", IDLE))
        devices: list[Any] = list(self.devices.all()) if self.devices is not None else []
        if self.ctx is not None:
            devices += [self.ctx.can_port(bus) for bus in self.cfg.can]
        for device in devices:
            probe = hal_probe(device)
            if probe is not None:
                watchdog.register(f"hal-{getattr(device, 'name', None) or type(device).__name__}", 60.0, probe=probe)
        log.info("watchdog_watching", watchdog_s=watchdog.interval_s, tasks=watchdog.names())

    def any_session(self) -> bool:
        return any(c.in_session() for c in self.connectors.values())

    # ------------------------------------------------------------------ internals

    def _build_connectors(self) -> None:
        """(Re)build the state machines in the shared ``connectors`` dict (others hold it)."""
        assert self.devices is not None
        d = self.devices
        for conn in self.cfg.connectors:
            hw = ConnectorHardware(
                meter=d.meters[conn.id],
                contactor=d.contactors[conn.id],
                vehicle=d.vehicles[conn.id],
                modules=d.power_modules.get(conn.id),
                imd=d.imd.get(conn.id),
                thermal=self.thermal,
                bidirectional=d.bidirectional.get(conn.id),
                pace=d.pace,
            )
            self.connectors[conn.id] = Connector(conn, hw, self.cfg.charging, self.faults, [self.listener])
        if self.on_built is not None:
            self.on_built()


async def _start_device(device: Any) -> None:
    try:
        await asyncio.wait_for(device.start(), DEVICE_START_TIMEOUT_S)
    except Exception as exc:  # the device stays unhealthy; its connector will not charge
        log.error("device_start_failed", device=getattr(device, "name", "?"), error=f"{type(exc).__name__}: {exc}")
