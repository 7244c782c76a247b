"""One connector's state machine: IEC 61851 pilot states feeding a session machine.

States: ``idle`` -> ``vehicle_connected`` -> ``preparing`` -> ``charging`` /
``discharging`` -> ``finishing`` -> back; ``fault`` while a blocking fault is
active; ``unavailable`` while a service operation (self test) owns the hardware.

Safety rules enforced here, none of which depends on the network:

* Contactors close only after (DC) the cable check passed -- output at the check
  voltage, optional IMD self test, N fresh insulation readings above the fault
  limit after a grace period -- and the output is back below the safe voltage, and
  only if the mirror contact confirms "open" right before closing.
* Every exit from energy transfer (normal stop, abort, fault, unplug, cancellation)
  goes through :meth:`Connector._shutdown_output`: modules OFF, wait for the current
  to fall (bounded), contactor open confirmed by the mirror (a weld raises F-0101).
* The control loop only reads HAL snapshots and awaits HAL actions; everything it
  reports is a typed event (:mod:`agent.charging.events`) published to its listeners,
  which must not block. Readers outside the core use :meth:`Connector.snapshot`.

The parts with a job of their own live beside it: the cable check
(:mod:`~agent.charging.cable_check`), continuous fault supervision
(:mod:`~agent.charging.supervision`), setpoint arithmetic (:mod:`~agent.charging.setpoints`).
Why this module is still ~700 lines: it is one state machine, and its transitions
(preparation, session step, stop, suspend, resume) are kept in one file so the safety
order of every path -- output off before the contactor opens, mirror confirmed before
it closes -- reads top to bottom in one place.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Sequence

import structlog

from agent.charging.config import ChargingSection, ConnectorConfig
from agent.charging.faults import FaultBoard
from agent.charging.events import (
    CheckpointAbandoned,
    CommandOutcome,
    ConnectorEvent,
    IsolationMeasured,
    ConnectorListener,
    ConnectorState,
    SessionFinished,
    SessionProgress,
    SessionStarted,
    SessionSuspended,
    SetpointChanged,
    StateChanged,
    VehicleEvent,
)
from agent.charging.session import CLEAN_STOPS, Checkpoint, Session, SessionRequest, billed_energy
from agent.charging.cable_check import cable_check
from agent.charging.errors import Rejected, SessionAbort
from agent.charging.hardware import ConnectorHardware
from agent.charging.setpoints import ac_duty
from agent.charging.supervision import ConnectorSupervisor
from agent.charging.view import ConnectorSnapshot, SessionView
from agent.utctime import to_iso, utc_now
from hal.tick import Wakeup
from hal.interfaces import (
    ContactorError,
    PilotState,
    VehicleStatus,
)

log = structlog.get_logger(__name__)

#: re-exported: callers address the charging core through this module
__all__ = ["Connector", "ConnectorHardware", "ConnectorListener", "ConnectorState", "Rejected", "SessionAbort"]

DEFAULT_V2G_MIN_SOC = 20  # typical BMS floor (fault dictionary, F-0702)


class Connector:
    """State machine of one connector. Run :meth:`run` as a task; call the request methods."""

    def __init__(
        self,
        config: ConnectorConfig,
        hardware: ConnectorHardware,
        policy: ChargingSection,
        faults: FaultBoard,
        listeners: ConnectorListener | Sequence[ConnectorListener] = (),
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.id = config.id
        self.hw = hardware
        self.policy = policy
        self.faults = faults
        self.listeners: list[ConnectorListener] = (
            list(listeners) if isinstance(listeners, (list, tuple)) else [listeners]  # type: ignore[list-item]
        )
        self.clock = clock
        self.supervisor = ConnectorSupervisor(self.id, hardware, policy, faults, config.outlet_sensor, clock)
        self.state = ConnectorState.IDLE
        self.session: Session | None = None
        self.limits: dict[str, float] = {}  # source -> kW (set_power_limit, schedule, ...)
        self._pending: SessionRequest | None = None
        self._stop: tuple[str, str | None] | None = None  # (reason, command_id)
        self._unavailable_reason: str | None = None
        self._plugged = False
        self._current_setpoint = 0.0
        self._last_setpoint_sent = (-1.0, -1.0, 0.0)
        self._last_checkpoint = 0.0
        self._suspending = False
        self._resume: tuple[Checkpoint, float] | None = None
        self.last_isolation_kohm: float | None = None
        self.last_isolation_at: str | None = None
        self._stopping = asyncio.Event()
        self._wake = Wakeup()
        self.last_error: str | None = None
        self.ticks = 0  # control-loop iterations: the systemd watchdog's progress signal

    # ------------------------------------------------------------------ read-only view

    def snapshot(self) -> ConnectorSnapshot:
        """One consistent, immutable picture of this connector (see :mod:`agent.charging.view`)."""
        s = self.session
        thermal, sensor = self.hw.thermal, self.config.outlet_sensor
        outlet = thermal.temperatures().get(sensor) if thermal is not None and sensor else None
        vehicle = self.hw.vehicle.status()
        return ConnectorSnapshot(
            id=self.id,
            kind=self.config.kind,
            state=self.state,
            plugged=vehicle.plugged,
            meter=self.hw.meter.reading(),
            vehicle=vehicle,
            contactor=self.hw.contactor.status(),
            outlet_temperature=outlet,
            session=None
            if s is None
            else SessionView(
                record_id=s.record_id,
                mode=s.request.mode,
                start_time=s.start_time,
                energy_kwh=s.energy_kwh,
                max_power_kw=s.max_power_kw,
                soc_start=s.soc_start,
                transaction_id=s.request.transaction_id,
            ),
            limit_kw=self.effective_limit_kw(),
            unavailable_reason=self._unavailable_reason,
            last_error=self.last_error,
            last_isolation_kohm=self.last_isolation_kohm,
            last_isolation_at=self.last_isolation_at,
        )

    # ------------------------------------------------------------------ listeners

    def add_listener(self, listener: ConnectorListener) -> None:
        """Subscribe ``listener`` to this connector's events (from the next event on)."""
        self.listeners.append(listener)

    def remove_listener(self, listener: ConnectorListener) -> None:
        if listener in self.listeners:
            self.listeners.remove(listener)

    def _publish(self, event: ConnectorEvent) -> None:
        """Hand ``event`` to every listener; one that raises is logged and skipped."""
        for listener in list(self.listeners):
            try:
                listener.connector_event(event)
            except Exception:
                log.exception("connector_listener_failed", connector=self.id, listener=type(listener).__name__, kind=type(event).__name__)

    def _command(self, command_id: str, status: str, message: str | None = None, details: dict[str, Any] | None = None) -> None:
        self._publish(CommandOutcome(command_id, status, message, details))

    # ------------------------------------------------------------------ requests

    @property
    def is_dc(self) -> bool:
        return self.config.kind == "dc"

    @property
    def unavailable_reason(self) -> str | None:
        return self._unavailable_reason

    @property
    def supports_discharge(self) -> bool:
        return self.is_dc and self.hw.bidirectional is not None

    def in_session(self) -> bool:
        return self.session is not None or self.state in (ConnectorState.PREPARING, ConnectorState.FINISHING)

    def busy(self) -> bool:
        """In a session, or a start is armed and not yet picked up (``request_stop`` cancels it)."""
        return self.in_session() or self._pending is not None

    def request_start(self, request: SessionRequest) -> None:
        """Arm a session. Raises :class:`Rejected` (with the reason) when it cannot start now."""
        if self.state is ConnectorState.UNAVAILABLE:
            raise Rejected(f"connector {self.id} is unavailable ({self._unavailable_reason})")
        blocking = self.faults.blocking(self.id)
        if self.state is ConnectorState.FAULT or blocking:
            ids = ", ".join(sorted({f.fault_id for f in blocking})) or "fault"
            raise Rejected(f"connector {self.id} is faulted ({ids})")
        if self.in_session() or self._pending is not None:
            raise Rejected(f"connector {self.id} already has a session")
        if request.mode == "discharge" and not self.supports_discharge:
            raise Rejected(f"connector {self.id} is not V2G-capable (no bidirectional stage)")
        if not self._plugged:
            raise Rejected(f"no vehicle connected to connector {self.id}")
        self._pending = request
        self._wake.set()

    def request_stop(self, reason: str, command_id: str | None = None) -> None:
        """Stop the session (or cancel an armed one). Raises :class:`Rejected` if there is none."""
        if self._pending is not None and self.state is ConnectorState.VEHICLE_CONNECTED:
            pending, self._pending = self._pending, None
            if pending.command_id:
                self._command(pending.command_id, "failed", "pre-empted by stop_charging")
            if command_id:
                self._command(command_id, "completed", "armed session cancelled")
            return
        if not self.in_session():
            raise Rejected(f"no active session on connector {self.id}")
        self._stop = (reason, command_id)
        self._wake.set()

    def set_limit(self, source: str, kw: float | None) -> None:
        """Set or remove (``None``) a power limit from one source; the lowest wins."""
        if kw is None:
            self.limits.pop(source, None)
        else:
            self.limits[source] = max(0.0, kw)

    def effective_limit_kw(self) -> float:
        limit = self.config.max_power_kw
        for kw in self.limits.values():
            limit = min(limit, kw)
        if self.session is not None and self.session.request.power_kw is not None:
            limit = min(limit, self.session.request.power_kw)
        if self.faults.is_active("F-0203", self.id):
            limit *= self.policy.connector_derate_factor
        return limit

    async def set_unavailable(self, reason: str | None) -> None:
        """Take the connector out of service (``reason``) or back (``None``). Refused during a session."""
        if reason is not None and self.in_session():
            raise Rejected(f"connector {self.id} has an active session")
        self._unavailable_reason = reason
        if reason is not None:
            self._set_state(ConnectorState.UNAVAILABLE)
        elif self.state is ConnectorState.UNAVAILABLE:
            self._set_state(ConnectorState.VEHICLE_CONNECTED if self._plugged else ConnectorState.IDLE)

    # ------------------------------------------------------------------ maintenance of its hardware

    def has_module(self, address: int) -> bool:
        """True if power module ``address`` belongs to this connector's stack."""
        return self.hw.modules is not None and any(m.address == address for m in self.hw.modules.modules())

    def check_module_reset(self, address: int) -> None:
        """Raise :class:`Rejected` when resetting module ``address`` would starve the running session.

        Allowed when no session runs, when under 0.5 A flows, or when the other online
        modules' rated current covers what flows now.
        """
        modules = self.hw.modules
        if modules is None or not self.has_module(address):
            raise Rejected(f"params.module: no power module with address {address} on connector {self.id}")
        if self.session is None:
            return
        others = [m for m in modules.modules() if m.online and m.address != address]
        current = abs(modules.measured_current() or 0.0)
        spare = sum((m.ratings.max_current if m.ratings else 0.0) for m in others)
        if current > 0.5 and spare < current:
            raise Rejected(
                f"module {address} carries the session on connector {self.id}: the other modules "
                f"can take {spare:.0f} A of the {current:.0f} A flowing"
            )

    async def reset_power_module(self, address: int) -> None:
        """Reset one module of this connector (after :meth:`check_module_reset`); the driver's errors propagate."""
        self.check_module_reset(address)
        assert self.hw.modules is not None
        await self.hw.modules.reset_module(address)

    def reset_contactor_cycles(self) -> int:
        """Zero the contactor's cycle counter; return the count it had."""
        previous = self.hw.contactor.status().cycles
        self.hw.contactor.reset_cycles()
        return previous

    # ------------------------------------------------------------------ main loop

    async def run(self) -> None:
        """Control loop; returns after :meth:`shutdown` with the output safe."""
        await self._shutdown_output(initial=True)
        try:
            while not (self._stopping.is_set() and self.session is None):
                self._report_pace()
                try:
                    await self._step()
                except SessionAbort as abort:
                    await self._end_session(abort.stop_reason, abort.message, abort.fault_id, abort.details)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a bug must never leave the output live
                    log.exception("connector_loop_error", connector=self.id)
                    self.last_error = repr(exc)
                    await self._end_session("fault", f"internal error: {exc!r}", None, {})
                await self._sleep_tick()
                self.ticks += 1
        finally:
            await asyncio.shield(self._shutdown_output())

    async def shutdown(self, reason: str = "shutdown", *, suspend: bool = False) -> None:
        """Make :meth:`run` return with the output safe.

        A running session is stopped first: closed with its record (``suspend=False``),
        or suspended (``suspend=True``): energy transfer stops but the session stays
        open in the store, so a restart can :meth:`resume` it under the same record.
        An armed, not yet started session fails.
        """
        self._suspending = suspend
        if self.in_session() and self._stop is None:  # includes a preparation under way
            self._stop = (reason, None)
        if self._pending is not None:
            self._fail_pending("agent shutting down")
        self._stopping.set()
        self._wake.set()

    def resume(self, checkpoint: Checkpoint, wait_s: float) -> None:
        """Resume a session suspended at the last shutdown, if its vehicle is still here.

        Within ``wait_s`` the connector must see the vehicle plugged in; then the session
        is prepared again (cable check, contactor confirmed) and continues under the same
        ``record_id``. Otherwise, or when preparation fails, the session is closed from its
        checkpoint (exactly one record).
        """
        self._resume = (checkpoint, self.clock() + wait_s)
        self._wake.set()

    def _idle(self) -> bool:
        """No session, no pending start or resume, and the contactor coil off."""
        return (
            self.session is None
            and self._pending is None
            and self._resume is None
            and not self.hw.contactor.status().coil_energised
        )

    def _report_pace(self) -> bool:
        """Tell the shared pace whether this connector is busy (before each step, so the
        pollers are back at their normal period when a session is being prepared)."""
        idle = self._idle()
        if self.hw.pace is not None:
            self.hw.pace.report(self.id, not idle)
        return idle

    async def _sleep_tick(self) -> None:
        # on the shared tick grid: every connector (and the pilots) wake together. The
        # control tick is tick_s whenever energy could flow or is being prepared; with no
        # session, no pending start and the contactor open, idle_tick_s is enough (a
        # command, a resume or shutdown wakes the loop at once)
        idle = self._report_pace()
        await self._wake.wait_for_tick(max(self.policy.idle_tick_s, self.policy.tick_s) if idle else self.policy.tick_s)
        self._wake.clear()

    def _set_state(self, state: ConnectorState) -> None:
        if state is not self.state:
            log.info("connector_state", connector=self.id, old=self.state.value, new=state.value)
            old, self.state = self.state, state
            self._publish(StateChanged(self.id, old, state))

    async def _step(self) -> None:
        status = self.hw.vehicle.status()
        self.supervisor.evaluate(status)
        self._track_plug(status)
        if self.state is ConnectorState.UNAVAILABLE:
            return
        if self.session is not None:
            await self._session_step(status)
            return
        if self._resume is not None:
            self._step_resume()
        if self.faults.blocking(self.id):
            if self._pending is not None:
                self._fail_pending("connector faulted: " + ", ".join(f.fault_id for f in self.faults.blocking(self.id)))
            self._set_state(ConnectorState.FAULT)
            return
        self._set_state(ConnectorState.VEHICLE_CONNECTED if self._plugged else ConnectorState.IDLE)
        if not self._plugged:
            if self._pending is not None:
                self._fail_pending("vehicle unplugged before the session started")
            return
        if self._pending is None and self.policy.autostart and status.ev_ready:
            self._pending = SessionRequest(start_reason="local_auth")
        if self._pending is not None:
            request, self._pending = self._pending, None
            await self._start_session(request)

    def resume_checkpoint(self) -> Checkpoint | None:
        """The checkpoint of a session waiting to be resumed, if any."""
        if self._resume is not None:
            return self._resume[0]
        if self._pending is not None and self._pending.resume is not None:
            return self._pending.resume
        return None

    def _step_resume(self) -> None:
        assert self._resume is not None
        checkpoint, deadline = self._resume
        if self._plugged and self._pending is None and not self.faults.blocking(self.id):
            self._resume = None
            self._pending = SessionRequest(
                mode=checkpoint.get("mode", "charge"),
                start_reason=checkpoint.get("start_reason", "remote_start"),
                command_id=checkpoint.get("command_id"),
                transaction_id=checkpoint.get("transaction_id"),
                resume=checkpoint,
            )
            log.info("session_resuming", connector=self.id, record_id=checkpoint.get("record_id"))
        elif self.clock() >= deadline:
            self._resume = None
            reason = "shutdown" if self._plugged else "ev_disconnected"
            self._publish(CheckpointAbandoned(self.id, checkpoint, reason, "suspended session not resumed"))

    def _fail_pending(self, message: str) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and pending.command_id:
            self._command(pending.command_id, "failed", message)

    def _track_plug(self, status: VehicleStatus) -> None:
        plugged = status.plugged
        if plugged and not self._plugged:
            self._plugged = True
            self.faults.clear("F-0805", self.id)
            self._publish(VehicleEvent(self.id, "plug_in", {"vehicle_connected": True}))
        elif not plugged and self._plugged and status.pilot is PilotState.A:
            self._plugged = False
            self._publish(VehicleEvent(self.id, "plug_out", {"vehicle_connected": False}))
            self.supervisor.clear_latched()

    # ------------------------------------------------------------------ faults

    # ------------------------------------------------------------------ preparing

    async def _start_session(self, request: SessionRequest) -> None:
        self._set_state(ConnectorState.PREPARING)
        self._stop = None
        try:
            await self._prepare(request)
        except SessionAbort as abort:
            await self._shutdown_output()
            if abort.fault_id:
                self.supervisor.latch(abort.fault_id, abort.details)
            if self._stop is not None and self._stop[1]:
                self._command(self._stop[1], "completed", "armed session cancelled")
            self._stop = None
            if request.resume is not None:
                self._publish(CheckpointAbandoned(self.id, request.resume, abort.stop_reason, abort.message))
            elif request.command_id:
                self._command(request.command_id, "failed", abort.message)
            log.warning("session_not_started", connector=self.id, reason=abort.message)
            self._set_state(ConnectorState.VEHICLE_CONNECTED if self._plugged else ConnectorState.IDLE)
            return
        except BaseException:
            await asyncio.shield(self._shutdown_output())
            raise
        reading = self.hw.meter.reading()
        assert reading is not None  # checked in _prepare
        status = self.hw.vehicle.status()
        discharge = request.mode == "discharge"
        if request.resume is not None:
            self.session = Session.from_checkpoint(request.resume, request, self.clock())
        else:
            self.session = Session(
                connector_id=self.id,
                request=request,
                start_time=utc_now(),
                started_mono=self.clock(),
                meter_start=reading.energy_export_kwh if discharge else reading.energy_import_kwh,
                soc_start=status.soc,
                vin=status.vin,
            )
        self._last_checkpoint = self.clock()
        self._set_state(ConnectorState.DISCHARGING if discharge else ConnectorState.CHARGING)
        self._publish(SessionStarted(self.session))
        self._publish(VehicleEvent(self.id, "start", {"reason": request.start_reason}))
        log.info("session_started", connector=self.id, record_id=self.session.record_id, mode=request.mode, meter_start=self.session.meter_start)

    def _abort_check(self, allow_pilot: tuple[PilotState, ...]) -> VehicleStatus:
        """Raise :class:`SessionAbort` when preparation must not go on."""
        status = self.hw.vehicle.status()
        if self._stop is not None:
            raise SessionAbort(self._stop[0], "stopped before charging started")
        if status.pilot is PilotState.A:
            raise SessionAbort("ev_disconnected", "vehicle unplugged during preparation")
        if status.pilot not in allow_pilot:
            raise SessionAbort("fault", f"control pilot in state {status.pilot.value}", "F-0801", pilot=status.pilot.value)
        self.supervisor.abort_on_blocking_faults()
        return status

    async def _wait_for(
        self, condition: Callable[[], bool], timeout: float, allow_pilot: tuple[PilotState, ...]
    ) -> bool:
        deadline = self.clock() + timeout
        while True:
            self.supervisor.evaluate(self.hw.vehicle.status())
            self._abort_check(allow_pilot)
            if condition():
                return True
            if self.clock() >= deadline:
                return False
            await asyncio.sleep(min(self.policy.tick_s, 0.05))

    async def _prepare(self, request: SessionRequest) -> None:
        ready_states = (PilotState.B, PilotState.C, PilotState.D)
        energy_states = (PilotState.C, PilotState.D)
        contactor = self.hw.contactor.status()
        if contactor.welded or not contactor.mirror_says_open or contactor.coil_energised:
            raise SessionAbort("fault", "contactor not confirmed open before the session", "F-0101", connector=self.id)
        if self.hw.meter.reading() is None:
            raise SessionAbort("fault", "energy meter has no fresh reading", "F-0451")
        if request.mode == "discharge" and self.hw.vehicle.status().discharge_allowed is False:
            # an explicit refusal ends it at once; "unknown" (no HLC data yet, e.g. just
            # after plug-in) is judged once the vehicle is ready, below
            self._check_discharge_consent(self.hw.vehicle.status())
        if self.is_dc:
            assert self.hw.modules is not None
            voltage = self.hw.modules.measured_voltage()
            if voltage is not None and voltage >= self.policy.safe_voltage_v:
                raise SessionAbort("fault", f"output at {voltage:.0f} V before the session", "F-0802", voltage=voltage)
            await self.hw.vehicle.set_pwm_duty(5.0)
        else:
            await self.hw.vehicle.set_pwm_duty(ac_duty(self.config.max_current_a, self.config.phases, self.effective_limit_kw()))
        if not await self._wait_for(
            lambda: self.hw.vehicle.status().ev_ready, self.policy.ev_ready_timeout_s, ready_states
        ):
            raise SessionAbort("fault", "vehicle did not request energy in time")
        if request.mode == "discharge":
            self._check_discharge_consent(self.hw.vehicle.status())
        if self.is_dc:
            await self._cable_check(energy_states)
        self._abort_check(energy_states)
        contactor = self.hw.contactor.status()
        if not contactor.mirror_says_open or contactor.welded:
            raise SessionAbort("fault", "mirror contact does not confirm open", "F-0101", connector=self.id)
        try:
            await self.hw.contactor.close()
        except ContactorError as exc:
            fault = "F-0101" if exc.code == "contactor_welded" else "F-0421"
            raise SessionAbort("fault", f"contactor: {exc.detail}", fault, code=exc.code) from None
        self.faults.clear("F-0421", self.id)
        self._current_setpoint = 0.0
        if self.is_dc:
            assert self.hw.modules is not None
            target = self.hw.vehicle.status().target_voltage
            await self.hw.modules.set_output(float(target or self.policy.cable_check_voltage_v), 0.0)
            await self.hw.modules.output_on()
        if request.mode == "discharge":
            self._check_discharge_consent(self.hw.vehicle.status())

    def _check_discharge_consent(self, status: VehicleStatus) -> None:
        """The EV's BMS must allow discharge (ISO 15118-20); a refusal is F-0702."""
        if status.discharge_allowed is True:
            self.faults.clear("F-0702", self.id)
            return
        if status.discharge_allowed is False:
            code = status.discharge_refusal or "unspecified"
            raise SessionAbort(
                "user_request", f"vehicle refused discharge ({code})", "F-0702", iso15118_refusal=code, soc=status.soc
            )
        raise SessionAbort("fault", "vehicle gave no V2G consent (no HLC discharge data)")

    async def _cable_check(self, energy_states: tuple[PilotState, ...]) -> None:
        """IEC 61851-23 cable check with the contactor open (:mod:`agent.charging.cable_check`)."""

        def isolation_measured(kohm: float) -> None:
            self.last_isolation_kohm = kohm
            self.last_isolation_at = to_iso(utc_now())
            passed = kohm >= self.policy.isolation_fault_kohm
            self._publish(IsolationMeasured(self.id, kohm, self.last_isolation_at, passed))

        await cable_check(
            self.hw,
            self.policy,
            max_voltage_v=self.config.max_voltage_v,
            connector_id=self.id,
            clock=self.clock,
            wait_for=lambda condition, timeout: self._wait_for(condition, timeout, energy_states),
            abort_check=lambda: self._abort_check(energy_states),
            isolation_measured=isolation_measured,
        )

    # ------------------------------------------------------------------ charging

    async def _session_step(self, status: VehicleStatus) -> None:
        session = self.session
        assert session is not None
        now = self.clock()
        if status.pilot is PilotState.A:
            self.faults.raise_("F-0805", self.id, stop_reason="ev_disconnected", record_id=session.record_id)
            raise SessionAbort("ev_disconnected", "vehicle unplugged during the session")
        if status.pilot in (PilotState.E, PilotState.F) or self.faults.is_active("F-0801", self.id):
            raise SessionAbort("fault", f"control pilot in state {status.pilot.value}", "F-0801", pilot=status.pilot.value)
        self.supervisor.abort_on_blocking_faults()
        if self._stop is not None:
            reason, _command = self._stop
            raise SessionAbort(reason, "stop requested")
        request = session.request
        if request.duration_s is not None and now - session.started_mono >= request.duration_s:
            raise SessionAbort("time_limit", "duration reached")
        if request.mode == "discharge":
            floor = request.min_soc if request.min_soc is not None else DEFAULT_V2G_MIN_SOC
            if status.soc is not None and status.soc <= floor:
                raise SessionAbort("soc_target_reached", f"SOC floor {floor} % reached")
            self._check_discharge_consent(status)
            stage = self.hw.bidirectional.status() if self.hw.bidirectional is not None else None
            if stage is not None and stage.health.ok and not stage.grid_synced:
                raise SessionAbort("fault", "V2G inverter lost grid sync", "F-0701", cycles=stage.cycles)
        elif request.target_soc is not None and status.soc is not None and status.soc >= request.target_soc:
            raise SessionAbort("soc_target_reached", f"target SOC {request.target_soc} % reached")
        if status.pilot is PilotState.B and self.effective_limit_kw() > 0:
            full = status.soc is not None and status.soc >= 99
            raise SessionAbort("soc_target_reached" if full else "user_request", "vehicle stopped requesting energy")

        reading = self.hw.meter.reading()
        if reading is not None:
            register = reading.energy_export_kwh if request.mode == "discharge" else reading.energy_import_kwh
            session.observe(register, reading.power_kw, status.soc)
        self.supervisor.check_meter_plausible(reading, now)
        if now - self._last_checkpoint >= self.policy.progress_persist_s:
            self._last_checkpoint = now
            self._publish(SessionProgress(session))
        if request.mode == "discharge":
            await self._discharge_setpoint(status, request)
        elif self.is_dc:
            await self._dc_setpoint(status)
        else:
            await self.hw.vehicle.set_pwm_duty(ac_duty(self.config.max_current_a, self.config.phases, self.effective_limit_kw()))

    async def _dc_setpoint(self, status: VehicleStatus) -> None:
        modules = self.hw.modules
        assert modules is not None
        voltage = status.target_voltage or modules.measured_voltage() or self.policy.cable_check_voltage_v
        measured_v = max(modules.measured_voltage() or voltage, 50.0)
        target = min(
            status.target_current if status.target_current is not None else 0.0,
            self.config.max_current_a,
            self.effective_limit_kw() * 1000.0 / measured_v,
        )
        capability = modules.capability()
        if capability is not None:
            target = min(target, capability.max_current)
        target = max(target, 0.0)
        step = self.policy.current_ramp_a_per_s * self.policy.tick_s
        if target > self._current_setpoint:
            self._current_setpoint = min(target, self._current_setpoint + step)
        else:
            self._current_setpoint = target  # down at once
        last_v, last_i, last_t = self._last_setpoint_sent
        now = self.clock()
        if abs(last_v - voltage) > 1.0 or abs(last_i - self._current_setpoint) > 0.5 or now - last_t > 2.0:
            await modules.set_output(float(voltage), self._current_setpoint)
            if abs(last_v - voltage) > 1.0 or abs(last_i - self._current_setpoint) > 0.5:
                self._publish(SetpointChanged(self.id, float(voltage), self._current_setpoint))
            self._last_setpoint_sent = (float(voltage), self._current_setpoint, now)

    async def _discharge_setpoint(self, status: VehicleStatus, request: SessionRequest) -> None:
        modules, stage = self.hw.modules, self.hw.bidirectional
        assert modules is not None and stage is not None
        voltage = status.target_voltage or modules.measured_voltage() or self.policy.cable_check_voltage_v
        power = min(request.power_kw or 0.0, self.effective_limit_kw())
        now = self.clock()
        last_v, last_p, last_t = self._last_setpoint_sent
        if abs(last_p - power) > 0.1 or now - last_t > 2.0:
            current = power * 1000.0 / max(float(voltage), 50.0)
            if status.max_discharge_current is not None:
                current = min(current, status.max_discharge_current)
            await modules.set_output(float(voltage), min(current * 1.1 + 1.0, self.config.max_current_a))
            await stage.discharge(float(voltage), power)
            self._last_setpoint_sent = (float(voltage), power, now)

    # ------------------------------------------------------------------ stopping

    async def _end_session(self, stop_reason: str, message: str, fault_id: str | None, details: dict[str, Any]) -> None:
        """Bring the output to a safe state, then close the session's record and commands."""
        if fault_id:
            self.supervisor.latch(fault_id, details)
        session = self.session
        if session is None:
            await self._shutdown_output()
            return
        self._set_state(ConnectorState.FINISHING)
        await self._shutdown_output()
        if self._suspending and self._stopping.is_set():
            self._suspend_session(session)
            return
        reading = self.hw.meter.reading()
        if reading is not None:
            register = reading.energy_export_kwh if session.request.mode == "discharge" else reading.energy_import_kwh
            session.observe(register, reading.power_kw, self.hw.vehicle.status().soc)
        session.stop_reason = stop_reason
        end = utc_now()
        self.session = None
        self._publish(SessionFinished(session, end, stop_reason, message, fault_id))
        energy = billed_energy(session.meter_start, session.meter_now)
        duration = int(self.clock() - session.started_mono)
        if session.request.command_id:
            clean = stop_reason in CLEAN_STOPS and fault_id is None
            self._command(
                session.request.command_id,
                "completed" if clean else "failed",
                ("Discharge finished" if session.request.mode == "discharge" else "Charging finished")
                if clean
                else f"session ended: {stop_reason} ({message})",
                {"energy_delivered": energy, "duration": duration, "stop_reason": stop_reason},
            )
        if self._stop is not None and self._stop[1]:
            self._command(self._stop[1], "completed", "Charging stopped", {"energy_delivered": energy})
        self._stop = None
        log.info("session_finished", connector=self.id, record_id=session.record_id, reason=stop_reason, energy=energy)
        self._set_state(ConnectorState.VEHICLE_CONNECTED if self._plugged else ConnectorState.IDLE)

    def _suspend_session(self, session: Session) -> None:
        """Shutdown with ``suspend``: output already safe; keep the session open for a resume."""
        reading = self.hw.meter.reading()
        if reading is not None:
            register = reading.energy_export_kwh if session.request.mode == "discharge" else reading.energy_import_kwh
            session.observe(register, reading.power_kw, self.hw.vehicle.status().soc)
        self.session = None
        self._stop = None
        self._publish(SessionSuspended(session))
        log.info("session_suspended", connector=self.id, record_id=session.record_id)
        self._set_state(ConnectorState.VEHICLE_CONNECTED if self._plugged else ConnectorState.IDLE)

    async def _shutdown_output(self, initial: bool = False) -> None:
        """Modules off, wait for the current to fall (bounded), contactor open and confirmed.

        Never raises: a weld raises F-0101 and leaves the modules off. Always ends
        with the pilot PWM off (constant +12 V).
        """
        p = self.policy
        modules = self.hw.modules
        try:
            if self.hw.bidirectional is not None:
                try:
                    await self.hw.bidirectional.stop_discharge()
                except Exception as exc:
                    log.error("v2g_stop_failed", connector=self.id, error=str(exc))
            if modules is not None:
                await modules.output_off()
                self._current_setpoint = 0.0
                deadline = self.clock() + p.stop_timeout_s
                while self.clock() < deadline:
                    current = modules.measured_current()
                    if current is None or abs(current) < p.stop_current_a:
                        break
                    await asyncio.sleep(0.02)
            status = self.hw.contactor.status()
            if status.coil_energised or not status.mirror_says_open or initial:
                try:
                    await self.hw.contactor.open()
                except ContactorError as exc:
                    self.faults.raise_("F-0101", self.id, code=exc.code, detail=exc.detail)
        except Exception:
            log.exception("shutdown_output_error", connector=self.id)
            self.hw.contactor.release()
        finally:
            try:
                await self.hw.vehicle.set_pwm_duty(100.0)
            except Exception:
                log.exception("pwm_reset_error", connector=self.id)
