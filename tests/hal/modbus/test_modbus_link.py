"""ModbusLink: wire frames, error mapping, serialisation, sharing and reconnection."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable

import pytest
import serial
from pymodbus.framer import FramerRTU

from hal.config import ModbusLinkConfig
from hal.interfaces import HealthState
from hal.modbus.link import ModbusLink, ModbusLinkError
from hal.sim.modbus_devices import BenderSimulator, ModbusSimServer, Sdm630Simulator
from hal.sim.serial_pair import SerialPair
from hal.sim.world import SimWorld

ServeFn = Callable[..., Awaitable[ModbusSimServer]]


def with_crc(hex_bytes: str) -> bytes:
    body = bytes.fromhex(hex_bytes)
    return body + FramerRTU.compute_CRC(body).to_bytes(2, "big")


class FakeRtuDevice:
    """The far end of a SerialPair, answering canned frames (records what it received)."""

    def __init__(self, path: str) -> None:
        self.port = serial.Serial(path, baudrate=9600, timeout=0)
        self.received: list[bytes] = []
        self.answers: dict[bytes, bytes] = {}
        loop = asyncio.get_running_loop()
        loop.add_reader(self.port.fileno(), self._on_data)
        self._buffer = b""

    def _on_data(self) -> None:
        self._buffer += self.port.read(1024)
        for request, answer in self.answers.items():
            if self._buffer.endswith(request):
                self.received.append(request)
                self._buffer = b""
                self.port.write(answer)
                return

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.port.fileno())
        self.port.close()


def rtu_config(path: str, timeout_s: float = 0.3) -> ModbusLinkConfig:
    return ModbusLinkConfig(
        transport="rtu",
        port=path,
        host=None,
        tcp_port=502,
        baudrate=9600,
        timeout_s=timeout_s,
        retries=0,
    )


async def test_rtu_wire_frames_through_link() -> None:
    """The link sends the reference request frames and decodes the reference answers."""
    async with SerialPair() as pair:
        device = FakeRtuDevice(pair.server_path)
        device.answers = {
            bytes.fromhex("01 04 00 00 00 02 71 CB"): bytes.fromhex("01 04 04 43 66 80 00 6F DF"),
            bytes.fromhex("01 04 00 48 00 04 71 DF"): bytes.fromhex(
                "01 04 08 44 9A 50 00 00 00 00 00 17 97"
            ),
            bytes.fromhex("01 03 00 00 00 06 C5 C8"): bytes.fromhex(
                "01 03 0C 00 00 00 03 00 00 00 02 00 00 01 4D 3F E5"
            ),
            bytes.fromhex("03 10 1F 45 00 01 02 54 45 A0 57"): with_crc("03 10 1F 45 00 01"),
        }
        link = ModbusLink("rs485", rtu_config(pair.client_path))
        try:
            assert await link.read_input(0x0000, 2, device_id=1) == [0x4366, 0x8000]
            assert await link.read_input(0x0048, 4, device_id=1) == [0x449A, 0x5000, 0, 0]
            assert await link.read_holding(0x0000, 6, device_id=1) == [0, 3, 0, 2, 0, 0x014D]
            await link.write_registers(8005, [0x5445], device_id=3)
            assert len(device.received) == 4
            assert link.health().ok
        finally:
            await link.close()
            device.close()


async def test_rtu_late_answer_is_rejected_as_bad_response() -> None:
    """An answer with the wrong length (e.g. meant for another request) is never returned as data."""
    async with SerialPair() as pair:
        device = FakeRtuDevice(pair.server_path)
        device.answers = {
            bytes.fromhex("01 04 00 34 00 02 30 05"): bytes.fromhex("01 04 04 43 66 80 00 6F DF"),
            bytes.fromhex("01 04 00 00 00 02 71 CB"): bytes.fromhex(
                "01 04 08 44 9A 50 00 00 00 00 00 17 97"
            ),
        }
        link = ModbusLink("rs485", rtu_config(pair.client_path))
        try:
            assert await link.read_input(0x0034, 2, device_id=1) == [0x4366, 0x8000]
            with pytest.raises(ModbusLinkError) as err:
                await link.read_input(0x0000, 2, device_id=1)
            assert err.value.reason == "bad_response"
            assert link.stats()["bad_responses"] == 1
        finally:
            await link.close()
            device.close()


async def test_exception_response_and_timeout(world: SimWorld, serve: ServeFn) -> None:
    sim = Sdm630Simulator(world.connector(1), unit_id=1)
    server = await serve([sim])
    link = ModbusLink("bus", server.link_config(timeout_s=0.2))
    try:
        with pytest.raises(ModbusLinkError) as err:
            await link.read_holding(0x0000, 2, device_id=1)  # SDM630 measurements are FC 04 only
        assert err.value.reason == "exception_response"
        assert err.value.exception_code == 2
        assert "illegal data address" in str(err.value)

        world.connector(1).meter.silent = True
        t0 = time.monotonic()
        with pytest.raises(ModbusLinkError) as err:
            await link.read_input(0x0000, 2, device_id=1)
        assert err.value.reason == "timeout"
        assert 0.15 < time.monotonic() - t0 < 1.0

        with pytest.raises(ModbusLinkError) as err:  # absent unit: silence, not an exception
            await link.read_input(0x0000, 2, device_id=9)
        assert err.value.reason == "timeout"
    finally:
        await link.close()


async def test_bad_arguments_raise_value_error() -> None:
    link = ModbusLink(
        "bus",
        ModbusLinkConfig(transport="tcp", host="127.0.0.1", port=None, tcp_port=1, baudrate=9600),
    )
    with pytest.raises(ValueError):
        await link.read_input(0, 0, device_id=1)
    with pytest.raises(ValueError):
        await link.read_input(0, 126, device_id=1)
    with pytest.raises(ValueError):
        await link.read_holding(70000, 1, device_id=1)
    with pytest.raises(ValueError):
        await link.write_registers(0, [0x10000], device_id=1)
    with pytest.raises(ValueError):
        await link.read_holding(0, 1, device_id=248)
    assert link.stats()["requests"] == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_reconnects_after_connect_failure_and_server_restart(world: SimWorld) -> None:
    port = free_port()
    cfg = ModbusLinkConfig(
        transport="tcp",
        host="127.0.0.1",
        port=None,
        tcp_port=port,
        baudrate=9600,
        timeout_s=0.2,
        retries=0,
    )
    link = ModbusLink("bus", cfg)
    assert link.health().state is HealthState.OFFLINE
    with pytest.raises(ModbusLinkError) as err:
        await link.read_input(0, 2, device_id=1)
    assert err.value.reason == "no_connection"
    h = link.health()
    assert h.state is HealthState.OFFLINE and h.code == "transport_error"
    # within the back-off the next request fails at once, without a connect attempt
    t0 = time.monotonic()
    with pytest.raises(ModbusLinkError) as err:
        await link.read_input(0, 2, device_id=1)
    assert err.value.reason == "no_connection" and time.monotonic() - t0 < 0.05
    assert link.stats()["connect_failures"] == 1

    server = ModbusSimServer([Sdm630Simulator(world.connector(1))], tcp_port=port)
    await server.start()
    try:
        await asyncio.sleep(0.25)  # past the first back-off step
        assert len(await link.read_input(0, 2, device_id=1)) == 2
        assert link.health().ok
        # the server goes away and comes back on the same port: the same link recovers
        await server.stop()
        with pytest.raises(ModbusLinkError):
            await link.read_input(0, 2, device_id=1)
        await server.start()
        regs: list[int] | None = None
        for _ in range(40):
            try:
                regs = await link.read_input(0, 2, device_id=1)
                break
            except ModbusLinkError:
                await asyncio.sleep(0.1)
        assert regs is not None and len(regs) == 2
        assert link.stats()["connects"] >= 2
    finally:
        await link.close()
        await server.stop()


async def test_requests_are_serialised_on_rtu(world: SimWorld, serve: ServeFn) -> None:
    """Concurrent requests from several tasks to two units never mix up answers."""
    meter = Sdm630Simulator(world.connector(1), unit_id=1, voltage_noise_v=0.0)
    imd = BenderSimulator(world.connector(2), unit_id=3)
    server = await serve([meter, imd], transport="rtu")
    link = ModbusLink("rs485", server.link_config(timeout_s=0.5))
    try:
        expected_meter = [meter.image("i")[a] for a in range(18)]
        expected_imd = [imd.image("h")[1000 + i] for i in range(4)]
        results = await asyncio.gather(
            *[link.read_input(0, 18, device_id=1) for _ in range(15)],
            *[link.read_holding(1000, 4, device_id=3) for _ in range(15)],
        )
        assert results[:15] == [expected_meter] * 15
        assert results[15:] == [expected_imd] * 15
        stats = link.stats()
        assert stats["answers"] == 30
        assert stats["connects"] == 1  # 30 concurrent first requests opened the port once
    finally:
        await link.close()


async def test_shared_link_refcount(world: SimWorld, serve: ServeFn) -> None:
    server = await serve([Sdm630Simulator(world.connector(1))])
    link = ModbusLink("bus", server.link_config())
    link.acquire()
    link.acquire()
    await link.read_input(0, 2, device_id=1)
    assert link.connected
    await link.release()
    assert link.connected and link.users == 1
    await link.release()
    assert not link.connected and link.users == 0
    # closing is not final: the next request reconnects
    assert len(await link.read_input(0, 2, device_id=1)) == 2
    await link.close()
    await link.close()  # idempotent
    assert not link.connected


async def test_serial_port_that_does_not_exist() -> None:
    missing = f"/dev/pts/does-not-exist-{os.getpid()}"
    link = ModbusLink("rs485", rtu_config(missing))
    with pytest.raises(ModbusLinkError) as err:
        await link.read_input(0, 2, device_id=1)
    assert err.value.reason == "no_connection"
    assert missing in err.value.detail
    assert link.health().code == "transport_error"
    await link.close()
