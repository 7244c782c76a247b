"""Frames from a power-module group to the bus, with ON frames that OFF can withdraw."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import can

from hal.can.module_table import Frame
from hal.can.port import CanPort

#: Bound on how long start()/stop()/output_off() wait for their frames to be sent.
SEND_WAIT_S = 5.0


class GroupSender:
    """Queues a group's frames on its :class:`~hal.can.port.CanPort`.

    ``send()`` returns one future per frame (nothing while the port is closed).
    ON/setpoint frames are *tracked* per module (``None``: group-wide) so that an OFF
    can ``withdraw()`` them while they still wait in the transmit queue: an OFF is
    never followed on the wire by an ON that was queued before it.
    """

    def __init__(self, port: CanPort, log: Any) -> None:
        self._port = port
        self._log = log
        self._enabling: list[tuple[int | None, asyncio.Future[bool]]] = []

    def send(self, frames: Sequence[Frame], urgent: bool = False) -> list[asyncio.Future[bool]]:
        if not self._port.is_open:
            return []
        return [
            self._port.send(
                can.Message(arbitration_id=aid, data=data, is_extended_id=True), urgent=urgent
            )
            for aid, data in frames
        ]

    def track(self, address: int | None, futures: list[asyncio.Future[bool]]) -> None:
        """Remember ON/setpoint frames so a later OFF can withdraw them."""
        self._enabling = [(a, f) for a, f in self._enabling if not f.done()]
        self._enabling.extend((address, f) for f in futures)

    def withdraw(self, address: int | None = None) -> None:
        """Cancel queued ON/setpoint frames: one module's ON frames, or (None) all."""
        keep: list[tuple[int | None, asyncio.Future[bool]]] = []
        for a, future in self._enabling:
            if address is None or a == address:
                future.cancel()
            elif not future.done():
                keep.append((a, future))
        self._enabling = keep

    async def wait_sent(self, futures: list[asyncio.Future[bool]]) -> bool:
        """True if every frame was handed to the bus within :data:`SEND_WAIT_S`."""
        if not futures:
            return True
        try:
            results = await asyncio.wait_for(asyncio.gather(*futures), SEND_WAIT_S)
        except TimeoutError:
            self._log.error("power_modules_send_timeout", frames=len(futures))
            return False
        return all(results)
