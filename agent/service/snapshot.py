"""The status snapshot of the running agent, projected from its parts.

:class:`StatusProjection` turns the connectors, fault board, component health, channel
and outbox into the plain input of :func:`agent.service.status.build_status` (the
contract of every key lives there). It only reads: it never awaits, never touches a
driver beyond its cached snapshot (``reading()``, ``status()``), and a part that is not
built yet is shown as absent. :meth:`systemd_status` turns the same snapshot into the
one-line ``STATUS=`` for ``systemctl status``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from agent import __version__
from agent.channels.tellus.channel import TellusChannel
from agent.charging.connector import Connector
from agent.charging.faults import FaultBoard
from agent.utctime import to_iso
from agent.config import AgentConfig
from agent.maintenance.health import ComponentHealth
from agent.maintenance.service_mode import ServiceMode
from agent.service.sdnotify import Notifier, Watchdog, status_line
from agent.service.status import build_status, fault_entry
from agent.store import Store


def connector_view(c: Connector) -> dict[str, Any]:
    """One connector as the status snapshot shows it."""
    reading = c.hw.meter.reading()
    vehicle = c.hw.vehicle.status()
    s = c.session
    return {
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
            "started_at": to_iso(s.start_time),
            "energy_kwh": s.energy_kwh,
            "max_power_kw": s.max_power_kw,
            "soc_start": s.soc_start,
        },
    }


class StatusProjection:
    """Builds the snapshot on demand; see the module contract."""

    def __init__(
        self,
        cfg: AgentConfig,
        store: Store,
        connectors: dict[int, Connector],
        faults: FaultBoard,
        health: ComponentHealth,
        service_mode: ServiceMode,
        channel: Callable[[], TellusChannel | None],
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.connectors = connectors
        self.faults = faults
        self.health = health
        self.service_mode = service_mode
        self.channel = channel
        self.started_at = time.time()
        self._status_text = ""

    def snapshot(self) -> dict[str, Any]:
        """Everything ``charger-agent status`` shows (see :func:`agent.service.status.build_status`)."""
        channel = self.channel()
        uplink = channel.status() if channel is not None else {"enabled": self.cfg.platform.enabled, "online": False}
        return build_status(
            agent_version=__version__,
            connectors=[connector_view(c) for c in self.connectors.values()],
            faults=[fault_entry(f.fault_id, f.connector_id, since=f.raised_at, details=f.details) for f in self.faults.active()],
            component_health={c.id: self.health.build(c) for c in self.connectors.values()},
            uplink=uplink,
            outbox=dataclasses.asdict(self.store.outbox.stats()),
            service_mode=self.service_mode.status(),
            taken_at=time.time(),
            started_at=self.started_at,
            serial_number=self.cfg.charger.serial_number,
        )

    def systemd_status(self, notifier: Notifier, watchdog: Watchdog, *, ready: bool = False) -> None:
        """``STATUS=`` for ``systemctl status`` when it changed (and ``READY=1`` when ``ready``)."""
        try:
            text = status_line(self.snapshot())
        except Exception as exc:  # a status line must never take the agent down
            text = f"status unavailable: {type(exc).__name__}"
        if watchdog.stalled:
            text = f"watchdog: {', '.join(watchdog.stalled)} stalled | {text}"
        if ready:
            notifier.ready(text)
        elif text != self._status_text:
            notifier.status(text)
        self._status_text = text
