"""InfyPower V1.13 codec against the worked frames of the protocol reference, plus properties."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hal.can import infypower_codec as infy
from hal.can.port import FrameError

CONTROLLER = 0xF0


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


ZERO8 = bytes(8)


# ---------------------------------------------------------------------------- worked frames


def test_read_float_vi_request_and_answer() -> None:
    frame = infy.read_request(infy.Cmd.READ_MODULE_VI_FLOAT, CONTROLLER, module=0)
    assert frame == (0x028300F0, ZERO8)
    answer_id = infy.response_id(infy.Cmd.READ_MODULE_VI_FLOAT, 0, CONTROLLER)
    assert answer_id == 0x0283F000
    assert infy.decode_vi_float(h("43 FA 00 00 42 48 00 00")) == (500.0, 50.0)


def test_read_integer_vi_request_and_answer() -> None:
    assert infy.read_request(infy.Cmd.READ_MODULE_VI_INT, CONTROLLER, module=0) == (
        0x028900F0,
        ZERO8,
    )
    assert infy.response_id(infy.Cmd.READ_MODULE_VI_INT, 0, CONTROLLER) == 0x0289F000
    assert infy.decode_vi_int(h("00 07 A1 20 00 00 C3 50")) == (500.0, 50.0)
    assert infy.encode_vi_int(500.0, 50.0) == h("00 07 A1 20 00 00 C3 50")


def test_read_status_answer_uses_everest_byte_order() -> None:
    assert infy.read_request(infy.Cmd.READ_STATUS, CONTROLLER, module=0) == (0x028400F0, ZERO8)
    assert infy.parse_id(0x0284F000) == infy.InfyId(0, 0x0A, 0x04, 0xF0, 0x00)
    status = infy.decode_status(h("00 00 02 00 1B 00 40 00"))
    assert status.group == 2
    assert status.temperature == 27
    assert status.flags == frozenset({"walk_in"})  # status1 bit 6, no alarm
    assert (status.status2, status.status1, status.status0) == (0x00, 0x40, 0x00)
    assert status.output_on  # status1 bit 0 (DC side off) is clear


def test_status_temperature_is_signed() -> None:
    assert infy.decode_status(h("00 00 02 00 FE 00 40 00")).temperature == -2


@pytest.mark.parametrize(
    ("byte", "bit", "flag"),
    [
        (7, 0, "short_circuit"),
        (6, 0, "output_off"),
        (6, 1, "fault"),
        (6, 3, "fan_fault"),
        (6, 4, "over_temperature"),
        (6, 7, "can_comm_fault"),
        (5, 0, "power_limiting"),
        (5, 3, "input_phase_lost"),
        (5, 7, "pfc_off"),
    ],
)
def test_status_bit_positions(byte: int, bit: int, flag: str) -> None:
    data = bytearray(8)
    data[byte] = 1 << bit
    assert infy.decode_status(bytes(data)).flags == frozenset({flag})
    assert infy.encode_status(0, 0, {flag}) == bytes(data)


def test_read_ratings_answer() -> None:
    assert infy.read_request(infy.Cmd.READ_RATINGS, CONTROLLER, module=0) == (0x028A00F0, ZERO8)
    assert infy.response_id(infy.Cmd.READ_RATINGS, 0, CONTROLLER) == 0x028AF000
    ratings = infy.decode_ratings(h("02 EE 00 64 01 00 05 DC"))
    assert ratings == infy.Ratings(750.0, 100.0, 25.6, 15000.0)
    assert infy.encode_ratings(750, 100, 25.6, 15000) == h("02 EE 00 64 01 00 05 DC")


def test_set_one_module() -> None:
    frame = infy.set_output_request(500.0, 20.0, CONTROLLER, module=0)
    assert frame == (0x029C00F0, h("00 07 A1 20 00 00 4E 20"))
    assert infy.decode_setpoint(frame.data) == (500.0, 20.0)


def test_set_group_total() -> None:
    frame = infy.set_output_request(500.0, 100.0, CONTROLLER, group=1)
    assert frame == (0x02DB01F0, h("00 07 A1 20 00 01 86 A0"))


def test_set_whole_system() -> None:
    frame = infy.set_output_request(500.0, 100.0, CONTROLLER)
    assert frame == (0x029B3FF0, h("00 07 A1 20 00 01 86 A0"))


def test_on_off_frames() -> None:
    assert infy.on_off_request(True, CONTROLLER, module=0) == (0x029A00F0, ZERO8)
    assert infy.on_off_request(False, CONTROLLER, module=0) == (0x029A00F0, h("01" + "00" * 7))
    assert infy.on_off_request(True, CONTROLLER, group=1) == (0x02DA01F0, ZERO8)
    assert infy.on_off_request(False, CONTROLLER) == (0x029A3FF0, h("01" + "00" * 7))
    assert infy.decode_on_off(ZERO8) is True
    assert infy.decode_on_off(h("01" + "00" * 7)) is False


def test_module_count_of_group() -> None:
    assert infy.read_request(infy.Cmd.READ_MODULE_COUNT, CONTROLLER, group=1) == (
        0x02C201F0,
        ZERO8,
    )
    assert infy.response_id(infy.Cmd.READ_MODULE_COUNT, 1, CONTROLLER,
                            device=infy.DEV_GROUP) == 0x02C2F001
    assert infy.decode_module_count(h("00 00 03 00 00 00 00 00")) == 3


def test_broadcast_read_and_answer_ids() -> None:
    assert infy.read_request(infy.Cmd.READ_SYSTEM_VI_FLOAT, CONTROLLER).arbitration_id == 0x02813FF0
    assert infy.response_id(infy.Cmd.READ_SYSTEM_VI_FLOAT, infy.BROADCAST, CONTROLLER) == 0x0281F03F


def test_parse_id_fields() -> None:
    assert infy.parse_id(0x028300F0) == infy.InfyId(0, 0x0A, 0x03, 0x00, 0xF0)
    assert infy.parse_id(0x02DB01F0) == infy.InfyId(0, 0x0B, 0x1B, 0x01, 0xF0)


@pytest.mark.parametrize(
    "command",
    [0x01, 0x02, 0x03, 0x04, 0x06, 0x08, 0x09, 0x0A, 0x0C],
)
def test_every_read_command_has_zero_payload(command: int) -> None:
    frame = infy.read_request(command, CONTROLLER, module=5)
    assert frame.data == ZERO8
    assert infy.parse_id(frame.arbitration_id) == infy.InfyId(0, 0x0A, command, 5, 0xF0)


def test_ac_input_and_available_current() -> None:
    assert infy.decode_ac_input(h("0F A0 0F A5 0F 9B 00 00")) == (400.0, 400.5, 399.5)
    assert infy.decode_available(h("13 88 01 90 00 00 00 00")) == (500.0, 40.0)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("decoder", "data"),
    [
        (infy.decode_vi_float, h("43 FA 00 00 42 48")),  # DLC 6
        (infy.decode_vi_float, struct.pack(">ff", math.nan, 1.0)),
        (infy.decode_vi_float, struct.pack(">ff", math.inf, 1.0)),
        (infy.decode_vi_float, struct.pack(">ff", 5000.0, 1.0)),  # no 5 kV module
        (infy.decode_vi_int, b"\xff" * 8),
        (infy.decode_status, h("00 00 02 00 80 00 40 00")),  # -128 degC
        (infy.decode_status, b""),
        (infy.decode_ratings, ZERO8),
        (infy.decode_ratings, h("00 64 02 EE 01 00 05 DC")),  # Vmin > Vmax
        (infy.decode_module_count, h("00 00 FF 00 00 00 00 00")),
        (infy.decode_on_off, h("07" + "00" * 7)),
    ],
)
def test_decoders_reject_garbage(decoder: object, data: bytes) -> None:
    with pytest.raises(FrameError):
        decoder(data)  # type: ignore[operator]


def test_error_code_in_answer_id_is_rejected() -> None:
    ident = infy.parse_id(infy.response_id(0x03, 0, CONTROLLER, error=0x2))
    assert ident.error == 2
    with pytest.raises(FrameError, match="command invalid"):
        infy.raise_for_error(ident)


def test_encoders_reject_unrepresentable_arguments() -> None:
    with pytest.raises(ValueError):
        infy.set_output_request(-1.0, 10.0, CONTROLLER, module=0)
    with pytest.raises(ValueError):
        infy.set_output_request(500.0, math.nan, CONTROLLER, module=0)
    with pytest.raises(ValueError):
        infy.read_request(infy.Cmd.READ_STATUS, CONTROLLER, module=0x3F)
    with pytest.raises(ValueError):
        infy.read_request(infy.Cmd.SET_ON_OFF, CONTROLLER, module=0)
    with pytest.raises(ValueError):
        infy.on_off_request(True, CONTROLLER, module=1, group=1)
    with pytest.raises(ValueError):
        infy.encode_status(1, 20, {"no_such_flag"})


# ---------------------------------------------------------------------------- properties

DECODERS = [
    infy.decode_vi_float,
    infy.decode_vi_int,
    infy.decode_status,
    infy.decode_ratings,
    infy.decode_module_count,
    infy.decode_ac_input,
    infy.decode_available,
    infy.decode_setpoint,
    infy.decode_on_off,
    infy.decode_ack,
]


@given(
    error=st.integers(0, 7),
    device=st.integers(0, 15),
    command=st.integers(0, 63),
    destination=st.integers(0, 255),
    source=st.integers(0, 255),
)
def test_id_round_trip(error: int, device: int, command: int, destination: int, source: int) -> None:
    aid = infy.build_id(
        device=device, command=command, destination=destination, source=source, error=error
    )
    assert aid <= 0x1FFF_FFFF
    assert infy.parse_id(aid) == infy.InfyId(error, device, command, destination, source)


@given(
    voltage=st.floats(0.0, 1500.0, width=32),
    current=st.floats(-50.0, 1000.0, width=32),
)
def test_float_vi_round_trip(voltage: float, current: float) -> None:
    assert infy.decode_vi_float(infy.encode_vi_float(voltage, current)) == (voltage, current)


@given(mv=st.integers(0, 1_500_000), ma=st.integers(0, 1_000_000))
def test_integer_vi_round_trip(mv: int, ma: int) -> None:
    decoded = infy.decode_vi_int(struct.pack(">II", mv, ma))
    assert decoded == (mv / 1000.0, ma / 1000.0)
    assert infy.encode_vi_int(*decoded) == struct.pack(">II", mv, ma)


@given(mv=st.integers(0, 0xFFFF_FFFF), ma=st.integers(0, 0xFFFF_FFFF))
def test_setpoint_round_trip(mv: int, ma: int) -> None:
    v, a = infy.decode_setpoint(struct.pack(">II", mv, ma))
    assert infy.encode_setpoint(v, a) == struct.pack(">II", mv, ma)


@given(
    group=st.integers(0, 255),
    temperature=st.integers(-50, 127),
    flags=st.frozensets(st.sampled_from(sorted(infy.STATUS_FLAGS))),
)
def test_status_round_trip(group: int, temperature: int, flags: frozenset[str]) -> None:
    status = infy.decode_status(infy.encode_status(group, temperature, flags))
    assert (status.group, status.temperature, status.flags) == (
        group,
        temperature,
        flags,
    )
    assert status.output_on is ("output_off" not in flags)


@given(
    vmax=st.integers(1, 1500),
    vmin_fraction=st.floats(0.0, 1.0),
    imax10=st.integers(1, 10_000),
    power10=st.integers(1, 20_000),
)
def test_ratings_round_trip(vmax: int, vmin_fraction: float, imax10: int, power10: int) -> None:
    vmin = int(vmax * vmin_fraction)
    data = infy.encode_ratings(vmax, vmin, imax10 / 10.0, power10 * 10.0)
    assert infy.decode_ratings(data) == (vmax, vmin, imax10 / 10.0, power10 * 10.0)


@given(count=st.integers(0, 63))
def test_module_count_round_trip(count: int) -> None:
    assert infy.decode_module_count(infy.encode_module_count(count)) == count


@given(data=st.binary(max_size=12), which=st.sampled_from(DECODERS))
def test_decoders_raise_only_frame_error(data: bytes, which: object) -> None:
    try:
        which(data)  # type: ignore[operator]
    except FrameError:
        pass
    if len(data) != 8:
        with pytest.raises(FrameError):
            which(data)  # type: ignore[operator]


def test_after_diode_voltage_request_and_answer() -> None:
    # 0x0C to module 0: after-diode (external) voltage 0.1 V, available current 0.1 A
    assert infy.read_request(infy.Cmd.READ_AVAILABLE, 0xF0, module=0) == (0x028C00F0, bytes(8))
    assert infy.decode_available(bytes.fromhex("1388 00FA 00000000")) == (500.0, 25.0)
    assert infy.encode_available(500.0, 25.0) == bytes.fromhex("138800FA00000000")


@pytest.mark.parametrize(
    ("error", "flags"),
    [(0, set()), (2, {"command_invalid"}), (3, {"data_invalid"}), (7, {"start_processing"}),
     (5, {"reply_error"})],
)
def test_error_code_in_the_reply_identifier_names_a_condition(error: int, flags: set[str]) -> None:
    # module 0 answering 0x03 with error 7 in bits 28..26: 0x1E83F000
    ident = infy.response_id(infy.Cmd.READ_MODULE_VI_FLOAT, 0, 0xF0, error=error)
    assert ident == (error << 26) | 0x0283F000
    assert infy.parse_id(ident).error == error
    assert infy.condition_flags(infy.parse_id(ident).error) == flags


def test_reply_with_start_processing_code_has_the_documented_id() -> None:
    assert infy.response_id(infy.Cmd.READ_MODULE_VI_FLOAT, 0, 0xF0, error=7) == 0x1E83F000
