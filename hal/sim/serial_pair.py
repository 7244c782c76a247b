"""A virtual null-modem cable: two pseudo-terminals bridged by the event loop.

A single pty pair has only one path (the slave side, ``/dev/pts/N``); the master
side is a bare file descriptor that pyserial cannot open by name. So, like
``socat -d -d pty,raw pty,raw``, :class:`SerialPair` opens *two* pty pairs and
copies bytes between the two masters. Each end then has a real device path:
a Modbus RTU server opens :attr:`SerialPair.server_path`, the client
(``ModbusLinkConfig(transport="rtu", port=pair.client_path)``) the other.

Contract:

* ``start()`` must run inside the event loop that will use the pair; it opens the
  ptys, puts both slave sides in raw mode (no echo, no line editing) and installs
  one reader per master. ``stop()`` removes the readers and closes every fd; both
  are idempotent. Usable as ``async with SerialPair() as pair``.
* Bytes are forwarded as soon as they arrive, unchanged. There is no baud-rate
  timing: pymodbus' RTU framer delimits frames by length and CRC, not by gaps.
* Like a cable with nobody listening, data written while the other end is not
  opened, or faster than it is read (pty buffer full), is dropped rather than
  blocking the loop. A read error on one master (e.g. EIO) is ignored.
* The pair keeps its own handle on each slave side open, so a client or server
  closing and reopening its path (reconnect tests) does not tear the pty down.
* Line settings (baud rate, parity, stop bits) are whatever each side configures
  on its own pty; they are not compared. Some kernels/sandboxes refuse parity
  settings on ptys (``termios.error: Invalid argument`` from pyserial), so tests
  over a pair should use 8N1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tty
from types import TracebackType
from typing import Self

_CHUNK = 4096


class SerialPair:
    """Two bridged ptys; see the module docstring."""

    def __init__(self) -> None:
        self._masters: tuple[int, int] | None = None
        self._slaves: tuple[int, int] | None = None
        self._paths: tuple[str, str] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.bytes_forwarded = 0

    @property
    def server_path(self) -> str:
        """Device path for the simulated device side (e.g. ``/dev/pts/3``)."""
        if self._paths is None:
            raise RuntimeError("SerialPair not started")
        return self._paths[0]

    @property
    def client_path(self) -> str:
        """Device path for the controller side (goes into ``ModbusLinkConfig.port``)."""
        if self._paths is None:
            raise RuntimeError("SerialPair not started")
        return self._paths[1]

    async def start(self) -> None:
        if self._masters is not None:
            return
        loop = asyncio.get_running_loop()
        m1, s1 = os.openpty()
        m2, s2 = os.openpty()
        for slave in (s1, s2):
            tty.setraw(slave)
        for master in (m1, m2):
            os.set_blocking(master, False)
        self._masters = (m1, m2)
        self._slaves = (s1, s2)
        self._paths = (os.ttyname(s1), os.ttyname(s2))
        self._loop = loop
        loop.add_reader(m1, self._forward, m1, m2)
        loop.add_reader(m2, self._forward, m2, m1)

    async def stop(self) -> None:
        masters, self._masters = self._masters, None
        slaves, self._slaves = self._slaves, None
        if masters is not None and self._loop is not None:
            for fd in masters:
                self._loop.remove_reader(fd)
        for fd in (masters or ()) + (slaves or ()):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._loop = None
        self._paths = None

    def _forward(self, src: int, dst: int) -> None:
        try:
            data = os.read(src, _CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        if not data:
            return
        with contextlib.suppress(BlockingIOError, InterruptedError, OSError):
            os.write(dst, data)
            self.bytes_forwarded += len(data)

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
