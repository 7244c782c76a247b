"""The OCPP channel: the charger as an OCPP charge point of its operator's CSMS.

Per platform-api §13 the OCPP channel owns session management, driver authorization and
billing; the Tellus channel runs beside it. Layout:

* :mod:`.config` -- the ``[ocpp]`` section; :mod:`.interface` -- :class:`ChargerPort`
  (what an OCPP version may use of the charger) and :class:`CsmsChannel`;
* version independent: :mod:`.journal` (durable transaction messages), :mod:`.settings`
  (configuration keys), :mod:`.authorize` (local list, cache, offline rules),
  :mod:`.profiles` (charging profiles -> connector limits), :mod:`.mapping`, :mod:`.metrics`;
* :mod:`.v16` -- OCPP 1.6-J on the ``ocpp`` package over ``websockets``.

The runtime calls :func:`start_ocpp` once (after the connectors run) and
:meth:`OcppService.stop` at shutdown, after the connectors stopped; Tellus commands go
through :func:`tellus_command_specs`.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Literal

import structlog

from agent.channels.ocpp.config import OcppSection, check_ocpp_url
from agent.channels.ocpp.interface import ChargerPort, CsmsChannel

if TYPE_CHECKING:
    from agent.channels.ocpp.journal import Journal  # loaded by start_ocpp, only when OCPP is enabled

log = structlog.get_logger(__name__)

__all__ = ["ChargerPort", "CsmsChannel", "OcppSection", "OcppService", "check_ocpp_url", "start_ocpp", "status_block", "tellus_command_specs", "with_ocpp_metadata"]

SESSION_COMMANDS = ("start_charging", "stop_charging")
OWNED_MESSAGE = "sessions belong to the OCPP channel on this charger (platform-api §13): start and stop them through the CSMS"


class OcppService:
    """A started OCPP channel plus its journal."""

    def __init__(self, channel: Any, journal: Journal) -> None:
        self.channel = channel
        self.journal = journal

    @property
    def online(self) -> bool:
        return bool(self.channel.online)

    def metadata(self) -> dict[str, Any]:
        return dict(self.channel.metadata())

    async def force_reconnect(self) -> None:
        await self.channel.force_reconnect()

    async def stop(self, grace_s: float = 3.0) -> None:
        """Journal what the last stopped sessions produced, send it if online (bounded), close."""
        tracker = getattr(self.channel, "tracker", None)
        if tracker is not None:
            for cid, connector in list(tracker.port.connectors.items()):
                try:
                    await tracker._poll(cid, connector)
                except Exception:
                    log.exception("ocpp_final_poll_failed", connector=cid)
        deadline = asyncio.get_running_loop().time() + grace_s
        while self.online and await self.journal.depth() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        await self.channel.stop()
        await self.journal.close()


async def start_ocpp(
    cfg: Any,
    *,
    connectors: dict[int, Any],
    faults: Any,
    restart_owner: Any,
    stop: asyncio.Event,
    firmware: Any = None,
    fetch_logs: Callable[[Any, Callable[[int], None]], Awaitable[dict[str, Any]]] | None = None,
    sim_root: Path | None = None,
) -> OcppService | None:
    """Start the OCPP channel (None: no ``[ocpp]`` section, or disabled).

    ``cfg`` is the whole :class:`agent.config.AgentConfig`; ``connectors`` the shared dict of
    connector state machines; ``restart_owner`` has the ``reboot_requested`` flag the runtime
    acts on after ``stop`` is set (a Reset: Soft = restart the agent, Hard = that flag too);
    ``firmware`` the one :class:`agent.firmware.manager.FirmwareManager`; ``fetch_logs`` the
    log-bundle service; ``sim_root`` the in-process simulator's file root (simulated readers).
    """
    section: OcppSection | None = getattr(cfg, "ocpp", None)
    if section is None or not section.enabled:
        return None
    from agent import __version__
    from agent.channels.ocpp.journal import Journal
    from agent.channels.ocpp.services import diagnostics_uploader, firmware_installer
    from agent.channels.ocpp.v16.channel import OcppV16Channel

    state_dir = Path(cfg.charger.state_dir)

    async def request_restart(hard: bool) -> None:
        log.warning("ocpp_reset_restart", hard=hard)
        if hard:
            restart_owner.reboot_requested = True
        stop.set()

    port = ChargerPort(
        serial_number=cfg.charger.serial_number,
        model=cfg.charger.model,
        vendor=section.vendor,
        firmware_version=__version__,
        state_dir=state_dir,
        connectors=connectors,
        faults=faults,
        free_vend=cfg.charging.autostart,
        request_restart=request_restart,
        install_firmware=firmware_installer(firmware) if firmware is not None else None,
        upload_diagnostics=diagnostics_uploader(fetch_logs) if fetch_logs is not None else None,
        readers=_readers(section, [c.id for c in cfg.connectors], sim_root),
    )
    journal = await Journal.open(state_dir)
    channel = OcppV16Channel(section, port, journal)
    await channel.start()
    return OcppService(channel, journal)


def _readers(section: OcppSection, connector_ids: list[int], root: Path | None) -> dict[int, Any]:
    """The ID-token readers: ``[ocpp] readers``, or a simulated one per connector with the
    in-process simulator (taps injected through its control endpoint)."""
    entries = [(r.connector, r.driver, r.reader_name) for r in section.readers]
    if not entries and root is not None:
        entries = [(cid, "sim", None) for cid in connector_ids]
    readers: dict[int, Any] = {}
    for connector, driver, name in entries:
        if driver == "sim":
            if root is None:
                continue
            from hal.auth.sim import SimulatedReader

            readers[connector] = SimulatedReader(Path(root) / "auth" / f"taps-{connector}.jsonl")
        else:
            from hal.auth.pcsc import PcscReader

            readers[connector] = PcscReader(name)
    return readers


def tellus_command_specs(specs: dict[str, Any], cfg: Any, service: Callable[[], "OcppService | None"]) -> dict[str, Any]:
    """The Tellus commands as they are with an OCPP channel configured (platform-api §13).

    * ``start_charging``/``stop_charging`` are refused with a message saying sessions belong
      to OCPP; limits, pause and schedules stay (they combine with charging profiles);
    * ``force_reconnect`` takes ``channel`` = ``platform`` | ``ocpp`` | ``all`` (default):
      ``ocpp`` rebuilds the OCPP WebSocket and completes once the boot is accepted again.
    """
    ocpp: OcppSection | None = getattr(cfg, "ocpp", None)
    if ocpp is None or not ocpp.enabled:
        return specs
    from agent.charging.connector import Rejected
    from agent.commands.params import NoParams

    async def refuse(_ctx: Any) -> None:
        raise Rejected(OWNED_MESSAGE)

    out = dict(specs)
    for name in SESSION_COMMANDS:
        if name in out:
            out[name] = dataclasses.replace(out[name], run=refuse)

    class ForceReconnectParams(NoParams):
        channel: Literal["platform", "ocpp", "all"] = "all"

    original = out.get("force_reconnect")

    async def force_reconnect(ctx: Any) -> None:
        channel = ctx.params.channel
        running = service()
        if channel != "platform" and running is not None:
            await running.force_reconnect()
        if channel != "ocpp" and original is not None:
            await original.run(ctx)
            return
        if running is None:
            raise Rejected("params.channel: the OCPP channel is not running")
        ctx.accepted("rebuilding the OCPP WebSocket")
        channel_service = running

        async def wait_online() -> None:
            deadline = asyncio.get_running_loop().time() + cfg.diagnostics.reconnect_timeout_s
            await asyncio.sleep(0.2)
            while asyncio.get_running_loop().time() < deadline:
                if channel_service.online:
                    ctx.completed("OCPP WebSocket rebuilt, boot accepted")
                    return
                await asyncio.sleep(0.1)
            ctx.failed("OCPP channel not back within the timeout")

        task = asyncio.create_task(wait_online(), name="ocpp-force-reconnect")
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)

    if original is not None:
        out["force_reconnect"] = dataclasses.replace(original, params=ForceReconnectParams, run=force_reconnect)
    return out


_BACKGROUND: set["asyncio.Task[None]"] = set()


METADATA_FIELDS = ("ocpp_version", "ocpp_csms_messages_per_minute", "ocpp_csms_last_message_at", "ocpp_negotiated_features")


def with_ocpp_metadata(body: dict[str, Any], cfg: Any, service: Callable[[], "OcppService | None"]) -> dict[str, Any]:
    """A telemetry body plus the optional ``ocpp`` block (platform-api §14.3, gap G16).

    Only with ``[ocpp] send_metadata = true``, only on the lowest connector's telemetry (the
    values are per charger, as device-wide faults go on the lowest connector, gap G9), and
    only the four proposed fields; absent values are left out.
    """
    running = service()
    section: OcppSection | None = getattr(cfg, "ocpp", None)
    lowest = min((c.id for c in cfg.connectors), default=None)
    if running is None or section is None or not section.send_metadata or body.get("connector_id") != lowest:
        return body
    meta = running.metadata()
    return {**body, "ocpp": {k: meta[k] for k in METADATA_FIELDS if meta.get(k) is not None}}


def status_block(service: "OcppService | None") -> dict[str, Any]:
    """``{"ocpp": metadata}`` for the status snapshot, or ``{}`` without a channel."""
    return {} if service is None else {"ocpp": service.metadata()}
