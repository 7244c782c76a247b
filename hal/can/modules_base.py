"""What every CAN power-module driver does, whatever the protocol.

:class:`PowerModuleGroup` implements :class:`hal.interfaces.PowerModules` on top of a
shared :class:`~hal.can.port.CanPort`. A protocol driver subclasses it and supplies
only frame building and decoding (the ``_*_frames``, ``_source`` and ``_decode``
hooks); this module owns the behaviour:

* **Module table.** One entry per module address: online state, the time of its last
  valid answer, the latest voltage/current/temperature (each with its own receive
  time), status flags, ratings, garbage-frame counter.
* **Comm loss.** A module is online while its last valid answer is at most
  ``comm_timeout_s`` old (configured > 10 s, the module's own watchdog, so the
  capability never drops while a module may still be delivering current). Its values
  are withheld (``None``) once they are older than that. The loss is logged once;
  while the output is on the lost module is commanded OFF and the current is
  redistributed over the remaining modules. It keeps being polled; its first valid
  answer brings it back (logged once), and while the output is on it gets its
  setpoint and ON again.
* **Current split.** ``set_output(V, I)`` stores the request. The modules that share
  it ("active": online, ratings known, not being reset) each get a share proportional
  to their current limit ``min(Imax, P_rated / V)``; the total is clamped to the sum
  of those limits, the voltage to the common ``[Vmin, Vmax]`` of the active modules.
  Setpoints go out only while the output is on; they are re-sent every
  ``setpoint_refresh_s`` and whenever the active set changes.
* **Poll / keep-alive.** Every ``poll_interval_s`` each known module is polled
  (values + status), which doubles as the keep-alive every module needs to hear
  within its 10 s watchdog. The loop runs in the event loop: if the process hangs,
  the frames stop and the modules switch themselves off.
* **Output verification.** A module whose reported output state disagrees with the
  commanded one ``verify_grace_s`` after the command is re-commanded every cycle
  and flagged (``module_alarm``: DEGRADED when it stays off, FAULT when it stays on).
* **Transport errors.** When the port reports ``transport_error`` the output is
  latched off (``output_on()`` must be called again) and OFF is re-sent to every
  module as soon as the bus accepts frames again.
* **Bad input.** A frame that fails to decode (:class:`~hal.can.port.FrameError`) is
  counted against the module that sent it and discarded; it never updates a value.
  Any garbage within the last ``comm_timeout_s`` makes the group DEGRADED
  (``garbage_frames``).
"""

from __future__ import annotations

import abc
import asyncio
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import can
import structlog
from pydantic import Field, field_validator

from hal.can.port import CanPort, FrameError
from hal.config import StrictModel
from hal.context import BuildContext
from hal.interfaces import (
    OK,
    Health,
    HealthState,
    ModuleRatings,
    ModuleStatus,
    monotonic,
)
from hal.tasks import stop_task

log = structlog.get_logger(__name__)

#: ``_source`` result for a frame answered by the group (or all modules) as a whole.
GROUP_SOURCE = -1

#: Status flags that make a module (and the group) FAULT / module_alarm.
ALARM_FLAGS = frozenset(
    {
        "fault",
        "protection",
        "short_circuit",
        "discharge_abnormal",
        "over_temperature",
        "output_over_voltage",
        "dcdc_over_voltage",
        "load_sharing_alarm",
        "current_imbalance",
        "input_phase_lost",
        "input_unbalanced",
        "input_under_voltage",
        "input_over_voltage",
        "pfc_voltage_abnormal",
        "internal_comm_fault",
        "input_wiring_error",
        "input_mode_mismatch",
    }
)
#: Status flags that make a module DEGRADED / module_alarm (it still delivers power).
WARNING_FLAGS = frozenset({"fan_fault", "can_comm_fault", "duplicate_address"})

#: Bound on how long start()/stop()/output_off() wait for their frames to be sent.
SEND_WAIT_S = 5.0
#: After the first discovery answer, wait this long for further answers.
DISCOVERY_SETTLE_S = 0.2

Frame = tuple[int, bytes]  # (29-bit arbitration id, payload), as the codecs return them


@dataclass(frozen=True, slots=True)
class Reading:
    """What one valid frame told about one module (``None``: not in this frame)."""

    address: int
    voltage: float | None = None
    current: float | None = None
    temperature: float | None = None
    flags: frozenset[str] | None = None
    output_on: bool | None = None
    max_voltage: float | None = None
    min_voltage: float | None = None
    max_current: float | None = None
    rated_power_w: float | None = None
    group: int | None = None


