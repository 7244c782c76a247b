"""Build the configured devices through the one driver registry.

Nothing else in the agent instantiates a driver: this module turns the validated
config into a :class:`hal.interfaces.DeviceSet` and owns the transports' context.
"""

from __future__ import annotations

from typing import TypeVar

from agent.charging.config import DeviceSection
from agent.config import AgentConfig
from hal import registry
from hal.context import BuildContext
from hal.interfaces import DeviceSet

P = TypeVar("P")


def _build(kind: registry.DriverKind[P], name: str, section: DeviceSection, ctx: BuildContext) -> P:
    return registry.build(kind, section.driver, name, section.options, ctx)


def build_devices(cfg: AgentConfig, ctx: BuildContext) -> DeviceSet:
    """Instantiate (not start) every configured device. IMDs shared by connectors are built once."""
    devices = DeviceSet(pace=ctx.pace)
    imds = {name: _build(registry.IMD, f"imd.{name}", section, ctx) for name, section in cfg.imd.items()}
    for conn in cfg.connectors:
        cctx = ctx.for_connector(conn.id)
        if conn.power_modules is not None:
            devices.power_modules[conn.id] = _build(
                registry.POWER_MODULES, f"connector{conn.id}.modules", conn.power_modules, cctx
            )
        devices.meters[conn.id] = _build(registry.METER, f"connector{conn.id}.meter", conn.meter, cctx)
        devices.contactors[conn.id] = _build(
            registry.CONTACTOR, f"connector{conn.id}.contactor", conn.contactor, cctx
        )
        devices.vehicles[conn.id] = _build(registry.VEHICLE, f"connector{conn.id}.vehicle", conn.vehicle, cctx)
        if conn.imd is not None:
            devices.imd[conn.id] = imds[conn.imd]
        if conn.bidirectional is not None:
            devices.bidirectional[conn.id] = _build(
                registry.BIDIRECTIONAL, f"connector{conn.id}.v2g", conn.bidirectional, cctx
            )
    if cfg.thermal is not None:
        devices.thermal = _build(registry.THERMAL, "thermal", cfg.thermal, ctx)
    return devices


def make_context(cfg: AgentConfig) -> BuildContext:
    return BuildContext(can=cfg.can, modbus=cfg.modbus, state_dir=cfg.charger.state_dir)
