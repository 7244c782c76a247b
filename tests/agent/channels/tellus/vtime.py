"""A virtual-time asyncio event loop for the uplink tests.

``loop.time()`` is a virtual clock. Whenever the loop has nothing to run, no tracked
worker-thread job is outstanding (executor jobs, and store-writer jobs registered with
:meth:`VirtualTimeLoop.track`) and no socket event arrives within ``real_wait`` real
seconds, the clock jumps straight to the next timer. Everything that measures time through
the loop (``asyncio.sleep``, ``wait_for``, aiohttp timeouts, long-poll holds in the
emulator) therefore runs in virtual time, while the HTTP traffic between the uplink and the
emulator is real TCP on 127.0.0.1 (loopback data is readable as soon as it is written, so
a request in flight is seen as activity). Thread work takes no virtual time; anything the
loop could not see would only make the virtual clock run *ahead*, so measured rates can
only come out lower than the shaping allows, never higher.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import selectors
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class VirtualClock:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class _VirtualSelector(selectors.DefaultSelector):
    def __init__(self, clock: VirtualClock, real_wait: float) -> None:
        super().__init__()
        self._clock = clock
        self._real_wait = real_wait
        self.outstanding = 0  # tracked thread jobs not finished yet
        self.jumps = 0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = super().select(0)
        if events or (timeout is not None and timeout <= 0):
            return events
        if timeout is None or self.outstanding > 0:
            # Only I/O or a thread can make progress: wait for it in real time (the thread
            # wakes the loop through its self-pipe). Returning [] re-runs the loop's checks.
            return super().select(None if timeout is None else 1.0)
        events = super().select(self._real_wait)
        if events:
            return events
        self._clock.now += timeout
        self.jumps += 1
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self, start: float = 10_000.0, real_wait: float = 0.001) -> None:
        self.vclock = VirtualClock(start)
        self.vselector = _VirtualSelector(self.vclock, real_wait)
        super().__init__(self.vselector)

    def time(self) -> float:
        return self.vclock.now

    def track(self, future: asyncio.Future[Any]) -> None:
        """Hold the virtual clock until ``future`` (completed by another thread) is done."""
        self.vselector.outstanding += 1

        def _done(_: asyncio.Future[Any]) -> None:
            self.vselector.outstanding -= 1

        future.add_done_callback(_done)

    def run_in_executor(self, executor: Any, func: Any, *args: Any) -> asyncio.Future[Any]:  # type: ignore[override]
        future = super().run_in_executor(executor, func, *args)
        self.track(future)
        return future


def run_virtual(coro: Coroutine[Any, Any, T], *, real_timeout: float = 30.0) -> T:
    """Run ``coro`` to completion on a fresh :class:`VirtualTimeLoop`; cancel it (and fail)
    if it takes more than ``real_timeout`` wall-clock seconds."""
    loop = VirtualTimeLoop()
    asyncio.set_event_loop(loop)
    timed_out = threading.Event()
    try:
        task = loop.create_task(coro)

        def _expire() -> None:
            timed_out.set()
            loop.call_soon_threadsafe(task.cancel)

        watchdog = threading.Timer(real_timeout, _expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            return loop.run_until_complete(task)
        except asyncio.CancelledError:
            if timed_out.is_set():
                raise AssertionError(f"test exceeded {real_timeout} s of real time") from None
            raise
        finally:
            watchdog.cancel()
    finally:
        try:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def virtual_time(
    real_timeout: float = 30.0,
) -> Callable[[Callable[..., Coroutine[Any, Any, None]]], Callable[..., None]]:
    """Decorator: run an ``async def`` test on a :class:`VirtualTimeLoop` (a plain sync test for
    pytest, fixtures still injected)."""

    def deco(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> None:
            run_virtual(fn(*args, **kwargs), real_timeout=real_timeout)

        wrapper.__signature__ = inspect.signature(fn)  # type: ignore[attr-defined]
        # pytest-asyncio must see a plain function, not the coroutine function behind it
        del wrapper.__wrapped__
        return wrapper

    return deco
