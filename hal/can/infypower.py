"""InfyPower REG/CEG/LRG power modules (CAN protocol V1.13) as :class:`PowerModules`.

All behaviour (comm loss, current split, keep-alive, verification, transport errors)
lives in :class:`hal.can.modules_base.PowerModuleGroup`; this module only says which
frames to send and how to read the answers:

* poll: command 0x03 (float V/I) or 0x09 (integer mV/mA), 0x04 (status, signed
  temperature, group) and 0x0C (voltage after the output diode) to every module,
  every cycle. The published output voltage is the after-diode voltage (0x0C), as
  EVerest publishes it (``output_voltage = "module"``: the module-side reading of
  0x03/0x09 instead); the current always comes from 0x03/0x09;
* answers whose identifier carries a non-zero error code (2 command invalid, 3 data
  invalid, 7 in start processing) are the module's condition, not garbage: the
  answer is a life sign, its payload is not decoded, and the condition shows as a
  flag (``command_invalid`` / ``data_invalid``: DEGRADED module_alarm;
  ``start_processing``: status only; other codes ``reply_error``) until an answer
  without error code clears it. ``reply_error_codes = "garbage"`` discards such
  answers as garbage instead;
* ratings: 0x0A per module until answered;
* discovery (``addresses`` omitted): 0x02 to the group; ``n`` modules are assumed to
  be addresses ``0..n-1`` (auto-allocated addressing). With two groups on one bus,
  configure the addresses explicitly;
* on/off: 0x1A per module (plus to the whole group while discovering);
* setpoints: ``current_sharing = "per_module"`` sends 0x1C with each module's share;
  ``"group"`` sends one 0x1B with the total to the group and lets the modules share.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar, Literal

from pydantic import Field

from hal.can import infypower_codec as infy
from hal.can.modules_base import (
    GROUP_SOURCE,
    Discovery,
    Frame,
    ModuleGroupOptions,
    PowerModuleGroup,
    Reading,
)
from hal.context import BuildContext

_ACK_COMMANDS = frozenset({infy.Cmd.SET_ON_OFF, infy.Cmd.SET_SYSTEM_OUTPUT,
                           infy.Cmd.SET_MODULE_OUTPUT})


class InfyPowerModules(PowerModuleGroup):
    """One group of InfyPower modules feeding one connector."""

    protocol: ClassVar[str] = "infypower"

    class Options(ModuleGroupOptions):
        """``[connector.N.power_modules]`` options for ``driver = "infypower"``.

        ``group`` is the number set on the modules' group dial, 0..62 (0x3F is left out
        because it is the "all modules" address of the protocol). ``addresses`` are
        module addresses 0x00..0x3E; omit them to discover the group's module count.
        """

        max_address: ClassVar[int] = infy.MAX_MODULE_ADDRESS

        group: int = Field(1, ge=0, le=infy.MAX_GROUP, description="module group number")
        current_sharing: Literal["per_module", "group"] = Field(
            "per_module",
            description="per_module: 0x1C with each module's share; group: 0x1B with the total",
        )
        measurement: Literal["float", "integer"] = Field(
            "float", description="read V/I with 0x03 (float) or 0x09 (integer mV/mA)"
        )
        output_voltage: Literal["after_diode", "module"] = Field(
            "after_diode",
            description="publish the after-diode voltage (0x0C) or the module's own (0x03/0x09)",
        )
        reply_error_codes: Literal["condition", "garbage"] = Field(
            "condition",
            description="an error code in an answer's identifier: module condition, or garbage",
        )

    def __init__(self, name: str, options: InfyPowerModules.Options, ctx: BuildContext) -> None:
        super().__init__(name, options, ctx)
        self.options = options
        self._after_diode = options.output_voltage == "after_diode"
        self._vi_command = (
            infy.Cmd.READ_MODULE_VI_FLOAT
            if options.measurement == "float"
            else infy.Cmd.READ_MODULE_VI_INT
        )

    # ------------------------------------------------------------------ receive

    def _source(self, arbitration_id: int) -> int | None:
        if (arbitration_id >> 8) & 0xFF != self._controller:
            return None
        device = (arbitration_id >> 22) & 0xF
        source = arbitration_id & 0xFF
        if device == infy.DEV_MODULE:
            return source if source in self._modules else None
        if device == infy.DEV_GROUP and source == self.options.group:
            return GROUP_SOURCE
        return None

    def _decode(
        self, source: int, arbitration_id: int, data: bytes | bytearray
    ) -> Reading | Discovery | None:
        command = (arbitration_id >> 16) & 0x3F
        error = (arbitration_id >> 26) & 0x7
        if error:
            if self.options.reply_error_codes == "garbage" or source == GROUP_SOURCE:
                infy.raise_for_error(infy.parse_id(arbitration_id))
            return Reading(source, condition=infy.condition_flags(error))
        reading = self._decode_payload(source, command, data)
        if isinstance(reading, Reading):
            return replace(reading, condition=frozenset())
        return reading

    def _decode_payload(
        self, source: int, command: int, data: bytes | bytearray
    ) -> Reading | Discovery | None:
        if source == GROUP_SOURCE:
            if command == infy.Cmd.READ_MODULE_COUNT:
                count = infy.decode_module_count(data)
                return Discovery(tuple(range(count)))
            return None
        if command in (infy.Cmd.READ_MODULE_VI_FLOAT, infy.Cmd.READ_MODULE_VI_INT):
            v, i = (
                infy.decode_vi_float(data)
                if command == infy.Cmd.READ_MODULE_VI_FLOAT
                else infy.decode_vi_int(data)
            )
            return Reading(source, voltage=None if self._after_diode else v, current=i)
        if command == infy.Cmd.READ_STATUS:
            st = infy.decode_status(data)
            return Reading(
                source,
                temperature=float(st.temperature),
                flags=st.flags,
                output_on=st.output_on,
                group=st.group,
            )
        if command == infy.Cmd.READ_RATINGS:
            r = infy.decode_ratings(data)
            return Reading(
                source,
                max_voltage=r.max_voltage,
                min_voltage=r.min_voltage,
                max_current=r.max_current,
                rated_power_w=r.rated_power_w,
            )
        if command == infy.Cmd.READ_AVAILABLE:
            after_diode, _available = infy.decode_available(data)
            return Reading(source, voltage=after_diode if self._after_diode else None)
        if command in _ACK_COMMANDS:
            infy.decode_ack(data)
            return Reading(source)
        return None

    # ------------------------------------------------------------------ transmit

    def _poll_frames(self, address: int) -> list[Frame]:
        return [
            infy.read_request(self._vi_command, self._controller, module=address),
            infy.read_request(infy.Cmd.READ_STATUS, self._controller, module=address),
            infy.read_request(infy.Cmd.READ_AVAILABLE, self._controller, module=address),
        ]

    def _ratings_frames(self, address: int) -> list[Frame]:
        return [infy.read_request(infy.Cmd.READ_RATINGS, self._controller, module=address)]

    def _discovery_frames(self) -> list[Frame]:
        return [
            infy.read_request(
                infy.Cmd.READ_MODULE_COUNT, self._controller, group=self.options.group
            )
        ]

    def _on_frames(self, address: int) -> list[Frame]:
        return [infy.on_off_request(True, self._controller, module=address)]

    def _off_frames(self, address: int) -> list[Frame]:
        return [infy.on_off_request(False, self._controller, module=address)]

    def _group_off_frames(self) -> list[Frame]:
        return [infy.on_off_request(False, self._controller, group=self.options.group)]

    def _setpoint_frames(
        self, voltage: float, total_current: float, shares: Mapping[int, float]
    ) -> list[Frame]:
        if self.options.current_sharing == "group":
            return [
                infy.set_output_request(
                    voltage, total_current, self._controller, group=self.options.group
                )
            ]
        return [
            infy.set_output_request(voltage, current, self._controller, module=address)
            for address, current in sorted(shares.items())
        ]

    def _describe_extra(self) -> dict[str, Any]:
        return {
            "current_sharing": self.options.current_sharing,
            "measurement": self.options.measurement,
            "output_voltage": self.options.output_voltage,
            "reply_error_codes": self.options.reply_error_codes,
        }
