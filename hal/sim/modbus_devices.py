"""Protocol-level Modbus simulators: real pymodbus servers that look like the meters and the IMD.

Each device simulator is bound to one :class:`hal.sim.world.SimConnector` and turns
what its real counterpart would measure into that device's register map:

* :class:`Sdm630Simulator` -- Eastron SDM630, float32 input registers (FC 04), from
  ``connector.meter`` (phase voltages/currents, power, frequency, energy);
* :class:`Djsf1352Simulator` -- Acrel DJSF1352-RN, holding block 0x0000..0x0013
  (FC 03), from ``connector.meter`` (voltage, current, power, energy, temperature);
* :class:`BenderSimulator` -- Bender isoCHA425HV channels 1000.. (FC 03) from
  ``connector.isolation_kohm`` / ``isolation_drop_kohm`` and the DC voltage, with a
  self test started by writing 0x5445 to 8005 (FC 16).

:class:`ModbusSimServer` serves a set of them -- several unit ids on one line -- over
TCP on 127.0.0.1 (``tcp_port=0`` picks a free port, see :attr:`ModbusSimServer.port`)
or over RTU through a :class:`hal.sim.serial_pair.SerialPair` (the client opens
:attr:`ModbusSimServer.client_path`). :meth:`ModbusSimServer.link_config` returns
a matching :class:`hal.config.ModbusLinkConfig`.

Behaviour contract:

* Register images are recomputed from the world every ``refresh_period_s``
  (default 0.1 s) by the server's refresh task, and copied into pymodbus' register
  store on every request, so an answer is never older than one refresh period.
* ``meter.frozen`` (fault ``meter_freeze``): the image stops being recomputed; the
  device keeps answering with bit-identical registers.
* ``meter.silent`` (fault ``meter_silence``) or a simulator's own ``silent`` flag:
  requests for that unit id are dropped before pymodbus handles them, so the
  client times out exactly as on a bus where the device is gone. Requests for
  unit ids that no simulator serves are dropped too (an RS-485 line stays silent
  for absent addresses).
* Wrong function codes or addresses outside a device's map get a Modbus exception
  (illegal data address), as a real device would send.

pymodbus notes (3.16): the servers are built from ``SimDevice``/``SimData`` (the
v4 datastore API). ``ModbusDeviceContext``/``ModbusServerContext`` still work in
3.16 but are converted to ``SimDevice`` internally and log a deprecation warning,
and their data blocks are deep-copied at construction, so they cannot be updated
afterwards; the ``SimDevice.action`` hook, which receives the live register list,
is how the images reach the server. ``ignore_missing_devices`` has no effect with
``SimDevice`` contexts (a missing id raises ``KeyError`` internally and the server
answers "device failure"), hence the request filter on ``trace_pdu``.

Why one module of ~590 lines: the three simulated Modbus devices (SDM630, DJSF1352,
isoCHA425) share one register-bank base and one server; each is ~150 lines of register map.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Literal, Self, cast

import structlog
from pymodbus.constants import ExcCodes
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from hal.config import ModbusLinkConfig
from hal.modbus.link import DataType as ConvType
from hal.modbus.link import encode_registers
from hal.sim.serial_pair import SerialPair
from hal.sim.world import SimConnector, SimWorld
from hal.tasks import stop_task

log = structlog.get_logger("hal.sim.modbus")

_TABLE_BY_FC: dict[int, str] = {3: "h", 6: "h", 16: "h", 23: "h", 4: "i"}


def _f32(*values: float) -> list[int]:
    return encode_registers([float(v) for v in values], ConvType.FLOAT32)


def _u32(value: float) -> list[int]:
    return encode_registers([int(value) % 2**32], ConvType.UINT32)


def _i16(value: float) -> int:
    clamped = max(-32768, min(32767, round(value)))
    return encode_registers([clamped], ConvType.INT16)[0]


class DeviceSimulator(ABC):
    """Base of the register-level device simulators.

    A subclass defines its register map (:meth:`_layout`: table -> list of
    ``(start, length, readonly)``), computes its image in :meth:`_compute` and may
    react to writes in :meth:`_on_write`. Images are sparse dicts address -> value
    per table (``"h"`` holding, ``"i"`` input).
    """

    kind = "device"

    def __init__(self, connector: SimConnector, unit_id: int) -> None:
        if not 1 <= unit_id <= 247:
            raise ValueError(f"unit_id {unit_id} outside 1..247")
        self.connector = connector
        self.unit_id = unit_id
        self.silent = False  # injection independent of the world (e.g. a dead IMD)
        self.requests = 0
        self._image: dict[str, dict[int, int]] = {"h": {}, "i": {}}
        self.refresh(0.0)

    # -- subclass hooks ----------------------------------------------------

    @abstractmethod
    def _layout(self) -> dict[str, list[tuple[int, int, bool]]]:
        """Register blocks per table: ``{"h"|"i": [(start, length, readonly), ...]}``."""

    @abstractmethod
    def _compute(self, now: float) -> dict[str, dict[int, int]]:
        """The register image (address -> value per table) from the current world."""

    def _frozen(self) -> bool:
        return False

    def _on_write(self, address: int, values: Sequence[int], now: float) -> ExcCodes | None:
        return ExcCodes.ILLEGAL_ADDRESS

    # -- behaviour -----------------------------------------------------------

    @property
    def is_silent(self) -> bool:
        return self.silent

    def refresh(self, now: float) -> None:
        """Recompute the register image from the world (skipped while frozen)."""
        if self._frozen() and any(self._image.values()):
            return
        self._image = self._compute(now)

    def image(self, table: Literal["h", "i"]) -> dict[int, int]:
        """A copy of the current register image of one table (for tests)."""
        return dict(self._image[table])

    def sim_device(self) -> SimDevice:
        """The pymodbus ``SimDevice`` serving this simulator's map and image."""
        layout = self._layout()

        def table(name: str) -> list[SimData]:
            blocks = layout.get(name) or [(0, 1, True)]
            return [
                SimData(start, count=length, values=0, datatype=DataType.REGISTERS, readonly=ro)
                for start, length, ro in blocks
            ]

        bits = [SimData(0, count=16, values=False, datatype=DataType.BITS, readonly=True)]
        return SimDevice(
            self.unit_id,
            simdata=(list(bits), list(bits), table("h"), table("i")),
            action=self._action,
        )

    async def _action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """pymodbus hook, called per request with the live register list of the table."""
        self.requests += 1
        table = _TABLE_BY_FC.get(function_code)
        if table is None:
            return ExcCodes.ILLEGAL_FUNCTION
        for addr, value in self._image[table].items():
            index = addr - start_address
            if 0 <= index < len(registers):
                registers[index] = value
        if set_values is not None and function_code in (6, 16):
            now = asyncio.get_running_loop().time()
            return self._on_write(address, [int(v) for v in set_values], now)
        return None


