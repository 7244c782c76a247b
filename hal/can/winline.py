"""Winline power modules (register protocol "PROTNO 0x060") as :class:`PowerModules`.

All behaviour lives in :class:`hal.can.modules_base.PowerModuleGroup`; this module
only says which frames to send and how to read the answers. Every frame is
point-to-point to one module, except discovery and the group-wide OFF:

* poll: registers 0x0001 (V), 0x0002 (A), 0x0040 (status word), 0x0004 (DC-board
  temperature) of every module, every cycle;
* ratings: 0x0011 (rated power) and 0x0012 (rated current). A module's current
  limit is register 0x0012 times ``current_limit_point`` (default 3.3325, what the
  field-proven EVerest driver uses; 1.0 reads 0x0012 as amps, as the protocol notes
  describe it). The voltage range is not readable over CAN and comes from the
  options (``max_voltage``/``min_voltage``, from the module's datasheet);
* discovery (``addresses`` omitted): register 0x0043 read from the group broadcast
  address 0xFE; every module whose answer names our group joins;
* on/off: register 0x0030, verified through status bit 22 (1 = output off);
* setpoints: 0x0021 (float V) and 0x001B (A x 1024) to each active module with its
  share of the total current.

Point-to-point identifiers carry 0 in their group bits 2..0 by default (as EVerest
sends them); ``ptp_group_bits = "group"`` puts the group number there instead.
Group-broadcast frames always carry the group number.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from hal.can import winline_codec as wl
from hal.can.modules_base import (
    Discovery,
    Frame,
    ModuleGroupOptions,
    PowerModuleGroup,
    Reading,
)
from hal.context import BuildContext


class WinlineModules(PowerModuleGroup):
    """One group of Winline modules feeding one connector."""

    protocol: ClassVar[str] = "winline"

    class Options(ModuleGroupOptions):
        """``[connector.N.power_modules]`` options for ``driver = "winline"``.

        ``group`` is the 3-bit group number in the identifier (0..7); ``addresses``
        are module addresses 0x00..0x3F, omitted to discover the group.
        """

        max_address: ClassVar[int] = wl.MAX_ADDRESS

        group: int = Field(0, ge=0, le=wl.MAX_GROUP, description="module group number")
        max_voltage: float = Field(1000.0, gt=0.0, le=1500.0, description="V, datasheet")
        min_voltage: float = Field(150.0, ge=0.0, le=1500.0, description="V, datasheet")
        current_limit_point: float = Field(
            3.3325,
            gt=0.0,
            le=10.0,
            description="module current limit = register 0x0012 x this (1.0: 0x0012 in A)",
        )
        ptp_group_bits: Literal["zero", "group"] = Field(
            "zero",
            description="group bits of point-to-point identifiers: 0, or the group number",
        )

        @model_validator(mode="after")
        def _voltage_range(self) -> WinlineModules.Options:
            if self.min_voltage >= self.max_voltage:
                raise ValueError("min_voltage must be below max_voltage")
            return self

    def __init__(self, name: str, options: WinlineModules.Options, ctx: BuildContext) -> None:
        super().__init__(name, options, ctx)
        self.options = options
        # the group bits of point-to-point frames (None: 0)
        self._ptp_group = options.group if options.ptp_group_bits == "group" else None

    # ------------------------------------------------------------------ receive

    def _source(self, arbitration_id: int) -> int | None:
        if arbitration_id >> 20 != wl.PROTNO:
            return None
        if (arbitration_id >> 11) & 0xFF != self._controller:
            return None
        source = (arbitration_id >> 3) & 0xFF
        if source in self._modules or self._discovery_mode:
            return source
        return None

    def _decode(
        self, source: int, arbitration_id: int, data: bytes | bytearray
    ) -> Reading | Discovery | None:
        response = wl.decode_response(data)
        register, value = response.register, response.value
        if source not in self._modules:
            # discovering: only a group-info answer naming our group is of interest
            if register == wl.Reg.GROUP_INFO:
                group, _dip = wl.decode_group_info(int(value))
                if group == self.options.group:
                    return Discovery((source,))
            return None
        if register == wl.Reg.OUTPUT_VOLTAGE:
            return Reading(source, voltage=float(value))
        if register == wl.Reg.OUTPUT_CURRENT:
            return Reading(source, current=float(value))
        if register == wl.Reg.STATUS:
            flags = wl.status_flags(int(value))
            return Reading(source, flags=flags, output_on="output_off" not in flags)
        if register == wl.Reg.DC_BOARD_TEMPERATURE:
            return Reading(source, temperature=float(value))
        if register == wl.Reg.RATED_POWER:
            return Reading(
                source,
                rated_power_w=float(value),
                max_voltage=self.options.max_voltage,
                min_voltage=self.options.min_voltage,
            )
        if register == wl.Reg.RATED_CURRENT:
            # 0x0012 is a float32: round the product so a 40 A module reads 40 A, not 39.99998
            return Reading(
                source, max_current=round(float(value) * self.options.current_limit_point, 2)
            )
        if register == wl.Reg.GROUP_INFO:
            group, _dip = wl.decode_group_info(int(value))
            return Reading(source, group=group)
        return Reading(source)  # any other valid answer (set acknowledgements) is a life sign

    # ------------------------------------------------------------------ transmit

    def _read(self, register: int, address: int) -> Frame:
        return wl.read_request(register, self._controller, module=address,
                               group=self._ptp_group)

    def _poll_frames(self, address: int) -> list[Frame]:
        return [
            self._read(wl.Reg.OUTPUT_VOLTAGE, address),
            self._read(wl.Reg.OUTPUT_CURRENT, address),
            self._read(wl.Reg.STATUS, address),
            self._read(wl.Reg.DC_BOARD_TEMPERATURE, address),
        ]

    def _ratings_frames(self, address: int) -> list[Frame]:
        return [self._read(wl.Reg.RATED_POWER, address), self._read(wl.Reg.RATED_CURRENT, address)]

    def _discovery_frames(self) -> list[Frame]:
        return [wl.read_request(wl.Reg.GROUP_INFO, self._controller, group=self.options.group)]

    def _on_frames(self, address: int) -> list[Frame]:
        return [wl.power_request(True, self._controller, module=address, group=self._ptp_group)]

    def _off_frames(self, address: int) -> list[Frame]:
        return [
            wl.power_request(False, self._controller, module=address, group=self._ptp_group)
        ]

    def _group_off_frames(self) -> list[Frame]:
        return [wl.power_request(False, self._controller, group=self.options.group)]

    def _setpoint_frames(
        self, voltage: float, total_current: float, shares: Mapping[int, float]
    ) -> list[Frame]:
        frames: list[Frame] = []
        for address, current in sorted(shares.items()):
            frames.append(
                wl.set_voltage_request(voltage, self._controller, module=address,
                                       group=self._ptp_group)
            )
            frames.append(
                wl.set_current_request(current, self._controller, module=address,
                                       group=self._ptp_group)
            )
        return frames

    def _describe_extra(self) -> dict[str, Any]:
        return {
            "voltage_range": [self.options.min_voltage, self.options.max_voltage],
            "current_limit_point": self.options.current_limit_point,
            "ptp_group_bits": self.options.ptp_group_bits,
        }
