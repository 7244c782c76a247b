"""How the agent process ends: reboot report persisted across the restart, exit codes, suspend rule."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from agent.config import load_config
from agent.firmware.boot import EXIT_UPGRADE_RESTART
from agent.service.lifecycle import PENDING_REBOOT_KEY, Lifecycle
from agent.store import Store

ROOT = Path(__file__).resolve().parents[3]


def _cfg(**charging: Any) -> Any:
    cfg = load_config(ROOT / "config" / "sim.toml").model
    return cfg.model_copy(update={"charging": cfg.charging.model_copy(update=charging)}) if charging else cfg


async def test_reboot_report_is_persisted_before_stopping_and_sent_once_after(store: Store) -> None:
    stop = asyncio.Event()
    life = Lifecycle(_cfg(), store.kv, stop)
    await life.schedule_reboot("cmd-reboot")
    assert stop.is_set() and life.reboot_requested
    assert (await store.kv.get(PENDING_REBOOT_KEY))["command_id"] == "cmd-reboot"

    reports: list[tuple[str, str, Any]] = []
    after = Lifecycle(_cfg(), store.kv, asyncio.Event())  # the next process
    await after.report_pending_reboot(lambda cid, status, msg, details: reports.append((cid, status, details)))
    await after.report_pending_reboot(lambda cid, status, msg, details: reports.append((cid, status, details)))
    assert [(c, s) for c, s, _ in reports] == [("cmd-reboot", "completed")]
    assert reports[0][2]["downtime_s"] >= 0.0


async def test_upgrade_restart_of_the_agent_exits_with_the_restart_code(store: Store) -> None:
    life = Lifecycle(_cfg(), store.kv, asyncio.Event())
    await life.request_upgrade_restart("agent")
    assert life.stop_event.is_set()
    assert await life.finish() == EXIT_UPGRADE_RESTART


async def test_sessions_are_suspended_only_for_a_plain_stop_with_on_shutdown_suspend(store: Store) -> None:
    life = Lifecycle(_cfg(on_shutdown="suspend"), store.kv, asyncio.Event())
    assert life.suspend_sessions_on_stop()
    await life.schedule_reboot("cmd-1")
    assert not life.suspend_sessions_on_stop()  # a reboot closes the sessions
    assert not Lifecycle(_cfg(on_shutdown="stop"), store.kv, asyncio.Event()).suspend_sessions_on_stop()
    assert await Lifecycle(_cfg(), store.kv, asyncio.Event()).finish() == 0
