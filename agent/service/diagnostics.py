"""The services the remote diagnostic commands use (:class:`agent.commands.diagnostics.AgentServices`).

:class:`DiagnosticServices` gathers them from the parts that own the behaviour, so the
command handlers stay testable without a whole agent:

* sessions: ``any_session`` / ``stop_sessions`` (bounded: 30 s, then logged);
* ``schedule_reboot`` -> :class:`agent.service.lifecycle.Lifecycle`;
* ``soft_reset`` -> :meth:`agent.service.hardware.HardwareStack.rebuild`;
* ``force_reconnect`` -> the Tellus channel (False when the platform is disabled);
* ``fetch_logs`` -> the log bundle with the session archive's CSV files of the window;
* ``run_self_test``: every connector out of service while the test owns the hardware
  (under the hardware lock), restored afterwards whatever happens;
* ``calibrate`` / ``reset_fan_counter``: refusals become :class:`Rejected` naming the field.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Callable

import structlog

from agent.channels.tellus.channel import TellusChannel
from agent.charging.connector import Connector, Rejected
from agent.config import LoadedConfig
from agent.maintenance.archive import SessionArchive
from agent.maintenance.archive_export import session_csv_files
from agent.maintenance.calibration import CalibrationError
from agent.maintenance.counters import UnknownFanError
from agent.maintenance.health import ComponentHealth
from agent.maintenance.logbundle import FetchLogsParams
from agent.maintenance.service_mode import ServiceMode
from agent.service.hardware import HardwareStack
from agent.service.lifecycle import Lifecycle
from agent.store import Store

log = structlog.get_logger(__name__)

STOP_SESSIONS_TIMEOUT_S = 30.0


class SessionControl:
    """Whole-charger session operations over the shared connectors dict."""

    def __init__(self, connectors: dict[int, Connector]) -> None:
        self.connectors = connectors

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
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_SESSIONS_TIMEOUT_S
        while loop.time() < deadline:
            if not self.any_session():
                return
            await asyncio.sleep(0.1)
        log.error("sessions_did_not_stop", connectors=[c.id for c in self.connectors.values() if c.in_session()])

    async def hold_all(self, reason: str | None) -> bool:
        """Take every connector out of service (``None``: back); False (nothing held) if one is busy."""
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


class DiagnosticServices(SessionControl):
    """See the module contract."""

    def __init__(
        self,
        loaded: LoadedConfig,
        store: Store,
        hardware: HardwareStack,
        lifecycle: Lifecycle,
        service_mode: ServiceMode,
        archive: SessionArchive | None,
        channel: Callable[[], TellusChannel | None],
        health: ComponentHealth,
    ) -> None:
        super().__init__(hardware.connectors)
        self.loaded = loaded
        self.cfg = loaded.model
        self.store = store
        self.hardware = hardware
        self.lifecycle = lifecycle
        self.service_mode = service_mode
        self.archive = archive
        self.channel = channel
        self.health = health

    def service_mode_on(self) -> bool:
        return self.service_mode.is_on()

    async def schedule_reboot(self, command_id: str) -> None:
        await self.lifecycle.schedule_reboot(command_id)

    async def soft_reset(self) -> dict[str, Any]:
        return await self.hardware.rebuild("remote_stop")

    async def force_reconnect(self) -> bool:
        channel = self.channel()
        return await channel.force_reconnect() if channel is not None else False

    async def fetch_logs(self, params: FetchLogsParams, progress: Callable[[int], None]) -> dict[str, Any]:
        """Bundle logs, audit log, the window's session archives and the redacted config; upload it."""
        from agent.maintenance.logbundle import LogSources, collect_and_upload  # first use loads the bundle code

        cfg = self.cfg
        since, until = params.window()
        creds = self.store.credentials.load()
        ledger = self.store.ledger
        return await collect_and_upload(
            params,
            sources=LogSources.discover(journald_unit=cfg.diagnostics.journald_unit, log_file=cfg.logging.file),
            audit=lambda s, u: ledger.audit_entries(since=s.timestamp(), until=u.timestamp()),
            config_path=self.loaded.path,
            workdir=Path(cfg.charger.state_dir) / "diag",
            extra_files=await session_csv_files(self.archive, since, until) if self.archive is not None else [],
            ca_file=cfg.platform.ca_file,
            known_secrets=[creds.device_secret] if creds is not None else [],
            progress=progress,
        )

    async def run_self_test(self, progress: Callable[[str], None]) -> dict[str, Any]:
        """Every connector out of service while the self test owns the hardware; restored after."""
        from agent.maintenance.selftest import run_self_test  # first use loads the checks

        async with self.hardware.lock:
            taken: list[Connector] = []
            try:
                for connector in self.connectors.values():
                    await connector.set_unavailable("self_test")
                    taken.append(connector)
                hardware = {cid: c.hw for cid, c in self.connectors.items()}
                report = await run_self_test(
                    hardware, self.hardware.thermal, self.cfg.self_test, progress=lambda event: progress(str(event))
                )
            finally:
                for connector in taken:
                    await connector.set_unavailable(None)
            return report.to_details()

    async def calibrate(self, sensor: str, reference: float) -> dict[str, Any]:
        calibration = self.hardware.calibration
        assert calibration is not None, "calibrate before the hardware started"
        try:
            entry = await calibration.calibrate(sensor, reference, calibration.raw_value(sensor))
        except CalibrationError as exc:
            raise Rejected(str(exc)) from None
        return entry.to_dict()

    async def reset_discharge_cycles(self, connector_id: int) -> int:
        """``discharge_contactor_cycles`` back to 0 (the discharge contactor was replaced)."""
        return await self.health.discharge.reset(connector_id)

    async def reset_fan_counter(self, fan: str | int | None) -> dict[str, Any]:
        fan_runtime = self.hardware.fan_runtime
        assert fan_runtime is not None, "reset_fan_counter before the hardware started"
        try:
            name = fan_runtime.resolve(fan)
        except UnknownFanError as exc:
            raise Rejected(f"params.fan: {exc}") from None
        previous = await fan_runtime.reset(name)
        return {"fan": name, "previous_hours": round(previous, 3)}
