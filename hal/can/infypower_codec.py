"""InfyPower REG/CEG/LRG CAN protocol V1.13: identifiers and payloads, as pure functions.

Frame identifier (29 bit, extended)::

    bits 28..26 error code   (0 in requests; 2 command invalid, 3 data invalid, 7 starting)
    bits 25..22 device       (0x0A single module or all modules, 0x0B a module group)
    bits 21..16 command
    bits 15..8  destination  (module 0x00..0x3E, 0x3F all modules, group number, or us)
    bits  7..0  source       (the controller 0xF0..0xF8 in requests; responder in answers)

Every payload is 8 bytes, big-endian. Requests for reads carry 8 zero bytes.

Encoders raise :class:`ValueError` for arguments they cannot represent (the caller's
mistake). Decoders take the bytes of a received frame and raise
:class:`~hal.can.port.FrameError` on anything that is not a well-formed, plausible
answer: a DLC other than 8, a non-finite float, a value outside the plausibility
range of the field. They never raise anything else for any input bytes.

The ``encode_*`` counterparts of the decoders build the answers a module would send;
the simulator uses them, and they make every decoder testable by round trip.

Why one module of ~510 lines: the complete frame codec of one protocol (V1.13), every
command with its test vector; pure functions, no state.
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
    "DEV_GROUP",
    "DEV_MODULE",
    "MAX_GROUP",
    "MAX_MODULE_ADDRESS",
    "Cmd",
    "Frame",
    "FrameError",
    "InfyId",
    "Ratings",
    "StatusReport",
    "VoltageCurrent",
    "build_id",
    "on_off_request",
    "parse_id",
    "read_request",
    "response_id",
    "set_output_request",
]

DEV_MODULE = 0x0A  # one module, or every module when the destination is BROADCAST
DEV_GROUP = 0x0B  # a module group; the destination is the group number
BROADCAST = 0x3F
MAX_MODULE_ADDRESS = 0x3E
MAX_GROUP = 0x3E  # group numbers 0..62 (0x3F is kept free: it means "all" for modules)

ERROR_CODES: dict[int, str] = {
    0x2: "command invalid",
    0x3: "data invalid",
    0x7: "in start processing",
}

# plausibility ranges for decoded values (inclusive)
VOLTAGE_RANGE = (-50.0, 1500.0)  # V, measured output voltage
CURRENT_RANGE = (-50.0, 1000.0)  # A, measured output current
TEMPERATURE_RANGE = (-50, 150)  # degC
AC_VOLTAGE_RANGE = (0.0, 1000.0)  # V
MAX_RATED_VOLTAGE = 1500  # V
MAX_RATED_CURRENT = 1000.0  # A
MAX_RATED_POWER_W = 200_000.0  # W

_ZERO8 = bytes(8)
_U32_MAX = 0xFFFF_FFFF


class Cmd(enum.IntEnum):
    READ_SYSTEM_VI_FLOAT = 0x01
    READ_MODULE_COUNT = 0x02
    READ_MODULE_VI_FLOAT = 0x03
    READ_STATUS = 0x04
    READ_AC_INPUT = 0x06
    READ_SYSTEM_VI_INT = 0x08
    READ_MODULE_VI_INT = 0x09
    READ_RATINGS = 0x0A
    READ_BARCODE = 0x0B
    READ_AVAILABLE = 0x0C
    SET_GROUP = 0x16
    SET_ON_OFF = 0x1A
    SET_SYSTEM_OUTPUT = 0x1B
    SET_MODULE_OUTPUT = 0x1C


READ_COMMANDS = frozenset(
    {
        Cmd.READ_SYSTEM_VI_FLOAT,
        Cmd.READ_MODULE_COUNT,
        Cmd.READ_MODULE_VI_FLOAT,
        Cmd.READ_STATUS,
        Cmd.READ_AC_INPUT,
        Cmd.READ_SYSTEM_VI_INT,
        Cmd.READ_MODULE_VI_INT,
        Cmd.READ_RATINGS,
        Cmd.READ_BARCODE,
        Cmd.READ_AVAILABLE,
    }
)

#: Status bits of command 0x04: (payload byte, bit, flag name).
#: byte 5 = status2, byte 6 = status1, byte 7 = status0.
STATUS_BITS: tuple[tuple[int, int, str], ...] = (
    (7, 0, "short_circuit"),
    (7, 4, "sleeping"),
    (7, 5, "discharge_abnormal"),
    (6, 0, "output_off"),
    (6, 1, "fault"),
    (6, 2, "protection"),
    (6, 3, "fan_fault"),
    (6, 4, "over_temperature"),
    (6, 5, "output_over_voltage"),
    (6, 6, "walk_in"),
    (6, 7, "can_comm_fault"),
    (5, 0, "power_limiting"),
    (5, 1, "duplicate_address"),
    (5, 2, "load_sharing_alarm"),
    (5, 3, "input_phase_lost"),
    (5, 4, "input_unbalanced"),
    (5, 5, "input_under_voltage"),
    (5, 6, "input_over_voltage"),
    (5, 7, "pfc_off"),
)
STATUS_FLAGS = frozenset(name for _, _, name in STATUS_BITS)
_FLAG_POSITION = {name: (byte, bit) for byte, bit, name in STATUS_BITS}


class Frame(NamedTuple):
    """An extended CAN frame as the codec sees it."""

    arbitration_id: int
    data: bytes


class InfyId(NamedTuple):
    error: int
    device: int
    command: int
    destination: int
    source: int


class VoltageCurrent(NamedTuple):
    voltage: float  # V
    current: float  # A


class Ratings(NamedTuple):
    max_voltage: float  # V
    min_voltage: float  # V
    max_current: float  # A
    rated_power_w: float  # W


@dataclass(frozen=True, slots=True)
class StatusReport:
    """Answer to command 0x04."""

    group: int
    temperature: int  # degC, signed
    flags: frozenset[str]
    status2: int
    status1: int
    status0: int

    @property
    def output_on(self) -> bool:
        return "output_off" not in self.flags


# ---------------------------------------------------------------------------- identifiers


def build_id(*, device: int, command: int, destination: int, source: int, error: int = 0) -> int:
    """Pack the identifier fields; raises ValueError when a field does not fit its width."""
    for value, width, label in (
        (error, 3, "error"),
        (device, 4, "device"),
        (command, 6, "command"),
        (destination, 8, "destination"),
        (source, 8, "source"),
    ):
        if not 0 <= value < (1 << width):
            raise ValueError(f"{label} {value!r} does not fit in {width} bits")
    return (error << 26) | (device << 22) | (command << 16) | (destination << 8) | source


def parse_id(arbitration_id: int) -> InfyId:
    """Split a 29-bit identifier into its fields; FrameError if it is wider than 29 bits."""
    if not 0 <= arbitration_id <= 0x1FFF_FFFF:
        raise FrameError(f"identifier 0x{arbitration_id:X} is not a 29-bit identifier")
    return InfyId(
        (arbitration_id >> 26) & 0x7,
        (arbitration_id >> 22) & 0xF,
        (arbitration_id >> 16) & 0x3F,
        (arbitration_id >> 8) & 0xFF,
        arbitration_id & 0xFF,
    )


def response_id(
    command: int, responder: int, controller: int, *, device: int = DEV_MODULE, error: int = 0
) -> int:
    """Identifier of an answer from ``responder`` (module, group or 0x3F) to ``controller``."""
    return build_id(
        device=device, command=command, destination=controller, source=responder, error=error
    )


#: Module condition flag per error code of an answer's identifier.
CONDITION_FLAGS: dict[int, str] = {
    0x2: "command_invalid",
    0x3: "data_invalid",
    0x7: "start_processing",
}


def condition_flags(error: int) -> frozenset[str]:
    """The condition an answer's error code states: empty for 0, ``reply_error`` if unknown."""
    if not error:
        return frozenset()
    return frozenset({CONDITION_FLAGS.get(error, "reply_error")})