@dataclass(frozen=True, slots=True)
class Discovery:
    """Module addresses found in our group."""

    addresses: tuple[int, ...]


class ModuleGroupOptions(StrictModel):
    """Options shared by every CAN power-module driver.

    ``comm_timeout_s`` must exceed the modules' own 10 s watchdog. Tests that need a
    short timeout build validated options and then override it with
    ``options.model_copy(update={"comm_timeout_s": 0.5})``, which skips validation.
    """

    max_address: ClassVar[int] = 0x3F

    bus: str = Field(..., min_length=1, description="name of the [can.<name>] bus")
    group: int = Field(0, ge=0, description="module group number")
    addresses: list[int] | None = Field(
        None, description="module addresses; None = discover the group's modules"
    )
    poll_interval_s: float = Field(
        1.0, ge=0.05, le=5.0, description="poll (and keep-alive) period per module"
    )
    comm_timeout_s: float = Field(
        15.0, gt=10.0, le=300.0, description="module lost after this long without valid answer"
    )
    setpoint_refresh_s: float = Field(
        5.0, ge=0.1, le=60.0, description="re-send setpoints and ON this often while on"
    )
    verify_grace_s: float = Field(
        2.0, ge=0.1, le=60.0, description="time a module gets to follow an on/off command"
    )
    reset_off_s: float = Field(
        5.0, ge=0.1, le=120.0, description="how long reset_module() keeps a module off"
    )
    answer_timeout_s: float = Field(
        1.0, ge=0.05, le=5.0, description="start() waits this long for discovery/ratings answers"
    )

    @field_validator("addresses")
    @classmethod
    def _check_addresses(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("addresses must not be empty (omit it to discover the modules)")
        if len(set(value)) != len(value):
            raise ValueError("addresses must be unique")
        for address in value:
            if not 0 <= address <= cls.max_address:
                raise ValueError(f"address {address} outside 0..{cls.max_address}")
        return sorted(value)


@dataclass(slots=True)
class _Module:
    address: int
    last_valid: float | None = None
    online: bool = False  # as last evaluated (drives the loss/recovery log lines)
    ever_online: bool = False
    voltage: float | None = None
    voltage_at: float = -math.inf
    current: float | None = None
    current_at: float = -math.inf
    temperature: float | None = None
    temperature_at: float = -math.inf
    flags: frozenset[str] = frozenset()
    flags_at: float = -math.inf
    output_on: bool | None = None
    output_at: float = -math.inf
    max_voltage: float | None = None
    min_voltage: float | None = None
    max_current: float | None = None
    rated_power_w: float | None = None
    reported_group: int | None = None
    garbage: int = 0
    last_garbage: float = -math.inf
    command_at: float = -math.inf  # last on/off command sent to it
    mismatch: str | None = None
    resetting: bool = False

    @property
    def ratings(self) -> ModuleRatings | None:
        if (
            self.max_voltage is None
            or self.min_voltage is None
            or self.max_current is None
            or self.rated_power_w is None
        ):
            return None
        return ModuleRatings(
            self.max_voltage, self.min_voltage, self.max_current, self.rated_power_w
        )


class PowerModuleGroup(abc.ABC):
    """A group of power modules on one CAN bus; see the module docstring for behaviour.

    Subclasses set ``protocol`` and implement the abstract hooks; nothing else.
    """

    protocol: ClassVar[str]

    def __init__(self, name: str, options: ModuleGroupOptions, ctx: BuildContext) -> None:
        if options.bus not in ctx.can_configs:
            raise ValueError(
                f"power modules '{name}': bus '{options.bus}' is not configured "
                f"(no [can.{options.bus}] section)"
            )
        self.name = name
        self._opts = options
        self._port: CanPort = ctx.can_port(options.bus)
        self._controller = self._port.config.controller_address
        self._discovery_mode = options.addresses is None
        self._modules: dict[int, _Module] = {a: _Module(a) for a in options.addresses or ()}
        self._active: frozenset[int] = frozenset()
        self._on = False
        self._request: tuple[float, float] | None = None
        self._effective: tuple[float, float, dict[int, float]] | None = None
        self._off_pending = False
        # queued ON/setpoint frames (address or None for group-wide), withdrawn by OFF
        self._enabling: list[tuple[int | None, asyncio.Future[bool]]] = []
        self._started = False
        self._started_at = 0.0
        self._poll_task: asyncio.Task[None] | None = None
        self._first_poll = asyncio.Event()
        self._discovered = asyncio.Event()
        self._ratings_changed = asyncio.Event()
        self._last_refresh = -math.inf
        self._garbage_total = 0
        self._last_garbage = -math.inf
        self._group_garbage_at = -math.inf
        self._health_seen: Health = Health(HealthState.OFFLINE, None, "not started")
        self._log = log.bind(power_modules=name, protocol=self.protocol, bus=options.bus)

    # ------------------------------------------------------------------ protocol hooks

    @abc.abstractmethod
    def _source(self, arbitration_id: int) -> int | None:
        """The module address a received frame comes from, :data:`GROUP_SOURCE` for an
        answer from our group as a whole, ``None`` for a frame that is not ours."""

    @abc.abstractmethod
    def _decode(self, source: int, arbitration_id: int, data: bytes | bytearray) -> (
        Reading | Discovery | None
    ):
        """Decode a frame from ``source``; FrameError on garbage, None when irrelevant.

        ``source`` may be an address not (yet) in the module table when discovering.
        """

    @abc.abstractmethod
    def _poll_frames(self, address: int) -> list[Frame]:
        """Requests that read one module's values and status (also the keep-alive)."""

    @abc.abstractmethod
    def _ratings_frames(self, address: int) -> list[Frame]:
        """Requests that read one module's ratings."""

    @abc.abstractmethod
    def _discovery_frames(self) -> list[Frame]:
        """Requests whose answers name the modules of our group."""

    @abc.abstractmethod
    def _on_frames(self, address: int) -> list[Frame]:
        """Switch one module's output on."""

    @abc.abstractmethod
    def _off_frames(self, address: int) -> list[Frame]:
        """Switch one module's output off."""

    @abc.abstractmethod
    def _group_off_frames(self) -> list[Frame]:
        """Switch every module of our group off (used when modules are discovered)."""

    @abc.abstractmethod
    def _setpoint_frames(
        self, voltage: float, total_current: float, shares: Mapping[int, float]
    ) -> list[Frame]:
        """Setpoints for the active modules: ``shares`` maps address -> amps and sums
        to ``total_current``."""

    def _describe_extra(self) -> dict[str, Any]:
        """Protocol-specific fields for :meth:`describe`."""
        return {}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """OFF to every assigned module, discover, read ratings, start polling.

        Returns after the first poll cycle has been queued, at most about
        ``2 * answer_timeout_s`` plus the time to send the frames. Raises
        :class:`~hal.can.port.CanPortError` if the bus cannot be opened.
        """
        if self._started:
            return
        await self._port.open()
        self._port.subscribe(self.on_frame)
        self._port.add_health_listener(self._on_port_health)
        self._started = True
        self._started_at = monotonic()
        self._first_poll.clear()
        try:
            self._on = False
            await self._wait_sent(self._send(self._off_all_frames(), urgent=True))
            now = monotonic()
            for m in self._modules.values():
                m.command_at = now
            if not self._modules:
                await self._discover()
            await self._read_ratings()
            self._poll_task = asyncio.get_running_loop().create_task(
                self._poll_loop(), name=f"power-modules-{self.name}"
            )
            await self._first_poll.wait()
        except BaseException:
            await self._teardown()
            raise
        self._log.info(
            "power_modules_started",
            modules=sorted(self._modules),
            rated=sorted(a for a, m in self._modules.items() if m.ratings is not None),
        )

    async def stop(self) -> None:
        """Command OFF to every module, stop polling and release the bus (idempotent)."""
        if not self._started:
            return
        await self._teardown()
        self._log.info("power_modules_stopped")

    async def _teardown(self) -> None:
        task, self._poll_task = self._poll_task, None
        await stop_task(task)
        self._on = False
        self._withdraw_enabling()
        if self._port.is_open:
            await self._wait_sent(self._send(self._off_all_frames(), urgent=True))
        self._port.unsubscribe(self.on_frame)
        self._port.remove_health_listener(self._on_port_health)
        self._started = False
        self._active = frozenset()
        await self._port.close()

    async def _discover(self) -> None:
        self._discovered.clear()
        self._send(self._discovery_frames())
        try:
            await asyncio.wait_for(self._discovered.wait(), self._opts.answer_timeout_s)
        except TimeoutError:
            self._log.warning("power_modules_discovery_unanswered", group=self._opts.group)
            return
        await asyncio.sleep(min(DISCOVERY_SETTLE_S, self._opts.answer_timeout_s))

    async def _read_ratings(self) -> None:
        missing = [a for a, m in self._modules.items() if m.ratings is None]
        for address in missing:
            self._send(self._ratings_frames(address))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._opts.answer_timeout_s
        while any(m.ratings is None for m in self._modules.values()):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._ratings_changed.clear()
            try:
                await asyncio.wait_for(self._ratings_changed.wait(), remaining)
            except TimeoutError:
                break

    # ------------------------------------------------------------------ commands

    async def set_output(self, voltage: float, current: float) -> None:
        """Set the group's output voltage and TOTAL current (clamped to the active
        modules' ratings). Takes effect on the wire only while the output is on.
        ValueError for negative or non-finite values."""
        if not (math.isfinite(voltage) and math.isfinite(current)) or voltage < 0 or current < 0:
            raise ValueError(f"invalid setpoint {voltage!r} V / {current!r} A")
        self._request = (float(voltage), float(current))
        if self._started and self._on:
            self._send_setpoints(monotonic())

    async def output_on(self) -> None:
        """Send the setpoint and ON to every active module.

        RuntimeError if not started, if ``set_output()`` was never called, or while
        the bus reports a transport error.
        """
        if not self._started:
            raise RuntimeError(f"power modules '{self.name}' are not started")
        if self._request is None:
            raise RuntimeError("call set_output() before output_on()")
        port_health = self._port.health()
        if port_health.code == "transport_error":
            raise RuntimeError(f"CAN bus '{self._opts.bus}' has a transport error")
        now = monotonic()
        self._reconcile(now)
        self._on = True
        self._off_pending = False
        self._send_setpoints(now)
        for address in sorted(self._active):
            self._send_on(address, now)
        self._log.info("power_modules_output_on", active=sorted(self._active))

    async def output_off(self) -> None:
        """Queue OFF for every module ahead of pending setpoints; return once handed
        to the bus (or failed: then health is transport_error and OFF is re-sent on
        recovery). Works before start() as a no-op on the wire."""
        self._on = False
        if not self._port.is_open:
            return
        now = monotonic()
        for m in self._modules.values():
            m.command_at = now
        self._withdraw_enabling()
        ok = await self._wait_sent(self._send(self._off_all_frames(), urgent=True))
        if not ok:
            self._off_pending = True
        self._log.info("power_modules_output_off", sent=ok)

    async def reset_module(self, address: int) -> None:
        """OFF to one module, wait ``reset_off_s``, then restore it: while the group is
        on it rejoins the current split and gets its setpoint and ON. The other modules
        carry its share meanwhile. ValueError for an address that is not ours."""
        module = self._modules.get(address)
        if module is None:
            raise ValueError(f"module {address} is not part of '{self.name}'")
        if not self._started:
            raise RuntimeError(f"power modules '{self.name}' are not started")
        self._log.info("power_module_reset", module=address, off_s=self._opts.reset_off_s)
        module.resetting = True
        try:
            now = monotonic()
            off_sent = self._reconcile(now)
            module.command_at = now
            if address not in off_sent:
                await self._wait_sent(self._send_off(address, now))
            await asyncio.sleep(self._opts.reset_off_s)
        finally:
            module.resetting = False
            if self._started:
                now = monotonic()
                module.command_at = now
                self._reconcile(now)

    # ------------------------------------------------------------------ snapshots

    def modules(self) -> list[ModuleStatus]:
        """Every known module by address; values of a stale module are ``None``."""
        now = monotonic()
        return [self._status(m, now) for _, m in sorted(self._modules.items())]

    def measured_voltage(self) -> float | None:
        """Mean fresh output voltage of the online modules, ``None`` if there is none."""
        now = monotonic()
        values = [
            m.voltage
            for m in self._modules.values()
            if m.voltage is not None and self._fresh(m.voltage_at, now) and self._is_online(m, now)
        ]
        return sum(values) / len(values) if values else None

    def measured_current(self) -> float | None:
        """Sum of the fresh output currents of the online modules, ``None`` if none."""
        now = monotonic()
        values = [
            m.current
            for m in self._modules.values()
            if m.current is not None and self._fresh(m.current_at, now) and self._is_online(m, now)
        ]
        return sum(values) if values else None

    def capability(self) -> ModuleRatings | None:
        """Common voltage range and summed current/power of the active modules."""
        ratings = [
            r
            for a in self._active_now(monotonic())
            if (r := self._modules[a].ratings) is not None
        ]
        if not ratings:
            return None
        return ModuleRatings(
            max_voltage=min(r.max_voltage for r in ratings),
            min_voltage=max(r.min_voltage for r in ratings),
            max_current=sum(r.max_current for r in ratings),
            rated_power_w=sum(r.rated_power_w for r in ratings),
        )

    def health(self) -> Health:
        """The group's health, first match wins: OFFLINE (not started); FAULT
        transport_error (bus); STALE comm_timeout (no module online); FAULT
        module_alarm (alarm flags, or output on although commanded off); DEGRADED
        comm_timeout (some module lost, or never answered a few polls after start);
        DEGRADED module_alarm / garbage_frames; OK. A module that has not answered
        yet since start counts as *lost* (``online`` capability) only after
        ``comm_timeout_s``."""
        if not self._started:
            return Health(HealthState.OFFLINE, None, "not started")
        port_health = self._port.health()
        if port_health.code == "transport_error":
            return port_health
        now = monotonic()
        if not self._modules:
            return Health(
                HealthState.STALE, "comm_timeout", f"no module found in group {self._opts.group}"
            )
        statuses = [(m, self._status(m, now)) for _, m in sorted(self._modules.items())]
        if not any(s.online for _, s in statuses):
            return Health(
                HealthState.STALE,
                "comm_timeout",
                f"no valid answer from any module within {self._opts.comm_timeout_s:g} s",
            )
        for _, s in statuses:
            if s.health.state is HealthState.FAULT:
                return Health(HealthState.FAULT, s.health.code,
                              f"module {s.address}: {s.health.detail}")
        lost = [s.address for m, s in statuses if not s.online and self._is_lost(m, now)]
        if lost:
            return Health(HealthState.DEGRADED, "comm_timeout",
                          f"module(s) {', '.join(map(str, lost))} lost")
        # a configured module that has not answered a few polls after start is worth
        # showing (a wiring check), even before it counts as lost
        silent = [
            s.address for m, s in statuses
            if not s.online and not m.ever_online
            and now - self._started_at > 2 * self._opts.answer_timeout_s + 2 * self._opts.poll_interval_s
        ]
        if silent:
            return Health(HealthState.DEGRADED, "comm_timeout",
                          f"module(s) {', '.join(map(str, silent))} not answering since start")
        for _, s in statuses:
            if s.health.state is HealthState.DEGRADED:
                return Health(HealthState.DEGRADED, s.health.code,
                              f"module {s.address}: {s.health.detail}")
        if self._fresh(self._group_garbage_at, now):
            return Health(HealthState.DEGRADED, "garbage_frames",
                          f"{self._garbage_total} garbage frame(s) in total")
        return OK

    def describe(self) -> dict[str, Any]:
        """Everything ``probe`` shows: protocol, bus, group, setpoints, per-module values."""
        now = monotonic()
        health = self.health()
        modules = []
        for status in self.modules():
            m = self._modules[status.address]
            modules.append(
                {
                    "address": status.address,
                    "online": status.online,
                    "active": status.address in self._active,
                    "voltage": status.voltage,
                    "current": status.current,
                    "temperature": status.temperature,
                    "output_on": status.output_on,
                    "flags": sorted(status.flags),
                    "ratings": None
                    if status.ratings is None
                    else {
                        "max_voltage": status.ratings.max_voltage,
                        "min_voltage": status.ratings.min_voltage,
                        "max_current": status.ratings.max_current,
                        "rated_power_w": status.ratings.rated_power_w,
                    },
                    "reported_group": m.reported_group,
                    "last_seen_s_ago": None
                    if m.last_valid is None
                    else round(now - m.last_valid, 3),
                    "garbage_frames": m.garbage,
                    "health": status.health.state.value,
                    "code": status.health.code,
                    "detail": status.health.detail,
                }
            )
        effective = self._effective
        cap = self.capability()
        return {
            "name": self.name,
            "protocol": self.protocol,
            "bus": self._opts.bus,
            "controller_address": f"0x{self._controller:02X}",
            "group": self._opts.group,
            "discovery": self._discovery_mode,
            "started": self._started,
            "output_on": self._on,
            "requested": None
            if self._request is None
            else {"voltage": self._request[0], "current": self._request[1]},
            "effective": None
            if effective is None
            else {
                "voltage": effective[0],
                "current": effective[1],
                "shares": {str(a): round(i, 3) for a, i in sorted(effective[2].items())},
            },
            "capability": None
            if cap is None
            else {
                "max_voltage": cap.max_voltage,
                "min_voltage": cap.min_voltage,
                "max_current": cap.max_current,
                "rated_power_w": cap.rated_power_w,
            },
            "measured_voltage": self.measured_voltage(),
            "measured_current": self.measured_current(),
            "health": health.state.value,
            "code": health.code,
            "detail": health.detail,
            "garbage_frames": self._garbage_total,
            "port": self._port.describe(),
            "modules": modules,
            **self._describe_extra(),
        }

    # ------------------------------------------------------------------ receive path

    def on_frame(self, msg: can.Message) -> None:
        """Receive path, called by the port for every data frame on the bus.

        Ignores frames that are not answers from our modules; decodes ours; counts and
        drops garbage; never raises. Public so benchmarks can feed it directly.
        """
        if not msg.is_extended_id or msg.is_remote_frame:
            return
        arbitration_id = msg.arbitration_id
        source = self._source(arbitration_id)
        if source is None:
            return
        try:
            decoded = self._decode(source, arbitration_id, msg.data)
        except FrameError as exc:
            if source == GROUP_SOURCE or source in self._modules:
                self._count_garbage(source, exc)
            return
        if decoded is None:
            return
        if isinstance(decoded, Reading):
            self._apply(decoded)
        elif self._discovery_mode:
            self._add_modules(decoded.addresses)

    def _apply(self, r: Reading) -> None:
        m = self._modules.get(r.address)
        if m is None:
            return
        now = monotonic()
        m.last_valid = now
        if r.voltage is not None:
            m.voltage, m.voltage_at = r.voltage, now
        if r.current is not None:
            m.current, m.current_at = r.current, now
        if r.temperature is not None:
            m.temperature, m.temperature_at = r.temperature, now
        if r.flags is not None:
            m.flags, m.flags_at = r.flags, now
        if r.output_on is not None:
            m.output_on, m.output_at = r.output_on, now
        if r.group is not None and r.group != m.reported_group:
            m.reported_group = r.group
            if r.group != self._opts.group:
                self._log.warning("power_module_group_mismatch", module=m.address,
                                  reported=r.group, configured=self._opts.group)
        changed = False
        if (
            r.max_voltage is not None
            or r.min_voltage is not None
            or r.max_current is not None
            or r.rated_power_w is not None
        ):
            had = m.ratings is not None
            if r.max_voltage is not None:
                m.max_voltage = r.max_voltage
            if r.min_voltage is not None:
                m.min_voltage = r.min_voltage
            if r.max_current is not None:
                m.max_current = r.max_current
            if r.rated_power_w is not None:
                m.rated_power_w = r.rated_power_w
            if not had and m.ratings is not None:
                changed = True
                self._ratings_changed.set()
        if not m.online:
            m.online = True
            changed = True
            if m.ever_online:
                self._log.info("power_module_recovered", module=m.address)
            m.ever_online = True
        if changed and self._poll_task is not None:  # during start() the first poll does it
            self._reconcile(now)

    def _add_modules(self, addresses: Iterable[int]) -> None:
        new = sorted(
            a
            for a in addresses
            if a not in self._modules and 0 <= a <= type(self._opts).max_address
        )
        if not new:
            return
        now = monotonic()
        for address in new:
            self._modules[address] = _Module(address, command_at=now)
        self._log.info("power_modules_discovered", added=new, modules=sorted(self._modules))
        self._discovered.set()
        if self._started and self._port.is_open:
            for address in new:
                self._send(self._off_frames(address), urgent=True)
                self._send(self._ratings_frames(address))

    def _count_garbage(self, source: int, exc: FrameError) -> None:
        now = monotonic()
        quiet_since = self._last_garbage
        self._garbage_total += 1
        self._last_garbage = now
        if source == GROUP_SOURCE:
            self._group_garbage_at = now
        else:
            m = self._modules[source]
            m.garbage += 1
            m.last_garbage = now
        if not self._fresh(quiet_since, now):
            # first garbage after a quiet period; the health shows the rest
            self._log.warning("power_module_garbage_frame",
                              module=None if source == GROUP_SOURCE else source,
                              reason=str(exc))

    # ------------------------------------------------------------------ poll loop

    async def _poll_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            try:
                self._poll_once(monotonic())
                if self._off_pending:
                    await self._resend_off()
                self._log_health_transition()
            except Exception:  # noqa: BLE001 -- the keep-alive must survive a bug in one cycle
                self._log.exception("power_modules_poll_failed")
            self._first_poll.set()
            await asyncio.sleep(max(0.0, self._opts.poll_interval_s - (loop.time() - began)))

    def _poll_once(self, now: float) -> None:
        self._check_timeouts(now)
        self._reconcile(now)
        if self._discovery_mode and not self._modules:
            self._send(self._discovery_frames())
        for address, m in sorted(self._modules.items()):
            if m.ratings is None:
                self._send(self._ratings_frames(address))
            self._send(self._poll_frames(address))
        self._verify_outputs(now)
        if self._on and now - self._last_refresh >= self._opts.setpoint_refresh_s:
            self._send_setpoints(now)
            for address in sorted(self._modules):
                if address in self._active:
                    self._send_on(address, None)
                else:
                    self._send(self._off_frames(address))

    def _check_timeouts(self, now: float) -> None:
        for m in self._modules.values():
            if m.online and not self._is_online(m, now):
                m.online = False
                self._log.warning("power_module_lost", module=m.address,
                                  timeout_s=self._opts.comm_timeout_s)

    def _verify_outputs(self, now: float) -> None:
        grace = self._opts.verify_grace_s
        for address, m in self._modules.items():
            if m.output_on is None or m.resetting or not self._is_online(m, now):
                continue
            expected = self._on and address in self._active
            if m.output_on == expected:
                if m.mismatch is not None:
                    self._log.info("power_module_output_confirmed", module=address,
                                   output_on=expected)
                    m.mismatch = None
                continue
            if now - m.command_at < grace or m.output_at <= m.command_at:
                continue  # give it time; only judge a status newer than the command
            detail = (
                "output stays off although commanded on"
                if expected
                else "output stays on although commanded off"
            )
            if m.mismatch != detail:
                self._log.warning("power_module_output_mismatch", module=address, detail=detail)
                m.mismatch = detail
            if expected:
                self._send_on(address, now)
            else:
                self._send_off(address, now)

    async def _resend_off(self) -> None:
        futures = self._send(self._off_all_frames(), urgent=True)
        if futures and await self._wait_sent(futures) and self._port.health().ok:
            self._off_pending = False
            self._log.info("power_modules_off_resent_after_transport_error")

    def _on_port_health(self, health: Health) -> None:
        if health.code == "transport_error":
            if self._on:
                self._log.error("power_modules_output_latched_off", reason=health.detail)
            self._on = False
            self._off_pending = True
            self._withdraw_enabling()
        elif health.ok and self._off_pending and self._started:
            self._send(self._off_all_frames(), urgent=True)

    def _log_health_transition(self) -> None:
        health = self.health()
        if health == self._health_seen:
            return
        self._health_seen = health
        if health.ok:
            self._log.info("power_modules_health_ok")
        else:
            self._log.warning("power_modules_health", state=health.state.value,
                              code=health.code, detail=health.detail)

    # ------------------------------------------------------------------ sharing

    def _reconcile(self, now: float) -> set[int]:
        """Bring the active set up to date; while on, OFF the modules that left it,
        redistribute, and switch on the ones that joined. Returns the addresses OFF
        was sent to."""
        active = self._active_now(now)
        if active == self._active:
            return set()
        added, removed = active - self._active, self._active - active
        self._active = active
        self._log.info("power_modules_active_changed", active=sorted(active),
                       added=sorted(added), removed=sorted(removed))
        off_sent: set[int] = set()
        if self._on:
            for address in sorted(removed):
                self._send_off(address, now)
                off_sent.add(address)
            self._send_setpoints(now)
            for address in sorted(added):
                self._send_on(address, now)
        return off_sent

    def _send_setpoints(self, now: float) -> None:
        self._last_refresh = now
        if self._request is None or not self._active:
            self._effective = None
            return
        voltage, current = self._request
        rated = [(a, r) for a in sorted(self._active) if (r := self._modules[a].ratings)]
        v_max = min(r.max_voltage for _, r in rated)
        v_min = max(r.min_voltage for _, r in rated)
        v = min(max(voltage, v_min), v_max)
        limits = {
            a: min(r.max_current, r.rated_power_w / v) if v > 0 else r.max_current
            for a, r in rated
        }
        capacity = sum(limits.values())
        total = min(current, capacity)
        shares = {a: total * lim / capacity if capacity > 0 else 0.0 for a, lim in limits.items()}
        self._effective = (v, total, shares)
        self._track_enabling(None, self._send(self._setpoint_frames(v, total, shares)))

    # ------------------------------------------------------------------ helpers

    def _fresh(self, stamp: float, now: float) -> bool:
        return now - stamp <= self._opts.comm_timeout_s

    def _is_online(self, m: _Module, now: float) -> bool:
        return m.last_valid is not None and now - m.last_valid <= self._opts.comm_timeout_s

    def _is_lost(self, m: _Module, now: float) -> bool:
        """Offline and no longer merely 'not answered yet since start'."""
        return m.ever_online or now - self._started_at > self._opts.comm_timeout_s

    def _active_now(self, now: float) -> frozenset[int]:
        return frozenset(
            a
            for a, m in self._modules.items()
            if not m.resetting and m.ratings is not None and self._is_online(m, now)
        )

    def _status(self, m: _Module, now: float) -> ModuleStatus:
        online = self._is_online(m, now)
        if not online:
            return ModuleStatus(
                address=m.address,
                online=False,
                ratings=m.ratings,
                last_seen=m.last_valid,
                health=Health(
                    HealthState.STALE,
                    "comm_timeout",
                    "no valid answer yet" if m.last_valid is None
                    else f"no valid answer for {now - m.last_valid:.1f} s",
                ),
            )
        return ModuleStatus(
            address=m.address,
            online=True,
            voltage=m.voltage if self._fresh(m.voltage_at, now) else None,
            current=m.current if self._fresh(m.current_at, now) else None,
            temperature=m.temperature if self._fresh(m.temperature_at, now) else None,
            output_on=m.output_on if self._fresh(m.output_at, now) else None,
            flags=m.flags if self._fresh(m.flags_at, now) else frozenset(),
            ratings=m.ratings,
            last_seen=m.last_valid,
            health=self._module_health(m, now),
        )

    def _module_health(self, m: _Module, now: float) -> Health:
        flags = m.flags if self._fresh(m.flags_at, now) else frozenset()
        alarms = flags & ALARM_FLAGS
        if alarms:
            return Health(HealthState.FAULT, "module_alarm", ", ".join(sorted(alarms)))
        if m.mismatch is not None and "stays on" in m.mismatch:
            return Health(HealthState.FAULT, "module_alarm", m.mismatch)
        warnings = flags & WARNING_FLAGS
        if warnings:
            return Health(HealthState.DEGRADED, "module_alarm", ", ".join(sorted(warnings)))
        if m.mismatch is not None:
            return Health(HealthState.DEGRADED, "module_alarm", m.mismatch)
        if self._fresh(m.last_garbage, now):
            return Health(HealthState.DEGRADED, "garbage_frames",
                          f"{m.garbage} garbage frame(s) in total")
        return OK

    def _off_all_frames(self) -> list[Frame]:
        frames: list[Frame] = []
        if self._discovery_mode:
            frames.extend(self._group_off_frames())
        for address in sorted(self._modules):
            frames.extend(self._off_frames(address))
        return frames

    def _send_on(self, address: int, now: float | None) -> None:
        """Queue ON for one module; a later OFF withdraws it if it is still queued."""
        self._track_enabling(address, self._send(self._on_frames(address)))
        if now is not None:
            self._modules[address].command_at = now

    def _send_off(self, address: int, now: float) -> list[asyncio.Future[bool]]:
        """Withdraw queued ON frames for one module and queue its OFF as urgent."""
        self._withdraw_enabling(address)
        self._modules[address].command_at = now
        return self._send(self._off_frames(address), urgent=True)

    def _track_enabling(self, address: int | None, futures: list[asyncio.Future[bool]]) -> None:
        self._enabling = [(a, f) for a, f in self._enabling if not f.done()]
        self._enabling.extend((address, f) for f in futures)

    def _withdraw_enabling(self, address: int | None = None) -> None:
        """Cancel queued ON/setpoint frames: one module's ON frames, or (None) all."""
        keep: list[tuple[int | None, asyncio.Future[bool]]] = []
        for a, future in self._enabling:
            if address is None or a == address:
                future.cancel()
            elif not future.done():
                keep.append((a, future))
        self._enabling = keep

    def _send(self, frames: Sequence[Frame], urgent: bool = False) -> list[asyncio.Future[bool]]:
        if not self._port.is_open:
            return []
        return [
            self._port.send(
                can.Message(arbitration_id=aid, data=data, is_extended_id=True), urgent=urgent
            )
            for aid, data in frames
        ]

    async def _wait_sent(self, futures: list[asyncio.Future[bool]]) -> bool:
        """True if every frame was handed to the bus within :data:`SEND_WAIT_S`."""
        if not futures:
            return True
        try:
            results = await asyncio.wait_for(asyncio.gather(*futures), SEND_WAIT_S)
        except TimeoutError:
            self._log.error("power_modules_send_timeout", frames=len(futures))
            return False
        return all(results)
