"""Codecs against the worked frames of the hardware reference (SDM630, DJSF1352, Bender)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymodbus.framer import FramerRTU
from pymodbus.pdu import DecodePDU
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    ReadInputRegistersRequest,
    WriteMultipleRegistersRequest,
)

from hal.interfaces import IsolationAlarm
from hal.modbus.bender import decode_channel
from hal.modbus.djsf1352 import decode_djsf1352, scale_decimal
from hal.modbus.link import DataType, decode_float32, decode_int16, decode_uint32, encode_registers
from hal.modbus.poller import DeviceDataError
from hal.modbus.sdm630 import INPUT_BLOCKS, decode_sdm630
from hal.sim.modbus_devices import BenderSimulator, Djsf1352Simulator, Sdm630Simulator
from hal.sim.world import SimConnector, SimMeter


def frame(hex_bytes: str) -> bytes:
    return bytes.fromhex(hex_bytes)


def request_frame(pdu: object) -> bytes:
    return FramerRTU(DecodePDU(False)).buildFrame(pdu)  # type: ignore[arg-type]


def response_registers(raw: bytes, device_id: int) -> list[int]:
    used, pdu = FramerRTU(DecodePDU(False)).handleFrame(raw, device_id, 0)
    assert pdu is not None and used == len(raw)
    return list(pdu.registers)


# --- RTU frames (built and parsed by pymodbus, compared with the reference) -------


def test_sdm630_voltage_frames() -> None:
    tx = request_frame(ReadInputRegistersRequest(address=0x0000, count=2, dev_id=1))
    assert tx == frame("01 04 00 00 00 02 71 CB")
    regs = response_registers(frame("01 04 04 43 66 80 00 6F DF"), 1)
    assert regs == [0x4366, 0x8000]
    assert decode_float32(regs) == [230.5]


def test_sdm630_energy_frames() -> None:
    tx = request_frame(ReadInputRegistersRequest(address=0x0048, count=4, dev_id=1))
    assert tx == frame("01 04 00 48 00 04 71 DF")
    regs = response_registers(frame("01 04 08 44 9A 50 00 00 00 00 00 17 97"), 1)
    assert decode_float32(regs) == [1234.5, 0.0]


def test_djsf1352_capture() -> None:
    tx = request_frame(ReadHoldingRegistersRequest(address=0x0000, count=6, dev_id=1))
    assert tx == frame("01 03 00 00 00 06 C5 C8")
    regs = response_registers(frame("01 03 0C 00 00 00 03 00 00 00 02 00 00 01 4D 3F E5"), 1)
    assert regs == [0, 3, 0, 2, 0, 0x014D]
    decoded = decode_djsf1352(regs + [0] * 14, taken_at=1.0)
    assert decoded.reading.voltage == 0.0
    assert decoded.reading.current == 0.0
    assert decoded.broken_wire is False
    assert decoded.reading.temperature == pytest.approx(33.3)


def test_bender_frames() -> None:
    poll = request_frame(ReadHoldingRegistersRequest(address=1000, count=4, dev_id=3))
    assert poll == frame("03 03 03 E8 00 04 C5 9B")
    self_test = request_frame(
        WriteMultipleRegistersRequest(address=8005, registers=[0x5445], dev_id=3)
    )
    assert self_test == frame("03 10 1F 45 00 01 02 54 45 A0 57")


def test_crc_of_reference_frames() -> None:
    for hex_frame in (
        "01 04 04 43 66 80 00 6F DF",
        "01 03 0C 00 00 00 03 00 00 00 02 00 00 01 4D 3F E5",
        "03 10 1F 45 00 01 02 54 45 A0 57",
    ):
        raw = frame(hex_frame)
        assert FramerRTU.check_CRC(raw[:-2], int.from_bytes(raw[-2:], "big"))
    assert not FramerRTU.check_CRC(frame("01 04 04 43 66 80 01"), 0x6FDF)


# --- conversion helpers -------------------------------------------------------


def test_conversion_helpers() -> None:
    assert decode_uint32([0x0001, 0x0002]) == [0x00010002]
    assert decode_int16([0xFFFF, 0x8000, 0x7FFF]) == [-1, -32768, 32767]
    assert encode_registers([230.5], DataType.FLOAT32) == [0x4366, 0x8000]
    with pytest.raises(ValueError):
        decode_float32([0x4366])  # half a float
    with pytest.raises(ValueError):
        decode_float32([0x10000, 0])
    with pytest.raises(ValueError):
        encode_registers([70000], DataType.INT16)


# --- SDM630 --------------------------------------------------------------------


def sdm_registers(sim: Sdm630Simulator) -> list[int]:
    image = sim.image("i")
    return [image[a + i] for a, n in INPUT_BLOCKS for i in range(n)]


def test_sdm630_decode_from_simulator_image() -> None:
    meter = SimMeter(
        kind="ac",
        phase_voltage=(230.5, 231.0, 229.5),
        phase_current=(10.0, 10.0, 10.0),
        power_kw=-6.9,
        energy_import_kwh=1234.5,
        energy_export_kwh=7.25,
        frequency_hz=49.98,
    )
    sim = Sdm630Simulator(SimConnector(1, meter=meter), voltage_noise_v=0.0)
    reading = decode_sdm630(sdm_registers(sim), taken_at=5.0)
    assert reading.taken_at == 5.0
    assert reading.power_kw == pytest.approx(-6.9, rel=1e-6)  # W -> kW, export keeps its sign
    assert reading.energy_import_kwh == 1234.5
    assert reading.energy_export_kwh == 7.25
    assert reading.frequency_hz == pytest.approx(49.98, rel=1e-6)
    assert reading.phases is not None
    assert [p.voltage for p in reading.phases] == [230.5, 231.0, 229.5]
    assert sum(p.power_kw or 0.0 for p in reading.phases) == pytest.approx(-6.9, rel=1e-5)
    assert reading.voltage == pytest.approx(230.333, abs=1e-3)
    assert reading.current == pytest.approx(10.0)


def test_sdm630_garbage_is_rejected() -> None:
    sim = Sdm630Simulator(SimConnector(1, meter=SimMeter(kind="ac")))
    regs = sdm_registers(sim)
    nan = encode_registers([math.nan], DataType.FLOAT32)
    with pytest.raises(DeviceDataError):
        decode_sdm630(nan + regs[2:], 0.0)
    negative_volts = encode_registers([-5.0], DataType.FLOAT32)
    with pytest.raises(DeviceDataError):
        decode_sdm630(negative_volts + regs[2:], 0.0)
    with pytest.raises(DeviceDataError):
        decode_sdm630(regs[:-2], 0.0)


# --- DJSF1352 --------------------------------------------------------------------


def test_scale_decimal() -> None:
    assert scale_decimal(4000, 2) == 400.0
    assert scale_decimal(12345, 0) == 12.345
    assert scale_decimal(-150, 1) == -1.5
    assert scale_decimal(15, 5) == 1500.0
    with pytest.raises(DeviceDataError):
        scale_decimal(1, 7)


def test_djsf1352_decode_fields() -> None:
    regs = [0] * 20
    regs[0x00], regs[0x01] = 4005, 2  # 400.5 V
    regs[0x02], regs[0x03] = encode_registers([-1234], DataType.INT16)[0], 1  # -12.34 A
    regs[0x05] = encode_registers([-55], DataType.INT16)[0]  # -5.5 degC
    regs[0x08], regs[0x09] = encode_registers([-494], DataType.INT16)[0], 4  # -4940 W
    regs[0x0C:0x0E] = encode_registers([1_234_567], DataType.UINT32)
    regs[0x0E:0x10] = encode_registers([70_000], DataType.UINT32)
    d = decode_djsf1352(regs, taken_at=2.0)
    assert d.reading.voltage == 400.5
    assert d.reading.current == -12.34
    assert d.reading.temperature == -5.5
    assert d.reading.power_kw == pytest.approx(-4.94)
    assert d.reading.energy_import_kwh == pytest.approx(1234.567)  # default unit: Wh
    assert d.reading.energy_export_kwh == pytest.approx(70.0)
    assert d.energy_raw == (1_234_567, 70_000)
    assert decode_djsf1352(regs, 2.0, energy_unit_kwh=0.0001).reading.energy_import_kwh == (
        pytest.approx(123.4567)
    )
    regs[0x04] = 1
    assert decode_djsf1352(regs, 2.0).broken_wire is True
    regs[0x04] = 2
    with pytest.raises(DeviceDataError):
        decode_djsf1352(regs, 2.0)


@settings(max_examples=200, deadline=None)
@given(
    voltage=st.floats(0.0, 1500.0),
    current=st.floats(-600.0, 600.0),
    power_kw=st.floats(-400.0, 400.0),
    energy=st.floats(0.0, 4_000_000.0),
)
def test_djsf1352_simulator_round_trip(
    voltage: float, current: float, power_kw: float, energy: float
) -> None:
    meter = SimMeter(voltage=voltage, current=current, power_kw=power_kw, energy_import_kwh=energy)
    sim = Djsf1352Simulator(SimConnector(2, meter=meter))
    image = sim.image("h")
    d = decode_djsf1352([image[a] for a in range(20)], 0.0)
    assert d.reading.voltage == pytest.approx(voltage, abs=0.06)
    assert d.reading.current == pytest.approx(current, abs=0.06)
    assert d.reading.power_kw == pytest.approx(power_kw, abs=0.06)
    assert d.reading.energy_import_kwh == pytest.approx(energy, abs=0.0006)


# --- Bender ----------------------------------------------------------------------


def channel_regs(value: float, att: int, ru: int, description: int = 71) -> list[int]:
    return encode_registers([value], DataType.FLOAT32) + [(att << 8) | ru, description]


def test_bender_channel_bits() -> None:
    ch = decode_channel(channel_regs(150_000.0, att=0b1000_0100, ru=0b0100_0010))
    assert ch.value == 150_000.0
    assert ch.alarm is IsolationAlarm.WARNING
    assert ch.test == "external" and ch.testing
    assert ch.unit_code == 2
    assert ch.validity == "lower"
    assert ch.description == 71
    assert decode_channel(channel_regs(1.0, 0x05, 0x02)).alarm is IsolationAlarm.ALARM
    assert decode_channel(channel_regs(1.0, 0x01, 0x02)).alarm is IsolationAlarm.PREWARNING
    err = decode_channel(channel_regs(0.0, 0x02, 0xC2))
    assert err.device_error and err.test == "none" and err.validity == "invalid"
    # alarm type 2 while a test runs: reserved by default (EVerest), a device error if asked
    in_test = channel_regs(0.0, 0x42, 0xC2)
    reserved = decode_channel(in_test)
    assert not reserved.device_error and reserved.alarm is IsolationAlarm.NONE
    assert reserved.test == "internal" and reserved.validity == "invalid"
    assert decode_channel(in_test, code_2_in_test_reserved=False).device_error
    for reserved in (3, 6, 7):
        with pytest.raises(DeviceDataError):
            decode_channel(channel_regs(1.0, reserved, 0x02))
    with pytest.raises(DeviceDataError):
        decode_channel(channel_regs(math.inf, 0, 0x02))


def test_bender_simulator_image() -> None:
    conn = SimConnector(2, meter=SimMeter(voltage=400.0), isolation_kohm=80.0)
    sim = BenderSimulator(conn)
    image = sim.image("h")
    rf = decode_channel([image[1000 + i] for i in range(4)])
    un = decode_channel([image[1008 + i] for i in range(4)])
    assert rf.value == pytest.approx(80_000.0) and rf.unit_code == 2
    assert rf.alarm is IsolationAlarm.ALARM  # below the simulated R2 (100 kOhm)
    assert un.value == 400.0 and un.unit_code == 4