def raise_for_error(ident: InfyId) -> None:
    """FrameError if a response identifier carries a non-zero error code."""
    if ident.error:
        meaning = ERROR_CODES.get(ident.error, "unknown error")
        raise FrameError(
            f"module 0x{ident.source:02X} answered command 0x{ident.command:02X} "
            f"with error {ident.error} ({meaning})"
        )


def _target(module: int | None, group: int | None) -> tuple[int, int]:
    if module is not None and group is not None:
        raise ValueError("address a module or a group, not both")
    if module is not None:
        if not 0 <= module <= MAX_MODULE_ADDRESS:
            raise ValueError(f"module address {module!r} outside 0x00..0x3E")
        return DEV_MODULE, module
    if group is not None:
        if not 0 <= group <= MAX_GROUP:
            raise ValueError(f"group {group!r} outside 0..{MAX_GROUP}")
        return DEV_GROUP, group
    return DEV_MODULE, BROADCAST


# ---------------------------------------------------------------------------- requests


def read_request(
    command: int, source: int, *, module: int | None = None, group: int | None = None
) -> Frame:
    """A read (8 zero bytes) to one module, one group, or (neither given) every module."""
    if command not in READ_COMMANDS:
        raise ValueError(f"0x{command:02X} is not a read command")
    device, destination = _target(module, group)
    return Frame(
        build_id(device=device, command=command, destination=destination, source=source), _ZERO8
    )


