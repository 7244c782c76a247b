"""Telemetry samples per connector (platform-api §7.1).

Cadence: ``telemetry_active_interval_s`` (5 s) while charging or discharging,
``telemetry_idle_interval_s`` (60 s) otherwise, and one sample at once on every
state change. Values come from the connector's meter; when the meter has no fresh
reading the sample is skipped (old values are never sent as new). AC connectors
carry ``phase_details`` (phase_a/b/c); power is kW, negative while discharging.

``state`` follows the connector, except in ``finishing``: while current still flows
(more than :data:`FLOWING_A`) the sample says ``charging``/``discharging`` -- the
platform's four states have no ``finishing``, and ``idle`` with 50 A flowing would be
false.

With ``component_health``, the *first* sample waits (at most ``first_sample_wait_s``)
until the block holds everything the hardware can give (``health_missing`` empty:
drivers deliver their first readings within a few seconds of the start), so the first
sample of a DC connector with an IMD is already complete.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import structlog

from agent.charging.connector import Connector, ConnectorState
from agent.utctime import to_iso, utc_now
from hal.tick import Wakeup

log = structlog.get_logger(__name__)

#: above this a connector in ``finishing`` still reports ``charging``/``discharging``
FLOWING_A = 1.0


def sample(connector: Connector, component_health: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """One TelemetryUpload body from the connector's read-only snapshot, or ``None`` when the
    meter has no fresh reading."""
    snap = connector.snapshot()
    reading = snap.meter
    if reading is None:
        return None
    telemetry_state = snap.state.telemetry_state
    if snap.state is ConnectorState.FINISHING and abs(reading.current) > FLOWING_A:
        discharging = (snap.session is not None and snap.session.mode == "discharge") or reading.power_kw < 0
        telemetry_state = "discharging" if discharging else "charging"
    body: dict[str, Any] = {
        "timestamp": to_iso(utc_now()),
        "connector_id": snap.id,
        "state": telemetry_state,
        "voltage": round(reading.voltage, 2),
        "current": round(reading.current, 2),
        "power": round(reading.power_kw, 3),
        "energy_delivered": round(snap.session.energy_kwh, 3) if snap.session is not None else 0.0,
    }
    if snap.vehicle.soc is not None and snap.plugged:
        body["soc"] = int(snap.vehicle.soc)
    if connector.config.outlet_sensor and connector.hw.thermal is not None:  # the outlet sensor, when configured
        t = snap.outlet_temperature
        if t is not None and t.celsius is not None:
            body["temperature"] = round(t.celsius, 1)
    elif reading.temperature is not None:
        body["temperature"] = round(reading.temperature, 1)
    if snap.kind == "ac" and reading.phases is not None:
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
        health_missing: Callable[[Connector, dict[str, Any]], list[str]] | None = None,
        first_sample_wait_s: float = 10.0,
    ) -> None:
        self.connector = connector
        self.put = put
        self.active_s = active_s
        self.idle_s = idle_s
        self.component_health = component_health
        self.health_missing = health_missing
        self.first_sample_wait_s = first_sample_wait_s
        self._changed = Wakeup()

    def state_changed(self) -> None:
        self._changed.set()

    async def _health_complete(self) -> None:
        """Wait (bounded) until the health block lacks nothing the hardware can give."""
        if self.component_health is None or self.health_missing is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.first_sample_wait_s
        missing: list[str] = []
        while loop.time() < deadline:
            block = self.component_health(self.connector)
            missing = self.health_missing(self.connector, block) if block is not None else []
            if not missing:
                return
            await asyncio.sleep(0.25)
        log.warning("component_health_incomplete", connector=self.connector.id, missing=missing)

    async def run(self) -> None:
        await self._health_complete()
        while True:
            body = sample(self.connector, self.component_health(self.connector) if self.component_health else None)
            if body is not None:
                await self.put(body)
            active = self.connector.state in (ConnectorState.CHARGING, ConnectorState.DISCHARGING)
            # a state change samples at once; otherwise the next slot of the shared tick grid
            await self._changed.wait_for_tick(self.active_s if active else self.idle_s)
            self._changed.clear()