class Sdm630Simulator(DeviceSimulator):
    """Eastron SDM630: input registers 0x0000..0x004B (float32, high word first).

    Per-phase power is ``connector.meter.power_kw`` split in proportion to
    V x I of each phase (evenly when no current flows); the sign of ``power_kw``
    (negative = export) is kept. Like a real meter's last digits, the phase
    voltages carry a small deterministic ripple of up to ``voltage_noise_v``
    (0 disables it): without it a noiseless world with a large float32 energy
    total could present bit-identical registers while power flows, which the
    driver would rightly call frozen.
    """

    kind = "sdm630"

    def __init__(
        self, connector: SimConnector, unit_id: int = 1, *, voltage_noise_v: float = 0.05
    ) -> None:
        self.voltage_noise_v = voltage_noise_v
        self._refreshes = 0
        super().__init__(connector, unit_id)

    def _frozen(self) -> bool:
        return self.connector.meter.frozen

    @property
    def is_silent(self) -> bool:
        return self.silent or self.connector.meter.silent

    def _layout(self) -> dict[str, list[tuple[int, int, bool]]]:
        # input registers up to export kWh; holding: the parity/address/baud set-up floats
        return {"i": [(0x0000, 0x004C, True)], "h": [(0x0012, 12, False)]}

    def _compute(self, now: float) -> dict[str, dict[int, int]]:
        m = self.connector.meter
        self._refreshes += 1
        ripple = self.voltage_noise_v * ((self._refreshes % 5) - 2) / 2.0  # -1..+1 x noise
        volts = tuple(v + ripple if v > 0 else v for v in m.phase_voltage)
        amps = m.phase_current
        total_w = m.power_kw * 1000.0
        va = [v * a for v, a in zip(volts, amps)]
        weight = sum(abs(x) for x in va)
        shares = [abs(x) / weight for x in va] if weight > 0 else [1 / 3] * 3
        watts = [total_w * s for s in shares]
        regs: dict[int, int] = {}

        def put(address: int, *values: float) -> None:
            for i, r in enumerate(_f32(*values)):
                regs[address + i] = r

        put(0x0000, *volts)
        put(0x0006, *amps)
        put(0x000C, *watts)
        put(0x0030, sum(amps))
        put(0x0034, total_w)
        put(0x0046, m.frequency_hz, m.energy_import_kwh, m.energy_export_kwh)
        hold: dict[int, int] = {}
        for i, r in enumerate(_f32(0.0, 0.0, float(self.unit_id))):  # 0x0012 parity, 0x0014 address
            hold[0x0012 + i] = r
        for i, r in enumerate(_f32(2.0)):  # 0x001C baud code 2 = 9600
            hold[0x001C + i] = r
        return {"i": regs, "h": hold}


