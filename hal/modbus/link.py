"""One Modbus link (an RS-485 port or a TCP endpoint) shared by every device that names it.

Contract of :class:`ModbusLink`:

* **Lazy and self-healing.** Constructing a link does no I/O and needs no running
  event loop. The pymodbus client is created and connected on the first request.
  When a request finds the link disconnected (port could not be opened, TCP peer
  closed, pymodbus dropped the connection after repeated silence) the next request
  tries to reconnect; after a failed connect further attempts are spaced by an
  exponential back-off (:data:`RECONNECT_BACKOFF_MIN_S` doubling up to
  :data:`RECONNECT_BACKOFF_MAX_S`), and requests made in between fail at once with
  reason ``no_connection``. No process restart is ever needed.
* **Serialised.** One :class:`asyncio.Lock` per link: requests of all devices on
  the link never interleave on the wire (required on a serial line, harmless on TCP).
* **One exception type.** Every failure of a request raises :class:`ModbusLinkError`
  with a machine-readable ``reason`` (``timeout``, ``no_connection``,
  ``exception_response``, ``bad_response``, ``transport_error``) and a readable
  ``detail``. Answers whose function code, length or echoed address do not match
  the request (e.g. a late answer to an earlier request on RTU) are rejected as
  ``bad_response`` and never returned as data. Invalid *arguments* (address outside
  0..65535, count outside 1..125, device id outside 0..247) are programming errors
  and raise :class:`ValueError` before anything is sent.
* **Timeouts.** Each attempt waits at most ``config.timeout_s`` for the answer;
  pymodbus re-sends a request ``config.retries`` times, so one request fails with
  ``timeout`` after at most ``timeout_s * (retries + 1)``.
* **Shared.** Devices call :meth:`ModbusLink.acquire` when they start and
  :meth:`ModbusLink.release` when they stop; the transport is closed when the last
  user releases it. :meth:`ModbusLink.close` closes it unconditionally (used by
  :meth:`hal.context.BuildContext.close`); both are idempotent and a later request
  simply reconnects.

Register conversion helpers (:func:`decode_float32`, :func:`decode_uint32`,
:func:`decode_int16`, :func:`encode_registers`, ...) delegate to pymodbus'
``convert_from_registers`` / ``convert_to_registers`` (big-endian word order, i.e.
high word first, as every device in this package uses).

Why one module of ~510 lines: one Modbus link (RTU or TCP) with its reconnect, timeout and
framing-error policy, shared by every device on the line.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence
from typing import Any, Literal, cast

import structlog
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.client.mixin import ModbusClientMixin
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.pdu import ModbusPDU

from hal.config import ModbusLinkConfig
from hal.interfaces import Health, HealthState, monotonic

log = structlog.get_logger("hal.modbus.link")

#: First wait after a failed connect before the next attempt (s); doubles per failure.
RECONNECT_BACKOFF_MIN_S = 0.2
#: Upper bound of the reconnect back-off (s).
RECONNECT_BACKOFF_MAX_S = 5.0
#: Consecutive unanswered requests after which :meth:`ModbusLink.health` reports STALE.
STALE_AFTER_CONSECUTIVE_TIMEOUTS = 3

LinkErrorReason = Literal[
    "timeout", "no_connection", "exception_response", "bad_response", "transport_error"
]

#: Modbus exception codes (as sent in an exception response) and their names.
EXCEPTION_CODES: dict[int, str] = {
    0x01: "illegal function",
    0x02: "illegal data address",
    0x03: "illegal data value",
    0x04: "server device failure",
    0x05: "acknowledge",
    0x06: "server device busy",
    0x07: "negative acknowledge",
    0x08: "memory parity error",
    0x0A: "gateway path unavailable",
    0x0B: "gateway target device failed to respond",
}

DataType = ModbusClientMixin.DATATYPE
Client = AsyncModbusSerialClient | AsyncModbusTcpClient

_FC_READ_HOLDING = 0x03
_FC_READ_INPUT = 0x04
_FC_WRITE_MULTIPLE = 0x10
_MAX_READ_COUNT = 125
_MAX_WRITE_COUNT = 123


class ModbusLinkError(Exception):
    """A Modbus request failed. ``reason`` is machine-readable, ``detail`` for humans.

    ``exception_code`` is set for ``reason == "exception_response"`` (the device
    answered with a Modbus exception, e.g. 2 = illegal data address).
    """

    def __init__(
        self,
        link: str,
        reason: LinkErrorReason,
        detail: str,
        *,
        device_id: int | None = None,
        exception_code: int | None = None,
    ) -> None:
        where = f"{link}" if device_id is None else f"{link} unit {device_id}"
        super().__init__(f"{where}: {reason}: {detail}")
        self.link = link
        self.reason: LinkErrorReason = reason
        self.detail = detail
        self.device_id = device_id
        self.exception_code = exception_code


# ---------------------------------------------------------------------------
# Register conversion (pymodbus does the packing; these only fix types/word order)


def decode_registers(registers: Sequence[int], data_type: Any) -> list[Any]:
    """Decode ``registers`` as consecutive values of ``data_type`` (a :data:`DataType`).

    High word first (pymodbus ``word_order="big"``). Always returns a list, also
    for a single value. Raises :class:`ValueError` when the register count is not
    a multiple of the type's size or a register is outside 0..0xFFFF.
    """
    if any(not 0 <= r <= 0xFFFF for r in registers):
        raise ValueError("register value outside 0..0xFFFF")
    try:
        result = ModbusClientMixin.convert_from_registers(
            list(registers), data_type, word_order="big"
        )
    except ModbusException as exc:
        raise ValueError(str(exc)) from exc
    if isinstance(result, list):
        return list(result)
    return [result]


def decode_float32(registers: Sequence[int]) -> list[float]:
    """IEEE-754 float32 values, two registers each, high word first."""
    return [float(v) for v in decode_registers(registers, DataType.FLOAT32)]


def decode_uint32(registers: Sequence[int]) -> list[int]:
    """Unsigned 32-bit values, two registers each, high word first."""
    return [int(v) for v in decode_registers(registers, DataType.UINT32)]


def decode_int16(registers: Sequence[int]) -> list[int]:
    """Signed 16-bit values, one register each (two's complement)."""
    return [int(v) for v in decode_registers(registers, DataType.INT16)]


def encode_registers(values: Sequence[float] | Sequence[int], data_type: Any) -> list[int]:
    """Encode ``values`` of ``data_type`` to registers, high word first (pymodbus).

    Raises :class:`ValueError` when a value does not fit the type.
    """
    try:
        return ModbusClientMixin.convert_to_registers(
            cast(list[float], list(values)), data_type, word_order="big"
        )
    except (struct.error, TypeError, ModbusException) as exc:
        raise ValueError(f"cannot encode {list(values)!r} as {data_type.name}: {exc}") from exc


# ---------------------------------------------------------------------------


class ModbusLink:
    """A shared, lock-serialised, self-reconnecting Modbus client (RTU or TCP).

    See the module docstring for the full contract.
    """

    def __init__(self, name: str, config: ModbusLinkConfig) -> None:
        self.name = name
        self.config = config
        self._client: Client | None = None
        self._lock = asyncio.Lock()
        self._users = 0
        self._ever_connected = False
        self._connect_failures = 0
        self._next_connect_at = 0.0
        self._last_connect_error: str | None = None
        self._last_error: str | None = None
        self._consecutive_timeouts = 0
        self._stats: dict[str, int] = {
            "requests": 0,
            "answers": 0,
            "timeouts": 0,
            "exception_responses": 0,
            "bad_responses": 0,
            "transport_errors": 0,
            "connects": 0,
            "connect_failures": 0,
        }
        self._log = log.bind(link=name, transport=config.transport, endpoint=self.endpoint)

    # -- identity ---------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """``/dev/ttyS1@9600 8N1`` or ``host:port``, for logs and probe output."""
        c = self.config
        if c.transport == "rtu":
            return f"{c.port}@{c.baudrate} {c.bytesize}{c.parity}{c.stopbits}"
        return f"{c.host}:{c.tcp_port}"

    @property
    def connected(self) -> bool:
        """True while the transport is open (says nothing about devices answering)."""
        return self._client is not None and self._client.connected

    # -- sharing ------------------------------------------------------------

    @property
    def users(self) -> int:
        return self._users

    def acquire(self) -> None:
        """Register one more device using this link (no I/O; connecting stays lazy)."""
        self._users += 1

    async def release(self) -> None:
        """Unregister one device; the transport is closed when no user remains."""
        if self._users > 0:
            self._users -= 1
        if self._users == 0:
            await self._close_transport("no users left")

    async def close(self) -> None:
        """Close the transport regardless of users (idempotent). A later request reconnects."""
        self._users = 0
        await self._close_transport("closed")

    async def _close_transport(self, why: str) -> None:
        async with self._lock:
            client, self._client = self._client, None
            if client is not None:
                was_connected = client.connected
                client.close()
                if was_connected:
                    self._log.info("modbus.link_closed", why=why)

    # -- requests -----------------------------------------------------------

    async def read_input(self, address: int, count: int, device_id: int) -> list[int]:
        """FC 04: read ``count`` input registers from ``address``. Raises :class:`ModbusLinkError`."""
        _check_args(address, count, device_id, _MAX_READ_COUNT)
        return await self._transact(_FC_READ_INPUT, address, count, device_id, None)

    async def read_holding(self, address: int, count: int, device_id: int) -> list[int]:
        """FC 03: read ``count`` holding registers from ``address``. Raises :class:`ModbusLinkError`."""
        _check_args(address, count, device_id, _MAX_READ_COUNT)
        return await self._transact(_FC_READ_HOLDING, address, count, device_id, None)

    async def write_registers(self, address: int, values: Sequence[int], device_id: int) -> None:
        """FC 16: write ``values`` to consecutive holding registers from ``address``.

        Returns once the device confirmed the write (address and count echoed back);
        raises :class:`ModbusLinkError` otherwise.
        """
        _check_args(address, len(values), device_id, _MAX_WRITE_COUNT)
        if any(not 0 <= v <= 0xFFFF for v in values):
            raise ValueError("register values must be 0..0xFFFF")
        await self._transact(_FC_WRITE_MULTIPLE, address, len(values), device_id, list(values))

    async def _transact(
        self,
        function_code: int,
        address: int,
        count: int,
        device_id: int,
        values: list[int] | None,
    ) -> list[int]:
        async with self._lock:
            client = await self._connected_client(device_id)
            self._stats["requests"] += 1
            try:
                if function_code == _FC_READ_INPUT:
                    rr = await client.read_input_registers(
                        address, count=count, device_id=device_id
                    )
                elif function_code == _FC_READ_HOLDING:
                    rr = await client.read_holding_registers(
                        address, count=count, device_id=device_id
                    )
                else:
                    rr = await client.write_registers(address, values or [], device_id=device_id)
            except ConnectionException as exc:
                # pymodbus: transport gone. Drop the client so the next request reconnects.
                self._client = None
                client.close()
                raise self._fail("no_connection", f"connection lost: {exc}", device_id) from exc
            except ModbusIOException as exc:
                text = str(exc)
                if "id=" in text and "received" in text:  # answer for another device/transaction
                    raise self._fail("bad_response", text, device_id) from exc
                raise self._fail(
                    "timeout",
                    f"no answer within {self.config.timeout_s:g} s "
                    f"({self.config.retries + 1} attempt(s))",
                    device_id,
                ) from exc
            except (ModbusException, OSError) as exc:
                raise self._fail(
                    "transport_error", f"{type(exc).__name__}: {exc}", device_id
                ) from exc
            return self._check_answer(rr, function_code, address, count, device_id)

    def _check_answer(
        self, rr: ModbusPDU, function_code: int, address: int, count: int, device_id: int
    ) -> list[int]:
        if rr.isError():
            code = rr.exception_code
            name = EXCEPTION_CODES.get(code, "unknown exception")
            raise self._fail(
                "exception_response",
                f"FC {function_code:#04x} at {address:#06x}: exception {code} ({name})",
                device_id,
                exception_code=code,
            )
        if rr.function_code != function_code:
            raise self._fail(
                "bad_response",
                f"answer has function code {rr.function_code:#04x}, expected {function_code:#04x}",
                device_id,
            )
        if function_code == _FC_WRITE_MULTIPLE:
            if rr.address != address or rr.count != count:
                raise self._fail(
                    "bad_response",
                    f"write echo {rr.address:#06x}x{rr.count} does not match {address:#06x}x{count}",
                    device_id,
                )
            self._succeeded()
            return []
        registers = list(rr.registers)
        if len(registers) != count:
            raise self._fail(
                "bad_response", f"got {len(registers)} registers, asked for {count}", device_id
            )
        self._succeeded()
        return registers

    def _succeeded(self) -> None:
        self._stats["answers"] += 1
        self._consecutive_timeouts = 0

    def _fail(
        self,
        reason: LinkErrorReason,
        detail: str,
        device_id: int,
        *,
        exception_code: int | None = None,
    ) -> ModbusLinkError:
        key = {
            "timeout": "timeouts",
            "exception_response": "exception_responses",
            "bad_response": "bad_responses",
            "transport_error": "transport_errors",
            "no_connection": "transport_errors",
        }[reason]
        self._stats[key] += 1
        if reason == "timeout":
            self._consecutive_timeouts += 1
        self._last_error = f"unit {device_id}: {reason}: {detail}"
        return ModbusLinkError(
            self.name, reason, detail, device_id=device_id, exception_code=exception_code
        )

    async def _connected_client(self, device_id: int) -> Client:
        """Return a connected client, connecting (with back-off) if needed. Lock held."""
        client = self._client
        if client is not None and client.connected:
            return client
        now = monotonic()
        if now < self._next_connect_at:
            raise ModbusLinkError(
                self.name,
                "no_connection",
                f"cannot open {self.endpoint} ({self._last_connect_error}); "
                f"next attempt in {self._next_connect_at - now:.1f} s",
                device_id=device_id,
            )
        if client is None:
            client = self._client = self._make_client()
        try:
            ok = await client.connect()
            error = "connect failed"
        except (ModbusException, OSError, ValueError) as exc:
            ok, error = False, f"{type(exc).__name__}: {exc}"
        if not ok or not client.connected:
            client.close()
            self._client = None
            self._connect_failures += 1
            self._stats["connect_failures"] += 1
            backoff = min(
                RECONNECT_BACKOFF_MIN_S * 2 ** (self._connect_failures - 1), RECONNECT_BACKOFF_MAX_S
            )
            self._next_connect_at = monotonic() + backoff
            first = self._last_connect_error is None
            self._last_connect_error = error
            self._last_error = f"cannot open {self.endpoint}: {error}"
            if first:  # log the outage once, not on every retry
                self._log.warning("modbus.link_open_failed", error=error, retry_in_s=backoff)
            raise ModbusLinkError(
                self.name,
                "no_connection",
                f"cannot open {self.endpoint}: {error}",
                device_id=device_id,
            )
        self._stats["connects"] += 1
        if self._last_connect_error is not None or self._ever_connected:
            self._log.info("modbus.link_reconnected", failed_attempts=self._connect_failures)
        else:
            self._log.info("modbus.link_connected")
        self._ever_connected = True
        self._connect_failures = 0
        self._next_connect_at = 0.0
        self._last_connect_error = None
        return client

    def _make_client(self) -> Client:
        c = self.config
        # reconnect_delay=0: pymodbus' own background reconnect is disabled; this class
        # reconnects on demand so there is never a second connection racing the first.
        if c.transport == "rtu":
            assert c.port is not None  # guaranteed by ModbusLinkConfig validation
            return AsyncModbusSerialClient(
                c.port,
                baudrate=c.baudrate,
                parity=c.parity,
                stopbits=c.stopbits,
                bytesize=c.bytesize,
                timeout=c.timeout_s,
                retries=c.retries,
                reconnect_delay=0,
                name=self.name,
            )
        assert c.host is not None
        return AsyncModbusTcpClient(
            c.host,
            port=c.tcp_port,
            timeout=c.timeout_s,
            retries=c.retries,
            reconnect_delay=0,
            name=self.name,
        )

    # -- observation -----------------------------------------------------------

    def health(self) -> Health:
        """Transport health (device health is each driver's business).

        OFFLINE before the first connect and while the port cannot be opened
        (``transport_error``); STALE/``comm_timeout`` after
        :data:`STALE_AFTER_CONSECUTIVE_TIMEOUTS` unanswered requests in a row; OK otherwise.
        """
        if not self.connected:
            if self._last_connect_error is not None:
                return Health(
                    HealthState.OFFLINE,
                    "transport_error",
                    f"cannot open {self.endpoint}: {self._last_connect_error}",
                )
            return Health(HealthState.OFFLINE, None, "not connected")
        if self._consecutive_timeouts >= STALE_AFTER_CONSECUTIVE_TIMEOUTS:
            return Health(
                HealthState.STALE,
                "comm_timeout",
                f"{self._consecutive_timeouts} requests in a row unanswered",
            )
        return Health()

    def stats(self) -> dict[str, int]:
        """Counters since construction (requests, answers, timeouts, ...)."""
        return dict(self._stats)

    def describe(self) -> dict[str, Any]:
        h = self.health()
        return {
            "name": self.name,
            "transport": self.config.transport,
            "endpoint": self.endpoint,
            "timeout_s": self.config.timeout_s,
            "retries": self.config.retries,
            "connected": self.connected,
            "users": self._users,
            "health": {"state": str(h.state), "code": h.code, "detail": h.detail},
            "last_error": self._last_error,
            "stats": self.stats(),
        }


def _check_args(address: int, count: int, device_id: int, max_count: int) -> None:
    if not 0 <= address <= 0xFFFF:
        raise ValueError(f"address {address} outside 0..65535")
    if not 1 <= count <= max_count:
        raise ValueError(f"count {count} outside 1..{max_count}")
    if address + count - 1 > 0xFFFF:
        raise ValueError("address + count beyond 65535")
    if not 0 <= device_id <= 247:
        raise ValueError(f"device id {device_id} outside 0..247")
