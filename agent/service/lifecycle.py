"""How the agent process ends: clean stop, remote reboot, upgrade restart.

:class:`Lifecycle` owns the stop event and the reasons to set it. Contract:

* :meth:`schedule_reboot` persists the pending ``completed`` report of a ``reboot``
  command *before* asking the process to stop, so the report survives the reboot
  and is sent by :meth:`report_pending_reboot` on the next start (with the downtime).
* :meth:`request_upgrade_restart` (``"agent"`` or ``"system"``) stops the process for
  the firmware manager; :meth:`exit_code` then returns the code systemd restarts on.
* :meth:`finish` runs the configured system reboot command when one is due (bounded
  to 60 s; a failure is logged, never raised) and returns the process exit code.
* Running sessions are suspended at shutdown only for a plain stop with
  ``[charging] on_shutdown = "suspend"``; a reboot or an upgrade closes them.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import structlog

from agent import __version__
from agent.utctime import parse_iso, to_iso, utc_now
from agent.config import AgentConfig
from agent.firmware.boot import EXIT_UPGRADE_RESTART
from agent.store.kv import KVStore

log = structlog.get_logger(__name__)

PENDING_REBOOT_KEY = "pending_reboot"
REBOOT_COMMAND_TIMEOUT_S = 60.0

StatusReport = Callable[[str, str, str | None, dict[str, Any] | None], None]


class Lifecycle:
    """The stop event and why it was set; see the module contract."""

    def __init__(self, cfg: AgentConfig, kv: KVStore, stop: asyncio.Event) -> None:
        self.cfg = cfg
        self.kv = kv
        self.stop_event = stop
        self.reboot_requested = False
        self.upgrade_restart: str | None = None  # "agent" | "system" once an upgrade asked for it

    def suspend_sessions_on_stop(self) -> bool:
        return self.cfg.charging.on_shutdown == "suspend" and not self.reboot_requested and self.upgrade_restart is None

    async def schedule_reboot(self, command_id: str) -> None:
        """Persist the pending ``completed`` report, then stop; the configured action follows."""
        await self.kv.set(PENDING_REBOOT_KEY, {"command_id": command_id, "at": to_iso(utc_now())})
        log.warning("reboot_requested", command_id=command_id, action=self.cfg.diagnostics.reboot_action)
        self.reboot_requested = True
        self.stop_event.set()

    async def report_pending_reboot(self, report: StatusReport) -> None:
        """After a reboot: report its command ``completed`` with the downtime, once."""
        pending = await self.kv.get(PENDING_REBOOT_KEY)
        if not isinstance(pending, dict) or not pending.get("command_id"):
            return
        requested = parse_iso(str(pending.get("at", to_iso(utc_now()))))
        downtime = round((utc_now() - requested).total_seconds(), 1)
        report(str(pending["command_id"]), "completed", "agent restarted", {"downtime_s": downtime, "version": __version__})
        await self.kv.delete(PENDING_REBOOT_KEY)

    async def request_upgrade_restart(self, kind: str) -> None:
        log.warning("upgrade_restart_requested", kind=kind)
        self.upgrade_restart = kind
        self.stop_event.set()

    async def finish(self) -> int:
        """After shutdown: the exit code, running the reboot command first when one is due."""
        log.info("agent_stopped", reboot=self.reboot_requested, upgrade_restart=self.upgrade_restart)
        if self.upgrade_restart == "agent":
            return EXIT_UPGRADE_RESTART  # systemd (Restart=always) starts the new current release
        if self.upgrade_restart == "system":
            await reboot_system(self.cfg.firmware.reboot_command)
        elif self.reboot_requested and self.cfg.diagnostics.reboot_action == "system":
            await reboot_system(self.cfg.diagnostics.reboot_command)
        return 0


async def reboot_system(command: list[str]) -> None:
    """Run the reboot command (bounded); failures are logged."""
    log.warning("system_reboot", command=command)
    try:
        proc = await asyncio.create_subprocess_exec(*command)
        await asyncio.wait_for(proc.wait(), REBOOT_COMMAND_TIMEOUT_S)
    except (OSError, asyncio.TimeoutError) as exc:
        log.error("system_reboot_failed", error=str(exc))
