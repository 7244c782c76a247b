"""Behaviour shared by every polled Modbus device: poll task, staleness, fault latching.

:class:`PolledDevice` implements the lifecycle and comm-loss rules of
:mod:`hal.interfaces` once; each driver only supplies ``_poll()`` (talk to the
device, decode, return one consistent reading) and reports device-side faults
through ``_set_device_health()``.

Contract of :class:`PolledDevice`:

* ``start()`` acquires the link, starts one poll task and returns once the first
  poll has been *attempted*, waiting at most ``link timeout_s + 1 s`` (the poll
  keeps running in the background if it takes longer). ``stop()`` cancels the
  task, releases the link and forgets every value. Both are idempotent.
* The task polls every ``poll_interval_s`` on the shared tick grid
  (:mod:`hal.tick`); a poll that overruns its slot delays the next one to the
  following slot (no burst of catch-up polls). While the charger is idle (the
  :class:`~hal.tick.Pace` of the build context: no session, every contactor open)
  it polls every ``idle_poll_interval_s`` instead (never faster than
  ``poll_interval_s``), and polls at once when a connector gets busy.
* A poll that raises :class:`~hal.modbus.link.ModbusLinkError` is a comm failure;
  one that raises :class:`DeviceDataError` is garbage (counted, discarded, the
  published value is left untouched); any other exception is logged with its
  traceback and treated as a failure -- the task never dies.
* The latest value is *fresh* while ``now - value.taken_at`` is at most the stale
  limit: ``stale_after_s``, and while idle (or for a value polled while idle) two idle
  periods if that is longer, so the slower idle polls never make a value stale.
  Without a fresh value ``_fresh_value()`` is ``None`` and ``health()`` is
  ``STALE``/``comm_timeout`` with the last error as detail. Loss is logged once
  (warning) and recovery once (info); old values are never presented as new.
* ``probe()`` polls once on demand (also when not started) and returns a dict
  with the reading or the error; it never publishes the value.
* Health precedence: OFFLINE (not started) > STALE > the device health set by the
  driver (FAULT/DEGRADED) > DEGRADED/``garbage_frames`` (the last poll was
  garbage) > OK. Device-health changes are logged once per change.

:class:`FreezeDetector` holds the "meter frozen" rules both energy meters use.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from abc import ABC, abstractmethod
from dataclasses import asdict, is_dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

import structlog
from pydantic import Field, model_validator

from hal.config import StrictModel
from hal.interfaces import Health, HealthState, MeterReading, monotonic
from hal.modbus.link import ModbusLink, ModbusLinkError
from hal.tasks import stop_task
from hal.tick import Pace

if TYPE_CHECKING:
    from hal.context import BuildContext


class DeviceDataError(Exception):
    """The device answered, but with values that cannot be right (garbage)."""


class _Stamped(Protocol):
    @property
    def taken_at(self) -> float: ...


R = TypeVar("R", bound=_Stamped)


class PolledOptions(StrictModel):
    """Options every polled Modbus device accepts."""

    link: str = Field(..., min_length=1, description="name of a [modbus.<name>] link")
    unit_id: int = Field(1, ge=1, le=247, description="Modbus device address")
    poll_interval_s: float = Field(1.0, ge=0.2, le=60.0, description="poll period")
    idle_poll_interval_s: float = Field(
        5.0,
        ge=0.2,
        le=60.0,
        description=(
            "poll period while the charger is idle (no session, contactors open); "
            "never faster than poll_interval_s"
        ),
    )
    stale_after_s: float = Field(
        5.0, gt=0.0, le=600.0, description="no valid answer for this long -> values withheld"
    )

    @model_validator(mode="after")
    def _stale_after_poll(self) -> PolledOptions:
        if self.stale_after_s <= self.poll_interval_s:
            raise ValueError(
                f"stale_after_s ({self.stale_after_s}) must be longer than "
                f"poll_interval_s ({self.poll_interval_s})"
            )
        return self


class MeterOptions(PolledOptions):
    """Options of an energy meter (adds the frozen-meter detection)."""

    freeze_power_kw: float = Field(
        1.0,
        gt=0.0,
        description="frozen-meter rules only apply while |power| is at least this",
    )
    freeze_window_s: float = Field(
        60.0,
        gt=0.0,
        description=(
            "energy import/export not advancing for this long while power flows -> "
            "meter_frozen; choose it so freeze_power_kw * window is well above one "
            "count of the energy register"
        ),
    )
    freeze_identical_polls: int = Field(
        10,
        ge=2,
        description=(
            "raw registers bit-identical in this many consecutive polls while power "
            "flows -> meter_frozen (must span more than the meter's update period)"
        ),
    )

    @model_validator(mode="after")
    def _identical_span(self) -> MeterOptions:
        span = self.freeze_identical_polls * self.poll_interval_s
        if span < 2.0:
            raise ValueError(
                f"freeze_identical_polls * poll_interval_s = {span:g} s; it must be >= 2 s "
                "so a meter's normal register update period is not mistaken for a freeze"
            )
        return self


def resolve_link(ctx: BuildContext, name: str, device: str) -> ModbusLink:
    """The shared link called ``name``; :class:`ValueError` naming the known links if absent."""
    if name not in ctx.modbus_configs:
        known = ", ".join(sorted(ctx.modbus_configs)) or "none"
        raise ValueError(f"{device}: modbus link '{name}' is not configured (known: {known})")
    return ctx.modbus_link(name)


class PolledDevice(ABC, Generic[R]):
    """Base class of the Modbus drivers (see the module docstring for the contract)."""

    #: Driver name as registered in :mod:`hal.registry` (for logs and ``describe()``).
    driver: ClassVar[str] = "modbus"
    #: Meters hide their reading while the driver reports FAULT; the IMD does not.
    withhold_on_fault: ClassVar[bool] = True

    def __init__(
        self,
        name: str,
        *,
        link: ModbusLink,
        unit_id: int,
        poll_interval_s: float,
        stale_after_s: float,
        idle_poll_interval_s: float | None = None,
        pace: Pace | None = None,
    ) -> None:
        self.name = name
        self._link = link
        self._unit_id = unit_id
        self._poll_interval_s = poll_interval_s
        self._idle_poll_interval_s = max(poll_interval_s, idle_poll_interval_s or poll_interval_s)
        self._stale_after_s = stale_after_s
        # without a pace nobody reports idle: always the normal period
        self._pace = pace if pace is not None else Pace()
        self._value_limit = stale_after_s  # the stale limit in force when _value was polled
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._first_attempt: asyncio.Event | None = None
        self._value: R | None = None
        self._last_error: str | None = None
        self._last_poll_garbage = False
        self._comm_lost = False
        self._answered_once = False
        self._lost_since: float | None = None
        self._device_health: Health | None = None
        self._counters: dict[str, int] = {
            "polls": 0,
            "answers": 0,
            "failures": 0,
            "garbage": 0,
        }
        self._log = structlog.get_logger("hal.modbus").bind(
            device=name, driver=self.driver, link=link.name, unit_id=unit_id
        )
        worst_request_s = link.config.timeout_s * (link.config.retries + 1)
        if stale_after_s < worst_request_s:
            self._log.warning(
                "modbus.stale_shorter_than_request",
                stale_after_s=stale_after_s,
                worst_request_s=worst_request_s,
            )

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Start polling; returns after the first attempt (bounded, see module docstring)."""
        if self._task is not None:
            return
        self._link.acquire()
        self._first_attempt = asyncio.Event()
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"modbus-poll:{self.name}")
        self._log.info("modbus.device_started", poll_interval_s=self._poll_interval_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self._first_attempt.wait(), timeout=self._link.config.timeout_s + 1.0
            )

    async def stop(self) -> None:
        """Stop polling, release the link, forget values (idempotent)."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        # A cancellation swallowed inside the Modbus client must not hang the stop: a task
        # left behind by stop_task() exits at its next loop check because ``_stopping`` is set.
        await stop_task(task)
        await self._link.release()
        self._value = None
        self._device_health = None
        self._comm_lost = False
        self._answered_once = False
        self._last_poll_garbage = False
        self._log.info("modbus.device_stopped")

    @property
    def running(self) -> bool:
        return self._task is not None

    # -- for subclasses --------------------------------------------------

    @abstractmethod
    async def _poll(self) -> R:
        """Talk to the device once and return one consistent reading.

        Raise :class:`ModbusLinkError` (comm failure) or :class:`DeviceDataError`
        (garbage). Call ``_set_device_health()`` for device-side faults.
        """

    def _set_device_health(self, health: Health | None) -> None:
        """Set (or clear with ``None``) the device-side health; logs each change once."""
        old = self._device_health
        if health is not None and health.ok:
            health = None
        if (old.code if old else None) == (health.code if health else None):
            self._device_health = health  # same condition, maybe a newer detail
            return
        self._device_health = health
        if health is not None:
            self._log.warning(
                "modbus.device_fault",
                state=str(health.state),
                code=health.code,
                detail=health.detail,
            )
        elif old is not None:
            self._log.info("modbus.device_fault_cleared", code=old.code)

    def _stale_limit(self) -> float:
        """``stale_after_s``; while the charger is idle, two idle periods if longer."""
        if self._idle_poll_interval_s > self._poll_interval_s and self._pace.idle:
            return max(self._stale_after_s, 2.0 * self._idle_poll_interval_s)
        return self._stale_after_s

    def _fresh_value(self) -> R | None:
        """The latest value if it is younger than the stale limit (now, or when it was
        polled, whichever is longer), else ``None``."""
        value = self._value
        if value is None or self._task is None:
            return None
        if monotonic() - value.taken_at > max(self._value_limit, self._stale_limit()):
            return None
        return value

    def _published_value(self) -> R | None:
        """What snapshot methods return: fresh, and not withheld by a FAULT."""
        value = self._fresh_value()
        if value is None:
            return None
        if (
            self.withhold_on_fault
            and self._device_health is not None
            and self._device_health.state is HealthState.FAULT
        ):
            return None
        return value

    # -- the poll task -----------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            await self._poll_guarded()
            if self._first_attempt is not None:
                self._first_attempt.set()
            # the next slot of the shared tick grid: an overrun skips slots, never bursts
            await self._pace.sleep(self._poll_interval_s, self._idle_poll_interval_s)

    async def _poll_guarded(self) -> None:
        self._counters["polls"] += 1
        try:
            value = await self._poll()
        except ModbusLinkError as exc:
            self._counters["failures"] += 1
            self._last_error = f"{exc.reason}: {exc.detail}"
        except DeviceDataError as exc:
            self._counters["garbage"] += 1
            if not self._last_poll_garbage:
                self._log.warning("modbus.device_garbage", detail=str(exc))
            self._last_poll_garbage = True
            self._last_error = f"bad data: {exc}"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a driver bug must not kill the poll task
            self._counters["failures"] += 1
            self._last_error = f"internal error: {type(exc).__name__}: {exc}"
            self._log.exception("modbus.poll_crashed")
        else:
            self._counters["answers"] += 1
            self._value = value
            self._value_limit = self._stale_limit()
            self._last_poll_garbage = False
            if not self._answered_once:
                self._answered_once = True
                self._log.info("modbus.device_answering")
        self._update_comm_state()

    def _update_comm_state(self) -> None:
        fresh = self._fresh_value() is not None
        if not fresh and not self._comm_lost:
            self._comm_lost = True
            self._lost_since = monotonic()
            self._log.warning(
                "modbus.device_comm_lost",
                stale_after_s=self._stale_after_s,
                last_error=self._last_error,
            )
        elif fresh and self._comm_lost:
            self._comm_lost = False
            down = monotonic() - self._lost_since if self._lost_since is not None else None
            self._log.info(
                "modbus.device_comm_restored",
                down_s=round(down, 2) if down is not None else None,
            )

    # -- observation -------------------------------------------------------

    def health(self) -> Health:
        if self._task is None:
            return Health(HealthState.OFFLINE, None, "not started")
        if self._fresh_value() is None:
            if self._value is None:
                detail = "no valid answer yet"
            else:
                age = monotonic() - self._value.taken_at
                detail = f"no valid answer for {age:.1f} s"
            if self._last_error:
                detail += f" (last error: {self._last_error})"
            return Health(HealthState.STALE, "comm_timeout", detail)
        if self._device_health is not None:
            return self._device_health
        if self._last_poll_garbage:
            return Health(HealthState.DEGRADED, "garbage_frames", self._last_error)
        return Health()

    async def probe(self) -> dict[str, Any]:
        """Poll the device once, now, for the ``probe`` command (works without ``start()``).

        Returns ``{"ok": True, "reading": {...}, "elapsed_s": ...}`` or
        ``{"ok": False, "error": "<reason>: <detail>", "elapsed_s": ...}``; never
        raises for comm or data problems. Does not publish the probed value.
        """
        self._link.acquire()
        t0 = monotonic()
        try:
            value = await self._poll()
        except ModbusLinkError as exc:
            result: dict[str, Any] = {"ok": False, "error": f"{exc.reason}: {exc.detail}"}
        except DeviceDataError as exc:
            result = {"ok": False, "error": f"bad data: {exc}"}
        else:
            reading = asdict(value) if is_dataclass(value) else repr(value)
            result = {"ok": True, "reading": reading}
        finally:
            await self._link.release()
        result["elapsed_s"] = round(monotonic() - t0, 3)
        result.update({"device": self.name, "driver": self.driver, "unit_id": self._unit_id})
        return result

    def describe(self) -> dict[str, Any]:
        """Static and live facts for ``probe``/``status`` output (never does I/O)."""
        h = self.health()
        value = self._published_value()
        return {
            "name": self.name,
            "driver": self.driver,
            "link": self._link.name,
            "endpoint": self._link.endpoint,
            "unit_id": self._unit_id,
            "poll_interval_s": self._poll_interval_s,
            "idle_poll_interval_s": self._idle_poll_interval_s,
            "polling_now_s": self._pace.period(self._poll_interval_s, self._idle_poll_interval_s),
            "stale_after_s": self._stale_after_s,
            "running": self.running,
            "health": {"state": str(h.state), "code": h.code, "detail": h.detail},
            "last_error": self._last_error,
            "counters": dict(self._counters),
            "reading": asdict(value) if value is not None and is_dataclass(value) else None,
        }


class FreezeDetector:
    """Detects a meter that answers but whose values stopped changing while power flows.

    Rules (both only while ``|power_kw| >= power_threshold_kw``; below it a meter
    may legitimately stand still and both rules reset):

    * **energy**: neither energy register changed for ``window_s``;
    * **identical**: the raw register blocks were bit-identical in
      ``identical_polls`` consecutive answered polls.

    :meth:`update` returns a human-readable reason while either rule holds, else
    ``None``; the condition clears by itself as soon as the values move again.
    """

    def __init__(self, *, power_threshold_kw: float, window_s: float, identical_polls: int) -> None:
        self.power_threshold_kw = power_threshold_kw
        self.window_s = window_s
        self.identical_polls = identical_polls
        self._energy: tuple[float, float] | None = None
        self._energy_since: float | None = None
        self._raw: tuple[int, ...] | None = None
        self._identical = 0

    def reset(self) -> None:
        self._energy = None
        self._energy_since = None
        self._raw = None
        self._identical = 0

    def update(
        self,
        now: float,
        raw: tuple[int, ...],
        power_kw: float,
        energy_import_kwh: float,
        energy_export_kwh: float,
    ) -> str | None:
        if not math.isfinite(power_kw) or abs(power_kw) < self.power_threshold_kw:
            self.reset()
            return None
        reasons: list[str] = []
        energy = (energy_import_kwh, energy_export_kwh)
        if self._energy != energy or self._energy_since is None:
            self._energy = energy
            self._energy_since = now
        elif now - self._energy_since >= self.window_s:
            reasons.append(
                f"energy registers unchanged for {now - self._energy_since:.1f} s "
                f"at {power_kw:.2f} kW"
            )
        if raw == self._raw:
            self._identical += 1
        else:
            self._raw = raw
            self._identical = 1
        if self._identical >= self.identical_polls:
            reasons.append(f"raw registers identical in {self._identical} consecutive polls")
        return "; ".join(reasons) or None


class PolledMeter(PolledDevice[MeterReading]):
    """Base of the Modbus energy meters: link, polling and freeze detection set up from
    :class:`MeterOptions`; a subclass only decodes its register map in ``_poll``."""

    def __init__(self, name: str, options: MeterOptions, ctx: BuildContext) -> None:
        super().__init__(
            name,
            link=resolve_link(ctx, options.link, name),
            unit_id=options.unit_id,
            poll_interval_s=options.poll_interval_s,
            stale_after_s=options.stale_after_s,
            idle_poll_interval_s=options.idle_poll_interval_s,
            pace=ctx.pace,
        )
        self._freeze = FreezeDetector(
            power_threshold_kw=options.freeze_power_kw,
            window_s=options.freeze_window_s,
            identical_polls=options.freeze_identical_polls,
        )
