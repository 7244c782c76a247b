"""The one place that maps a config ``driver = "name"`` to a driver class.

Like python-can's interface table, entries are ``"module:Class"`` strings imported on
first use, so a controller without (say) the gpiod C library never imports it unless
its config asks for a GPIO driver.

A driver class must provide:

* ``Options``: a pydantic model (subclass of :class:`hal.config.StrictModel`) holding
  every option the driver accepts besides ``driver``;
* ``__init__(self, name: str, options: Options, ctx: hal.context.BuildContext)``;
* the :mod:`hal.interfaces` protocol of its kind. :func:`build` returns the driver typed
  by that protocol, and the ``TYPE_CHECKING`` table below makes mypy check every
  registered class against it (``tests/hal/test_registry.py`` keeps the table and
  :data:`DRIVERS` in step).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from pydantic import BaseModel

from hal.interfaces import Bidirectional, Contactor, EnergyMeter, InsulationMonitor, PowerModules, Thermal, Vehicle

if TYPE_CHECKING:
    from hal.context import BuildContext

P = TypeVar("P")

#: kind -> driver name -> "module:Class"
DRIVERS: dict[str, dict[str, str]] = {
    "power_modules": {
        "infypower": "hal.can.infypower:InfyPowerModules",
        "winline": "hal.can.winline:WinlineModules",
    },
    "meter": {
        "eastron_sdm630": "hal.modbus.sdm630:Sdm630Meter",
        "acrel_djsf1352": "hal.modbus.djsf1352:Djsf1352Meter",
    },
    "imd": {
        "bender_isocha425": "hal.modbus.bender:BenderIsoCha425",
    },
    "contactor": {
        "gpio": "hal.gpio.contactor:GpioContactor",
    },
    "thermal": {
        "hwmon": "hal.thermal.hwmon:HwmonThermal",
    },
    "vehicle": {
        "iec61851": "hal.pilot.iec61851:Iec61851Vehicle",
    },
    "bidirectional": {
        "sim_http": "hal.v2g.sim_http:SimHttpBidirectional",
    },
}


@dataclass(frozen=True)
class DriverKind(Generic[P]):
    """One kind of device; ``P`` is the protocol every driver of that kind satisfies."""

    name: str


POWER_MODULES: DriverKind[PowerModules] = DriverKind("power_modules")
METER: DriverKind[EnergyMeter] = DriverKind("meter")
IMD: DriverKind[InsulationMonitor] = DriverKind("imd")
CONTACTOR: DriverKind[Contactor] = DriverKind("contactor")
THERMAL: DriverKind[Thermal] = DriverKind("thermal")
VEHICLE: DriverKind[Vehicle] = DriverKind("vehicle")
BIDIRECTIONAL: DriverKind[Bidirectional] = DriverKind("bidirectional")

if TYPE_CHECKING:  # mypy checks each registered class against its kind's protocol
    from hal.can.infypower import InfyPowerModules
    from hal.can.winline import WinlineModules
    from hal.gpio.contactor import GpioContactor
    from hal.modbus.bender import BenderIsoCha425
    from hal.modbus.djsf1352 import Djsf1352Meter
    from hal.modbus.sdm630 import Sdm630Meter
    from hal.pilot.iec61851 import Iec61851Vehicle
    from hal.thermal.hwmon import HwmonThermal
    from hal.v2g.sim_http import SimHttpBidirectional

    _CONTRACTS: tuple[
        tuple[type[PowerModules], ...],
        tuple[type[EnergyMeter], ...],
        tuple[type[InsulationMonitor], ...],
        tuple[type[Contactor], ...],
        tuple[type[Thermal], ...],
        tuple[type[Vehicle], ...],
        tuple[type[Bidirectional], ...],
    ] = (
        (InfyPowerModules, WinlineModules),
        (Sdm630Meter, Djsf1352Meter),
        (BenderIsoCha425,),
        (GpioContactor,),
        (HwmonThermal,),
        (Iec61851Vehicle,),
        (SimHttpBidirectional,),
    )


class UnknownDriver(LookupError):
    def __init__(self, kind: str, name: str) -> None:
        choices = ", ".join(sorted(DRIVERS.get(kind, {}))) or "none"
        super().__init__(f"unknown {kind} driver '{name}' (expected one of: {choices})")
        self.kind = kind
        self.name = name


@dataclass(frozen=True)
class DriverSpec:
    kind: str
    name: str
    cls: type[Any]

    @property
    def options_model(self) -> type[BaseModel]:
        model: type[BaseModel] = self.cls.Options
        return model


def lookup(kind: str, name: str) -> DriverSpec:
    """Return the driver registered as ``name`` for ``kind``; raise :class:`UnknownDriver`."""
    try:
        target = DRIVERS[kind][name]
    except KeyError:
        raise UnknownDriver(kind, name) from None
    module_name, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    return DriverSpec(kind, name, cls)


def build(kind: DriverKind[P], driver: str, name: str, options: Any, ctx: BuildContext) -> P:
    """Instantiate (not start) driver ``driver`` of ``kind``, typed by the kind's protocol.

    Raises :class:`UnknownDriver` for a name the registry does not know (config
    validation reports that earlier, with the file and key).
    """
    spec = lookup(kind.name, driver)
    return cast(P, spec.cls(name, options, ctx))


def names(kind: str) -> list[str]:
    return sorted(DRIVERS.get(kind, {}))
