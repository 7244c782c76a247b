"""Winline power modules, register protocol "PROTNO 0x060": identifiers and payloads.

Frame identifier (29 bit, extended)::

    bits 28..20 protocol number, always 0x060
    bit  19     1 = point-to-point, 0 = broadcast
    bits 18..11 destination (module 0x00..0x3F, 0xFF everybody, 0xFE one group, or us)
    bits 10..3  source
    bits  2..0  group number (0..7)

Request payload: ``[0]`` function (0x10 read, 0x03 set), ``[1]`` 0, ``[2..3]`` register,
``[4..7]`` value (zero for reads). Answer payload: ``[0]`` type (0x41 float32, 0x42
integer), ``[1]`` status (0xF0 normal, anything else: discard), ``[2..3]`` register,
``[4..7]`` value. Everything big-endian.

Encoders raise :class:`ValueError` for arguments they cannot represent. Decoders raise
:class:`~hal.can.port.FrameError` for a DLC other than 8, an unknown type byte, a
status byte other than 0xF0, a type that does not match the register, a non-finite
float, or a value outside the register's plausibility range -- and nothing else,
whatever the input bytes.
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from hal.can.port import FrameError

__all__ = [
    "BROADCAST",
    "GROUP_BROADCAST",
    "PROTNO",
    "Frame",
    "FrameError",
    "Reg",
    "Request",
    "Response",
    "WinlineId",
    "build_id",
    "decode_response",
    "parse_id",
    "read_request",
    "set_request",
]

PROTNO = 0x060
BROADCAST = 0xFF
GROUP_BROADCAST = 0xFE
MAX_ADDRESS = 0x3F
MAX_GROUP = 7

FUNC_READ = 0x10
FUNC_SET = 0x03
TYPE_FLOAT = 0x41
TYPE_INT = 0x42
STATUS_OK = 0xF0

#: Output current setpoints are sent as amps x 1024.
CURRENT_SCALE = 1024

#: Bit 16 of the power register: 0x00000000 = on, 0x00010000 = off.
POWER_ON = 0x0000_0000
POWER_OFF = 0x0001_0000


class Reg(enum.IntEnum):
    # read (function 0x10)
    OUTPUT_VOLTAGE = 0x0001
    OUTPUT_CURRENT = 0x0002
    CURRENT_LIMIT_POINT = 0x0003
    DC_BOARD_TEMPERATURE = 0x0004
    DC_INPUT_VOLTAGE = 0x0005
    PFC_BUS_POSITIVE = 0x0008
    PFC_BUS_NEGATIVE = 0x000A
    AMBIENT_TEMPERATURE = 0x000B
    AC_VOLTAGE_A = 0x000C
    AC_VOLTAGE_B = 0x000D
    AC_VOLTAGE_C = 0x000E
    PFC_BOARD_TEMPERATURE = 0x0010
    RATED_POWER = 0x0011
    RATED_CURRENT = 0x0012
    STATUS = 0x0040
    GROUP_INFO = 0x0043
    INPUT_POWER = 0x0048
    ALTITUDE = 0x004A
    INPUT_MODE = 0x004B
    SERIAL_LOW = 0x0054
    SERIAL_HIGH = 0x0055
    DCDC_VERSION = 0x0056
    PFC_VERSION = 0x0057
    # set (function 0x03)
    SET_ALTITUDE = 0x0017
    SET_CURRENT = 0x001B
    SET_GROUP = 0x001E
    SET_ADDRESS_MODE = 0x001F
    SET_VOLTAGE = 0x0021
    SET_CURRENT_LIMIT_POINT = 0x0022
    SET_VOLTAGE_UPPER_LIMIT = 0x0023
    POWER = 0x0030
    OVER_VOLTAGE_RESET = 0x0031
    OVER_VOLTAGE_PROTECTION = 0x003E
    SHORT_CIRCUIT_RESET = 0x0044
    SET_INPUT_MODE = 0x0046


FLOAT_REGISTERS = frozenset(
    {
        Reg.OUTPUT_VOLTAGE,
        Reg.OUTPUT_CURRENT,
        Reg.CURRENT_LIMIT_POINT,
        Reg.DC_BOARD_TEMPERATURE,
        Reg.DC_INPUT_VOLTAGE,
        Reg.PFC_BUS_POSITIVE,
        Reg.PFC_BUS_NEGATIVE,
        Reg.AMBIENT_TEMPERATURE,
        Reg.AC_VOLTAGE_A,
        Reg.AC_VOLTAGE_B,
        Reg.AC_VOLTAGE_C,
        Reg.PFC_BOARD_TEMPERATURE,
        Reg.RATED_POWER,
        Reg.RATED_CURRENT,
        Reg.SET_VOLTAGE,
        Reg.SET_CURRENT_LIMIT_POINT,
        Reg.SET_VOLTAGE_UPPER_LIMIT,
    }
)
INT_REGISTERS = frozenset(set(Reg) - FLOAT_REGISTERS)
SET_REGISTERS = frozenset(
    {
        Reg.SET_ALTITUDE,
        Reg.SET_CURRENT,
        Reg.SET_GROUP,
        Reg.SET_ADDRESS_MODE,
        Reg.SET_VOLTAGE,
        Reg.SET_CURRENT_LIMIT_POINT,
        Reg.SET_VOLTAGE_UPPER_LIMIT,
        Reg.POWER,
        Reg.OVER_VOLTAGE_RESET,
        Reg.OVER_VOLTAGE_PROTECTION,
        Reg.SHORT_CIRCUIT_RESET,
        Reg.SET_INPUT_MODE,
    }
)
READ_REGISTERS = frozenset(set(Reg) - SET_REGISTERS)

#: Plausibility ranges (inclusive) checked when an answer for the register is decoded.
PLAUSIBLE: dict[int, tuple[float, float]] = {
    Reg.OUTPUT_VOLTAGE: (-50.0, 1500.0),
    Reg.OUTPUT_CURRENT: (-50.0, 1000.0),
    Reg.DC_BOARD_TEMPERATURE: (-50.0, 150.0),
    Reg.AMBIENT_TEMPERATURE: (-50.0, 150.0),
    Reg.PFC_BOARD_TEMPERATURE: (-50.0, 150.0),
    Reg.RATED_POWER: (1.0, 200_000.0),
    Reg.RATED_CURRENT: (0.1, 1000.0),
    Reg.AC_VOLTAGE_A: (0.0, 1000.0),
    Reg.AC_VOLTAGE_B: (0.0, 1000.0),
    Reg.AC_VOLTAGE_C: (0.0, 1000.0),
    Reg.SET_VOLTAGE: (0.0, 1500.0),
}

#: Status word (register 0x0040): bit -> flag name.
STATUS_BITS: dict[int, str] = {
    0: "fault",
    1: "protection",
    3: "internal_comm_fault",
    4: "input_wiring_error",
    5: "input_mode_mismatch",
    7: "dcdc_over_voltage",
    8: "pfc_voltage_abnormal",
    9: "input_over_voltage",
    14: "input_under_voltage",
    16: "can_comm_fault",
    17: "current_imbalance",
    22: "output_off",
    23: "power_limiting",
    24: "temperature_derating",
    25: "ac_power_limiting",
    27: "fan_fault",
    28: "short_circuit",
    30: "over_temperature",
    31: "output_over_voltage",
}
STATUS_FLAGS = frozenset(STATUS_BITS.values())
_FLAG_BIT = {name: bit for bit, name in STATUS_BITS.items()}
OUTPUT_OFF_BIT = 22


class Frame(NamedTuple):
    arbitration_id: int
    data: bytes


class WinlineId(NamedTuple):
    protno: int
    ptp: bool
    destination: int
    source: int
    group: int


@dataclass(frozen=True, slots=True)
class Request:
    function: int  # FUNC_READ or FUNC_SET
    register: int
    raw: int  # bytes 4..7 as uint32

    @property
    def float_value(self) -> float:
        value: float = struct.unpack(">f", self.raw.to_bytes(4, "big"))[0]
        return value


@dataclass(frozen=True, slots=True)
class Response:
    register: int
    value: float | int  # float for TYPE_FLOAT answers, int (uint32) for TYPE_INT


# ---------------------------------------------------------------------------- identifiers


def build_id(*, destination: int, source: int, group: int = 0, ptp: bool = True) -> int:
    """Pack the identifier; ValueError if a field does not fit its width."""
    for value, width, label in ((destination, 8, "destination"), (source, 8, "source"),
                                (group, 3, "group")):
        if not 0 <= value < (1 << width):
            raise ValueError(f"{label} {value!r} does not fit in {width} bits")
    return (PROTNO << 20) | (int(ptp) << 19) | (destination << 11) | (source << 3) | group


def parse_id(arbitration_id: int) -> WinlineId:
    """Split an identifier into its fields (the caller checks ``protno == PROTNO``)."""
    if not 0 <= arbitration_id <= 0x1FFF_FFFF:
        raise FrameError(f"identifier 0x{arbitration_id:X} is not a 29-bit identifier")
    return WinlineId(
        arbitration_id >> 20,
        bool(arbitration_id >> 19 & 1),
        arbitration_id >> 11 & 0xFF,
        arbitration_id >> 3 & 0xFF,
        arbitration_id & 0x7,
    )


def _request_id(source: int, module: int | None, group: int | None) -> int:
    if group is not None and not 0 <= group <= MAX_GROUP:
        raise ValueError(f"group {group!r} outside 0..{MAX_GROUP}")
    if module is not None:
        if not 0 <= module <= MAX_ADDRESS:
            raise ValueError(f"module address {module!r} outside 0x00..0x3F")
        return build_id(destination=module, source=source, group=group or 0, ptp=True)
    if group is not None:
        return build_id(destination=GROUP_BROADCAST, source=source, group=group, ptp=False)
    return build_id(destination=BROADCAST, source=source, group=0, ptp=False)


# ---------------------------------------------------------------------------- values


def register_is_float(register: int) -> bool:
    return register in FLOAT_REGISTERS


def _encode_value(register: int, value: float) -> bytes:
    if register in FLOAT_REGISTERS:
        if not math.isfinite(value):
            raise ValueError(f"value {value!r} for register 0x{register:04X} is not finite")
        return struct.pack(">f", value)
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"register 0x{register:04X} takes an integer, got {value!r}")
    number = int(value)
    if not 0 <= number <= 0xFFFF_FFFF:
        raise ValueError(f"value {number!r} does not fit in uint32")
    return number.to_bytes(4, "big")


def current_to_raw(amps: float) -> int:
    """Current setpoint encoding of register 0x001B: amps x 1024, rounded."""
    if not math.isfinite(amps) or amps < 0:
        raise ValueError(f"current {amps!r} must be finite and >= 0")
    return round(amps * CURRENT_SCALE)


def raw_to_current(raw: int) -> float:
    return raw / CURRENT_SCALE


# ---------------------------------------------------------------------------- requests


def read_request(
    register: int, source: int, *, module: int | None = None, group: int | None = None
) -> Frame:
    """Read ``register`` from one module (point-to-point, group bits = ``group`` or 0),
    from a whole group (destination 0xFE), or (neither given) from every module (0xFF)."""
    data = struct.pack(">BBHI", FUNC_READ, 0, register, 0)
    return Frame(_request_id(source, module, group), data)


def set_request(
    register: int,
    value: float,
    source: int,
    *,
    module: int | None = None,
    group: int | None = None,
) -> Frame:
    """Write ``value`` (float32 or uint32, per register type) to ``register``."""
    data = struct.pack(">BBH", FUNC_SET, 0, register) + _encode_value(register, value)
    return Frame(_request_id(source, module, group), data)


def set_voltage_request(
    volts: float, source: int, *, module: int | None = None, group: int | None = None
) -> Frame:
    """Register 0x0021: output voltage setpoint, float32 V."""
    if not math.isfinite(volts) or volts < 0:
        raise ValueError(f"voltage {volts!r} must be finite and >= 0")
    return set_request(Reg.SET_VOLTAGE, float(volts), source, module=module, group=group)


def set_current_request(
    amps: float, source: int, *, module: int | None = None, group: int | None = None
) -> Frame:
    """Register 0x001B: output current setpoint, uint32 amps x 1024."""
    return set_request(Reg.SET_CURRENT, current_to_raw(amps), source, module=module, group=group)


def power_request(
    on: bool, source: int, *, module: int | None = None, group: int | None = None
) -> Frame:
    """Register 0x0030: 0x00000000 switches the output on, 0x00010000 off."""
    return set_request(Reg.POWER, POWER_ON if on else POWER_OFF, source, module=module, group=group)


def decode_request(data: bytes | bytearray) -> Request:
    """A controller's request as a module sees it; FrameError on a malformed one."""
    if len(data) != 8:
        raise FrameError(f"DLC {len(data)}, expected 8")
    function, _, register, raw = struct.unpack(">BBHI", data)
    if function not in (FUNC_READ, FUNC_SET):
        raise FrameError(f"unknown function 0x{function:02X}")
    return Request(function, register, raw)