class Djsf1352Simulator(DeviceSimulator):
    """Acrel DJSF1352-RN: holding registers 0x0000..0x0023.

    Decimal-point codes are chosen per value so the raw number fits its register
    (voltage/current: at least 0.1 V / 0.01 A resolution). Energy counters are
    ``kWh / energy_unit_kwh`` (default 0.001: Wh), wrapped at 2^32. ``broken_wire``
    sets register 0x0004.
    """

    kind = "djsf1352"

    def __init__(
        self, connector: SimConnector, unit_id: int = 1, *, energy_unit_kwh: float = 0.001
    ) -> None:
        if energy_unit_kwh <= 0:
            raise ValueError("energy_unit_kwh must be > 0")
        self.energy_unit_kwh = energy_unit_kwh
        self.broken_wire = False
        super().__init__(connector, unit_id)

    def _frozen(self) -> bool:
        return self.connector.meter.frozen

    @property
    def is_silent(self) -> bool:
        return self.silent or self.connector.meter.silent

    def _layout(self) -> dict[str, list[tuple[int, int, bool]]]:
        return {"h": [(0x0000, 0x0024, True)], "i": []}

    @staticmethod
    def _fit(value: float, limit: int, min_dp: int) -> tuple[int, int]:
        """(raw, dp) with raw = value / 10^(dp-3) fitting |raw| <= limit, finest dp first."""
        for dp in range(min_dp, 7):
            raw = round(value / 10.0 ** (dp - 3))
            if abs(raw) <= limit:
                return raw, dp
        return (limit if value > 0 else -limit), 6

    def _compute(self, now: float) -> dict[str, dict[int, int]]:
        m = self.connector.meter
        v_raw, v_dp = self._fit(max(m.voltage, 0.0), 0xFFFF, 2)
        i_raw, i_dp = self._fit(m.current, 32767, 1)
        p_raw, p_dp = self._fit(m.power_kw * 1000.0, 32767, 3)
        regs: dict[int, int] = {addr: 0 for addr in range(0x0024)}
        regs[0x00], regs[0x01] = v_raw, v_dp
        regs[0x02], regs[0x03] = _i16(i_raw), i_dp
        regs[0x04] = 1 if self.broken_wire else 0
        regs[0x05] = _i16(m.temperature * 10.0)
        regs[0x08], regs[0x09] = _i16(p_raw), p_dp
        regs[0x0C], regs[0x0D] = _u32(round(m.energy_import_kwh / self.energy_unit_kwh))
        regs[0x0E], regs[0x0F] = _u32(round(m.energy_export_kwh / self.energy_unit_kwh))
        regs[0x10] = 1  # voltage transformer ratio
        regs[0x11] = 300  # rated primary current, A
        regs[0x23] = 100  # software version
        return {"h": regs, "i": {}}


