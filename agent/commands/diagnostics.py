"""Handlers of the remote diagnostic commands (platform-api §14.2, proposed extension).

Risk classes (§14.2): ``reboot``, ``soft_reset``, ``force_reconnect``, ``fetch_logs``,
``reset_contactor_counter`` and ``reset_fan_counter`` are low risk;
``run_self_test``, ``calibrate_sensor`` and ``reset_power_module`` are medium risk and
refused while any session runs (the dispatcher enforces the class).

Lifecycle: ``accepted`` once the command is valid and started, then ``completed`` or
``failed`` with structured ``details``; long work (log upload) re-reports ``accepted``
with ``details.progress``. ``reboot`` is the exception: its ``completed`` is reported
by the agent after it is back (the pending report is persisted before exiting).

The handlers only use :class:`AgentServices`, the narrow surface the runtime offers.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal, Protocol

import structlog
from pydantic import Field

from agent.commands.dispatcher import CommandContext, CommandSpec
from agent.commands.params import NoParams, Params
from agent.charging.connector import Connector, Rejected
from agent.maintenance.logbundle import BundleError, FetchLogsParams, UploadError
from hal.tasks import stop_tasks

log = structlog.get_logger(__name__)


# --------------------------------------------------------------------------- params


class RebootParams(Params):
    force: bool = Field(False, description="stop running sessions cleanly instead of waiting for them")


class CalibrateParams(Params):
    sensor: str = Field(..., min_length=1, max_length=64)
    reference_value: float = Field(..., ge=-1000.0, le=2000.0)


class ResetFanParams(Params):
    fan: str | int | None = Field(
        None, description="fan name or 1-based index (like connector ids); may be absent when there is one fan"
    )


class ResetModuleParams(Params):
    module: int = Field(..., ge=0, le=0xFE, description="module address on the CAN bus")


# --------------------------------------------------------------------------- services


class AgentServices(Protocol):
    """What the diagnostic handlers may ask of the running agent."""

    connectors: dict[int, Connector]

    def any_session(self) -> bool: ...
    async def stop_sessions(self, reason: str) -> None: ...
    async def schedule_reboot(self, command_id: str) -> None:
        """Persist the pending report, then shut down and run the configured reboot action."""
        ...

    async def soft_reset(self) -> dict[str, Any]: ...
    async def force_reconnect(self) -> bool: ...
    async def fetch_logs(self, params: FetchLogsParams, progress: Any) -> dict[str, Any]: ...
    async def run_self_test(self, progress: Any) -> dict[str, Any]: ...
    def service_mode_on(self) -> bool: ...
    async def calibrate(self, sensor: str, reference: float) -> dict[str, Any]: ...
    async def reset_fan_counter(self, fan: str | int | None) -> dict[str, Any]: ...


def _run_in_background(ctx: CommandContext, work: Any, name: str) -> None:
    """Run a long diagnostic after ``accepted``; any exception ends the command ``failed``."""

    async def runner() -> None:
        try:
            await work
        except asyncio.CancelledError:
            ctx.failed(f"{name} interrupted by the agent stopping")
            raise
        except Exception as exc:
            log.exception("diagnostic_failed", command=name, command_id=ctx.command_id)
            ctx.failed(f"{name} failed: {type(exc).__name__}: {exc}")

    task = asyncio.create_task(runner(), name=f"diag-{name}-{ctx.command_id}")
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


_BACKGROUND: set[asyncio.Task[None]] = set()


async def cancel_background() -> None:
    """Cancel diagnostic work still running (agent shutdown): each ends ``failed``.

    A deferred ``reboot`` waiting for sessions to end must not fire because the
    shutdown itself closed those sessions.
    """
    await stop_tasks(list(_BACKGROUND))


def diagnostic_specs(services: AgentServices) -> dict[str, CommandSpec]:
    async def reboot(ctx: CommandContext) -> None:
        p: RebootParams = ctx.params
        if services.any_session() and not p.force:
            ctx.accepted("reboot deferred until the running sessions end", {"deferred": True})

            async def wait_then_reboot() -> None:
                while services.any_session():
                    await asyncio.sleep(1.0)
                await services.schedule_reboot(ctx.command_id)

            _run_in_background(ctx, wait_then_reboot(), "reboot")
            return
        ctx.accepted("rebooting", {"forced": p.force})

        async def now() -> None:
            if services.any_session():
                await services.stop_sessions("remote_stop")
            await services.schedule_reboot(ctx.command_id)

        _run_in_background(ctx, now(), "reboot")

    async def soft_reset(ctx: CommandContext) -> None:
        ctx.accepted("re-initialising state machines and drivers")

        async def work() -> None:
            details = await services.soft_reset()
            ctx.completed("state machines and drivers re-initialised", details)

        _run_in_background(ctx, work(), "soft_reset")

    async def force_reconnect(ctx: CommandContext) -> None:
        ctx.accepted("dropping upstream connections")

        async def work() -> None:
            online = await services.force_reconnect()
            if online:
                ctx.completed("reconnected with a new token")
            else:
                ctx.failed("not reconnected within the timeout (reconnect budget or platform unreachable)")

        _run_in_background(ctx, work(), "force_reconnect")

    async def fetch_logs(ctx: CommandContext) -> None:
        p: FetchLogsParams = ctx.params
        ctx.accepted("collecting logs")

        reported: list[int] = []

        def progress(percent: int) -> None:
            # one status report per quarter: statuses share the 60/min budget with records
            if percent >= (reported[-1] if reported else 0) + 25 or (percent == 100 and 100 not in reported):
                reported.append(percent)
                ctx.accepted("uploading", {"progress": percent})

        async def work() -> None:
            try:
                details = await services.fetch_logs(p, progress)
            except UploadError as exc:
                ctx.failed(f"upload failed: {exc}", getattr(exc, "details", None))
                return
            except BundleError as exc:
                ctx.failed(f"bundle failed: {exc}")
                return
            ctx.completed("logs uploaded", details)

        _run_in_background(ctx, work(), "fetch_logs")

    async def run_self_test(ctx: CommandContext) -> None:
        ctx.accepted("self test running; connectors unavailable")

        def progress(check: str) -> None:
            log.info("self_test_progress", command_id=ctx.command_id, check=check)

        async def work() -> None:
            report = await services.run_self_test(progress)
            if report.get("passed"):
                ctx.completed("self test passed", report)
            else:
                ctx.failed("self test found problems", report)

        _run_in_background(ctx, work(), "run_self_test")

    async def calibrate_sensor(ctx: CommandContext) -> None:
        p: CalibrateParams = ctx.params
        if not services.service_mode_on():
            raise Rejected("calibrate_sensor needs local service mode (key switch or `charger-agent service-mode on`)")
        details = await services.calibrate(p.sensor, p.reference_value)
        ctx.accepted("calibrating", {"sensor": p.sensor})
        ctx.completed("sensor calibrated", details)

    async def reset_contactor_counter(ctx: CommandContext) -> None:
        targets = [ctx.connector] if ctx.connector is not None else list(services.connectors.values())
        previous = {}
        for connector in targets:
            previous[str(connector.id)] = connector.reset_contactor_cycles()
        ctx.accepted("resetting contactor counters")
        ctx.completed("contactor counters reset", {"previous_cycles": previous})

    async def reset_fan_counter(ctx: CommandContext) -> None:
        p: ResetFanParams = ctx.params
        details = await services.reset_fan_counter(p.fan)
        ctx.accepted("resetting fan counter")
        ctx.completed("fan counter reset", details)

    async def reset_power_module(ctx: CommandContext) -> None:
        p: ResetModuleParams = ctx.params
        owner = _module_owner(services.connectors, p.module, ctx.connector)
        owner.check_module_reset(p.module)
        ctx.accepted(f"resetting module {p.module} on connector {owner.id}")

        async def work() -> None:
            await owner.reset_power_module(p.module)
            ctx.completed(f"module {p.module} reset", {"connector_id": owner.id, "module": p.module})

        _run_in_background(ctx, work(), "reset_power_module")

    low: Literal["low"] = "low"
    medium: Literal["medium"] = "medium"
    return {
        "reboot": CommandSpec("reboot", RebootParams, "device", reboot, low),
        "soft_reset": CommandSpec("soft_reset", NoParams, "device", soft_reset, low),
        "force_reconnect": CommandSpec("force_reconnect", NoParams, "device", force_reconnect, low),
        "fetch_logs": CommandSpec("fetch_logs", FetchLogsParams, "device", fetch_logs, low),
        "run_self_test": CommandSpec("run_self_test", NoParams, "device", run_self_test, medium),
        "calibrate_sensor": CommandSpec("calibrate_sensor", CalibrateParams, "device", calibrate_sensor, medium),
        "reset_contactor_counter": CommandSpec("reset_contactor_counter", NoParams, "device", reset_contactor_counter, low),
        "reset_fan_counter": CommandSpec("reset_fan_counter", ResetFanParams, "device", reset_fan_counter, low),
        "reset_power_module": CommandSpec(
            "reset_power_module", ResetModuleParams, "device", reset_power_module, medium, own_session_check=True
        ),
    }


def _module_owner(connectors: dict[int, Connector], address: int, hint: Connector | None) -> Connector:
    candidates = [hint] if hint is not None else list(connectors.values())
    for connector in candidates:
        if connector.has_module(address):
            return connector
    raise Rejected(f"params.module: no power module with address {address} on this charger")
