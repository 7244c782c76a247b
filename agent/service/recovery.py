"""Start-up recovery: what the last run left open is closed (or resumed) before anything new starts.

Both functions run after the connectors are built and before the uplink and the
dispatcher start, so no new session or command can race them. Each reports through
the reporter (committed to the outbox before it returns) and is idempotent: a crash
during recovery repeats it on the next start without a second record or status.
"""

from __future__ import annotations

import asyncio
from typing import Iterable

import structlog

from agent.channels.tellus.reporter import Reporter
from agent.charging.config import ChargingSection
from agent.charging.connector import Connector
from agent.charging.session import as_checkpoint
from agent.utctime import parse_iso, utc_now
from agent.store import Store

log = structlog.get_logger(__name__)

FIRST_READING_TRIES = 50  # x 0.1 s: wait up to ~5 s for a fresh meter reading


async def close_open_sessions(
    store: Store, reporter: Reporter, connectors: dict[int, Connector], policy: ChargingSection
) -> None:
    """Sessions still open from the last run: resume a recently suspended one, close the rest.

    A session suspended by a clean shutdown (``[charging] on_shutdown = "suspend"``) not
    older than ``resume_window_s`` is handed to its connector to resume. Every other
    open session -- a crash, a power loss, an old suspension -- is closed now, with the
    meter's current register when it can be read within ~5 s, exactly once
    (``stop_reason`` ``power_loss``, or ``shutdown`` for an expired suspension).
    """
    for open_session in await store.sessions.open_sessions():
        try:
            cp = as_checkpoint(open_session.running or open_session.start)
        except ValueError as exc:  # never crash the start-up on one damaged row; keep it for inspection
            log.error("session_checkpoint_damaged", connector=open_session.connector_id, record_id=open_session.record_id, error=str(exc))
            continue
        connector = connectors.get(open_session.connector_id)
        suspended_at = cp.get("suspended_at")
        if suspended_at and connector is not None and policy.on_shutdown == "suspend":
            age = (utc_now() - parse_iso(str(suspended_at))).total_seconds()
            if age <= policy.resume_window_s:
                connector.resume(cp, policy.resume_plug_wait_s)
                log.info("session_resume_scheduled", connector=connector.id, record_id=cp.get("record_id"))
                continue
        meter_end = None
        if connector is not None:
            for _ in range(FIRST_READING_TRIES):
                reading = connector.hw.meter.reading()
                if reading is not None:
                    meter_end = reading.energy_export_kwh if cp.get("mode") == "discharge" else reading.energy_import_kwh
                    break
                await asyncio.sleep(0.1)
        reason = "shutdown" if suspended_at else "power_loss"
        message = "session ended by a shutdown" if suspended_at else "session ended by a power loss"
        reporter.close_checkpoint(open_session.connector_id, cp, reason, message, meter_end)
    await reporter.drain()


async def close_interrupted_commands(
    store: Store, reporter: Reporter, connectors: dict[int, Connector], still_running: Iterable[str | None]
) -> None:
    """Commands accepted before the last stop that nothing will finish now end ``failed``.

    Spared: the start command of a session being resumed, power limits still running
    (:class:`agent.charging.limits.PowerLimits` reports those when they elapse) and the
    ids in ``still_running`` (the firmware manager's pending install). Closed sessions
    already reported their command through the reporter.
    """
    await reporter.drain()
    alive = {cp.get("command_id") for c in connectors.values() for cp in [c.resume_checkpoint()] if cp}
    limits = await store.kv.get("power_limits", [])
    alive |= {e.get("command_id") for e in limits if isinstance(e, dict)}
    alive |= set(still_running)
    for entry in await store.ledger.non_terminal():
        if entry.command_id in alive:
            continue
        reporter.command_status(entry.command_id, "failed", "interrupted by an agent restart before it finished")
    await reporter.drain()