class BenderSimulator(DeviceSimulator):
    """Bender isoCHA425HV: measurement channels 1000..1031 and the self-test register 8005.

    R_F is ``isolation_drop_kohm`` when that injection is set, else
    ``isolation_kohm``; the device's own alarm type follows ``r1_kohm`` (warning)
    and ``r2_kohm`` (alarm). U_n is ``connector.meter.voltage``; U_L1e/U_L2e are
    +/- half of it. Injections on the simulator: ``silent``, ``device_error``,
    ``fail_self_test`` (the test ends with a device error), ``stuck_self_test``
    (the test never ends). A self test lasts ``self_test_duration_s``; while it
    runs the AT&T test bits read "external test" and, with ``code_2_during_test``
    (the default, as field devices are reported to do), the alarm type reads 2.
    Register 3026 is device enable: writes of 0 or 1 are accepted (anything else
    is an illegal data value); while it is 0 (``device_enabled`` False) every
    channel's validity reads "invalid". When a ``world`` is given,
    ``connector.imd_self_test_until`` is set to the world time the test will end
    (and cleared afterwards) so the physics can see it.
    """

    kind = "bender"
    TEST_EXTERNAL = 0b10 << 6

    def __init__(
        self,
        connector: SimConnector,
        unit_id: int = 3,
        *,
        world: SimWorld | None = None,
        self_test_duration_s: float = 1.0,
        r1_kohm: float = 500.0,
        r2_kohm: float = 100.0,
        device_enabled: bool = True,
        code_2_during_test: bool = True,
    ) -> None:
        self.world = world
        self.device_enabled = device_enabled
        self.code_2_during_test = code_2_during_test
        self.enable_writes: list[int] = []
        self.self_test_duration_s = self_test_duration_s
        self.r1_kohm = r1_kohm
        self.r2_kohm = r2_kohm
        self.device_error = False
        self.fail_self_test = False
        self.stuck_self_test = False
        self.self_tests_started = 0
        self._test_until: float | None = None
        self._test_failed = False
        super().__init__(connector, unit_id)

    @property
    def testing(self) -> bool:
        return self._test_until is not None

    def _layout(self) -> dict[str, list[tuple[int, int, bool]]]:
        return {"h": [(1000, 32, True), (3026, 1, False), (8005, 1, False)], "i": []}

    def _on_write(self, address: int, values: Sequence[int], now: float) -> ExcCodes | None:
        if address == 3026 and len(values) == 1:
            if values[0] not in (0, 1):
                return ExcCodes.ILLEGAL_VALUE
            self.enable_writes.append(values[0])
            self.device_enabled = values[0] == 1
            self.refresh(now)
            return None
        if address != 8005 or len(values) != 1:
            return ExcCodes.ILLEGAL_ADDRESS
        if values[0] != 0x5445:
            return ExcCodes.ILLEGAL_VALUE
        self.self_tests_started += 1
        self._test_until = now + self.self_test_duration_s
        self._test_failed = self.fail_self_test
        if self.world is not None:
            self.connector.imd_self_test_until = self.world.time + self.self_test_duration_s
        log.info("sim.imd_self_test_started", unit_id=self.unit_id)
        self.refresh(now)
        return None

    def refresh(self, now: float) -> None:
        if self._test_until is not None and now >= self._test_until and not self.stuck_self_test:
            self._test_until = None
            if self.world is not None:
                self.connector.imd_self_test_until = None
        super().refresh(now)

    def _compute(self, now: float) -> dict[str, dict[int, int]]:
        c = self.connector
        kohm = c.isolation_drop_kohm if c.isolation_drop_kohm is not None else c.isolation_kohm
        testing = self._test_until is not None
        if self.device_error or self._test_failed:
            alarm = 2
        elif kohm < self.r2_kohm:
            alarm = 5
        elif kohm < self.r1_kohm:
            alarm = 4
        else:
            alarm = 0
        if testing and self.code_2_during_test:
            alarm = 2
        att = alarm | (self.TEST_EXTERNAL if testing else 0)
        u = max(c.meter.voltage, 0.0)
        # (value, unit code, description code) per 4-register channel from 1000;
        # None = channel not documented for this device: value 0, validity "invalid".
        channels: list[tuple[float, int, int] | None] = [
            (kohm * 1000.0, 2, 71),  # 1000 R_F, ohm
            None,  # 1004
            (u, 4, 76),  # 1008 U_n, V
            (0.0, 8, 82),  # 1012 C_e, F
            (u / 2.0, 4, 76),  # 1016 U_L1e, V
            (-u / 2.0, 4, 76),  # 1020 U_L2e, V
            (50.0, 5, 0),  # 1024 fault location, %
            (kohm * 1000.0, 2, 71),  # 1028 R_FU, ohm
        ]
        regs: dict[int, int] = {}
        for n, channel in enumerate(channels):
            base = 1000 + 4 * n
            if channel is None or not self.device_enabled:
                value, ru, description, ch_att = 0.0, (0b11 << 6) | 1, 0, 0
            else:
                value, ru, description = channel
                # the R_F channels carry the insulation alarm and test bits; the
                # others only a device error
                ch_att = att if n in (0, 7) else (2 if alarm == 2 else 0)
            hi, lo = _f32(value)
            regs[base] = hi
            regs[base + 1] = lo
            regs[base + 2] = (ch_att << 8) | ru
            regs[base + 3] = description
        regs[3026] = int(self.device_enabled)
        regs[8005] = 0
        return {"h": regs, "i": {}}

    def clear_self_test_failure(self) -> None:
        """Forget a failed test's device error (as a device reset would)."""
        self._test_failed = False


