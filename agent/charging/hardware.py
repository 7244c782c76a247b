"""The HAL devices one connector uses."""

from __future__ import annotations

from dataclasses import dataclass

from hal.interfaces import Bidirectional, Contactor, EnergyMeter, InsulationMonitor, PowerModules, Thermal, Vehicle


@dataclass
class ConnectorHardware:
    """The HAL devices one connector uses (thermal is shared by the whole charger)."""

    meter: EnergyMeter
    contactor: Contactor
    vehicle: Vehicle
    modules: PowerModules | None = None
    imd: InsulationMonitor | None = None
    thermal: Thermal | None = None
    bidirectional: Bidirectional | None = None
