"""``charger-agent run``: the composition root. It builds the parts and wires them; it owns no behaviour.

Data flows one way: HAL -> connector state machines -> reporter -> outbox -> uplink;
commands come back through the dispatcher. Start-up order matters for safety and
for exactly-once billing:

1. open the state store (refuse to start on a corrupt or locked store, with a hint);
2. start the in-process simulator when configured, then the hardware stack
   (:mod:`agent.service.hardware`: a device that fails to start stays unhealthy and
   blocks its connector; the others run);
3. close every session left open by a power loss (``stop_reason`` ``power_loss``),
   atomically with its record, before any new session can start
   (:mod:`agent.service.recovery`);
4. limits, schedules, the dispatcher, housekeeping and the status file;
5. start the Tellus channel last: charging never waits for it.

SIGTERM/SIGINT: running sessions are stopped cleanly (records closed) or suspended,
queued reports get a few seconds to go out, a final heartbeat ``offline`` is sent, and
every device is left in its safe state (:mod:`agent.service.lifecycle` decides what
follows: exit, upgrade restart or system reboot).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import structlog


from agent import __version__
from agent.channels.ocpp import OcppService, start_ocpp, status_block, tellus_command_specs, with_ocpp_metadata
from agent.channels.tellus.channel import TellusChannel
from agent.channels.tellus.reporter import Reporter
from agent.charging.cabinet import check_cabinet
from agent.charging.connector import Connector
from agent.charging.faults import FaultBoard
from agent.charging.limits import PowerLimits
from agent.charging.scheduler import Scheduler
from agent.commands.diagnostics import cancel_background, diagnostic_specs
from agent.commands.dispatcher import Dispatcher
from agent.commands.operational import operational_specs
from agent.config import AgentConfig, LoadedConfig
from agent.firmware.command import firmware_command_spec
from agent.firmware.manager import FirmwareManager
from agent.maintenance.archive import SessionArchive
from agent.maintenance.health import ComponentHealth
from agent.maintenance.service_mode import ServiceMode, audit_hook
from agent.service.companions import ArchiveCompanion, HealthCompanion, TelemetryCompanion
from agent.service.diagnostics import DiagnosticServices
from agent.service.hardware import HardwareStack
from agent.service.housekeeping import Housekeeping, outbox_canary
from agent.service.lifecycle import Lifecycle
from agent.service.memory import trim_heap
from agent.service.recovery import close_interrupted_commands, close_open_sessions
from agent.service.sdnotify import Notifier, Watchdog, default_notifier
from agent.service.snapshot import StatusProjection
from agent.service.status import StatusWriter, status_path
from agent.store import Store, StoreError
from hal.tasks import stop_tasks

log = structlog.get_logger(__name__)

SHUTDOWN_STOP_REASON = "shutdown"


class Agent:
    """The running agent. Create, then ``await run(stop_event)``; parts are set once it runs."""

    def __init__(self, loaded: LoadedConfig) -> None:
        self.loaded = loaded
        self.cfg: AgentConfig = loaded.model
        self.notifier: Notifier = default_notifier()
        self.watchdog: Watchdog = Watchdog.from_env(self.notifier)
        self.connectors: dict[int, Connector] = {}
        self.store: Store | None = None
        self.simulator: Any = None
        self.faults: FaultBoard | None = None
        self.reporter: Reporter | None = None
        self.hardware: HardwareStack | None = None
        self.channel: TellusChannel | None = None
        self.services: DiagnosticServices | None = None
        self.ocpp: OcppService | None = None

    def any_session(self) -> bool:
        return any(c.in_session() for c in self.connectors.values())

    async def run(self, stop: asyncio.Event) -> int:
        cfg = self.cfg
        state_dir = Path(cfg.charger.state_dir)
        try:
            self.store = store = await Store.open(state_dir, cfg.store)
        except StoreError as exc:
            log.error("state_store_unusable", state_dir=str(state_dir), error=str(exc))
            print(f"charger-agent: cannot use the state store in {state_dir}: {exc}", flush=True)
            return 1
        lifecycle = Lifecycle(cfg, store.kv, stop)
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(store.close)
            if cfg.sim is not None and cfg.sim.in_process:
                from agent.cli.sim import SimulatedCharger

                assert self.loaded.sim_root is not None
                self.simulator = await stack.enter_async_context(SimulatedCharger(cfg, self.loaded.sim_root))

            service_mode = ServiceMode(state_dir, cfg.service)
            service_mode.on_change = audit_hook(store.ledger.audit, service_mode)
            await service_mode.start()
            stack.push_async_callback(service_mode.stop)

            ids = [c.id for c in cfg.connectors]
            self.reporter = reporter = Reporter(store, ids, cdr_extensions=cfg.platform.cdr_extensions, send_vin=cfg.platform.send_vin)
            await reporter.start()
            stack.push_async_callback(reporter.stop)
            self.faults = faults = FaultBoard(reporter)
            archive = await SessionArchive.open(state_dir, cfg.archive)
            stack.push_async_callback(archive.close)
            reporter.archive = archive
            health = ComponentHealth(store.kv, cfg.health)
            await health.load()
            telemetry = TelemetryCompanion(
                lambda body: store.outbox.put("telemetry", with_ocpp_metadata(body, cfg, lambda: self.ocpp)),
                active_s=cfg.platform.telemetry_active_interval_s,
                idle_s=cfg.platform.telemetry_idle_interval_s,
                component_health=health.build if cfg.platform.send_component_health else None,
                health_missing=health.missing if cfg.platform.send_component_health else None,
            )

            limits = PowerLimits(
                store.kv,
                self.connectors,
                lambda command_id, details: reporter.command_status(command_id, "completed", "limit elapsed, reverted", details),
            )
            self.hardware = hardware = HardwareStack(
                cfg, store.kv, faults, reporter,
                companions=[telemetry, ArchiveCompanion(archive), HealthCompanion(health)],
                on_built=limits.apply,
                watchdog=self.watchdog,
                connectors=self.connectors,
            )
            await hardware.start()
            await close_open_sessions(store, reporter, self.connectors, cfg.charging)
            await lifecycle.report_pending_reboot(reporter.command_status)
            await reporter.drain()
            self.services = services = DiagnosticServices(
                self.loaded, store, hardware, lifecycle, service_mode, archive, lambda: self.channel, health
            )
            firmware = FirmwareManager(
                cfg.firmware,
                state_dir=state_dir,
                kv=store.kv,
                outbox=store.outbox,
                command_status=reporter.command_status,
                running_version=__version__,
                any_session=services.any_session,
                request_restart=lifecycle.request_upgrade_restart,
                hold_charging=services.hold_all,
            )
            await firmware.load()  # its pending command is not "interrupted"
            await close_interrupted_commands(store, reporter, self.connectors, firmware.alive_command_ids())

            await limits.load()
            scheduler = Scheduler(store.kv, self.connectors, cfg.charger.timezone)
            await scheduler.load()
            specs = {
                **operational_specs(limits, scheduler, v2g_capable=cfg.charger.v2g_capable),
                **diagnostic_specs(services, default_upload_url=cfg.diagnostics.log_upload_url),
                "firmware_upgrade": firmware_command_spec(firmware),
            }
            specs = tellus_command_specs(specs, cfg, lambda: self.ocpp)
            dispatcher = Dispatcher(store.ledger, reporter, self.connectors, specs, ready=hardware.wait_ready)
            projection = StatusProjection(cfg, store, self.connectors, faults, health, service_mode, lambda: self.channel)

            def cabinet() -> None:
                if hardware.thermal is not None:
                    check_cabinet(faults, hardware.thermal, cfg.charging)

            checks = [cabinet]
            housekeeping = Housekeeping(
                limits=limits, scheduler=scheduler, store=store, health=health, connectors=self.connectors,
                watchdog=self.watchdog, checks=checks,
                update_status=lambda: projection.systemd_status(self.notifier, self.watchdog),
            )
            tasks = [asyncio.create_task(housekeeping.run(), name="housekeeping")]
            snapshot_file = status_path(state_dir, runtime_dir=cfg.charger.runtime_dir)  # tmpfs under systemd
            status_writer = StatusWriter(snapshot_file, 1.0, lambda: projection.snapshot() | status_block(self.ocpp))
            await status_writer.start()
            stack.push_async_callback(status_writer.stop)
            if cfg.platform.enabled:
                self.channel = channel = TellusChannel(
                    cfg, store, faults, dispatcher.deliver, ids, firmware_version=firmware.installed_version
                )
                reporter.on_fault_change = channel.fault_changed
                checks.append(channel.check_reconnect_storm)
                await channel.start()
            self.ocpp = await start_ocpp(
                cfg, connectors=self.connectors, faults=faults, restart_owner=lifecycle, stop=stop,
                firmware=firmware, fetch_logs=services.fetch_logs, sim_root=getattr(self.simulator, "root", None),
            )
            healthy = (lambda: True) if self.channel is None else self.channel.reached_platform
            tasks.append(asyncio.create_task(firmware.after_start(healthy), name="firmware-health-gate"))
            tasks.append(asyncio.create_task(outbox_canary(reporter, self.watchdog), name="outbox-canary"))
            self._supervise(tasks)
            log.info("agent_started", version=__version__, connectors=ids, platform=cfg.platform.url if cfg.platform.enabled else None)
            projection.systemd_status(self.notifier, self.watchdog, ready=True)  # READY=1: config, state and HAL are up
            self.watchdog.start()
            trim_heap()  # start-up's garbage back to the kernel (RSS)

            await stop.wait()
            await self.watchdog.stop()
            self.notifier.stopping("stopping: closing sessions, sending queued reports")
            log.info("agent_stopping")
            if not lifecycle.reboot_requested:
                await cancel_background()
            await stop_tasks(tasks)
            await dispatcher.close()
            await hardware.stop(SHUTDOWN_STOP_REASON, suspend=lifecycle.suspend_sessions_on_stop())
            if self.ocpp is not None:
                await self.ocpp.stop()
            await reporter.drain()
            if self.channel is not None:
                await self.channel.stop()
        return await lifecycle.finish()

    def _supervise(self, tasks: list[asyncio.Task[Any]]) -> None:
        """Register what must keep making progress for the systemd watchdog to be fed."""
        by_name = {t.get_name(): t for t in tasks}
        self.watchdog.register("housekeeping", 15.0, task=by_name["housekeeping"])
        self.watchdog.register("outbox", 60.0, task=by_name["outbox-canary"])
        if self.channel is not None:
            self.watchdog.register("uplink", 3 * self.cfg.platform.heartbeat_interval_s + 30.0, probe=self.channel.progress)
        assert self.hardware is not None
        self.hardware.watch(self.watchdog)


async def run_agent(loaded: LoadedConfig, stop: asyncio.Event) -> int:
    return await Agent(loaded).run(stop)