# ---------------------------------------------------------------------------- answers


def encode_response(
    register: int, value: float, *, status: int = STATUS_OK, type_byte: int | None = None
) -> bytes:
    """An answer carrying ``value`` for ``register`` (type chosen by the register)."""
    if type_byte is None:
        type_byte = TYPE_FLOAT if register in FLOAT_REGISTERS else TYPE_INT
    if type_byte == TYPE_FLOAT:
        payload = struct.pack(">f", value)
    else:
        payload = int(value).to_bytes(4, "big")
    return struct.pack(">BBH", type_byte, status, register) + payload


def decode_response(data: bytes | bytearray) -> Response:
    """Decode and validate a module's answer (see the module docstring for what fails)."""
    if len(data) != 8:
        raise FrameError(f"DLC {len(data)}, expected 8")
    type_byte, status, register = data[0], data[1], data[2] << 8 | data[3]
    if status != STATUS_OK:
        raise FrameError(f"status byte 0x{status:02X} (register 0x{register:04X})")
    value: float | int
    if type_byte == TYPE_FLOAT:
        if register in INT_REGISTERS:
            raise FrameError(f"float answer for integer register 0x{register:04X}")
        value = struct.unpack_from(">f", data, 4)[0]
        if not math.isfinite(value):
            raise FrameError(f"non-finite value for register 0x{register:04X}")
    elif type_byte == TYPE_INT:
        if register in FLOAT_REGISTERS:
            raise FrameError(f"integer answer for float register 0x{register:04X}")
        value = data[4] << 24 | data[5] << 16 | data[6] << 8 | data[7]
    else:
        raise FrameError(f"unknown type byte 0x{type_byte:02X}")
    bounds = PLAUSIBLE.get(register)
    if bounds is not None and not bounds[0] <= value <= bounds[1]:
        raise FrameError(f"register 0x{register:04X} value {value!r} outside "
                         f"{bounds[0]:g}..{bounds[1]:g}")
    return Response(register, value)


@lru_cache(maxsize=1024)
def status_flags(word: int) -> frozenset[str]:
    """Named flags set in status word 0x0040 (reserved bits ignored)."""
    return frozenset(name for bit, name in STATUS_BITS.items() if word >> bit & 1)


def status_word(flags: Iterable[str]) -> int:
    """Inverse of :func:`status_flags`; ValueError for an unknown flag name."""
    word = 0
    for flag in flags:
        try:
            word |= 1 << _FLAG_BIT[flag]
        except KeyError:
            raise ValueError(f"unknown status flag {flag!r}") from None
    return word


def decode_group_info(value: int) -> tuple[int, int]:
    """Register 0x0043: (group number, DIP address) from the high and low 16 bits."""
    return value >> 16 & 0xFFFF, value & 0xFFFF


def encode_group_info(group: int, dip_address: int) -> int:
    if not (0 <= group <= 0xFFFF and 0 <= dip_address <= 0xFFFF):
        raise ValueError("group and DIP address must fit in 16 bits each")
    return group << 16 | dip_address
