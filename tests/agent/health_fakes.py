"""Small in-memory HAL stand-ins for the component-health, counter and calibration tests."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from agent.charging.config import ChargingSection, ConnectorConfig, DeviceSection
from agent.charging.connector import Connector, ConnectorHardware
from agent.charging.faults import FaultBoard
from hal.interfaces import (
    OK,
    BidirectionalStatus,
    ContactorPosition,
    ContactorStatus,
    FanStatus,
    Health,
    TemperatureReading,
)
from tests.agent.fakes import (
    FakeBidirectional,
    FakeContactor,
    FakeImd,
    FakeMeter,
    FakeModules,
    FakeVehicle,
    RecordingListener,
)


@dataclass
class FakeThermal:
    """Temperatures and fans set directly by the test."""

    name: str = "thermal"
    temps: dict[str, float | None] = field(default_factory=dict)
    fan_state: dict[str, FanStatus] = field(default_factory=dict)
    duty_calls: list[tuple[str, float]] = field(default_factory=list)
    started: bool = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.started = False

    def temperatures(self) -> Mapping[str, TemperatureReading]:
        return {n: TemperatureReading(n, c) for n, c in self.temps.items()}

    def fans(self) -> Mapping[str, FanStatus]:
        return dict(self.fan_state)

    def set_fan(
        self,
        name: str,
        rpm: float | None,
        duty: float = 100.0,
        nominal: float = 1800.0,
        health: Health = OK,
    ) -> None:
        self.fan_state[name] = FanStatus(name, rpm, duty, nominal, health)

    async def set_fan_duty(self, fan: str, percent: float) -> None:
        self.duty_calls.append((fan, percent))

    def health(self) -> Health:
        return OK


@dataclass
class ScriptedContactor(FakeContactor):
    """A FakeContactor whose reported position and health can be forced, with rated cycles."""

    forced_position: ContactorPosition | None = None
    forced_health: Health = OK
    rated_cycles: int | None = None

    @property
    def options(self) -> Any:
        return SimpleNamespace(rated_cycles=self.rated_cycles) if self.rated_cycles else None

    def status(self) -> ContactorStatus:
        base = super().status()
        return ContactorStatus(
            coil_energised=base.coil_energised,
            mirror_says_open=base.mirror_says_open,
            position=self.forced_position or base.position,
            welded=self.welded,
            cycles=self.cycles,
            health=self.forced_health,
        )


@dataclass
class MeasuringStage(FakeBidirectional):
    """A V2G stage that also reports harmonic distortion."""

    thd_pct: float | None = 2.4

    def status(self) -> BidirectionalStatus:
        base = super().status()
        return BidirectionalStatus(
            base.active, base.power_kw, base.grid_synced, base.cycles, self.thd_pct, base.health
        )


def make_connector(
    *,
    kind: str = "dc",
    cid: int = 1,
    thermal: FakeThermal | None = None,
    contactor: FakeContactor | None = None,
    stage: FakeBidirectional | None = None,
    modules: FakeModules | None = None,
    outlet_sensor: str | None = None,
) -> Connector:
    """A (not running) connector over fakes."""
    dev = DeviceSection(driver="x")
    contactor = contactor or FakeContactor()
    if kind == "dc" and modules is None:
        modules = FakeModules(contactor=contactor)
    cfg = ConnectorConfig(
        id=cid,
        kind=kind,
        max_power_kw=60,
        max_current_a=150 if kind == "dc" else 32,
        power_modules=dev if kind == "dc" else None,
        meter=dev,
        contactor=dev,
        vehicle=dev,
        outlet_sensor=outlet_sensor,
    )
    hw = ConnectorHardware(
        meter=FakeMeter(),
        contactor=contactor,
        vehicle=FakeVehicle(),
        modules=modules if kind == "dc" else None,
        imd=FakeImd() if kind == "dc" else None,
        thermal=thermal,
        bidirectional=stage,
    )
    listener = RecordingListener()
    return Connector(cfg, hw, ChargingSection(), FaultBoard(), listener)
