"""Configuration models the HAL owns: transports and the strict base every option model uses.

Driver-specific options live next to each driver (``Driver.Options``) and are
validated through :mod:`hal.registry`; the agent's config loader only knows the
shape around them.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


#: Keys of ``[can.<bus>]`` itself; they may not be repeated inside ``options``.
_CAN_OWN_KEYS = frozenset({"interface", "channel", "bitrate"})


def _python_can_interfaces() -> frozenset[str]:
    import can.util  # python-can's names, plugins included; the set its own checks use

    return frozenset(can.util.VALID_INTERFACES)


def _required_bus_arguments(interface: str) -> list[str] | None:
    """Parameters the interface's bus class requires (no default), ``None`` if unknown.

    Importing an interface module can fail (its vendor package is not installed, as
    for ``gs_usb`` without pyusb): then nothing is checked here and opening the bus
    reports the problem. Vendor modules log warnings about missing native libraries
    on import; they are silenced for the check.
    """
    import importlib
    import inspect
    import logging

    from can.interfaces import BACKENDS

    try:
        module_name, class_name = BACKENDS[interface]
    except (KeyError, TypeError, ValueError):
        return None
    can_log = logging.getLogger("can")
    level = can_log.level
    can_log.setLevel(logging.CRITICAL)
    try:
        bus_class = getattr(importlib.import_module(module_name), class_name)
        parameters = inspect.signature(bus_class.__init__).parameters.values()
    except Exception:  # noqa: BLE001 -- any import problem: leave it to opening the bus
        return None
    finally:
        can_log.setLevel(level)
    return [
        p.name
        for p in parameters
        if p.name not in ("self", "channel")
        and p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]


class CanBusConfig(StrictModel):
    """One CAN bus shared by every power-module driver that names it.

    ``interface`` is any python-can interface name: ``socketcan`` on a controller
    (``can0``) or bench (``vcan0``), ``udp_multicast`` between processes on one
    machine, ``socketcand`` for a remote bus, USB adapters (``pcan``, ``slcan``,
    ``gs_usb``, ``kvaser``, ...), ``virtual`` for in-process tests and the demo.

    ``options`` is passed to ``can.Bus(...)`` unchanged, next to ``interface``,
    ``channel`` and (for interfaces that set it) ``bitrate``: whatever the chosen
    interface accepts (``host``/``port`` for socketcand, ``tty_baudrate`` for slcan,
    ``index`` for gs_usb, ``port``/``hop_limit`` for udp_multicast, ...). It is
    validated as far as python-can allows: the interface must be one python-can
    knows, python-can's own checks of common keys (``port``, ``fd``, ``state``, bit
    timing) must pass, and the bus class's required arguments must be present.
    Unknown keys cannot be rejected: python-can's bus classes accept any keyword.
    """

    interface: str = Field("socketcan", description="python-can interface name")
    channel: str = Field(..., min_length=1, description="e.g. can0, vcan0, or a virtual channel name")
    bitrate: int = Field(125_000, ge=10_000, le=1_000_000, description="bit/s (ignored by vcan/virtual)")
    tx_spacing_ms: float = Field(
        5.0, ge=0.0, le=200.0, description="minimum gap between two transmitted frames"
    )
    controller_address: int = Field(0xF0, ge=0xF0, le=0xF8, description="our address on the bus")
    options: dict[str, Any] = Field(
        default_factory=dict,
        validate_default=True,
        description="interface-specific keyword arguments for can.Bus()",
    )

    @field_validator("interface")
    @classmethod
    def _known_interface(cls, value: str) -> str:
        known = _python_can_interfaces()
        if value not in known:
            close = difflib.get_close_matches(value, sorted(known), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ValueError(
                f"a python-can interface name ({hint}one of {', '.join(sorted(known))})"
            )
        return value

    @field_validator("options")
    @classmethod
    def _options_acceptable(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        own = sorted(_CAN_OWN_KEYS & value.keys())
        if own:
            raise ValueError(
                f"{', '.join(own)} set in [can.<bus>] itself, not inside options"
            )
        interface = info.data.get("interface")
        if interface is None:  # already reported as unknown
            return value
        from can.util import _create_bus_config  # python-can's own checks (port, fd, timing)

        try:
            _create_bus_config(
                {"interface": interface, "channel": info.data.get("channel"), **value}
            )
        except Exception as exc:  # noqa: BLE001 -- ValueError/TypeError/TimingError/...
            raise ValueError(f"options python-can accepts for {interface!r} ({exc})") from None
        required = _required_bus_arguments(interface)
        missing = [name for name in required or () if name not in value]
        if missing:
            raise ValueError(
                f"the options interface {interface!r} requires: "
                + ", ".join(repr(n) for n in missing)
                + " (e.g. options = { "
                + ", ".join(f"{n} = ..." for n in missing)
                + " })"
            )
        return value

    def bus_kwargs(self) -> dict[str, Any]:
        """The keyword arguments ``can.Bus()`` is called with for this bus."""
        kwargs: dict[str, Any] = {"interface": self.interface, "channel": self.channel}
        if self.interface not in NO_BITRATE_INTERFACES:
            kwargs["bitrate"] = self.bitrate
        kwargs.update(self.options)
        return kwargs


#: Interfaces whose bitrate is not set through python-can (socketcan/vcan: ``ip link``;
#: in-process and network transports have none).
NO_BITRATE_INTERFACES = frozenset({"virtual", "socketcan", "udp_multicast", "socketcand"})


class ModbusLinkConfig(StrictModel):
    """One Modbus link: an RS-485 port (RTU) or a TCP endpoint. Devices name it by key."""

    transport: Literal["rtu", "tcp"]
    port: str | None = Field(None, description="serial device for RTU, e.g. /dev/ttyS1")
    baudrate: int = Field(9600, ge=1200, le=230_400)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8
    host: str | None = Field(None, description="TCP host for transport = tcp")
    tcp_port: int = Field(502, ge=0, le=65535, description="0 = assigned by the in-process simulator")
    timeout_s: float = Field(1.0, gt=0.0, le=10.0, description="per-request answer timeout")
    retries: int = Field(1, ge=0, le=5)

    @model_validator(mode="after")
    def _endpoint_present(self) -> "ModbusLinkConfig":
        if self.transport == "rtu" and not self.port:
            raise ValueError("transport = 'rtu' needs 'port' (e.g. /dev/ttyS1)")
        if self.transport == "tcp" and not self.host:
            raise ValueError("transport = 'tcp' needs 'host' (e.g. 127.0.0.1)")
        return self
