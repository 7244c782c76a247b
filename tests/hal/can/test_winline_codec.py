"""Winline "PROTNO 0x060" codec against the worked frames of the protocol reference, plus properties."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hal.can import winline_codec as wl
from hal.can.port import FrameError

CONTROLLER = 0xF0


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


# ---------------------------------------------------------------------------- identifiers


def test_point_to_point_ids() -> None:
    assert wl.build_id(destination=3, source=CONTROLLER, group=0, ptp=True) == 0x06081F80
    answer = wl.parse_id(0x060F8018)
    assert answer == wl.WinlineId(wl.PROTNO, True, CONTROLLER, 3, 0)


def test_broadcast_ids() -> None:
    assert wl.read_request(wl.Reg.OUTPUT_VOLTAGE, CONTROLLER).arbitration_id == 0x0607FF80
    group1 = wl.read_request(wl.Reg.GROUP_INFO, CONTROLLER, group=1)
    assert group1.arbitration_id == 0x0607F781
    assert wl.parse_id(0x0607F781) == wl.WinlineId(wl.PROTNO, False, 0xFE, CONTROLLER, 1)


# ---------------------------------------------------------------------------- worked frames


def test_read_voltage() -> None:
    frame = wl.read_request(wl.Reg.OUTPUT_VOLTAGE, CONTROLLER, module=3)
    assert frame == (0x06081F80, h("10 00 00 01 00 00 00 00"))
    answer = wl.decode_response(h("41 F0 00 01 43 FA 00 00"))
    assert answer == wl.Response(0x0001, 500.0)
    assert wl.encode_response(wl.Reg.OUTPUT_VOLTAGE, 500.0) == h("41 F0 00 01 43 FA 00 00")


def test_read_dc_board_temperature() -> None:
    frame = wl.read_request(wl.Reg.DC_BOARD_TEMPERATURE, CONTROLLER, module=3)
    assert frame == (0x06081F80, h("10 00 00 04 00 00 00 00"))
    answer = wl.decode_response(h("41 F0 00 04") + struct.pack(">f", 41.5))
    assert answer == wl.Response(0x0004, 41.5)


def test_read_status() -> None:
    frame = wl.read_request(wl.Reg.STATUS, CONTROLLER, module=3)
    assert frame == (0x06081F80, h("10 00 00 40 00 00 00 00"))
    answer = wl.decode_response(h("42 F0 00 40 00 40 00 00"))
    assert answer == wl.Response(0x0040, 0x0040_0000)
    assert wl.status_flags(int(answer.value)) == frozenset({"output_off"})  # bit 22


def test_set_500_volts() -> None:
    frame = wl.set_voltage_request(500.0, CONTROLLER, module=3)
    assert frame == (0x06081F80, h("03 00 00 21 43 FA 00 00"))
    request = wl.decode_request(frame.data)
    assert (request.function, request.register, request.float_value) == (0x03, 0x0021, 500.0)


def test_set_20_amps() -> None:
    frame = wl.set_current_request(20.0, CONTROLLER, module=3)
    assert frame == (0x06081F80, h("03 00 00 1B 00 00 50 00"))
    assert wl.raw_to_current(wl.decode_request(frame.data).raw) == 20.0


def test_output_on_and_off() -> None:
    assert wl.power_request(True, CONTROLLER, module=3) == (0x06081F80,
                                                            h("03 00 00 30 00 00 00 00"))
    assert wl.power_request(False, CONTROLLER, module=3) == (0x06081F80,
                                                             h("03 00 00 30 00 01 00 00"))


@pytest.mark.parametrize(
    ("bit", "flag"),
    [(0, "fault"), (1, "protection"), (16, "can_comm_fault"), (22, "output_off"),
     (23, "power_limiting"), (27, "fan_fault"), (28, "short_circuit"),
     (30, "over_temperature"), (31, "output_over_voltage")],
)
def test_status_bits(bit: int, flag: str) -> None:
    assert wl.status_flags(1 << bit) == frozenset({flag})
    assert wl.status_word({flag}) == 1 << bit


def test_group_info() -> None:
    assert wl.decode_group_info(0x0001_0003) == (1, 3)
    assert wl.encode_group_info(1, 3) == 0x0001_0003


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "data",
    [
        h("41 F0 00 01 43 FA"),  # DLC 6
        h("41 F1 00 01 43 FA 00 00"),  # status byte not 0xF0
        h("43 F0 00 01 43 FA 00 00"),  # unknown type byte
        h("42 F0 00 01 43 FA 00 00"),  # integer answer for the float voltage register
        h("41 F0 00 40 00 40 00 00"),  # float answer for the integer status register
        h("41 F0 00 01") + struct.pack(">f", math.nan),
        h("41 F0 00 01") + struct.pack(">f", 1e9),  # implausible voltage
        h("41 F0 00 12") + struct.pack(">f", 0.0),  # zero rated current
    ],
)
def test_decode_response_rejects_garbage(data: bytes) -> None:
    with pytest.raises(FrameError):
        wl.decode_response(data)


def test_decode_request_rejects_unknown_function() -> None:
    with pytest.raises(FrameError):
        wl.decode_request(h("11 00 00 01 00 00 00 00"))


def test_encoders_reject_unrepresentable_arguments() -> None:
    with pytest.raises(ValueError):
        wl.set_current_request(-1.0, CONTROLLER, module=3)
    with pytest.raises(ValueError):
        wl.set_voltage_request(math.inf, CONTROLLER, module=3)
    with pytest.raises(ValueError):
        wl.read_request(wl.Reg.OUTPUT_VOLTAGE, CONTROLLER, module=0x40)
    with pytest.raises(ValueError):
        wl.read_request(wl.Reg.OUTPUT_VOLTAGE, CONTROLLER, group=8)
    with pytest.raises(ValueError):
        wl.status_word({"no_such_flag"})


# ---------------------------------------------------------------------------- properties


@given(
    ptp=st.booleans(),
    destination=st.integers(0, 255),
    source=st.integers(0, 255),
    group=st.integers(0, 7),
)
def test_id_round_trip(ptp: bool, destination: int, source: int, group: int) -> None:
    aid = wl.build_id(destination=destination, source=source, group=group, ptp=ptp)
    assert aid <= 0x1FFF_FFFF
    assert wl.parse_id(aid) == wl.WinlineId(wl.PROTNO, ptp, destination, source, group)


@given(
    register=st.sampled_from(sorted(wl.READ_REGISTERS)),
    module=st.integers(0, 0x3F),
)
def test_read_request_round_trip(register: int, module: int) -> None:
    frame = wl.read_request(register, CONTROLLER, module=module)
    request = wl.decode_request(frame.data)
    assert (request.function, request.register, request.raw) == (wl.FUNC_READ, register, 0)
    assert wl.parse_id(frame.arbitration_id).destination == module


@given(value=st.floats(-50.0, 1500.0, width=32))
def test_float_response_round_trip(value: float) -> None:
    data = wl.encode_response(wl.Reg.OUTPUT_VOLTAGE, value)
    assert wl.decode_response(data) == wl.Response(wl.Reg.OUTPUT_VOLTAGE, value)


@given(word=st.integers(0, 0xFFFF_FFFF))
def test_status_word_round_trip(word: int) -> None:
    assert wl.decode_response(wl.encode_response(wl.Reg.STATUS, word)).value == word
    known = word & wl.status_word(wl.STATUS_FLAGS)
    assert wl.status_word(wl.status_flags(word)) == known


@given(amps=st.floats(0.0, 1000.0))
def test_current_setpoint_resolution(amps: float) -> None:
    request = wl.decode_request(wl.set_current_request(amps, CONTROLLER, module=1).data)
    assert abs(wl.raw_to_current(request.raw) - amps) <= 0.5 / wl.CURRENT_SCALE


@given(data=st.binary(max_size=12))
def test_decode_response_raises_only_frame_error(data: bytes) -> None:
    try:
        wl.decode_response(data)
    except FrameError:
        pass
    if len(data) != 8 or (len(data) > 1 and data[1] != wl.STATUS_OK):
        with pytest.raises(FrameError):
            wl.decode_response(data)


def test_point_to_point_group_bits() -> None:
    # module 3 from 0xF0: group bits 0 (EVerest's form) or the group number
    assert wl.read_request(wl.Reg.OUTPUT_VOLTAGE, 0xF0, module=3)[0] == 0x06081F80
    assert wl.read_request(wl.Reg.OUTPUT_VOLTAGE, 0xF0, module=3, group=5)[0] == 0x06081F85
    assert wl.parse_id(0x06081F85).group == 5


def test_rated_current_register_and_limit_point() -> None:
    request = wl.read_request(wl.Reg.RATED_CURRENT, 0xF0, module=3)
    assert request == (0x06081F80, bytes.fromhex("1000001200000000"))
    # a module answering 12.0 (float) for 0x0012 can give 12.0 x 3.3325 = 39.99 A
    answer = wl.decode_response(bytes.fromhex("41F0001241400000"))
    assert (answer.register, answer.value) == (wl.Reg.RATED_CURRENT, 12.0)
    assert round(float(answer.value) * 3.3325, 2) == 39.99