def on_off_request(
    on: bool, source: int, *, module: int | None = None, group: int | None = None
) -> Frame:
    """Command 0x1A: byte 0 = 0x00 switches the output on, 0x01 off."""
    device, destination = _target(module, group)
    data = bytes((0x00 if on else 0x01, 0, 0, 0, 0, 0, 0, 0))
    return Frame(
        build_id(device=device, command=Cmd.SET_ON_OFF, destination=destination, source=source),
        data,
    )


def set_output_request(
    voltage: float,
    current: float,
    source: int,
    *,
    module: int | None = None,
    group: int | None = None,
) -> Frame:
    """Set output voltage and current.

    To one module: command 0x1C with that module's current. To a group (device 0x0B)
    or to every module (neither given): command 0x1B with the TOTAL current, which the
    modules share among themselves.
    """
    device, destination = _target(module, group)
    command = Cmd.SET_MODULE_OUTPUT if module is not None else Cmd.SET_SYSTEM_OUTPUT
    return Frame(
        build_id(device=device, command=command, destination=destination, source=source),
        encode_setpoint(voltage, current),
    )


def _milli(value: float, label: str) -> int:
    if not math.isfinite(value):
        raise ValueError(f"{label} {value!r} is not finite")
    milli = round(value * 1000.0)
    if not 0 <= milli <= _U32_MAX:
        raise ValueError(f"{label} {value!r} outside 0..{_U32_MAX / 1000:g}")
    return milli


def encode_setpoint(voltage: float, current: float) -> bytes:
    """Payload of 0x1B/0x1C: uint32 mV, uint32 mA."""
    return struct.pack(">II", _milli(voltage, "voltage"), _milli(current, "current"))


def decode_setpoint(data: bytes | bytearray) -> VoltageCurrent:
    """Payload of a 0x1B/0x1C request or its echo, in V and A."""
    _check_dlc(data)
    mv, ma = struct.unpack(">II", data)
    return VoltageCurrent(mv / 1000.0, ma / 1000.0)


def decode_on_off(data: bytes | bytearray) -> bool:
    """Payload of a 0x1A request: True = on. FrameError for anything but 0x00/0x01."""
    _check_dlc(data)
    if data[0] not in (0x00, 0x01):
        raise FrameError(f"on/off byte 0x{data[0]:02X} is neither 0x00 (on) nor 0x01 (off)")
    return data[0] == 0x00


