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
from typing import Any, Literal

import structlog

from agent.channels.ocpp.config import OcppSection, check_ocpp_url
from agent.channels.ocpp.interface import ChargerPort, CsmsChannel
from agent.channels.ocpp.journal import Journal

log = structlog.get_logger(__name__)

__all__ = ["ChargerPort", "CsmsChannel", "OcppSection", "OcppService", "check_ocpp_url", "start_ocpp", "tellus_command_specs", "with_ocpp_metadata"]

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


async def start_ocpp(agent: Any) -> OcppService | None:
    """Start the OCPP channel of a running :class:`agent.runtime.Agent` (None: not configured)."""
    cfg: OcppSection | None = getattr(agent.cfg, "ocpp", None)
    if cfg is None or not cfg.enabled:
        return None
    from agent import __version__
    from agent.channels.ocpp.services import diagnostics_uploader, firmware_installer
    from agent.channels.ocpp.v16.channel import OcppV16Channel

    state_dir = Path(agent.cfg.charger.state_dir)

    async def request_restart(hard: bool) -> None:
        log.warning("ocpp_reset_restart", hard=hard)
        agent.reboot_requested = hard
        if agent._stop_event is not None:
            agent._stop_event.set()

    port = ChargerPort(
        serial_number=agent.cfg.charger.serial_number,
        model=agent.cfg.charger.model,
        vendor=cfg.vendor,
        firmware_version=__version__,
        state_dir=state_dir,
        connectors=agent.connectors,
        faults=agent.faults,
        free_vend=agent.cfg.charging.autostart,
        request_restart=request_restart,
        install_firmware=firmware_installer(agent.firmware) if agent.firmware is not None else None,
        upload_diagnostics=diagnostics_uploader(agent),
        readers=_readers(agent),
    )
    journal = await Journal.open(state_dir)
    channel = OcppV16Channel(cfg, port, journal)
    await channel.start()
    return OcppService(channel, journal)


def _readers(agent: Any) -> dict[int, Any]:
    """The ID-token readers: ``[ocpp] readers``, or a simulated one per connector with the
    in-process simulator (taps injected through its control endpoint)."""
    cfg: OcppSection = agent.cfg.ocpp
    root = getattr(getattr(agent, "simulator", None), "root", None)
    entries = [(r.connector, r.driver, r.reader_name) for r in cfg.readers]
    if not entries and root is not None:
        entries = [(c.id, "sim", None) for c in agent.cfg.connectors]
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


def tellus_command_specs(specs: dict[str, Any], agent: Any) -> dict[str, Any]:
    """The Tellus commands as they are with an OCPP channel configured (platform-api §13).

    * ``start_charging``/``stop_charging`` are refused with a message saying sessions belong
      to OCPP; limits, pause and schedules stay (they combine with charging profiles);
    * ``force_reconnect`` takes ``channel`` = ``platform`` | ``ocpp`` | ``all`` (default):
      ``ocpp`` rebuilds the OCPP WebSocket and completes once the boot is accepted again.
    """
    ocpp: OcppSection | None = getattr(agent.cfg, "ocpp", None)
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
        service: OcppService | None = agent.ocpp
        if channel != "platform" and service is not None:
            await service.force_reconnect()
        if channel != "ocpp" and original is not None:
            await original.run(ctx)
            return
        if service is None:
            raise Rejected("params.channel: the OCPP channel is not running")
        ctx.accepted("rebuilding the OCPP WebSocket")

        async def wait_online() -> None:
            deadline = asyncio.get_running_loop().time() + agent.cfg.diagnostics.reconnect_timeout_s
            await asyncio.sleep(0.2)
            while asyncio.get_running_loop().time() < deadline:
                if service.online:
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


def with_ocpp_metadata(agent: Any, body: dict[str, Any]) -> dict[str, Any]:
    """A telemetry body plus the optional ``ocpp`` block (platform-api §14.3, gap G16).

    Only with ``[ocpp] send_metadata = true``, only on the lowest connector's telemetry (the
    values are per charger, as device-wide faults go on the lowest connector, gap G9), and
    only the four proposed fields; absent values are left out.
    """
    service: OcppService | None = getattr(agent, "ocpp", None)
    cfg: OcppSection | None = getattr(agent.cfg, "ocpp", None)
    if service is None or cfg is None or not cfg.send_metadata or body.get("connector_id") != min(agent.connectors, default=None):
        return body
    meta = service.metadata()
    return {**body, "ocpp": {k: meta[k] for k in METADATA_FIELDS if meta.get(k) is not None}}

