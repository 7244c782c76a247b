"""One shared tick grid for every periodic loop of the process.

Each periodic loop (connector control, pilot sampling, Modbus and CAN polling, hwmon,
status snapshot, watchdog, ...) waits with :func:`sleep_to_grid` instead of
``asyncio.sleep(period)``: it wakes at the next multiple of its period on the event
loop's clock, so loops with equal (or commensurate) periods wake at the *same*
instant, and the event loop handles all of them in one pass instead of one wake-up
per timer. A 100 ms control tick and a 50 ms pilot sample share every other wake-up;
all 1 s jobs share one. Nothing is delayed by more than one period, and no loop can
hold up another: each is still its own task, only the timer deadlines coincide.

:class:`Wakeup` is a cheaper ``asyncio.Event`` for "sleep until the next tick or
until somebody has news" (no task and no timeout object per wait, as
``asyncio.wait_for(event.wait(), t)`` would create).

:class:`Pace` lets pollers that only need a slow pace while nothing can flow (energy
meters, the insulation monitor, idle power modules) stretch their period while the
charger is idle and return to it the moment a connector gets busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Iterator


def next_boundary(now: float, period: float) -> float:
    """The first multiple of ``period`` strictly after ``now`` (ValueError for period <= 0)."""
    if not period > 0:
        raise ValueError(f"period must be > 0, got {period!r}")
    # a hair of tolerance: a loop woken exactly on a boundary waits for the next one
    return (math.floor(now / period + 1e-7) + 1) * period


async def sleep_to_grid(period: float) -> None:
    """Sleep until the next multiple of ``period`` on the running loop's clock."""
    loop = asyncio.get_running_loop()
    now = loop.time()
    await asyncio.sleep(next_boundary(now, period) - now)


async def wait_event_to_grid(event: asyncio.Event, period: float) -> bool:
    """Until ``event`` is set or the next multiple of ``period``, whichever is first.

    Returns ``True`` when the event ended the wait. For an event owned by somebody else
    (a stop signal); a loop's own "news" flag is cheaper as a :class:`Wakeup`.
    """
    if event.is_set():
        return True
    loop = asyncio.get_running_loop()
    now = loop.time()
    try:
        await asyncio.wait_for(event.wait(), next_boundary(now, period) - now)
    except TimeoutError:
        return False
    return True


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Wakeup:
    """A flag a loop can sleep on until a deadline: ``set()`` ends the sleep early.

    ``set()`` may be called from the loop thread only (as for ``asyncio.Event``); it
    stays set until :meth:`clear`. :meth:`wait_until` returns at once while set.
    """

    def __init__(self) -> None:
        self._set = False
        self._waiter: asyncio.Future[None] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        if self._waiter is not None:
            _wake(self._waiter)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        """Wait until set (no deadline)."""
        await self.wait_until(math.inf)

    async def wait_until(self, when: float) -> None:
        """Return at loop time ``when`` or as soon as the flag is set, whichever is first."""
        if self._set:
            return
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiter = waiter
        handle = loop.call_at(when, _wake, waiter) if math.isfinite(when) else None
        try:
            await waiter
        finally:
            if handle is not None:
                handle.cancel()
            self._waiter = None

    async def wait_for_tick(self, period: float) -> None:
        """Until the next multiple of ``period`` (see :func:`sleep_to_grid`) or until set."""
        loop = asyncio.get_running_loop()
        await self.wait_until(next_boundary(loop.time(), period))


class Pace:
    """Whether the charger is busy, for pollers that may slow down while it is idle.

    Each connector reports itself with :meth:`report`: *busy* while a session is
    prepared, running or being resumed, or its contactor coil is energised. The charger
    is **idle** once at least one connector has reported and none reports busy. Until
    the first report it counts as busy, so a driver used on its own (``probe``, a test,
    a bench script) always polls at its normal period.

    A poller waits with :meth:`sleep`: on the grid of its idle period while the charger
    is idle, of its normal period while busy. The switch to busy ends every idle sleep
    at once, so the first fast poll follows the start of a session within one pass of
    the event loop. Loop thread only (as :class:`Wakeup`).
    """

    def __init__(self) -> None:
        self._busy: dict[object, bool] = {}
        self._sleepers: set[Wakeup] = set()

    @property
    def idle(self) -> bool:
        return bool(self._busy) and not any(self._busy.values())

    def report(self, key: object, busy: bool) -> None:
        """``key`` (a connector id) is busy or not; a change to busy wakes the idle sleepers."""
        if self._busy.get(key) is busy:
            return
        was_idle = self.idle
        self._busy[key] = busy
        if was_idle and busy:
            for sleeper in self._sleepers:
                sleeper.set()

    @contextlib.contextmanager
    def busy_while(self, key: object) -> Iterator[None]:
        """Busy for the ``with`` block: for work that needs fresh readings at once (a self test)."""
        self.report(key, True)
        try:
            yield
        finally:
            self.report(key, False)

    def period(self, period: float, idle_period: float) -> float:
        """``idle_period`` while idle (never shorter than ``period``), else ``period``."""
        return max(period, idle_period) if self.idle else period

    async def sleep(self, period: float, idle_period: float, wakeup: Wakeup | None = None) -> None:
        """Until the next multiple of :meth:`period`, or until the charger turns busy.

        With ``wakeup`` (the poller's own "news" flag) the sleep also ends when it is
        set; it is cleared on return.
        """
        current = self.period(period, idle_period)
        if current == period and wakeup is None:
            await sleep_to_grid(period)
            return
        sleeper = wakeup if wakeup is not None else Wakeup()
        self._sleepers.add(sleeper)
        try:
            await sleeper.wait_for_tick(current)
        finally:
            self._sleepers.discard(sleeper)
            sleeper.clear()