# ---------------------------------------------------------------------------- answers


def _check_dlc(data: bytes | bytearray) -> None:
    if len(data) != 8:
        raise FrameError(f"DLC {len(data)}, expected 8")


def _check_range(value: float, bounds: tuple[float, float], label: str) -> float:
    if not (math.isfinite(value) and bounds[0] <= value <= bounds[1]):
        raise FrameError(f"{label} {value!r} outside {bounds[0]:g}..{bounds[1]:g}")
    return value


def encode_vi_float(voltage: float, current: float) -> bytes:
    """Answer to 0x01/0x03: float32 V, float32 A."""
    return struct.pack(">ff", voltage, current)


def decode_vi_float(data: bytes | bytearray) -> VoltageCurrent:
    """Answer to 0x01 (system) or 0x03 (one module): float32 V, float32 A."""
    _check_dlc(data)
    voltage, current = struct.unpack(">ff", data)
    return VoltageCurrent(
        _check_range(voltage, VOLTAGE_RANGE, "voltage"),
        _check_range(current, CURRENT_RANGE, "current"),
    )


def encode_vi_int(voltage: float, current: float) -> bytes:
    """Answer to 0x08/0x09: uint32 mV, uint32 mA (negative values are sent as 0)."""
    return struct.pack(
        ">II", _milli(max(voltage, 0.0), "voltage"), _milli(max(current, 0.0), "current")
    )


def decode_vi_int(data: bytes | bytearray) -> VoltageCurrent:
    """Answer to 0x08 (system) or 0x09 (one module): uint32 mV, uint32 mA, returned in V/A."""
    _check_dlc(data)
    mv, ma = struct.unpack(">II", data)
    return VoltageCurrent(
        _check_range(mv / 1000.0, VOLTAGE_RANGE, "voltage"),
        _check_range(ma / 1000.0, CURRENT_RANGE, "current"),
    )


def encode_status(group: int, temperature: int, flags: Iterable[str] = ()) -> bytes:
    """Answer to 0x04: [2] group, [4] int8 temperature, [5] status2, [6] status1, [7] status0."""
    status = [0, 0, 0, 0, 0, 0, 0, 0]
    for flag in flags:
        try:
            byte, bit = _FLAG_POSITION[flag]
        except KeyError:
            raise ValueError(f"unknown status flag {flag!r}") from None
        status[byte] |= 1 << bit
    if not 0 <= group <= 0xFF:
        raise ValueError(f"group {group!r} does not fit in a byte")
    if not -128 <= temperature <= 127:
        raise ValueError(f"temperature {temperature!r} does not fit in int8")
    status[2] = group
    status[4] = temperature & 0xFF
    return bytes(status)


@lru_cache(maxsize=4096)
def status_flags(status2: int, status1: int, status0: int) -> frozenset[str]:
    """Named flags set in the three status bytes (reserved bits are ignored)."""
    raw = {5: status2, 6: status1, 7: status0}
    return frozenset(name for byte, bit, name in STATUS_BITS if raw[byte] >> bit & 1)


def decode_status(data: bytes | bytearray) -> StatusReport:
    """Answer to 0x04. The temperature byte is signed (0xFE = -2 degC)."""
    _check_dlc(data)
    temperature = data[4] - 256 if data[4] >= 128 else data[4]
    _check_range(temperature, TEMPERATURE_RANGE, "temperature")
    return StatusReport(
        group=data[2],
        temperature=temperature,
        flags=status_flags(data[5], data[6], data[7]),
        status2=data[5],
        status1=data[6],
        status0=data[7],
    )


