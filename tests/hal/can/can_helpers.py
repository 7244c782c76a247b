"""Helpers shared by the CAN tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import can
from can.interfaces.virtual import VirtualBus

from hal.can.modules_base import PowerModuleGroup
from hal.config import CanBusConfig
from hal.context import BuildContext
from hal.sim.can_modules import CanModuleSimulator
from hal.sim.world import SimModule, SimWorld

D = TypeVar("D", bound=PowerModuleGroup)

WaitUntil = Callable[..., Awaitable[None]]


def unique_channel() -> str:
    return f"test-{uuid.uuid4().hex}"


class Recorder:
    """A third node on the channel that keeps every frame it sees, with timestamps."""

    def __init__(self, channel: str) -> None:
        self.bus = can.Bus(interface="virtual", channel=channel)
        self._frames: list[can.Message] = []

    def frames(self) -> list[can.Message]:
        while (msg := self.bus.recv(timeout=0)) is not None:
            self._frames.append(msg)
        return list(self._frames)

    def sent_by_controller(self, controller: int = 0xF0) -> list[can.Message]:
        """Frames whose source field (InfyPower: bits 7..0) is the controller."""
        return [m for m in self.frames() if m.arbitration_id & 0xFF == controller]

    def clear(self) -> None:
        self.frames()
        self._frames.clear()


class FlakyBus(VirtualBus):
    """A virtual bus whose send or receive can be made to fail, like a socketcan bus
    whose interface went down or whose transmit queue is full."""

    instances: ClassVar[list[FlakyBus]] = []

    def __init__(self, channel: Any = "flaky", bitrate: int | None = None, **kwargs: Any) -> None:
        super().__init__(channel=channel, **kwargs)
        self.bitrate = bitrate
        self.fail_send = False
        self.fail_recv_once = False
        FlakyBus.instances.append(self)

    def send(self, msg: can.Message, timeout: float | None = None) -> None:
        if self.fail_send:
            raise can.CanOperationError("Failed to transmit: No buffer space available", 105)
        super().send(msg, timeout)

    def _recv_internal(self, timeout: float | None) -> tuple[can.Message | None, bool]:
        if self.fail_recv_once:
            self.fail_recv_once = False
            raise can.CanOperationError("Failed to receive: Network is down", 100)
        return super()._recv_internal(timeout)


class Rig:
    """A simulated module group on a fresh virtual channel, plus drivers built against it."""

    def __init__(
        self,
        channel: str,
        protocol: str,
        modules: list[SimModule],
        state_dir: Path,
        tx_spacing_ms: float = 1.0,
        interface: str = "virtual",
    ) -> None:
        self.config = CanBusConfig(interface=interface, channel=channel,
                                   tx_spacing_ms=tx_spacing_ms)
        sim_config = CanBusConfig(interface="virtual", channel=channel)
        self.world = SimWorld()
        self.modules = {m.address: m for m in modules}
        self.sim = CanModuleSimulator(sim_config, modules, protocol, self.world)  # type: ignore[arg-type]
        self.ctx = BuildContext(can={"main": self.config}, modbus={}, state_dir=state_dir)
        self.drivers: list[PowerModuleGroup] = []

    def driver(self, cls: type[D], *, comm_timeout_s: float = 0.5, name: str = "c1",
               **options: Any) -> D:
        """Build a driver; ``comm_timeout_s`` is shortened past the > 10 s validation."""
        defaults: dict[str, Any] = {
            "bus": "main",
            "poll_interval_s": 0.05,
            "verify_grace_s": 0.2,
            "answer_timeout_s": 0.3,
            "reset_off_s": 0.3,
        }
        defaults.update(options)
        validated = cls.Options(**defaults)  # type: ignore[attr-defined]
        shortened = validated.model_copy(update={"comm_timeout_s": comm_timeout_s})
        driver = cls(name, shortened, self.ctx)  # type: ignore[call-arg]
        self.drivers.append(driver)
        return driver

    async def close(self) -> None:
        for driver in self.drivers:
            await driver.stop()
        await self.sim.stop()
        await self.ctx.close()


def modules_at(*addresses: int, group: int = 1, voltage: float = 400.0,
               current: float = 10.0) -> list[SimModule]:
    """SimModules (40 A, 20 kW, 150..750 V each) that already report some output."""
    return [
        SimModule(address=a, group=group, output_voltage=voltage, output_current=current)
        for a in addresses
    ]
