"""The HAL devices one connector uses."""

from __future__ import annotations

from dataclasses import dataclass

from hal.interfaces import Bidirectional, Contactor, EnergyMeter, InsulationMonitor, PowerModules, Thermal, Vehicle
from hal.tick import Pace


@dataclass
class ConnectorHardware:
    """The HAL devices one connector uses (thermal is shared by the whole charger).

    ``pace`` is the process's :class:`~hal.tick.Pace`: the connector reports there
    whether it is busy, so idle pollers can slow down (``None``: nobody slows down).
    """

    meter: EnergyMeter
    contactor: Contactor
    vehicle: Vehicle
    modules: PowerModules | None = None
    imd: InsulationMonitor | None = None
    thermal: Thermal | None = None
    bidirectional: Bidirectional | None = None
    pace: Pace | None = None