def encode_ratings(
    max_voltage: float, min_voltage: float, max_current: float, rated_power_w: float
) -> bytes:
    """Answer to 0x0A: uint16 Vmax (1 V), Vmin (1 V), Imax (0.1 A), power (10 W)."""
    fields = (
        round(max_voltage),
        round(min_voltage),
        round(max_current * 10.0),
        round(rated_power_w / 10.0),
    )
    if any(not 0 <= f <= 0xFFFF for f in fields):
        raise ValueError(f"ratings {fields!r} do not fit in uint16")
    return struct.pack(">HHHH", *fields)


def decode_ratings(data: bytes | bytearray) -> Ratings:
    """Answer to 0x0A. FrameError unless 0 <= Vmin <= Vmax <= 1500, Imax > 0, power > 0."""
    _check_dlc(data)
    vmax, vmin, imax10, power10 = struct.unpack(">HHHH", data)
    if not 0 < vmax <= MAX_RATED_VOLTAGE or vmin > vmax:
        raise FrameError(f"implausible voltage rating {vmin}..{vmax} V")
    if not 0 < imax10 / 10.0 <= MAX_RATED_CURRENT:
        raise FrameError(f"implausible current rating {imax10 / 10.0} A")
    if not 0 < power10 * 10.0 <= MAX_RATED_POWER_W:
        raise FrameError(f"implausible power rating {power10 * 10} W")
    return Ratings(float(vmax), float(vmin), imax10 / 10.0, power10 * 10.0)


def encode_module_count(count: int) -> bytes:
    """Answer to 0x02: [2] uint8 count."""
    if not 0 <= count <= BROADCAST:
        raise ValueError(f"module count {count!r} outside 0..63")
    return bytes((0, 0, count, 0, 0, 0, 0, 0))


def decode_module_count(data: bytes | bytearray) -> int:
    """Answer to 0x02: number of modules (0..63)."""
    _check_dlc(data)
    count = data[2]
    if count > BROADCAST:
        raise FrameError(f"implausible module count {count}")
    return count


def encode_ac_input(vab: float, vbc: float, vca: float) -> bytes:
    """Answer to 0x06: uint16 line voltages in 0.1 V."""
    fields = tuple(round(v * 10.0) for v in (vab, vbc, vca))
    if any(not 0 <= f <= 0xFFFF for f in fields):
        raise ValueError(f"line voltages {fields!r} do not fit in uint16")
    return struct.pack(">HHHH", *fields, 0)


def decode_ac_input(data: bytes | bytearray) -> tuple[float, float, float]:
    """Answer to 0x06: (Vab, Vbc, Vca) in V."""
    _check_dlc(data)
    vab, vbc, vca, _ = struct.unpack(">HHHH", data)
    return (
        _check_range(vab / 10.0, AC_VOLTAGE_RANGE, "Vab"),
        _check_range(vbc / 10.0, AC_VOLTAGE_RANGE, "Vbc"),
        _check_range(vca / 10.0, AC_VOLTAGE_RANGE, "Vca"),
    )


def encode_available(voltage: float, current: float) -> bytes:
    """Answer to 0x0C: uint16 voltage after the diode (0.1 V), available current (0.1 A)."""
    fields = (round(voltage * 10.0), round(current * 10.0))
    if any(not 0 <= f <= 0xFFFF for f in fields):
        raise ValueError(f"values {fields!r} do not fit in uint16")
    return struct.pack(">HHI", *fields, 0)


def decode_available(data: bytes | bytearray) -> VoltageCurrent:
    """Answer to 0x0C: external (after-diode) voltage and available current, in V/A."""
    _check_dlc(data)
    v10, a10, _ = struct.unpack(">HHI", data)
    return VoltageCurrent(
        _check_range(v10 / 10.0, VOLTAGE_RANGE, "voltage"),
        _check_range(a10 / 10.0, CURRENT_RANGE, "current"),
    )


def decode_ack(data: bytes | bytearray) -> None:
    """Answer to a set command (0x1A/0x1B/0x1C): content undocumented, only the DLC is checked."""
    _check_dlc(data)
