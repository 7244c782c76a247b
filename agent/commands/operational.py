"""Handlers of the operational commands (platform-api §8.3).

Lifecycle reports (§8.5, Project choices): ``accepted`` as soon as the command is
valid and armed; ``start_charging`` ends ``completed`` (with energy and duration)
when its session ends cleanly, ``failed`` otherwise; ``stop_charging`` ends
``completed`` once the current is down and the contactor confirmed open;
``set_power_limit``/``pause_charging`` end ``completed`` when the limit elapsed and
was reverted; ``set_schedule`` ends ``completed`` once the schedule is stored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.commands.dispatcher import CommandContext, CommandSpec
from agent.commands.params import Discharge, PauseCharging, SetPowerLimit, SetSchedule, StartCharging, StopCharging
from agent.charging.connector import Rejected
from agent.charging.session import SessionRequest

if TYPE_CHECKING:
    from agent.charging.limits import PowerLimits
    from agent.charging.scheduler import Scheduler


def operational_specs(limits: "PowerLimits", scheduler: "Scheduler", *, v2g_capable: bool) -> dict[str, CommandSpec]:
    async def start_charging(ctx: CommandContext) -> None:
        p: StartCharging = ctx.params
        assert ctx.connector is not None
        ctx.connector.request_start(
            SessionRequest(
                start_reason="remote_start",
                command_id=ctx.command_id,
                power_kw=p.charge_power,
                duration_s=p.duration,
                target_soc=p.target_soc,
                transaction_id=p.transaction_id,
            )
        )
        ctx.accepted("session armed", {"connector_id": ctx.connector.id})

    async def stop_charging(ctx: CommandContext) -> None:
        p: StopCharging = ctx.params
        assert ctx.connector is not None
        ctx.connector.request_stop(p.reason or "remote_stop", ctx.command_id)
        ctx.accepted("stopping", {"connector_id": ctx.connector.id})

    async def _limit(ctx: CommandContext, percent: float, duration: int, reason: str | None) -> None:
        targets = [ctx.connector.id] if ctx.connector is not None else sorted(limits.connectors)
        applied = await limits.add(ctx.command_id, targets, percent, duration, reason)
        ctx.accepted("limit applied", {"limit_kw": {str(k): v for k, v in applied.items()}, "duration": duration})

    async def set_power_limit(ctx: CommandContext) -> None:
        p: SetPowerLimit = ctx.params
        await _limit(ctx, p.power_limit_percent, p.duration, p.reason)

    async def pause_charging(ctx: CommandContext) -> None:
        p: PauseCharging = ctx.params
        await _limit(ctx, 0, p.duration, p.reason or "pause_charging")

    async def set_schedule(ctx: CommandContext) -> None:
        p: SetSchedule = ctx.params
        assert ctx.connector is not None
        ctx.accepted("schedule received")
        await scheduler.store(ctx.connector.id, p)
        ctx.completed("schedule stored", {"schedule_id": p.schedule_id, "enabled": p.enabled})

    async def discharge(ctx: CommandContext) -> None:
        p: Discharge = ctx.params
        assert ctx.connector is not None
        if not v2g_capable:
            raise Rejected(f"connector {ctx.connector.id} is not V2G-capable")
        ctx.connector.request_start(
            SessionRequest(
                mode="discharge",
                start_reason="remote_start",
                command_id=ctx.command_id,
                power_kw=p.discharge_power,
                duration_s=p.duration,
                min_soc=p.min_soc,
            )
        )
        ctx.accepted("discharge armed", {"connector_id": ctx.connector.id})

    return {
        "start_charging": CommandSpec("start_charging", StartCharging, "connector", start_charging),
        "stop_charging": CommandSpec("stop_charging", StopCharging, "connector", stop_charging),
        "set_power_limit": CommandSpec("set_power_limit", SetPowerLimit, "device", set_power_limit),
        "pause_charging": CommandSpec("pause_charging", PauseCharging, "device", pause_charging),
        "set_schedule": CommandSpec("set_schedule", SetSchedule, "connector", set_schedule),
        "discharge": CommandSpec("discharge", Discharge, "connector", discharge),
    }
