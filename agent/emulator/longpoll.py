"""Long-poll waiters: hold ``GET /v1/device/commands`` until a command arrives or ``wait`` ends."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from agent.emulator.state import CommandRecord, Delivery, EmulatorStore

__all__ = ["CommandBroker"]

Claimed = tuple[CommandRecord, Delivery]


@dataclass(eq=False)
class _Waiter:
    device_id: str
    connector_id: int
    future: asyncio.Future[Claimed | None]
    is_alive: Callable[[], bool]


class CommandBroker:
    """Hands queued commands to waiting long-polls, first come first served.

    Registers itself as the store's ``on_command_ready`` hook. Claiming happens synchronously
    inside the store, so a command goes to exactly one request (heartbeat or long-poll)
    unless re-delivery was requested.
    """

    def __init__(self, store: EmulatorStore) -> None:
        self._store = store
        self._waiters: list[_Waiter] = []
        store.on_command_ready = self.notify

    @property
    def waiting(self) -> int:
        """Number of long-polls currently held."""
        return len(self._waiters)

    async def wait_for_command(
        self,
        device_id: str,
        connector_id: int,
        timeout: float,
        is_alive: Callable[[], bool] = lambda: True,
    ) -> Claimed | None:
        """Return a command for ``connector_id`` at once if one is pending, else hold.

        Args:
            device_id: the polling device.
            connector_id: the poll's connector; device-level commands match any connector.
            timeout: seconds to hold before giving up.
            is_alive: reports whether the client is still connected; a dead waiter is skipped
                so no command is handed to a closed connection.

        Returns:
            The claimed command and its delivery record, or ``None`` on timeout (or when the
            emulator is resetting/stopping).

        If the caller is cancelled after a command was claimed for it, the claim is undone so
        the command stays deliverable.
        """
        claimed = self._store.claim_for_poll(device_id, connector_id)
        if claimed is not None:
            return claimed
        loop = asyncio.get_running_loop()
        waiter = _Waiter(device_id, connector_id, loop.create_future(), is_alive)
        self._waiters.append(waiter)
        try:
            await asyncio.wait([waiter.future], timeout=timeout)
        except asyncio.CancelledError:
            self._discard(waiter)
            if waiter.future.done() and not waiter.future.cancelled():
                result = waiter.future.result()
                if result is not None:
                    self._store.unclaim(*result)
            waiter.future.cancel()
            raise
        self._discard(waiter)
        if waiter.future.done():
            return waiter.future.result()
        waiter.future.cancel()
        return None

    def notify(self, device_id: str) -> None:
        """Give newly deliverable commands of ``device_id`` to its waiters, oldest waiter first."""
        for waiter in list(self._waiters):
            if waiter.device_id != device_id or waiter.future.done():
                continue
            if not waiter.is_alive():
                self._discard(waiter)
                continue
            claimed = self._store.claim_for_poll(device_id, waiter.connector_id)
            if claimed is not None:
                self._discard(waiter)
                waiter.future.set_result(claimed)

    def release_all(self) -> None:
        """End every held long-poll now with "no command" (reset, shutdown)."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.future.done():
                waiter.future.set_result(None)

    def _discard(self, waiter: _Waiter) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass
