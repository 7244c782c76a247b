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
import dataclasses
import functools
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import structlog

from agent import __version__
from agent.commands.dispatcher import Dispatcher
from agent.maintenance.archive import SessionArchive, SessionRecorder
from agent.maintenance.calibration import CalibratedThermal, Calibration, CalibrationError
from agent.commands.diagnostics import cancel_background, diagnostic_specs
from agent.commands.operational import operational_specs
from agent.maintenance.counters import FanRuntime, UnknownFanError
from agent.maintenance.health import ComponentHealth
from agent.config import AgentConfig, LoadedConfig
from agent.charging.connector import Connector, ConnectorHardware, ConnectorState, Rejected
from agent.service.devices import build_devices, make_context
from agent.charging.faults import FaultBoard, Severity, most_severe, numeric_code
from agent.charging.limits import PowerLimits
from agent.channels.tellus.reporter import Reporter
from agent.maintenance.logbundle import FetchLogsParams, LogSources, collect_and_upload
from agent.maintenance.selftest import run_self_test
from agent.firmware.boot import EXIT_UPGRADE_RESTART
from agent.firmware.command import firmware_command_spec
from agent.firmware.manager import FirmwareManager
from agent.charging.scheduler import Scheduler
from agent.service.sdnotify import IDLE, Notifier, Watchdog, default_notifier, hal_probe, status_line
from agent.maintenance.service_mode import ServiceMode, audit_hook
from agent.service.status import StatusWriter, build_status, fault_entry, status_path
from agent.charging.session import iso, utc_now
from agent.store import Credentials, Store, StoreError
from agent.channels.tellus.telemetry import TelemetrySampler
from agent.channels.tellus.auth import Identity, TokenManager
from agent.channels.tellus.client import PlatformHttp
from agent.channels.tellus.uplink import Uplink
from agent.channels.ocpp import OcppService, start_ocpp, status_block, tellus_command_specs, with_ocpp_metadata
from hal.context import BuildContext
from hal.interfaces import DeviceSet, HealthState, Thermal

log = structlog.get_logger(__name__)

SHUTDOWN_STOP_REASON = "shutdown"
PENDING_REBOOT_KEY = "pending_reboot"


