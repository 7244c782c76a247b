"""Configuration models the HAL owns: transports and the strict base every option model uses.

Driver-specific options live next to each driver (``Driver.Options``) and are
validated through :mod:`hal.registry`; the agent's config loader only knows the
shape around them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class CanBusConfig(StrictModel):
    """One CAN bus shared by every power-module driver that names it.

    ``interface`` is any python-can interface name: ``socketcan`` on a controller
    (``can0``) or bench (``vcan0``), ``virtual`` for in-process tests and the demo.
    """

    interface: str = Field("socketcan", description="python-can interface name")
    channel: str = Field(..., min_length=1, description="e.g. can0, vcan0, or a virtual channel name")
    bitrate: int = Field(125_000, ge=10_000, le=1_000_000, description="bit/s (ignored by vcan/virtual)")
    tx_spacing_ms: float = Field(
        5.0, ge=0.0, le=200.0, description="minimum gap between two transmitted frames"
    )
    controller_address: int = Field(0xF0, ge=0xF0, le=0xF8, description="our address on the bus")


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
