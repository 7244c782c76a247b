"""Protocol-level simulator of InfyPower or Winline power modules on a CAN bus.

:class:`CanModuleSimulator` opens its own python-can bus on the configured channel
(``virtual`` in-process, ``vcan0`` on a bench) and behaves like the modules would:

* every controller request (source 0xF0..0xF8) addressed to a module, its group or
  everybody sets ``last_heard = world.time`` on each addressed :class:`SimModule`;
* commands change the SimModule fields the controller commands: ``on``,
  ``voltage_setpoint``, ``current_limit`` (a group/system total, InfyPower 0x1B, is
  split evenly over the addressed modules that are on, or all of them if none is);
* reads are answered from the measured fields (``output_voltage``,
  ``output_current``, ``temperature``) and from ``on``/``walk_in`` for the status
  bits, encoded with the real codecs.

Nothing here moves a value in time: ramps and the modules' 10 s watchdog belong to
:func:`hal.sim.physics.step`. Fault injections on a SimModule:

* ``silent``: the module still hears (and obeys) commands but never answers;
* ``garbage``: every answer is corrupted, cycling through a DLC shorter than 8,
  a value the decoders must reject (NaN float, out-of-range number, InfyPower
  temperature byte -128), a wrong Winline status or type byte, and random bytes of
  random length below 8. Each corruption is one a correct decoder detects, so a
  garbage module never delivers a value that looks valid.

Protocol details that the documents leave open are parameters, set to what the
driver's options say so both ends agree, and enforced strictly:

* Winline point-to-point group bits (``winline_ptp_group_bits``): ``"zero"`` (the
  default, as EVerest sends them) makes a module ignore a point-to-point frame whose
  group bits are not 0; ``"group"`` ignores one whose bits are not its group.
* Winline register 0x0012 (``winline_current_limit_point``): answered as the module's
  real current limit divided by the current-limit point the controller multiplies
  it with.
* InfyPower: a module whose ``reply_error`` is set (2, 3 or 7) answers every request
  with that error code in the identifier and eight zero bytes; it still obeys.
  Its after-diode voltage (0x0C) is the output voltage; the module-side reading
  (0x03/0x09) is :data:`DIODE_DROP_V` higher while the module is on.

AC input voltages are fixed (the world model has no grid voltage): 400 V line to
line for InfyPower 0x06, 400 V / sqrt(3) per phase for Winline 0x000C..0x000E.
Requests the real modules would answer but this simulator does not model (InfyPower
barcode 0x0B, most Winline configuration registers) get no answer.
"""

from __future__ import annotations

import asyncio
import math
import random
import struct
from collections.abc import Mapping, Sequence
from typing import Literal

import can
import structlog

from hal.can import infypower_codec as infy
from hal.can import winline_codec as wl
from hal.can.port import FrameError
from hal.config import CanBusConfig
from hal.sim.world import SimModule, SimWorld

log = structlog.get_logger(__name__)

NOMINAL_AC_VOLTAGE = 400.0
#: Forward drop of an InfyPower module's output diode while it delivers (V).
DIODE_DROP_V = 0.8
_CONTROLLER_ADDRESSES = range(0xF0, 0xF9)
_NAN8 = struct.pack(">ff", math.nan, math.nan)