class Agent:
    """The running agent. Create, then ``await run(stop_event)``."""

    def __init__(self, loaded: LoadedConfig) -> None:
        self.loaded = loaded
        self.cfg: AgentConfig = loaded.model
        self.store: Store | None = None
        self.devices: DeviceSet | None = None
        self.ctx: BuildContext | None = None
        self.thermal: Thermal | None = None  # calibrated view of the thermal driver
        self.calibration: Calibration | None = None
        self.fan_runtime: FanRuntime | None = None
        self.health: ComponentHealth | None = None
        self.connectors: dict[int, Connector] = {}
        self.faults: FaultBoard | None = None
        self.reporter: Reporter | None = None
        self.uplink: Uplink | None = None
        self.dispatcher: Dispatcher | None = None
        self.scheduler: Scheduler | None = None
        self.limits: PowerLimits | None = None
        self.simulator: Any = None
        self.samplers: dict[int, TelemetrySampler] = {}
        self.reboot_requested = False
        self.archive: SessionArchive | None = None
        self._recorder: asyncio.Task[Any] | None = None
        self._recorder_stop = asyncio.Event()
        self.started_at = time.time()
        self.service_mode: ServiceMode | None = None
        self._stop_event: asyncio.Event | None = None
        self._connector_tasks: list[asyncio.Task[Any]] = []
        self._hw_tasks: list[asyncio.Task[Any]] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._hw_lock = asyncio.Lock()
        self.firmware: FirmwareManager | None = None
        self.ocpp: OcppService | None = None
        self.upgrade_restart: str | None = None  # "agent" | "system" once an upgrade asked for it
        self.notifier: Notifier = default_notifier()
        self.watchdog: Watchdog = Watchdog.from_env(self.notifier)
        self._status_text = ""

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
        self._stop_event = stop
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
                from agent.cli.sim import SimulatedCharger

                assert self.loaded.sim_root is not None
                self.simulator = await stack.enter_async_context(SimulatedCharger(cfg, self.loaded.sim_root))

            self.started_at = time.time()
            self.service_mode = ServiceMode(state_dir, cfg.service)
            self.service_mode.on_change = audit_hook(self.store.ledger.audit, self.service_mode)
            await self.service_mode.start()
            stack.push_async_callback(self.service_mode.stop)

            ids = [c.id for c in cfg.connectors]
            self.reporter = Reporter(
                self.store, ids, cdr_extensions=cfg.platform.cdr_extensions, send_vin=cfg.platform.send_vin
            )
            await self.reporter.start()
            stack.push_async_callback(self.reporter.stop)
            self.faults = FaultBoard(self.reporter)
            self.archive = await SessionArchive.open(state_dir, cfg.archive)
            stack.push_async_callback(self.archive.close)
            self.reporter.archive = self.archive
            self.health = ComponentHealth(self.store.kv, cfg.health)
            await self.health.load()
            self.reporter.on_session_started = self.health.discharge.note_session_started
            self.reporter.on_state_change = self._state_changed

            await self._start_hardware()
            await self._close_power_loss_sessions()
            await self._report_pending_reboot()
            self.firmware = FirmwareManager(
                cfg.firmware,
                state_dir=state_dir,
                kv=self.store.kv,
                outbox=self.store.outbox,
                command_status=self.reporter.command_status,
                running_version=__version__,
                any_session=self.any_session,
                request_restart=self.request_upgrade_restart,
                hold_charging=self.hold_charging_for_upgrade,
            )
            await self.firmware.load()  # its pending command is not "interrupted"
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
            specs = {
                **operational_specs(self.limits, self.scheduler, v2g_capable=cfg.charger.v2g_capable),
                **diagnostic_specs(self),
                "firmware_upgrade": firmware_command_spec(self.firmware),
            }
            specs = tellus_command_specs(specs, cfg, lambda: self.ocpp)
            self.dispatcher = Dispatcher(self.store.ledger, self.reporter, self.connectors, specs)
            self._tasks = [asyncio.create_task(self._housekeeping(), name="housekeeping")]
            status_writer = StatusWriter(status_path(state_dir), 1.0, self.status_snapshot)
            await status_writer.start()
            stack.push_async_callback(status_writer.stop)
            if cfg.platform.enabled:
                await self._start_uplink()
            self.ocpp = await start_ocpp(
                cfg, connectors=self.connectors, faults=self.faults, restart_owner=self, stop=stop,
                firmware=self.firmware, fetch_logs=self.fetch_logs, sim_root=getattr(self.simulator, "root", None),
            )
            self._tasks.append(
                asyncio.create_task(self.firmware.after_start(self._healthy_for_upgrade), name="firmware-health-gate")
            )
            log.info("agent_started", version=__version__, connectors=ids, platform=cfg.platform.url if cfg.platform.enabled else None)
            self._watch_critical_tasks()
            self._update_status(ready=True)  # READY=1: config, state and HAL are up
            self.watchdog.start()

            await stop.wait()
            await self.watchdog.stop()
            self.notifier.stopping("stopping: closing sessions, sending queued reports")
            await self._shutdown()
        log.info("agent_stopped", reboot=self.reboot_requested, upgrade_restart=self.upgrade_restart)
        if self.upgrade_restart == "agent":
            return EXIT_UPGRADE_RESTART  # systemd (Restart=always) starts the new current release
        if self.upgrade_restart == "system":
            await self._reboot_system(cfg.firmware.reboot_command)
            return 0
        if self.reboot_requested and cfg.diagnostics.reboot_action == "system":
            await self._reboot_system()
        return 0

    def status_snapshot(self) -> dict[str, Any]:
        """Everything ``charger-agent status`` shows (see :func:`agent.service.status.build_status`)."""
        connectors = []
        for c in self.connectors.values():
            reading = c.hw.meter.reading()
            vehicle = c.hw.vehicle.status()
            s = c.session
            connectors.append(
                {
                    "id": c.id,
                    "kind": c.config.kind,
                    "state": c.state.value,
                    "plugged": vehicle.plugged,
                    "power_kw": reading.power_kw if reading is not None else None,
                    "soc": vehicle.soc,
                    "limit_kw": c.effective_limit_kw(),
                    "unavailable_reason": c.unavailable_reason,
                    "last_error": c.last_error,
                    "session": None
                    if s is None
                    else {
                        "record_id": s.record_id,
                        "mode": s.request.mode,
                        "started_at": iso(s.start_time),
                        "energy_kwh": s.energy_kwh,
                        "max_power_kw": s.max_power_kw,
                        "soc_start": s.soc_start,
                    },
                }
            )
        faults = [
            fault_entry(f.fault_id, f.connector_id, since=f.raised_at, details=f.details)
            for f in (self.faults.active() if self.faults is not None else [])
        ]
        health = {c.id: self.health.build(c) for c in self.connectors.values()} if self.health is not None else {}
        uplink: dict[str, Any] = {"enabled": self.cfg.platform.enabled, "online": False}
        if self.uplink is not None:
            uplink.update(
                online=self.uplink.online,
                last_heartbeat_at=self.uplink.stats.last_heartbeat_ok,
                reconnects_10min=self.uplink.budget.used(),
                reconnect_limit=self.uplink.budget.limit,
                reconnects_total=self.uplink.stats.reconnects,
                last_error=self.uplink.stats.last_error,
            )
        outbox = dataclasses.asdict(self.store.outbox.stats()) if self.store is not None else {}
        return build_status(
            agent_version=__version__,
            connectors=connectors,
            faults=faults,
            component_health=health,
            uplink=uplink,
            outbox=outbox,
            service_mode=self.service_mode.status() if self.service_mode is not None else {},
            taken_at=time.time(),
            started_at=self.started_at,
            serial_number=self.cfg.charger.serial_number,
        ) | status_block(self.ocpp)

    def service_mode_on(self) -> bool:
        return self.service_mode is not None and self.service_mode.is_on()

    def _state_changed(self, connector_id: int, _state: ConnectorState) -> None:
        sampler = self.samplers.get(connector_id)
        if sampler is not None:
            sampler.state_changed()

    # ------------------------------------------------------------------ hardware stack

    async def _start_hardware(self) -> None:
        """Build and start the drivers, the connector state machines and their tasks."""
        assert self.store is not None and self.faults is not None and self.reporter is not None
        cfg = self.cfg
        self.ctx = make_context(cfg)
        self.devices = build_devices(cfg, self.ctx)

        async def start(device: Any) -> None:
            try:
                await asyncio.wait_for(device.start(), 15.0)
            except Exception as exc:  # the device stays unhealthy; its connector will not charge
                log.error("device_start_failed", device=getattr(device, "name", "?"), error=f"{type(exc).__name__}: {exc}")

        await asyncio.gather(*(start(d) for d in self.devices.all()))
        self.calibration = Calibration(
            self.store.kv, cfg.calibration, thermal=self.devices.thermal, modules=self.devices.power_modules
        )
        await self.calibration.load()
        self.thermal = CalibratedThermal(self.devices.thermal, self.calibration) if self.devices.thermal else None
        self.fan_runtime = FanRuntime(self.store.kv, self.devices.thermal)
        await self.fan_runtime.load()
        await self.fan_runtime.start()
        self._build_connectors()
        health = self.health if cfg.platform.send_component_health else None
        self.samplers = {
            cid: TelemetrySampler(
                c,
                lambda body: self.store.outbox.put("telemetry", with_ocpp_metadata(body, cfg, lambda: self.ocpp)),  # type: ignore[union-attr]
                active_s=cfg.platform.telemetry_active_interval_s,
                idle_s=cfg.platform.telemetry_idle_interval_s,
                component_health=health.build if health is not None else None,
            )
            for cid, c in self.connectors.items()
        }
        self._connector_tasks = [asyncio.create_task(c.run(), name=f"connector-{cid}") for cid, c in self.connectors.items()]
        self._recorder_stop = asyncio.Event()
        self._recorder = (
            asyncio.create_task(
                SessionRecorder(self.archive, list(self.connectors.values())).run(self._recorder_stop),
                name="session-archive",
            )
            if self.archive is not None
            else None
        )
        self._hw_tasks = [
            *(asyncio.create_task(s.run(), name=f"telemetry-{cid}") for cid, s in self.samplers.items()),
            asyncio.create_task(self._monitor(), name="device-monitor"),
        ]

    async def _stop_hardware(self, reason: str, *, suspend: bool = False) -> None:
        """Stop sessions (closed or suspended), the connector loops, their tasks and the drivers."""
        for connector in self.connectors.values():
            await connector.shutdown(reason, suspend=suspend)
        _done, pending = await asyncio.wait(self._connector_tasks, timeout=20.0) if self._connector_tasks else ((), ())
        for task in pending:
            log.error("connector_stop_timeout", task=task.get_name())
            task.cancel()
        await asyncio.gather(*self._connector_tasks, return_exceptions=True)
        for task in self._hw_tasks:
            task.cancel()
        await asyncio.gather(*self._hw_tasks, return_exceptions=True)
        self._connector_tasks, self._hw_tasks = [], []
        if self._recorder is not None:  # after the connectors: sessions they ended get closed
            self._recorder_stop.set()
            await asyncio.gather(self._recorder, return_exceptions=True)
            self._recorder = None
        if self.health is not None:
            await self.health.sync(self.connectors.values())
        if self.fan_runtime is not None:
            await self.fan_runtime.stop()
        if self.devices is not None:
            for device in reversed(self.devices.all()):
                try:
                    await asyncio.wait_for(device.stop(), 10.0)
                except Exception:
                    log.exception("device_stop_failed", device=getattr(device, "name", "?"))
        if self.ctx is not None:
            await self.ctx.close()

    def _build_connectors(self) -> None:
        """(Re)build the state machines in the shared ``connectors`` dict (others hold it)."""
        assert self.devices is not None and self.faults is not None and self.reporter is not None
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
        if self.limits is not None:
            self.limits.apply()

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
        running (:class:`agent.charging.limits.PowerLimits` reports those when they elapse).
        Closed sessions already reported their command through the reporter.
        """
        assert self.store is not None and self.reporter is not None
        await self.reporter.drain()
        alive = {cp.get("command_id") for c in self.connectors.values() for cp in [c.resume_checkpoint()] if cp}
        limits = await self.store.kv.get("power_limits", [])
        alive |= {e.get("command_id") for e in limits if isinstance(e, dict)}
        if self.firmware is not None:
            alive |= self.firmware.alive_command_ids()
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
        assert self.faults is not None
        policy = self.cfg.charging
        while True:
            thermal = self.thermal
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
            self.watchdog.beat("housekeeping")
            if ticks % 5 == 0:
                self._update_status()
            if self.health is not None:
                await self.health.sync(self.connectors.values())
            if ticks % 5 == 0:
                self.scheduler.evaluate()
            if ticks % 3600 == 0:
                await self.scheduler.purge_finished()
                await self.store.ledger.purge()
                await self.store.outbox.maintain()
            ticks += 1
            await asyncio.sleep(1.0)

    # ------------------------------------------------------------------ systemd supervision

    def _watch_critical_tasks(self) -> None:
        """Register what must keep making progress for the watchdog to be fed."""
        wd = self.watchdog
        wd.register("housekeeping", 15.0, task=self._tasks[0] if self._tasks else None)
        if self.reporter is not None:
            canary = asyncio.create_task(self._outbox_canary(), name="outbox-canary")
            self._tasks.append(canary)
            wd.register("outbox", 60.0, task=canary)
        if self.uplink is not None:
            up = self.uplink
            wd.register(
                "uplink",
                3 * self.cfg.platform.heartbeat_interval_s + 30.0,
                probe=lambda: up.stats.heartbeats_attempted if up.online else IDLE,
            )
        self._watch_hardware()

    def _watch_hardware(self) -> None:
        wd = self.watchdog
        for task in self._connector_tasks:  # named connector-<id>
            connector = self.connectors[int(task.get_name().split("-", 1)[1])]
            wd.register(task.get_name(), 90.0, task=task, probe=functools.partial(getattr, connector, "ticks", IDLE))
        devices = list(self.devices.all()) if self.devices is not None else []
        if self.ctx is not None:
            devices += [self.ctx.can_port(bus) for bus in self.cfg.can]
        for device in devices:
            probe = hal_probe(device)
            if probe is not None:
                wd.register(f"hal-{getattr(device, 'name', None) or type(device).__name__}", 60.0, probe=probe)
        log.info("watchdog_watching", watchdog_s=wd.interval_s, tasks=wd.names())

    async def _outbox_canary(self) -> None:
        """Proves the reporter -> store path still commits (the outbox is critical)."""
        assert self.reporter is not None
        while True:
            await self.reporter.drain()
            self.watchdog.beat("outbox")
            await asyncio.sleep(5.0)

    def _update_status(self, *, ready: bool = False) -> None:
        """``STATUS=`` for ``systemctl status`` (and ``READY=1`` the first time)."""
        try:
            text = status_line(self.status_snapshot())
        except Exception as exc:
            text = f"status unavailable: {type(exc).__name__}"
        if self.watchdog.stalled:
            text = f"watchdog: {', '.join(self.watchdog.stalled)} stalled | {text}"
        if ready:
            self.notifier.ready(text)
        elif text != self._status_text:
            self.notifier.status(text)
        self._status_text = text

    # ------------------------------------------------------------------ shutdown

    async def _shutdown(self) -> None:
        log.info("agent_stopping")
        if not self.reboot_requested:
            await cancel_background()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        suspend = self.cfg.charging.on_shutdown == "suspend" and not self.reboot_requested and self.upgrade_restart is None
        await self._stop_hardware(SHUTDOWN_STOP_REASON, suspend=suspend)
        if self.ocpp is not None:
            await self.ocpp.stop()
        if self.reporter is not None:
            await self.reporter.drain()
        if self.uplink is not None:
            assert self.store is not None
            deadline = asyncio.get_running_loop().time() + 5.0
            urgent = ("command_status", "charging_record", "event", "firmware_status")
            while self.uplink.online and self.store.outbox.total_depth(urgent) and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.1)
            await self.uplink.stop(final_heartbeat=True)

    # ------------------------------------------------------------------ services for the diagnostic commands

    def any_session(self) -> bool:
        return any(c.in_session() for c in self.connectors.values())

    async def stop_sessions(self, reason: str) -> None:
        """Stop every running session cleanly and wait (bounded) until all are closed."""
        for connector in self.connectors.values():
            if connector.in_session():
                try:
                    connector.request_stop(reason)
                except Rejected:
                    pass
        for _ in range(300):
            if not self.any_session():
                return
            await asyncio.sleep(0.1)
        log.error("sessions_did_not_stop", connectors=[c.id for c in self.connectors.values() if c.in_session()])

    async def schedule_reboot(self, command_id: str) -> None:
        """Persist the pending ``completed`` report, then shut down; the configured action follows."""
        assert self.store is not None and self._stop_event is not None
        await self.store.kv.set(PENDING_REBOOT_KEY, {"command_id": command_id, "at": iso(utc_now())})
        log.warning("reboot_requested", command_id=command_id, action=self.cfg.diagnostics.reboot_action)
        self.reboot_requested = True
        self._stop_event.set()

    async def _report_pending_reboot(self) -> None:
        assert self.store is not None and self.reporter is not None
        pending = await self.store.kv.get(PENDING_REBOOT_KEY)
        if not isinstance(pending, dict) or not pending.get("command_id"):
            return
        requested = datetime.fromisoformat(str(pending.get("at", iso(utc_now()))).replace("Z", "+00:00"))
        downtime = round((utc_now() - requested).total_seconds(), 1)
        self.reporter.command_status(
            str(pending["command_id"]), "completed", "agent restarted", {"downtime_s": downtime, "version": __version__}
        )
        await self.reporter.drain()
        await self.store.kv.delete(PENDING_REBOOT_KEY)

    async def _reboot_system(self, command: list[str] | None = None) -> None:
        command = command or self.cfg.diagnostics.reboot_command
        log.warning("system_reboot", command=command)
        try:
            proc = await asyncio.create_subprocess_exec(*command)
            await asyncio.wait_for(proc.wait(), 60)
        except (OSError, asyncio.TimeoutError) as exc:
            log.error("system_reboot_failed", error=str(exc))

    def _healthy_for_upgrade(self) -> bool:
        """The firmware health gate: the new version runs and has reached the platform."""
        if not self.cfg.platform.enabled:
            return True
        return self.uplink is not None and self.uplink.stats.last_heartbeat_ok is not None

    async def request_upgrade_restart(self, kind: str) -> None:
        assert self._stop_event is not None
        log.warning("upgrade_restart_requested", kind=kind)
        self.upgrade_restart = kind
        self._stop_event.set()

    async def hold_charging_for_upgrade(self, reason: str | None) -> bool:
        """Take every connector out of service for an install (``None``: back); False if one is busy."""
        taken: list[Connector] = []
        for connector in self.connectors.values():
            try:
                await connector.set_unavailable(reason)
            except Rejected:
                for t in taken:
                    await t.set_unavailable(None)
                return False
            taken.append(connector)
        return True

    async def soft_reset(self) -> dict[str, Any]:
        """Close sessions cleanly, stop and rebuild drivers and state machines in this process."""
        assert self.faults is not None
        async with self._hw_lock:
            started = asyncio.get_running_loop().time()
            self.watchdog.unregister_prefix("connector-")
            self.watchdog.unregister_prefix("hal-")
            await self._stop_hardware("remote_stop")
            for fault in self.faults.active():
                # A weld is not cleared blindly: the rebuilt connector clears F-0101 itself
                # once the fresh driver confirms the contacts open, and keeps it otherwise
                # (no "(cleared)" report for contacts that are still welded).
                if fault.connector_id is not None and fault.fault_id != "F-0101":
                    self.faults.clear(fault.fault_id, fault.connector_id)
            await self._start_hardware()
            self._watch_hardware()
            assert self.devices is not None
            return {
                "connectors": sorted(self.connectors),
                "devices": len(self.devices.all()),
                "duration_s": round(asyncio.get_running_loop().time() - started, 2),
            }

    async def force_reconnect(self) -> bool:
        if self.uplink is None:
            return False
        await self.uplink.force_reconnect()
        deadline = asyncio.get_running_loop().time() + self.cfg.diagnostics.reconnect_timeout_s
        await asyncio.sleep(0.05)
        while asyncio.get_running_loop().time() < deadline:
            if self.uplink.online:
                return True
            await asyncio.sleep(0.1)
        return False

    async def fetch_logs(self, params: FetchLogsParams, progress: Callable[[int], None]) -> dict[str, Any]:
        """Bundle logs, audit log, recent session archives and the redacted config; upload it."""
        assert self.store is not None
        cfg = self.cfg
        since, until = params.window()
        creds = self.store.credentials.load()
        return await collect_and_upload(
            params,
            sources=LogSources.discover(journald_unit=cfg.diagnostics.journald_unit, log_file=cfg.logging.file),
            audit=lambda s, u: self.store.ledger.audit_entries(since=s.timestamp(), until=u.timestamp()),  # type: ignore[union-attr]
            config_path=self.loaded.path,
            workdir=Path(cfg.charger.state_dir) / "diag",
            extra_files=await self._archive_files(since, until),
            ca_file=cfg.platform.ca_file,
            known_secrets=[creds.device_secret] if creds is not None else [],
            progress=progress,
        )

    async def _archive_files(self, since: datetime, until: datetime, limit: int = 20) -> list[tuple[str, bytes]]:
        """Per-session CSV files of the archived sessions that overlap the window."""
        if self.archive is None:
            return []
        files: list[tuple[str, bytes]] = []
        for info in await self.archive.list_sessions(limit=200):
            start = float(info.start_time)
            end = float(info.end_time) if info.end_time is not None else until.timestamp()
            if end < since.timestamp() or start > until.timestamp():
                continue
            rows = await self.archive.samples(info.record_id)
            lines = ["t_unix,resolution,power_kw,voltage,current,soc,temperature,energy_kwh"]
            lines += [
                f"{r.t},{r.resolution},{r.power_kw},{r.voltage},{r.current},{r.soc},{r.temperature},{r.energy_kwh}"
                for r in rows
            ]
            files.append((f"{info.record_id}.csv", ("\n".join(lines) + "\n").encode()))
            if len(files) >= limit:
                break
        return files

    async def run_self_test(self, progress: Callable[[str], None]) -> dict[str, Any]:
        """Every connector out of service while the self test owns the hardware; restored after."""
        async with self._hw_lock:
            taken: list[Connector] = []
            try:
                for connector in self.connectors.values():
                    await connector.set_unavailable("self_test")
                    taken.append(connector)
                hardware = {cid: c.hw for cid, c in self.connectors.items()}
                report = await run_self_test(
                    hardware, self.thermal, self.cfg.self_test, progress=lambda event: progress(str(event))
                )
            finally:
                for connector in taken:
                    await connector.set_unavailable(None)
            return report.to_details()

    async def calibrate(self, sensor: str, reference: float) -> dict[str, Any]:
        assert self.calibration is not None
        try:
            entry = await self.calibration.calibrate(sensor, reference, self.calibration.raw_value(sensor))
        except CalibrationError as exc:
            raise Rejected(str(exc)) from None
        return entry.to_dict()

    async def reset_fan_counter(self, fan: str | int | None) -> dict[str, Any]:
        assert self.fan_runtime is not None
        try:
            name = self.fan_runtime.resolve(fan)
        except UnknownFanError as exc:
            raise Rejected(f"params.fan: {exc}") from None
        previous = await self.fan_runtime.reset(name)
        return {"fan": name, "previous_hours": round(previous, 3)}


async def run_agent(loaded: LoadedConfig, stop: asyncio.Event) -> int:
    return await Agent(loaded).run(stop)
