"""Telemetry samples per connector (platform-api §7.1).

Cadence: ``telemetry_active_interval_s`` (5 s) while charging or discharging,
``telemetry_idle_interval_s`` (60 s) otherwise, and one sample at once on every
state change. Values come from the connector's meter; when the meter has no fresh
reading the sample is skipped (old values are never sent as new). AC connectors
carry ``phase_details`` (phase_a/b/c); power is kW, negative while discharging.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import structlog

from agent.charging.connector import Connector, ConnectorState
from agent.utctime import to_iso, utc_now

log = structlog.get_logger(__name__)


def sample(connector: Connector, component_health: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """One TelemetryUpload body, or ``None`` when the meter has no fresh reading."""
    reading = connector.hw.meter.reading()
    if reading is None:
        return None
    state = connector.state
    body: dict[str, Any] = {
        "timestamp": to_iso(utc_now()),
        "connector_id": connector.id,
        "state": state.telemetry_state,
        "voltage": round(reading.voltage, 2),
        "current": round(reading.current, 2),
        "power": round(reading.power_kw, 3),
        "energy_delivered": round(connector.session.energy_kwh, 3) if connector.session is not None else 0.0,
    }
    vehicle = connector.hw.vehicle.status()
    if vehicle.soc is not None and vehicle.plugged:
        body["soc"] = int(vehicle.soc)
    thermal = connector.hw.thermal
    if thermal is not None and connector.config.outlet_sensor:
        t = thermal.temperatures().get(connector.config.outlet_sensor)
        if t is not None and t.celsius is not None:
            body["temperature"] = round(t.celsius, 1)
    elif reading.temperature is not None:
        body["temperature"] = round(reading.temperature, 1)
    if connector.config.kind == "ac" and reading.phases is not None:
        body["phase_details"] = {
            name: {"voltage": round(p.voltage, 2), "current": round(p.current, 2)}
            for name, p in zip(("phase_a", "phase_b", "phase_c"), reading.phases)
        }
    if component_health is not None:
        body["component_health"] = component_health
    return body


class TelemetrySampler:
    """One task per connector putting samples into the outbox at the documented cadence."""

    def __init__(
        self,
        connector: Connector,
        put: Callable[[dict[str, Any]], Any],
        *,
        active_s: float,
        idle_s: float,
        component_health: Callable[[Connector], dict[str, Any] | None] | None = None,
    ) -> None:
        self.connector = connector
        self.put = put
        self.active_s = active_s
        self.idle_s = idle_s
        self.component_health = component_health
        self._changed = asyncio.Event()

    def state_changed(self) -> None:
        self._changed.set()

    async def run(self) -> None:
        while True:
            body = sample(self.connector, self.component_health(self.connector) if self.component_health else None)
            if body is not None:
                await self.put(body)
            active = self.connector.state in (ConnectorState.CHARGING, ConnectorState.DISCHARGING)
            try:
                await asyncio.wait_for(self._changed.wait(), self.active_s if active else self.idle_s)
            except asyncio.TimeoutError:
                pass
            self._changed.clear()