class CanModuleSimulator:
    """Answers a controller's frames on behalf of ``modules``; see the module docstring.

    ``modules`` is a mapping address -> SimModule or a sequence of SimModules (keyed by
    their ``address``). ``seed`` makes the random garbage reproducible.
    """

    def __init__(
        self,
        bus_config: CanBusConfig,
        modules: Mapping[int, SimModule] | Sequence[SimModule],
        protocol: Literal["infypower", "winline"],
        world: SimWorld,
        *,
        seed: int = 0,
        winline_ptp_group_bits: Literal["zero", "group"] = "zero",
        winline_current_limit_point: float = 3.3325,
    ) -> None:
        if protocol not in ("infypower", "winline"):
            raise ValueError(f"unknown protocol {protocol!r}")
        self.bus_config = bus_config
        self.protocol = protocol
        self.winline_ptp_group_bits = winline_ptp_group_bits
        self.winline_current_limit_point = winline_current_limit_point
        self.world = world
        if isinstance(modules, Mapping):
            self.modules: dict[int, SimModule] = dict(modules)
        else:
            self.modules = {m.address: m for m in modules}
        self.frames_received = 0
        self.frames_answered = 0
        self.garbage_sent = 0
        self._rng = random.Random(seed)
        self._garbage_turn = 0
        self._bus: can.BusABC | None = None
        self._notifier: can.Notifier | None = None

    async def start(self) -> None:
        """Open the simulator's own bus and start answering (idempotent)."""
        if self._bus is not None:
            return
        cfg = self.bus_config
        self._bus = await asyncio.to_thread(lambda: can.Bus(**cfg.bus_kwargs()))
        self._notifier = can.Notifier(
            self._bus, [self._on_message], timeout=0.1, loop=asyncio.get_running_loop()
        )
        log.info("can_module_simulator_started", protocol=self.protocol,
                 channel=cfg.channel, modules=sorted(self.modules))

    async def stop(self) -> None:
        """Stop answering and close the bus (idempotent)."""
        notifier, bus = self._notifier, self._bus
        self._notifier = None
        self._bus = None
        if notifier is not None:
            await asyncio.to_thread(notifier.stop, 1.0)
        if bus is not None:
            bus.shutdown()

    def _on_message(self, msg: can.Message) -> None:
        bus = self._bus
        if bus is None:
            return
        for answer in self.handle(msg):
            try:
                bus.send(answer)
            except can.CanError as exc:
                log.warning("can_module_simulator_send_failed", error=str(exc))

    def handle(self, msg: can.Message) -> list[can.Message]:
        """Apply one received frame to the modules and return the answers to send."""
        if msg.is_error_frame or msg.is_remote_frame or not msg.is_extended_id:
            return []
        try:
            if self.protocol == "infypower":
                frames = self._infy(msg.arbitration_id, bytes(msg.data))
            else:
                frames = self._winline(msg.arbitration_id, bytes(msg.data))
        except FrameError:
            return []  # a malformed request: real modules ignore it too
        self.frames_received += 1
        self.frames_answered += len(frames)
        return [can.Message(arbitration_id=a, data=d, is_extended_id=True) for a, d in frames]

    # ------------------------------------------------------------------ InfyPower

    def _infy(self, arbitration_id: int, data: bytes) -> list[tuple[int, bytes]]:
        ident = infy.parse_id(arbitration_id)
        if ident.error or ident.source not in _CONTROLLER_ADDRESSES:
            return []
        controller = ident.source
        single = False
        if ident.device == infy.DEV_MODULE and ident.destination == infy.BROADCAST:
            targets = list(self.modules.values())
        elif ident.device == infy.DEV_MODULE:
            module = self.modules.get(ident.destination)
            targets = [module] if module is not None else []
            single = True
        elif ident.device == infy.DEV_GROUP:
            targets = [m for m in self.modules.values() if m.group == ident.destination]
        else:
            return []
        if not targets:
            return []
        for m in targets:
            m.last_heard = self.world.time
        command = ident.command
        if command == infy.Cmd.SET_ON_OFF:
            on = infy.decode_on_off(data)
            for m in targets:
                m.on = on
        elif command == infy.Cmd.SET_MODULE_OUTPUT and single:
            voltage, current = infy.decode_setpoint(data)
            targets[0].voltage_setpoint = voltage
            targets[0].current_limit = current
        elif command == infy.Cmd.SET_SYSTEM_OUTPUT:
            voltage, total = infy.decode_setpoint(data)
            sharers = [m for m in targets if m.on] or targets
            for m in targets:
                m.voltage_setpoint = voltage
            for m in sharers:
                m.current_limit = total / len(sharers)
        answering = [m for m in targets if not m.silent]
        if not answering:
            return []
        if single:
            m = answering[0]
            if m.reply_error:
                return [(infy.response_id(command, m.address, controller, error=m.reply_error),
                         bytes(8))]
            payload = self._infy_module_answer(command, m, data)
            if payload is None:
                return []
            if m.garbage:
                payload = self._corrupt_infy(command, payload)
            return [(infy.response_id(command, m.address, controller), payload)]
        payload = self._infy_group_answer(command, targets, data)
        if payload is None:
            return []
        if any(m.garbage for m in answering):
            payload = self._corrupt_infy(command, payload)
        responder = ident.destination
        return [(infy.response_id(command, responder, controller, device=ident.device), payload)]

    @staticmethod
    def _infy_module_answer(command: int, m: SimModule, request: bytes) -> bytes | None:
        inner = m.output_voltage + (DIODE_DROP_V if m.on and m.output_voltage > 0 else 0.0)
        if command == infy.Cmd.READ_MODULE_VI_FLOAT:
            return infy.encode_vi_float(inner, m.output_current)
        if command == infy.Cmd.READ_MODULE_VI_INT:
            return infy.encode_vi_int(inner, m.output_current)
        if command == infy.Cmd.READ_STATUS:
            flags = set()
            if not m.on:
                flags.add("output_off")
            if m.walk_in:
                flags.add("walk_in")
            temperature = max(-128, min(127, round(m.temperature)))
            return infy.encode_status(m.group & 0xFF, temperature, flags)
        if command == infy.Cmd.READ_RATINGS:
            return infy.encode_ratings(m.max_voltage, m.min_voltage, m.max_current,
                                       m.rated_power_w)
        if command == infy.Cmd.READ_AVAILABLE:
            return infy.encode_available(max(m.output_voltage, 0.0),
                                         m.max_current if m.on else 0.0)
        if command == infy.Cmd.READ_AC_INPUT:
            return infy.encode_ac_input(NOMINAL_AC_VOLTAGE, NOMINAL_AC_VOLTAGE,
                                        NOMINAL_AC_VOLTAGE)
        if command == infy.Cmd.READ_MODULE_COUNT:
            return infy.encode_module_count(1)
        if command in (infy.Cmd.SET_ON_OFF, infy.Cmd.SET_MODULE_OUTPUT,
                       infy.Cmd.SET_SYSTEM_OUTPUT):
            return request  # echo
        return None

    @staticmethod
    def _infy_group_answer(command: int, targets: list[SimModule], request: bytes) -> bytes | None:
        if command == infy.Cmd.READ_MODULE_COUNT:
            return infy.encode_module_count(min(len(targets), infy.BROADCAST))
        if command in (infy.Cmd.READ_SYSTEM_VI_FLOAT, infy.Cmd.READ_SYSTEM_VI_INT):
            voltage = sum(m.output_voltage for m in targets) / len(targets)
            current = sum(m.output_current for m in targets)
            if command == infy.Cmd.READ_SYSTEM_VI_FLOAT:
                return infy.encode_vi_float(voltage, current)
            return infy.encode_vi_int(voltage, current)
        if command in (infy.Cmd.SET_ON_OFF, infy.Cmd.SET_SYSTEM_OUTPUT):
            return request  # echo
        return None

    def _corrupt_infy(self, command: int, payload: bytes) -> bytes:
        self.garbage_sent += 1
        turn = self._garbage_turn % 3
        self._garbage_turn += 1
        if turn == 1:
            if command in (infy.Cmd.READ_MODULE_VI_FLOAT, infy.Cmd.READ_SYSTEM_VI_FLOAT):
                return _NAN8
            if command in (infy.Cmd.READ_MODULE_VI_INT, infy.Cmd.READ_SYSTEM_VI_INT):
                return b"\xff" * 8  # 4.29 MV
            if command == infy.Cmd.READ_STATUS:
                return payload[:4] + b"\x80" + payload[5:]  # -128 degC
            if command == infy.Cmd.READ_RATINGS:
                return bytes(8)
            if command == infy.Cmd.READ_MODULE_COUNT:
                return b"\x00\x00\xff" + bytes(5)
            if command == infy.Cmd.READ_AVAILABLE:
                return b"\xff" * 8  # 6553.5 V
        if turn == 2:
            return self._random_short()
        return payload[:5]

    # ------------------------------------------------------------------ Winline

    def _winline(self, arbitration_id: int, data: bytes) -> list[tuple[int, bytes]]:
        ident = wl.parse_id(arbitration_id)
        if ident.protno != wl.PROTNO or ident.source not in _CONTROLLER_ADDRESSES:
            return []
        controller = ident.source
        if ident.ptp:
            module = self.modules.get(ident.destination)
            want = 0 if self.winline_ptp_group_bits == "zero" or module is None else module.group & 0x7
            if module is None or ident.group != want:
                return []  # not for this module (wrong group bits are ignored, not obeyed)
            targets = [module]
        elif ident.destination == wl.BROADCAST:
            targets = list(self.modules.values())
        elif ident.destination == wl.GROUP_BROADCAST:
            targets = [m for m in self.modules.values() if m.group == ident.group]
        else:
            return []
        if not targets:
            return []
        for m in targets:
            m.last_heard = self.world.time
        request = wl.decode_request(data)
        register = request.register
        answers: list[tuple[int, bytes]] = []
        for m in targets:
            value: float | int | None
            if request.function == wl.FUNC_SET:
                value = self._winline_set(m, request)
            elif register == wl.Reg.RATED_CURRENT:
                value = m.max_current / self.winline_current_limit_point
            else:
                value = self._winline_read(m, register)
            if value is None or m.silent:
                continue
            payload = wl.encode_response(register, value)
            if m.garbage:
                payload = self._corrupt_winline(register, payload)
            answer_id = wl.build_id(destination=controller, source=m.address,
                                    group=m.group & 0x7, ptp=True)
            answers.append((answer_id, payload))
        return answers

    @staticmethod
    def _winline_set(m: SimModule, request: wl.Request) -> float | int | None:
        register = request.register
        if register == wl.Reg.SET_VOLTAGE:
            m.voltage_setpoint = request.float_value
            return m.voltage_setpoint
        if register == wl.Reg.SET_CURRENT:
            m.current_limit = wl.raw_to_current(request.raw)
            return request.raw
        if register == wl.Reg.POWER:
            if request.raw == wl.POWER_ON:
                m.on = True
            elif request.raw == wl.POWER_OFF:
                m.on = False
            else:
                return None
            return request.raw
        return None

    @staticmethod
    def _winline_read(m: SimModule, register: int) -> float | int | None:
        if register == wl.Reg.OUTPUT_VOLTAGE:
            return m.output_voltage
        if register == wl.Reg.OUTPUT_CURRENT:
            return m.output_current
        if register == wl.Reg.DC_BOARD_TEMPERATURE:
            return m.temperature
        if register == wl.Reg.RATED_POWER:
            return m.rated_power_w
        if register == wl.Reg.RATED_CURRENT:
            return m.max_current
        if register == wl.Reg.CURRENT_LIMIT_POINT:
            return m.current_limit / m.max_current if m.max_current else 0.0
        if register == wl.Reg.STATUS:
            return wl.status_word(() if m.on else ("output_off",))
        if register == wl.Reg.GROUP_INFO:
            return wl.encode_group_info(m.group, m.address)
        if register in (wl.Reg.AC_VOLTAGE_A, wl.Reg.AC_VOLTAGE_B, wl.Reg.AC_VOLTAGE_C):
            return NOMINAL_AC_VOLTAGE / math.sqrt(3.0)
        return None

    def _corrupt_winline(self, register: int, payload: bytes) -> bytes:
        self.garbage_sent += 1
        turn = self._garbage_turn % 4
        self._garbage_turn += 1
        if turn == 1:
            return payload[:1] + b"\xf1" + payload[2:]  # status byte: not normal
        if turn == 2:
            if wl.register_is_float(register):
                return payload[:4] + struct.pack(">f", math.nan)
            return bytes((wl.TYPE_FLOAT,)) + payload[1:]  # float type for an integer register
        if turn == 3:
            return self._random_short()
        return payload[:6]

    def _random_short(self) -> bytes:
        length = self._rng.randrange(0, 8)
        return bytes(self._rng.randrange(256) for _ in range(length))
