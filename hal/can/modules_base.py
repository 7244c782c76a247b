"""What every CAN power-module driver does, whatever the protocol.

:class:`PowerModuleGroup` implements :class:`hal.interfaces.PowerModules` on top of a
shared :class:`~hal.can.port.CanPort`. A protocol driver subclasses it and supplies
only frame building and decoding (the ``_*_frames``, ``_source`` and ``_decode``
hooks); this module owns the behaviour:

* **Module table** (:mod:`hal.can.module_table`). One entry per module address:
  online state, the time of its last valid answer, the latest values (each with its
  own receive time), status flags, condition, ratings, garbage-frame counter.
* **Comm loss.** A module is online while its last valid answer is at most
  ``comm_timeout_s`` old (configured > 10 s, the module's own watchdog, so the
  capability never drops while a module may still be delivering current). Its values
  are withheld (``None``) once they are older than that. The loss is logged once;
  while the output is on the lost module is commanded OFF and the current is
  redistributed over the remaining modules. It keeps being polled; its first valid
  answer brings it back (logged once), and while the output is on it gets its
  setpoint and ON again.
* **Current split** (:mod:`hal.can.current_split`). ``set_output(V, I)`` stores the
  request. The modules that share it ("active": online, ratings known, not being
  reset) each get a share proportional to their current limit ``min(Imax, P_rated /
  V)``; the total is clamped to the sum of those limits, the voltage to the common
  ``[Vmin, Vmax]`` of the active modules.
  Setpoints go out only while the output is on; they are re-sent every
  ``setpoint_refresh_s`` and whenever the active set changes.
* **Poll / keep-alive.** Every ``poll_interval_s`` each known module is polled
  (values + status), which doubles as the keep-alive every module needs to hear
  within its 10 s watchdog. The loop runs in the event loop: if the process hangs,
  the frames stop and the modules switch themselves off. While the charger is idle
  (:class:`~hal.tick.Pace`) and the output is off and settled (no OFF pending, no
  reset, every module off and past ``verify_grace_s`` since its last command), the
  period is ``idle_poll_interval_s`` (at most a third of ``comm_timeout_s``); the
  first poll after a connector gets busy goes out at once.
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

Why ~560 lines after the split into module_table/current_split/module_sender/
module_protocol/module_options/module_describe: what remains is the one driver lifecycle
(start, poll, command, stop) both protocols share.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable
from typing import Any

import can
import structlog

from hal.can.current_split import split_current
from hal.can.module_options import ModuleGroupOptions
from hal.can.module_protocol import ModuleProtocol
from hal.can.module_sender import GroupSender
from hal.can.module_table import (
    GROUP_SOURCE,
    Discovery,
    Frame,
    ModuleEntry,
    ModuleTable,
    Reading,
)
from hal.can.port import CanPort, FrameError
from hal.context import BuildContext
from hal.interfaces import (
    Health,
    HealthState,
    ModuleRatings,
    ModuleStatus,
    monotonic,
)
from hal.tasks import stop_task
from hal.tick import Wakeup

__all__ = [
    "GROUP_SOURCE",
    "Discovery",
    "Frame",
    "ModuleGroupOptions",
    "PowerModuleGroup",
    "Reading",
]

log = structlog.get_logger(__name__)

#: After the first discovery answer, wait this long for further answers.
DISCOVERY_SETTLE_S = 0.2


class PowerModuleGroup(ModuleProtocol):
    """A group of power modules on one CAN bus; see the module docstring for behaviour.

    Subclasses set ``protocol`` and implement the abstract hooks; nothing else.
    """

    def __init__(self, name: str, options: ModuleGroupOptions, ctx: BuildContext) -> None:
        if options.bus not in ctx.can_configs:
            raise ValueError(
                f"power modules '{name}': bus '{options.bus}' is not configured "
                f"(no [can.{options.bus}] section)"
            )
        self.name = name
        self._opts = options
        self._port: CanPort = ctx.can_port(options.bus)
        self._pace = ctx.pace
        self._poll_now = Wakeup()  # ends an idle-pace sleep: the output or a reset changed
        self._controller = self._port.config.controller_address
        self._discovery_mode = options.addresses is None
        self._table = ModuleTable(options.addresses or (), options.comm_timeout_s)
        self._modules: dict[int, ModuleEntry] = self._table.entries
        self._active: frozenset[int] = frozenset()
        self._on = False
        self._request: tuple[float, float] | None = None
        self._effective: tuple[float, float, dict[int, float]] | None = None
        self._off_pending = False
        self._started = False
        self._started_at = 0.0
        self._poll_task: asyncio.Task[None] | None = None
        self._first_poll = asyncio.Event()
        self._discovered = asyncio.Event()
        self._ratings_changed = asyncio.Event()
        self._last_refresh = -math.inf
        self._health_seen: Health = Health(HealthState.OFFLINE, None, "not started")
        self._log = log.bind(power_modules=name, protocol=self.protocol, bus=options.bus)
        self._tx = GroupSender(self._port, self._log)

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
            await self._tx.wait_sent(self._tx.send(self._off_all_frames(), urgent=True))
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
        self._tx.withdraw()
        if self._port.is_open:
            await self._tx.wait_sent(self._tx.send(self._off_all_frames(), urgent=True))
        self._port.unsubscribe(self.on_frame)
        self._port.remove_health_listener(self._on_port_health)
        self._started = False
        self._active = frozenset()
        await self._port.close()

    async def _discover(self) -> None:
        self._discovered.clear()
        self._tx.send(self._discovery_frames())
        try:
            await asyncio.wait_for(self._discovered.wait(), self._opts.answer_timeout_s)
        except TimeoutError:
            self._log.warning("power_modules_discovery_unanswered", group=self._opts.group)
            return
        await asyncio.sleep(min(DISCOVERY_SETTLE_S, self._opts.answer_timeout_s))

    async def _read_ratings(self) -> None:
        missing = [a for a, m in self._modules.items() if m.ratings is None]
        for address in missing:
            self._tx.send(self._ratings_frames(address))
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
        self._poll_now.set()  # back to the normal period for the verification
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
        self._tx.withdraw()
        ok = await self._tx.wait_sent(self._tx.send(self._off_all_frames(), urgent=True))
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
        self._poll_now.set()
        try:
            now = monotonic()
            off_sent = self._reconcile(now)
            module.command_at = now
            if address not in off_sent:
                await self._tx.wait_sent(self._send_off(address, now))
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
        return [self._table.status(m, now) for _, m in sorted(self._modules.items())]

    def measured_voltage(self) -> float | None:
        """Mean fresh output voltage of the online modules, ``None`` if there is none."""
        return self._table.measured_voltage(monotonic())

    def measured_current(self) -> float | None:
        """Sum of the fresh output currents of the online modules, ``None`` if none."""
        return self._table.measured_current(monotonic())

    def capability(self) -> ModuleRatings | None:
        """Common voltage range and summed current/power of the active modules."""
        return self._table.capability(monotonic())

    def health(self) -> Health:
        """The group's health, first match wins: OFFLINE (not started); FAULT
        transport_error (bus); then :meth:`ModuleTable.group_health
        <hal.can.module_table.ModuleTable.group_health>` (STALE comm_timeout, FAULT
        module_alarm, DEGRADED comm_timeout / module_alarm / garbage_frames, OK)."""
        if not self._started:
            return Health(HealthState.OFFLINE, None, "not started")
        port_health = self._port.health()
        if port_health.code == "transport_error":
            return port_health
        return self._table.group_health(
            group=self._opts.group,
            started_at=self._started_at,
            answer_timeout_s=self._opts.answer_timeout_s,
            poll_interval_s=self._opts.poll_interval_s,
            now=monotonic(),
        )

    def describe(self) -> dict[str, Any]:
        """Everything ``probe`` shows: protocol, bus, group, setpoints, per-module values."""
        from hal.can.module_describe import describe_group

        return describe_group(self)

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
        changed = m.apply(r, now)
        if changed:
            self._ratings_changed.set()
        if r.group is not None and r.group != m.reported_group:
            m.reported_group = r.group
            if r.group != self._opts.group:
                self._log.warning("power_module_group_mismatch", module=m.address,
                                  reported=r.group, configured=self._opts.group)
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
            self._modules[address] = ModuleEntry(address, command_at=now)
        self._log.info("power_modules_discovered", added=new, modules=sorted(self._modules))
        self._discovered.set()
        if self._started and self._port.is_open:
            for address in new:
                self._tx.send(self._off_frames(address), urgent=True)
                self._tx.send(self._ratings_frames(address))

    def _count_garbage(self, source: int, exc: FrameError) -> None:
        if self._table.count_garbage(source, monotonic()):
            # first garbage after a quiet period; the health shows the rest
            self._log.warning("power_module_garbage_frame",
                              module=None if source == GROUP_SOURCE else source,
                              reason=str(exc))

    # ------------------------------------------------------------------ poll loop

    async def _poll_loop(self) -> None:
        while True:
            try:
                self._poll_once(monotonic())
                if self._off_pending:
                    await self._resend_off()
                self._log_health_transition()
            except Exception:  # noqa: BLE001 -- the keep-alive must survive a bug in one cycle
                self._log.exception("power_modules_poll_failed")
            self._first_poll.set()
            await self._pace.sleep(self._opts.poll_interval_s, self._idle_period(monotonic()), self._poll_now)

    def _idle_period(self, now: float) -> float:
        """The poll period while the charger is idle: ``idle_poll_interval_s`` (at most a
        third of ``comm_timeout_s``) once the output is off and settled, else the normal one."""
        opts = self._opts
        settled_after = opts.verify_grace_s + opts.poll_interval_s
        unsettled = self._on or self._off_pending or any(
            m.resetting or m.output_on or now - m.command_at < settled_after for m in self._modules.values()
        )
        if unsettled:
            return opts.poll_interval_s
        return min(opts.idle_poll_interval_s, opts.comm_timeout_s / 3.0)

    def _poll_once(self, now: float) -> None:
        self._check_timeouts(now)
        self._reconcile(now)
        if self._discovery_mode and not self._modules:
            self._tx.send(self._discovery_frames())
        for address, m in sorted(self._modules.items()):
            if m.ratings is None:
                self._tx.send(self._ratings_frames(address))
            self._tx.send(self._poll_frames(address))
        self._verify_outputs(now)
        if self._on and now - self._last_refresh >= self._opts.setpoint_refresh_s:
            self._send_setpoints(now)
            for address in sorted(self._modules):
                if address in self._active:
                    self._send_on(address, None)
                else:
                    self._tx.send(self._off_frames(address))

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
        futures = self._tx.send(self._off_all_frames(), urgent=True)
        if futures and await self._tx.wait_sent(futures) and self._port.health().ok:
            self._off_pending = False
            self._log.info("power_modules_off_resent_after_transport_error")

    def _on_port_health(self, health: Health) -> None:
        if health.code == "transport_error":
            if self._on:
                self._log.error("power_modules_output_latched_off", reason=health.detail)
            self._on = False
            self._off_pending = True
            self._tx.withdraw()
        elif health.ok and self._off_pending and self._started:
            self._tx.send(self._off_all_frames(), urgent=True)

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
        ratings = {a: r for a in sorted(self._active) if (r := self._modules[a].ratings)}
        split = split_current(*self._request, ratings)
        self._effective = (split.voltage, split.total_current, split.shares)
        self._tx.track(
            None,
            self._tx.send(self._setpoint_frames(split.voltage, split.total_current, split.shares)),
        )

    # ------------------------------------------------------------------ helpers

    def _is_online(self, m: ModuleEntry, now: float) -> bool:
        return self._table.is_online(m, now)

    def _active_now(self, now: float) -> frozenset[int]:
        return self._table.active(now)

    def _off_all_frames(self) -> list[Frame]:
        frames: list[Frame] = []
        if self._discovery_mode:
            frames.extend(self._group_off_frames())
        for address in sorted(self._modules):
            frames.extend(self._off_frames(address))
        return frames

    def _send_on(self, address: int, now: float | None) -> None:
        """Queue ON for one module; a later OFF withdraws it if it is still queued."""
        self._tx.track(address, self._tx.send(self._on_frames(address)))
        if now is not None:
            self._modules[address].command_at = now

    def _send_off(self, address: int, now: float) -> list[asyncio.Future[bool]]:
        """Withdraw queued ON frames for one module and queue its OFF as urgent."""
        self._tx.withdraw(address)
        self._modules[address].command_at = now
        return self._tx.send(self._off_frames(address), urgent=True)
