"""The one place that maps a config ``driver = "name"`` to a driver class.

Like python-can's interface table, entries are ``"module:Class"`` strings imported on
first use, so a controller without (say) the gpiod C library never imports it unless
its config asks for a GPIO driver.

A driver class must provide:

* ``Options``: a pydantic model (subclass of :class:`hal.config.StrictModel`) holding
  every option the driver accepts besides ``driver``;
* ``__init__(self, name: str, options: Options, ctx: hal.context.BuildContext)``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

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


def names(kind: str) -> list[str]:
    return sorted(DRIVERS.get(kind, {}))