class ModbusSimServer:
    """A pymodbus server (TCP on 127.0.0.1 or RTU over a pty pair) for several simulators.

    Contract: ``start()`` binds/opens and returns once the server accepts requests;
    ``stop()`` stops the refresh task, the server and the pty pair (idempotent).
    Unit ids must be unique. Usable as ``async with``.
    """

    def __init__(
        self,
        devices: Sequence[DeviceSimulator],
        *,
        transport: Literal["tcp", "rtu"] = "tcp",
        tcp_port: int = 0,
        baudrate: int = 9600,
        parity: Literal["N", "E", "O"] = "N",
        stopbits: Literal[1, 2] = 1,
        bytesize: Literal[7, 8] = 8,
        refresh_period_s: float = 0.1,
    ) -> None:
        ids = [d.unit_id for d in devices]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate unit ids: {ids}")
        if not devices:
            raise ValueError("at least one device simulator is needed")
        self.devices = list(devices)
        self.transport = transport
        self._tcp_port = tcp_port
        self.baudrate = baudrate
        self.parity = parity
        self.stopbits = stopbits
        self.bytesize = bytesize
        self.refresh_period_s = refresh_period_s
        self._by_unit = {d.unit_id: d for d in devices}
        self._server: ModbusTcpServer | ModbusSerialServer | None = None
        self._pair: SerialPair | None = None
        self._refresh_task: asyncio.Task[None] | None = None
        self._bound_port: int | None = None
        self.dropped_requests = 0

    @property
    def port(self) -> int:
        """The bound TCP port (after ``start()``; useful with ``tcp_port=0``)."""
        if self._bound_port is None:
            raise RuntimeError("TCP server not started")
        return self._bound_port

    @property
    def client_path(self) -> str:
        """The serial device path a client opens (RTU, after ``start()``)."""
        if self._pair is None:
            raise RuntimeError("RTU server not started")
        return self._pair.client_path

    def link_config(self, *, timeout_s: float = 0.5, retries: int = 0) -> ModbusLinkConfig:
        """A :class:`ModbusLinkConfig` that reaches this server."""
        if self.transport == "tcp":
            return ModbusLinkConfig(
                transport="tcp",
                port=None,
                baudrate=self.baudrate,
                host="127.0.0.1",
                tcp_port=self.port,
                timeout_s=timeout_s,
                retries=retries,
            )
        return ModbusLinkConfig(
            transport="rtu",
            port=self.client_path,
            host=None,
            tcp_port=502,
            baudrate=self.baudrate,
            parity=self.parity,
            stopbits=self.stopbits,
            bytesize=self.bytesize,
            timeout_s=timeout_s,
            retries=retries,
        )

    def _filter(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU | None:
        """trace_pdu hook: drop requests for silent or absent units (the client times out)."""
        if sending:
            return pdu
        device = self._by_unit.get(pdu.dev_id)
        if device is None or device.is_silent:
            self.dropped_requests += 1
            return None
        return pdu

    async def start(self) -> None:
        if self._server is not None:
            return
        sim_devices = [d.sim_device() for d in self.devices]
        trace = cast(Callable[[bool, ModbusPDU], ModbusPDU], self._filter)
        server: ModbusTcpServer | ModbusSerialServer
        if self.transport == "tcp":
            server = ModbusTcpServer(
                sim_devices, address=("127.0.0.1", self._tcp_port), trace_pdu=trace
            )
            await server.serve_forever(background=True)
            sockets = getattr(server.transport, "sockets", None)
            if not sockets:
                raise RuntimeError("pymodbus TCP server did not bind")
            self._bound_port = int(sockets[0].getsockname()[1])
        else:
            self._pair = SerialPair()
            await self._pair.start()
            server = ModbusSerialServer(
                sim_devices,
                port=self._pair.server_path,
                baudrate=self.baudrate,
                parity=self.parity,
                stopbits=self.stopbits,
                bytesize=self.bytesize,
                trace_pdu=trace,
            )
            await server.serve_forever(background=True)
        self._server = server
        self._refresh_task = asyncio.create_task(self._refresh_loop(), name="modbus-sim-refresh")
        log.info(
            "sim.modbus_server_started",
            transport=self.transport,
            endpoint=self._bound_port if self.transport == "tcp" else self.client_path,
            units=sorted(self._by_unit),
        )

    async def _refresh_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            for device in self.devices:
                try:
                    device.refresh(now)
                except Exception:  # a bad world value must not stop the other devices
                    log.exception("sim.modbus_refresh_failed", unit_id=device.unit_id)
            await asyncio.sleep(self.refresh_period_s)

    async def stop(self) -> None:
        task, self._refresh_task = self._refresh_task, None
        await stop_task(task)
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()
        pair, self._pair = self._pair, None
        if pair is not None:
            await pair.stop()
        self._bound_port = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
