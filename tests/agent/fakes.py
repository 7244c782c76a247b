"""In-memory stand-ins for the HAL contracts, for unit tests of logic above the HAL.

Driver-level behaviour is tested against the protocol simulators elsewhere; these
fakes only model what the connector state machine observes.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from agent.charging import events as ev
from agent.charging.session import record_of
from hal.interfaces import (
    OK,
    BidirectionalStatus,
    ContactorError,
    ContactorPosition,
    ContactorStatus,
    Health,
    HealthState,
    IsolationAlarm,
    IsolationReading,
    MeterReading,
    ModuleRatings,
    ModuleStatus,
    PilotState,
    SelfTestResult,
    VehicleStatus,
)


@dataclass
class FakeModules:
    name: str = "modules"
    count: int = 2
    on: bool = False
    voltage_set: float = 0.0
    current_set: float = 0.0
    offline: set[int] = field(default_factory=set)
    battery_voltage: float = 400.0
    contactor: "FakeContactor | None" = None
    calls: list[tuple[str, float, float]] = field(default_factory=list)

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def set_output(self, voltage: float, current: float) -> None:
        self.voltage_set, self.current_set = voltage, current
        self.calls.append(("set", voltage, current))

    async def output_on(self) -> None:
        self.on = True
        self.calls.append(("on", 0, 0))

    async def output_off(self) -> None:
        self.on = False
        self.calls.append(("off", 0, 0))

    async def reset_module(self, address: int) -> None: ...

    def modules(self) -> list[ModuleStatus]:
        return [ModuleStatus(address=a, online=a not in self.offline) for a in range(self.count)]

    def measured_voltage(self) -> float | None:
        if len(self.offline) == self.count:
            return None
        if self.contactor is not None and self.contactor.closed:
            return self.battery_voltage
        return self.voltage_set if self.on else 0.0

    def measured_current(self) -> float | None:
        closed = self.contactor is not None and self.contactor.closed
        return self.current_set if (self.on and closed) else 0.0

    def capability(self) -> ModuleRatings | None:
        n = self.count - len(self.offline)
        return ModuleRatings(750, 150, 40.0 * n, 20000.0 * n) if n else None

    def health(self) -> Health:
        return OK


@dataclass
class FakeMeter:
    name: str = "meter"
    energy: float = 1000.0
    power_kw: float = 0.0
    silent: bool = False
    modules: FakeModules | None = None
    last: float = field(default_factory=time.monotonic)
    export: float = 0.0
    export_kw: float = 0.0
    frozen: bool = False  # keeps answering with the values it had

    def tick(self) -> None:
        now = time.monotonic()
        if self.frozen:
            self.last = now
            return
        if self.export_kw > 0:
            self.power_kw = -self.export_kw
            self.export += self.export_kw * (now - self.last) / 3600.0
        elif self.modules is not None:
            self.power_kw = (self.modules.measured_current() or 0.0) * (self.modules.measured_voltage() or 0.0) / 1000
            self.energy += self.power_kw * (now - self.last) / 3600.0
        self.last = now

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def reading(self) -> MeterReading | None:
        self.tick()
        if self.silent:
            return None
        return MeterReading(400.0, 0.0, self.power_kw, self.energy, self.export, time.monotonic())

    def health(self) -> Health:
        return Health(HealthState.STALE, "comm_timeout") if self.silent else OK


@dataclass
class FakeContactor:
    name: str = "contactor"
    coil: bool = False
    closed: bool = False
    welded: bool = False
    weld_on_open: bool = False
    fail_to_close: bool = False
    cycles: int = 0

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def close(self) -> None:
        if self.welded or self.closed:
            raise ContactorError("contactor_welded", "mirror does not confirm open")
        self.coil = True
        await asyncio.sleep(0.01)
        if self.fail_to_close:
            self.coil = False
            raise ContactorError("contactor_failed_to_close", "no mirror feedback")
        self.closed = True
        self.cycles += 1

    async def open(self) -> None:
        self.coil = False
        await asyncio.sleep(0.01)
        if self.weld_on_open and self.closed:
            self.welded = True
            raise ContactorError("contactor_welded", "mirror stayed closed")
        self.closed = False

    def release(self) -> None:
        self.coil = False

    def status(self) -> ContactorStatus:
        return ContactorStatus(
            coil_energised=self.coil,
            mirror_says_open=not self.closed,
            position=ContactorPosition.CLOSED if self.closed else ContactorPosition.OPEN,
            welded=self.welded,
            cycles=self.cycles,
        )

    def reset_cycles(self) -> None:
        self.cycles = 0

    def clear_weld(self) -> None:
        self.welded = False

    def health(self) -> Health:
        return OK


@dataclass
class FakeVehicle:
    name: str = "vehicle"
    pilot: PilotState = PilotState.A
    duty: float = 100.0
    soc: int | None = 40
    wants_energy: bool = True
    target_voltage: float | None = 400.0
    target_current: float | None = 100.0
    discharge_allowed: bool | None = True
    discharge_refusal: str | None = None

    def plug(self) -> None:
        self.pilot = PilotState.B

    def unplug(self) -> None:
        self.pilot = PilotState.A

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def status(self) -> VehicleStatus:
        pilot = self.pilot
        if pilot in (PilotState.B, PilotState.C):
            pilot = PilotState.C if (self.duty < 100 and self.wants_energy) else PilotState.B
        return VehicleStatus(
            pilot=pilot,
            plugged=pilot in (PilotState.B, PilotState.C, PilotState.D),
            ev_ready=pilot in (PilotState.C, PilotState.D),
            pwm_duty_percent=self.duty,
            soc=self.soc,
            target_voltage=self.target_voltage,
            target_current=self.target_current,
            discharge_allowed=self.discharge_allowed,
            discharge_refusal=self.discharge_refusal,
            taken_at=time.monotonic(),
        )

    async def set_pwm_duty(self, percent: float) -> None:
        self.duty = percent

    def health(self) -> Health:
        return OK


@dataclass
class FakeImd:
    name: str = "imd"
    kohm: float = 5000.0
    silent: bool = False
    self_test_ok: bool = True
    modules: FakeModules | None = None
    kohm_under_voltage: float | None = None  # resistance seen only while the output is energised

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def reading(self) -> IsolationReading | None:
        if self.silent:
            return None
        kohm = self.kohm
        if self.kohm_under_voltage is not None and self.modules is not None and self.modules.on:
            kohm = self.kohm_under_voltage
        return IsolationReading(kohm, IsolationAlarm.NONE, 500.0, time.monotonic())

    async def self_test(self) -> SelfTestResult:
        await asyncio.sleep(0.01)
        return SelfTestResult(self.self_test_ok, "ok" if self.self_test_ok else "device error", 0.01)

    def health(self) -> Health:
        return OK


@dataclass
class FakeBidirectional:
    name: str = "v2g"
    power_kw: float = 0.0
    synced: bool = True
    cycles: int = 0
    meter: "FakeMeter | None" = None

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def discharge(self, voltage: float, power_kw: float) -> None:
        if self.power_kw == 0 and power_kw > 0:
            self.cycles += 1
        self.power_kw = power_kw
        if self.meter is not None:
            self.meter.export_kw = power_kw

    async def stop_discharge(self) -> None:
        self.power_kw = 0.0
        if self.meter is not None:
            self.meter.export_kw = 0.0

    def status(self) -> "BidirectionalStatus":
        return BidirectionalStatus(self.power_kw > 0, self.power_kw, self.synced, self.cycles)

    def health(self) -> Health:
        return OK


@dataclass
class RecordingListener:
    """Records what a connector publishes; builds each record as the reporter would."""

    states: list[str] = field(default_factory=list)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    statuses: list[tuple[str, str, str | None, dict[str, Any] | None]] = field(default_factory=list)
    progress: int = 0
    suspended: list[dict[str, Any]] = field(default_factory=list)
    closed: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    setpoints: list[tuple[float | None, float | None]] = field(default_factory=list)

    def connector_event(self, event: ev.ConnectorEvent) -> None:
        match event:
            case ev.StateChanged(new=new):
                self.states.append(str(new))
            case ev.VehicleEvent(_, event_type, data):
                self.events.append((event_type, data))
            case ev.SessionProgress():
                self.progress += 1
            case ev.SessionSuspended(session):
                self.suspended.append(dict(session.checkpoint()))
            case ev.CheckpointAbandoned(_, checkpoint, stop_reason, _):
                self.closed.append((dict(checkpoint), stop_reason))
            case ev.SessionFinished(session, ended_at, stop_reason):
                self.records.append(record_of(session, ended_at))
                self.events.append(("stop", {"reason": stop_reason}))
            case ev.CommandOutcome(command_id, status, message, details):
                self.statuses.append((command_id, status, message, details))
            case ev.SetpointChanged(_, voltage, current):
                self.setpoints.append((voltage, current))

    def event_types(self) -> list[str]:
        return [e for e, _ in self.events]
