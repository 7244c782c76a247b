"""``charger-agent run``: assemble HAL, state machines, store, dispatcher and uplink.

Data flows one way: HAL -> connector state machines -> reporter -> outbox -> uplink;
commands come back through the dispatcher. Start-up order matters for safety and
for exactly-once billing:

1. open the state store (refuse to start on a corrupt or locked store, with a hint);
2. start the in-process simulator when configured, then the devices (a device that
   fails to start stays unhealthy and blocks its connector; the others run);
3. close every session left open by a power loss (``stop_reason`` ``power_loss``),
   atomically with its record, before any new session can start;
4. start the connectors (outputs forced safe first), telemetry, schedules, limits;
5. start the uplink last: charging never waits for it.

SIGTERM/SIGINT: running sessions are stopped cleanly (records closed), queued
reports get a few seconds to go out, a final heartbeat ``offline`` is sent, and
every device is left in its safe state.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from agent import __version__
from agent.commands.dispatcher import Dispatcher
from agent.commands.operational import operational_specs
from agent.config import AgentConfig, LoadedConfig
from agent.connector import Connector, ConnectorHardware
from agent.devices import build_devices, make_context
from agent.faults import FaultBoard, Severity, most_severe, numeric_code
from agent.limits import PowerLimits
from agent.reporter import Reporter
from agent.scheduler import Scheduler
from agent.session import utc_now
from agent.store import Credentials, Store, StoreError
from agent.telemetry import TelemetrySampler
from agent.uplink.auth import Identity, TokenManager
from agent.uplink.client import PlatformHttp
from agent.uplink.service import Uplink
from hal.interfaces import DeviceSet, HealthState

log = structlog.get_logger(__name__)

SHUTDOWN_STOP_REASON = "shutdown"


class Agent:
    """The running agent. Create, then ``await run(stop_event)``."""

    def __init__(self, loaded: LoadedConfig) -> None:
        self.loaded = loaded
        self.cfg: AgentConfig = loaded.model
        self.store: Store | None = None
        self.devices: DeviceSet | None = None
        self.connectors: dict[int, Connector] = {}
        self.faults: FaultBoard | None = None
        self.reporter: Reporter | None = None
        self.uplink: Uplink | None = None
        self.dispatcher: Dispatcher | None = None
        self.scheduler: Scheduler | None = None
        self.limits: PowerLimits | None = None
        self.simulator: Any = None
        self._tasks: list[asyncio.Task[Any]] = []

    # ------------------------------------------------------------------ heartbeat status

    def heartbeat_status(self) -> tuple[str, int]:
        """``fault`` + most severe error code when an error is active, else ``online``/0 (§6)."""
        assert self.faults is not None
        errors = [f for f in self.faults.active() if f.definition.severity is Severity.ERROR]
        worst = most_severe(errors)
        return ("fault", numeric_code(worst.fault_id)) if worst else ("online", 0)

    # ------------------------------------------------------------------ run

    async def run(self, stop: asyncio.Event) -> int:
        cfg = self.cfg
        state_dir = Path(cfg.charger.state_dir)
        try:
            self.store = await Store.open(state_dir, cfg.store)
        except StoreError as exc:
            log.error("state_store_unusable", state_dir=str(state_dir), error=str(exc))
            print(f"charger-agent: cannot use the state store in {state_dir}: {exc}", flush=True)
            return 1
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(self.store.close)
            if cfg.sim is not None and cfg.sim.in_process:
                from agent.sim_runner import SimulatedCharger

                assert self.loaded.sim_root is not None
                self.simulator = await stack.enter_async_context(SimulatedCharger(cfg, self.loaded.sim_root))
            ctx = make_context(cfg)
            stack.push_async_callback(ctx.close)
            self.devices = build_devices(cfg, ctx)
            await self._start_devices(stack)

            ids = [c.id for c in cfg.connectors]
            self.reporter = Reporter(
                self.store, ids, cdr_extensions=cfg.platform.cdr_extensions, send_vin=cfg.platform.send_vin
            )
            await self.reporter.start()
            stack.push_async_callback(self.reporter.stop)
            self.faults = FaultBoard(self.reporter)
            self._build_connectors()
            await self._close_power_loss_sessions()
            await self._close_interrupted_commands()

            self.limits = PowerLimits(
                self.store.kv,
                self.connectors,
                lambda command_id, details: self.reporter.command_status(  # type: ignore[union-attr]
                    command_id, "completed", "limit elapsed, reverted", details
                ),
            )
            await self.limits.load()
            self.scheduler = Scheduler(self.store.kv, self.connectors, cfg.charger.timezone)
            await self.scheduler.load()
            specs = operational_specs(self.limits, self.scheduler, v2g_capable=cfg.charger.v2g_capable)
            self.dispatcher = Dispatcher(self.store.ledger, self.reporter, self.connectors, specs)

            samplers = {
                cid: TelemetrySampler(
                    c,
                    lambda body: self.store.outbox.put("telemetry", body),  # type: ignore[union-attr]
                    active_s=cfg.platform.telemetry_active_interval_s,
                    idle_s=cfg.platform.telemetry_idle_interval_s,
                )
                for cid, c in self.connectors.items()
            }
            self.reporter.on_state_change = lambda cid, _state: samplers[cid].state_changed()

            connector_tasks = [asyncio.create_task(c.run(), name=f"connector-{cid}") for cid, c in self.connectors.items()]
            self._tasks = [
                *(asyncio.create_task(s.run(), name=f"telemetry-{cid}") for cid, s in samplers.items()),
                asyncio.create_task(self._monitor(), name="device-monitor"),
                asyncio.create_task(self._housekeeping(), name="housekeeping"),
            ]
            if cfg.platform.enabled:
                await self._start_uplink()
            log.info("agent_started", version=__version__, connectors=ids, platform=cfg.platform.url if cfg.platform.enabled else None)

            stop_task = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([stop_task, *connector_tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stop_task and task.exception() is not None:
                    log.error("connector_task_died", error=repr(task.exception()))
            stop_task.cancel()
            await self._shutdown(connector_tasks)
        log.info("agent_stopped")
        return 0

    async def _start_devices(self, stack: contextlib.AsyncExitStack) -> None:
        assert self.devices is not None

        async def start(device: Any) -> None:
            try:
                await asyncio.wait_for(device.start(), 15.0)
            except Exception as exc:
                log.error("device_start_failed", device=getattr(device, "name", "?"), error=f"{type(exc).__name__}: {exc}")

        devices = self.devices.all()
        await asyncio.gather(*(start(d) for d in devices))
        for device in devices:
            stack.push_async_callback(device.stop)

    def _build_connectors(self) -> None:
        assert self.devices is not None and self.faults is not None and self.reporter is not None
        d = self.devices
        for conn in self.cfg.connectors:
            hw = ConnectorHardware(
                meter=d.meters[conn.id],
                contactor=d.contactors[conn.id],
                vehicle=d.vehicles[conn.id],
                modules=d.power_modules.get(conn.id),
                imd=d.imd.get(conn.id),
                thermal=d.thermal,
                bidirectional=d.bidirectional.get(conn.id),
            )
            self.connectors[conn.id] = Connector(
                conn,
                hw,
                self.cfg.charging,
                self.faults,
                self.reporter,
                cdr_extensions=self.cfg.platform.cdr_extensions,
                send_vin=self.cfg.platform.send_vin,
            )

    async def _close_power_loss_sessions(self) -> None:
        """Sessions still open from the last run: resume a recently suspended one, close the rest.

        A session suspended by a clean shutdown (``[charging] on_shutdown = "suspend"``) not
        older than ``resume_window_s`` is handed to its connector to resume. Every other
        open session -- a crash, a power loss, an old suspension -- is closed now, with the
        meter's current register when it can be read, exactly once.
        """
        assert self.store is not None and self.reporter is not None
        policy = self.cfg.charging
        for open_session in await self.store.sessions.open_sessions():
            cp = open_session.running or open_session.start
            connector = self.connectors.get(open_session.connector_id)
            suspended_at = cp.get("suspended_at")
            if suspended_at and connector is not None and policy.on_shutdown == "suspend":
                age = (utc_now() - datetime.fromisoformat(str(suspended_at).replace("Z", "+00:00"))).total_seconds()
                if age <= policy.resume_window_s:
                    connector.resume(cp, policy.resume_plug_wait_s)
                    log.info("session_resume_scheduled", connector=connector.id, record_id=cp.get("record_id"))
                    continue
            meter_end = None
            if connector is not None:
                for _ in range(50):  # up to ~5 s for a first fresh reading
                    reading = connector.hw.meter.reading()
                    if reading is not None:
                        meter_end = reading.energy_export_kwh if cp.get("mode") == "discharge" else reading.energy_import_kwh
                        break
                    await asyncio.sleep(0.1)
            reason = "shutdown" if suspended_at else "power_loss"
            message = "session ended by a shutdown" if suspended_at else "session ended by a power loss"
            self.reporter.close_checkpoint(open_session.connector_id, cp, reason, message, meter_end)
        await self.reporter.drain()

    async def _close_interrupted_commands(self) -> None:
        """Commands accepted before the last stop that nothing will finish now end ``failed``.

        Spared: the start command of a session being resumed, and power limits still
        running (:class:`agent.limits.PowerLimits` reports those when they elapse).
        Closed sessions already reported their command through the reporter.
        """
        assert self.store is not None and self.reporter is not None
        await self.reporter.drain()
        alive = {cp.get("command_id") for c in self.connectors.values() for cp in [c.resume_checkpoint()] if cp}
        limits = await self.store.kv.get("power_limits", [])
        alive |= {e.get("command_id") for e in limits if isinstance(e, dict)}
        for entry in await self.store.ledger.non_terminal():
            if entry.command_id in alive:
                continue
            self.reporter.command_status(entry.command_id, "failed", "interrupted by an agent restart before it finished")
        await self.reporter.drain()

    async def _start_uplink(self) -> None:
        assert self.store is not None and self.dispatcher is not None and self.reporter is not None
        cfg = self.cfg
        http = PlatformHttp(cfg.platform.url, ca_file=cfg.platform.ca_file, timeout_s=cfg.platform.request_timeout_s)
        identity = Identity(
            sn=cfg.charger.serial_number,
            model=cfg.charger.model,
            manufacturer=cfg.charger.manufacturer,
            firmware_version=__version__,
            mac=cfg.charger.mac,
        )
        tokens = TokenManager(http, self.store.credentials, identity, lambda i, s: Credentials(device_id=i, device_secret=s))
        self.uplink = Uplink(
            http=http,
            tokens=tokens,
            outbox=self.store.outbox,
            deliver=self.dispatcher.deliver,
            heartbeat_status=self.heartbeat_status,
            connector_ids=sorted(self.connectors),
            heartbeat_interval_s=cfg.platform.heartbeat_interval_s,
            long_poll_wait_s=cfg.platform.long_poll_wait_s,
        )
        self.reporter.on_fault_change = self.uplink.heartbeat_soon
        await self.uplink.start()

    # ------------------------------------------------------------------ background

    async def _monitor(self) -> None:
        """Device-wide faults from the thermal system: F-0204 cabinet temperature, F-0601 fan."""
        assert self.devices is not None and self.faults is not None
        policy = self.cfg.charging
        while True:
            thermal = self.devices.thermal
            if thermal is not None:
                temps = thermal.temperatures()
                pm = temps.get("power_module")
                if pm is not None and pm.celsius is not None:
                    if pm.celsius >= policy.cabinet_critical_c:
                        self.faults.raise_("F-0204", None, temperature=round(pm.celsius, 1), threshold=policy.cabinet_critical_c)
                    elif pm.celsius < policy.cabinet_critical_c - 5.0:
                        self.faults.clear("F-0204", None)
                for name, fan in thermal.fans().items():
                    low = fan.health.state in (HealthState.DEGRADED, HealthState.FAULT) and fan.health.code in ("fan_low", "fan_stopped")
                    if low:
                        self.faults.raise_("F-0601", None, fan=name, rpm=fan.rpm, nominal_rpm=fan.nominal_rpm)
                    else:
                        self.faults.clear("F-0601", None)
            if self.uplink is not None:
                storm = self.uplink.budget.used() >= self.uplink.budget.limit
                self.faults.set("F-0302", None, storm, reconnects_10min=self.uplink.budget.used())
            await asyncio.sleep(1.0)

    async def _housekeeping(self) -> None:
        assert self.limits is not None and self.scheduler is not None and self.store is not None
        ticks = 0
        while True:
            await self.limits.tick()
            if ticks % 5 == 0:
                self.scheduler.evaluate()
            if ticks % 3600 == 0:
                await self.scheduler.purge_finished()
                await self.store.ledger.purge()
                await self.store.outbox.maintain()
            ticks += 1
            await asyncio.sleep(1.0)

    # ------------------------------------------------------------------ shutdown

    async def _shutdown(self, connector_tasks: list[asyncio.Task[Any]]) -> None:
        log.info("agent_stopping")
        suspend = self.cfg.charging.on_shutdown == "suspend"
        for connector in self.connectors.values():
            await connector.shutdown(SHUTDOWN_STOP_REASON, suspend=suspend)
        done, pending = await asyncio.wait(connector_tasks, timeout=20.0)
        for task in pending:
            task.cancel()
        await asyncio.gather(*connector_tasks, return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.reporter is not None:
            await self.reporter.drain()
        if self.uplink is not None:
            assert self.store is not None
            deadline = asyncio.get_running_loop().time() + 5.0
            urgent = ("command_status", "charging_record", "event")
            while self.uplink.online and self.store.outbox.total_depth(urgent) and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.1)
            await self.uplink.stop(final_heartbeat=True)


async def run_agent(loaded: LoadedConfig, stop: asyncio.Event) -> int:
    return await Agent(loaded).run(stop)
