"""Wear counters behind the service commands ``reset_fan_counter`` and
``reset_contactor_counter`` (platform-api §14.2).

* :class:`FanRuntime` counts each cooling fan's run time. It samples ``Thermal.fans()``
  every ``sample_interval_s``; the interval since the previous sample counts as run
  time when that sample showed the fan turning (rpm > 0). An unknown rpm (stale or
  unreadable fan) counts as not turning: run time is under-counted rather than
  invented. Totals are persisted in the key/value store under
  ``counters/fan_runtime/<fan>`` every ``persist_interval_s`` and at :meth:`FanRuntime.stop`,
  so a crash loses at most one persist interval; a reset is persisted at once.
* The contactor cycle counter belongs to the contactor driver, which persists it on
  every change; :func:`reset_contactor_cycles` only resets it through the HAL and
  reports the previous count.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from agent.store.db import StoreError
from agent.store.kv import KVStore
from agent.utctime import to_iso, utc_now
from hal.interfaces import Contactor, Thermal
from hal.tasks import stop_task

log = structlog.get_logger(__name__)

FAN_RUNTIME_KEY = "counters/fan_runtime/"


class UnknownFanError(ValueError):
    """A fan name or index that matches no fan; the message lists the known fans."""


@dataclass
class _FanCount:
    seconds: float = 0.0
    reset_at: str | None = None
    dirty: bool = False


def reset_contactor_cycles(contactor: Contactor) -> int:
    """Reset the contactor's cycle counter (the part was replaced); return the previous count.

    The driver persists the new value itself (the GPIO driver with one durable file
    write, on the calling thread). Refusing the reset during a session is the caller's
    decision.
    """
    previous = contactor.status().cycles
    contactor.reset_cycles()
    log.info("contactor_counter_reset", contactor=contactor.name, previous=previous)
    return previous


class FanRuntime:
    """Run-time hours of every cooling fan, persisted in the key/value store.

    Lifecycle: ``await load()``, ``await start()`` (takes a first sample and starts the
    sampling task), ``await stop()`` (takes a last sample and persists). :meth:`sample`
    and :meth:`persist` are public so callers and tests can drive the counter without
    the task.
    """

    def __init__(
        self,
        kv: KVStore,
        thermal: Thermal | None,
        *,
        sample_interval_s: float = 1.0,
        persist_interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Count the fans of ``thermal`` (None: no fans, nothing counted)."""
        if sample_interval_s <= 0 or persist_interval_s <= 0:
            raise ValueError("sample and persist intervals must be positive")
        self._kv = kv
        self._thermal = thermal
        self._sample_s = sample_interval_s
        self._persist_s = persist_interval_s
        self._clock = clock
        self._counts: dict[str, _FanCount] = {}
        self._running: dict[str, bool] = {}  # fan -> turning at the previous sample
        self._last_sample: float | None = None
        self._task: asyncio.Task[None] | None = None

    async def load(self) -> None:
        """Read the persisted totals; malformed entries are logged and start from 0."""
        for key, value in (await self._kv.items(FAN_RUNTIME_KEY)).items():
            fan = key[len(FAN_RUNTIME_KEY) :]
            seconds = value.get("seconds") if isinstance(value, dict) else None
            if (
                not fan
                or isinstance(seconds, bool)
                or not isinstance(seconds, (int, float))
                or seconds < 0
            ):
                log.warning("fan_runtime_invalid", key=key, value=value)
                continue
            reset_at = value.get("reset_at")
            self._counts[fan] = _FanCount(
                float(seconds), reset_at if isinstance(reset_at, str) else None
            )

    def fans(self) -> list[str]:
        """Fans of the thermal device in its order, then fans only known from the store."""
        live = list(self._thermal.fans()) if self._thermal is not None else []
        return live + sorted(set(self._counts) - set(live))

    def hours(self, fan: str) -> float:
        """Run-time hours of ``fan`` (0.0 for a fan never seen turning)."""
        count = self._counts.get(fan)
        return count.seconds / 3600.0 if count is not None else 0.0

    def all_hours(self) -> dict[str, float]:
        """``{fan: hours}`` for every fan in :meth:`fans` order."""
        return {fan: self.hours(fan) for fan in self.fans()}

    def resolve(self, ref: str | int | None) -> str:
        """The fan named by a command parameter: a name, a 1-based index into :meth:`fans`
        (like connector ids), or None when there is exactly one fan.

        Raises :class:`UnknownFanError` naming the known fans otherwise.
        """
        fans = self.fans()
        if ref is None:
            if len(fans) == 1:
                return fans[0]
            raise UnknownFanError(
                f"{len(fans)} fans configured ({', '.join(fans) or 'none'}): name one"
            )
        if isinstance(ref, int) and not isinstance(ref, bool):
            if 1 <= ref <= len(fans):
                return fans[ref - 1]
            raise UnknownFanError(
                f"fan index {ref} out of range 1..{len(fans)} ({', '.join(fans) or 'no fans'})"
            )
        if ref in fans:
            return ref
        raise UnknownFanError(f"unknown fan {ref!r}; known fans: {', '.join(fans) or 'none'}")

    def sample(self) -> None:
        """Add the time since the previous sample to each fan that was turning then, and
        remember which fans turn now."""
        now = self._clock()
        if self._last_sample is not None:
            elapsed = max(now - self._last_sample, 0.0)
            for fan, turning in self._running.items():
                if turning and elapsed > 0.0:
                    count = self._counts.setdefault(fan, _FanCount())
                    count.seconds += elapsed
                    count.dirty = True
        self._last_sample = now
        fans = self._thermal.fans() if self._thermal is not None else {}
        self._running = {
            name: status.rpm is not None and status.rpm > 0.0 for name, status in fans.items()
        }

    async def persist(self) -> None:
        """Write every total that changed since the last write (durable when this returns)."""
        for fan, count in self._counts.items():
            if count.dirty:
                await self._kv.set(
                    f"{FAN_RUNTIME_KEY}{fan}",
                    {"seconds": count.seconds, "reset_at": count.reset_at},
                )
                count.dirty = False

    async def reset(self, fan: str) -> float:
        """Set ``fan``'s run time to 0 (the fan was replaced), persisted at once; return the
        previous hours. Raises :class:`UnknownFanError` for a fan :meth:`fans` does not list."""
        if fan not in self.fans():
            raise UnknownFanError(
                f"unknown fan {fan!r}; known fans: {', '.join(self.fans()) or 'none'}"
            )
        previous = self.hours(fan)
        reset_at = to_iso(utc_now())
        await self._kv.set(f"{FAN_RUNTIME_KEY}{fan}", {"seconds": 0.0, "reset_at": reset_at})
        self._counts[fan] = _FanCount(0.0, reset_at)
        log.info("fan_runtime_reset", fan=fan, previous_hours=round(previous, 3))
        return previous

    async def start(self) -> None:
        """Take the first sample and start the sampling task (idempotent)."""
        if self._task is not None:
            return
        self.sample()
        self._task = asyncio.create_task(self._run(), name="fan-runtime")

    async def stop(self) -> None:
        """Stop the task, count the time up to now and persist (idempotent)."""
        task, self._task = self._task, None
        if task is not None:
            await stop_task(task)
            self.sample()
        await self.persist()

    async def _run(self) -> None:
        next_persist = self._clock() + self._persist_s
        while True:
            await asyncio.sleep(self._sample_s)
            self.sample()
            if self._clock() >= next_persist:
                next_persist = self._clock() + self._persist_s
                try:
                    await self.persist()
                except StoreError as exc:
                    log.warning("fan_runtime_persist_failed", error=str(exc))


__all__ = ["FAN_RUNTIME_KEY", "FanRuntime", "UnknownFanError", "reset_contactor_cycles"]
