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
  reports goes to a :class:`ConnectorListener` whose methods must not block.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import structlog

from agent.charging.config import ChargingSection, ConnectorConfig
from agent.charging.faults import FaultBoard
from agent.charging.session import CLEAN_STOPS, Checkpoint, Session, SessionRequest, build_record
from agent.utctime import to_iso, utc_now
from hal.interfaces import (
    Bidirectional,
    Contactor,
    ContactorError,
    EnergyMeter,
    HealthState,
    InsulationMonitor,
    PilotState,
    PowerModules,
    Thermal,
    Vehicle,
    VehicleStatus,
)

log = structlog.get_logger(__name__)

AC_NOMINAL_VOLTAGE = 230.0
PILOT_ERROR_GRACE_S = 0.5
DEFAULT_V2G_MIN_SOC = 20  # typical BMS floor (fault dictionary, F-0702)


class ConnectorState(enum.StrEnum):
    IDLE = "idle"
    VEHICLE_CONNECTED = "vehicle_connected"
    PREPARING = "preparing"
    CHARGING = "charging"
    DISCHARGING = "discharging"
    FINISHING = "finishing"
    FAULT = "fault"
    UNAVAILABLE = "unavailable"

    @property
    def telemetry_state(self) -> str:
        """The platform's four telemetry states (platform-api gap G7 Project choice)."""
        if self in (ConnectorState.CHARGING, ConnectorState.DISCHARGING):
            return self.value
        if self in (ConnectorState.FAULT, ConnectorState.UNAVAILABLE):
            return "fault"
        return "idle"


class Rejected(Exception):
    """A request the connector will not take; the message is for the platform."""


class SessionAbort(Exception):
    """Ends preparation or a session early: ``stop_reason``, optional fault to raise."""

    def __init__(self, stop_reason: str, message: str, fault_id: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.stop_reason = stop_reason
        self.message = message
        self.fault_id = fault_id
        self.details = details


class ConnectorListener(Protocol):
    """Receives what the connector observes. Implementations must return at once."""

    def state_changed(self, connector_id: int, state: ConnectorState) -> None: ...
    def event(self, connector_id: int, event_type: str, data: dict[str, Any]) -> None: ...
    def session_started(self, session: Session) -> None: ...
    def session_progress(self, session: Session) -> None: ...
    def session_suspended(self, session: Session) -> None:
        """Energy transfer stopped for a shutdown; the session stays open for a resume."""
        ...

    def close_checkpoint(self, connector_id: int, checkpoint: Checkpoint, stop_reason: str, message: str) -> None:
        """Close a persisted session from its checkpoint (exactly one record)."""
        ...
    def session_finished(self, session: Session, record: dict[str, Any], stop_event: dict[str, Any]) -> None:
        """The record and its ``stop`` event data: persisted together, exactly once."""
        ...
    def command_status(
        self, command_id: str, status: str, message: str | None = None, details: dict[str, Any] | None = None
    ) -> None: ...


@dataclass
class ConnectorHardware:
    """The HAL devices one connector uses (thermal is shared by the whole charger)."""

    meter: EnergyMeter
    contactor: Contactor
    vehicle: Vehicle
    modules: PowerModules | None = None
    imd: InsulationMonitor | None = None
    thermal: Thermal | None = None
    bidirectional: Bidirectional | None = None


class Connector:
    """State machine of one connector. Run :meth:`run` as a task; call the request methods."""

    def __init__(
        self,
        config: ConnectorConfig,
        hardware: ConnectorHardware,
        policy: ChargingSection,
        faults: FaultBoard,
        listener: ConnectorListener,
        *,
        cdr_extensions: bool = True,
        send_vin: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.id = config.id
        self.hw = hardware
        self.policy = policy
        self.faults = faults
        self.listener = listener
        self.cdr_extensions = cdr_extensions
        self.send_vin = send_vin
        self.clock = clock
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
        self._meter_bad_since: float | None = None
        self._mirror_closed_since: float | None = None
        self._pilot_bad_since: float | None = None
        self._implausible_since: float | None = None
        self._suspending = False
        self._resume: tuple[Checkpoint, float] | None = None
        self._latched: set[str] = set()  # faults found by a session procedure: cleared at plug-out
        self.last_isolation_kohm: float | None = None
        self.last_isolation_at: str | None = None
        self._imd_bad_since: float | None = None
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self.last_error: str | None = None
        self.ticks = 0  # control-loop iterations: the systemd watchdog's progress signal

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
                self.listener.command_status(pending.command_id, "failed", "pre-empted by stop_charging")
            if command_id:
                self.listener.command_status(command_id, "completed", "armed session cancelled")
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

    async def _sleep_tick(self) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), self.policy.tick_s)
        except asyncio.TimeoutError:
            pass
        self._wake.clear()

    def _set_state(self, state: ConnectorState) -> None:
        if state is not self.state:
            log.info("connector_state", connector=self.id, old=self.state.value, new=state.value)
            self.state = state
            self.listener.state_changed(self.id, state)

    async def _step(self) -> None:
        status = self.hw.vehicle.status()
        self._evaluate_faults(status)
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
            self.listener.close_checkpoint(self.id, checkpoint, reason, "suspended session not resumed")

    def _fail_pending(self, message: str) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and pending.command_id:
            self.listener.command_status(pending.command_id, "failed", message)

    def _abort_on_blocking_faults(self) -> None:
        """Abort when a blocking fault is active; this connector's ones stay latched until plug-out."""
        blocking = self.faults.blocking(self.id)
        if blocking:
            for f in blocking:
                if f.connector_id == self.id:
                    self._latched.add(f.fault_id)
            raise SessionAbort("fault", "fault active: " + ", ".join(sorted({f.fault_id for f in blocking})))

    def _latch(self, fault_id: str, details: dict[str, Any]) -> None:
        """Raise a fault found by a session procedure; it stays until the vehicle is unplugged."""
        self._latched.add(fault_id)
        self.faults.raise_(fault_id, self.id, **details)

    def _track_plug(self, status: VehicleStatus) -> None:
        plugged = status.plugged
        if plugged and not self._plugged:
            self._plugged = True
            self.faults.clear("F-0805", self.id)
            self.listener.event(self.id, "plug_in", {"vehicle_connected": True})
        elif not plugged and self._plugged and status.pilot is PilotState.A:
            self._plugged = False
            self.listener.event(self.id, "plug_out", {"vehicle_connected": False})
            for fault_id in sorted(self._latched):
                if fault_id != "F-0101":  # a weld needs service, not a new vehicle
                    self.faults.clear(fault_id, self.id)
            self._latched.clear()

    # ------------------------------------------------------------------ faults

    def _set_fault(self, fault_id: str, connector_id: int, active: bool, **details: Any) -> None:
        """Raise or clear a continuously evaluated fault; latched faults are not cleared here."""
        if active:
            self.faults.raise_(fault_id, connector_id, **details)
        elif fault_id not in self._latched:
            self.faults.clear(fault_id, connector_id)

    def _evaluate_faults(self, status: VehicleStatus) -> None:
        now = self.clock()
        cid = self.id
        contactor = self.hw.contactor.status()
        # coil off but the mirror says "closed": a main pole is stuck, by definition a weld
        stuck = not contactor.coil_energised and not contactor.mirror_says_open
        if stuck and self._mirror_closed_since is None:
            self._mirror_closed_since = now
        if not stuck:
            self._mirror_closed_since = None
        stuck_long = self._mirror_closed_since is not None and now - self._mirror_closed_since >= 0.3
        if contactor.welded or stuck_long:
            self.faults.raise_("F-0101", cid, connector=cid, mirror_says_open=contactor.mirror_says_open)
        else:
            self._set_fault("F-0101", cid, False)
        self._set_fault("F-0422", cid, contactor.health.code == "mirror_mismatch", detail=contactor.health.detail)
        pilot_bad = status.pilot in (PilotState.E, PilotState.UNKNOWN) or (
            status.pilot is PilotState.F and status.pwm_duty_percent > 0
        )
        # a pilot reading that is briefly unknown (start-up debounce, a transition
        # between windows) is not an error; one that stays so is
        if pilot_bad and self._pilot_bad_since is None:
            self._pilot_bad_since = now
        if not pilot_bad:
            self._pilot_bad_since = None
        pilot_error = self._pilot_bad_since is not None and now - self._pilot_bad_since >= PILOT_ERROR_GRACE_S
        self._set_fault("F-0801", cid, pilot_error, pilot=status.pilot.value, detail=status.health.detail)

        meter_health = self.hw.meter.health()
        meter_bad = self.hw.meter.reading() is None
        if meter_bad and self._meter_bad_since is None:
            self._meter_bad_since = now
        if not meter_bad:
            self._meter_bad_since = None
        lost = self._meter_bad_since is not None and now - self._meter_bad_since >= self.policy.meter_loss_grace_s
        frozen = meter_health.code == "meter_frozen"
        self._set_fault("F-0452", cid, frozen, detail=meter_health.detail)
        self._set_fault("F-0451", cid, lost and not frozen, detail=meter_health.detail or meter_health.state.value)

        if self.hw.modules is not None:
            modules = self.hw.modules.modules()
            offline = [m.address for m in modules if not m.online]
            self._set_fault("F-0411", cid, bool(offline) and len(offline) < len(modules), modules=offline)
            self._set_fault("F-0412", cid, bool(modules) and len(offline) == len(modules), modules=offline)
            alarms = {m.address: sorted(m.flags) for m in modules if m.health.state is HealthState.FAULT}
            self._set_fault("F-0413", cid, bool(alarms), modules=alarms)

        if self.hw.imd is not None:
            reading = self.hw.imd.reading()
            if reading is None or reading.resistance_kohm is None and not reading.testing:
                if self._imd_bad_since is None:
                    self._imd_bad_since = now
            else:
                self._imd_bad_since = None
            imd_lost = self._imd_bad_since is not None and now - self._imd_bad_since >= self.policy.imd_loss_grace_s
            self._set_fault("F-0103", cid, imd_lost, detail=self.hw.imd.health().detail)
            if reading is not None and reading.resistance_kohm is not None:
                limit = self.policy.isolation_fault_kohm
                if reading.resistance_kohm < limit:
                    self.faults.raise_("F-0102", cid, resistance_kohm=round(reading.resistance_kohm, 1), limit_kohm=limit)
                elif reading.resistance_kohm > limit * 1.2:
                    self._set_fault("F-0102", cid, False)

        if self.hw.thermal is not None and self.config.outlet_sensor:
            t = self.hw.thermal.temperatures().get(self.config.outlet_sensor)
            if t is not None and t.celsius is not None:
                if t.celsius >= self.policy.connector_warning_c:
                    self.faults.raise_("F-0203", cid, temperature=round(t.celsius, 1), threshold=self.policy.connector_warning_c)
                elif t.celsius < self.policy.connector_warning_c - 5.0:
                    self.faults.clear("F-0203", cid)

    # ------------------------------------------------------------------ preparing

    async def _start_session(self, request: SessionRequest) -> None:
        self._set_state(ConnectorState.PREPARING)
        self._stop = None
        try:
            await self._prepare(request)
        except SessionAbort as abort:
            await self._shutdown_output()
            if abort.fault_id:
                self._latch(abort.fault_id, abort.details)
            if self._stop is not None and self._stop[1]:
                self.listener.command_status(self._stop[1], "completed", "armed session cancelled")
            self._stop = None
            if request.resume is not None:
                self.listener.close_checkpoint(self.id, request.resume, abort.stop_reason, abort.message)
            elif request.command_id:
                self.listener.command_status(request.command_id, "failed", abort.message)
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
        self.listener.session_started(self.session)
        self.listener.event(self.id, "start", {"reason": request.start_reason})
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
        self._abort_on_blocking_faults()
        return status

    async def _wait_for(
        self, condition: Callable[[], bool], timeout: float, allow_pilot: tuple[PilotState, ...]
    ) -> bool:
        deadline = self.clock() + timeout
        while True:
            self._evaluate_faults(self.hw.vehicle.status())
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
            await self.hw.vehicle.set_pwm_duty(self._ac_duty(self.effective_limit_kw()))
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
        """IEC 61851-23 cable check with the contactor open; raises SessionAbort on failure."""
        modules, imd, p = self.hw.modules, self.hw.imd, self.policy
        assert modules is not None
        status = self.hw.vehicle.status()
        if status.target_voltage is None:
            raise SessionAbort("fault", "vehicle sent no target voltage (no HLC data)")
        check_v = min(p.cable_check_voltage_v, self.config.max_voltage_v)
        await modules.set_output(check_v, p.cable_check_current_a)
        await modules.output_on()

        def voltage_reached() -> bool:
            v = modules.measured_voltage()
            return v is not None and abs(v - check_v) <= 0.1 * check_v

        if not await self._wait_for(voltage_reached, p.voltage_settle_timeout_s, energy_states):
            raise SessionAbort("fault", f"cable-check voltage {check_v:.0f} V not reached")
        if imd is None:
            log.warning("no_imd_configured", connector=self.id)
        else:
            if p.imd_self_test:
                result = await imd.self_test()
                self._abort_check(energy_states)
                if not result.passed:
                    raise SessionAbort("fault", f"IMD self test failed: {result.detail}", "F-0104", detail=result.detail)
            applied_at = self.clock()
            fresh: list[float] = []
            seen: set[float] = set()
            last_ok = self.clock()

            def enough_readings() -> bool:
                nonlocal last_ok
                r = imd.reading()
                now = self.clock()
                if r is None or (r.resistance_kohm is None and not r.testing):
                    if now - last_ok > p.imd_loss_grace_s:
                        raise SessionAbort("fault", "insulation monitor stopped reporting", "F-0103")
                    return False
                last_ok = now
                if r.resistance_kohm is None or r.taken_at in seen or r.taken_at < applied_at + p.isolation_grace_s:
                    return False
                seen.add(r.taken_at)
                if r.resistance_kohm < p.isolation_fault_kohm:
                    # a failed test is the most telling point of the insulation trend
                    self.last_isolation_kohm = r.resistance_kohm
                    self.last_isolation_at = to_iso(utc_now())
                    raise SessionAbort(
                        "fault",
                        f"insulation {r.resistance_kohm:.0f} kOhm below {p.isolation_fault_kohm:.0f} kOhm",
                        "F-0102",
                        resistance_kohm=round(r.resistance_kohm, 1),
                        limit_kohm=p.isolation_fault_kohm,
                    )
                fresh.append(r.resistance_kohm)
                return len(fresh) >= p.isolation_readings

            if not await self._wait_for(enough_readings, p.isolation_timeout_s, energy_states):
                raise SessionAbort("fault", "no fresh insulation readings in time", "F-0103")
            self.last_isolation_kohm = min(fresh)
            self.last_isolation_at = to_iso(utc_now())
        await modules.output_off()

        def discharged() -> bool:
            v = modules.measured_voltage()
            return v is not None and v < p.safe_voltage_v

        if not await self._wait_for(discharged, p.voltage_settle_timeout_s, energy_states):
            raise SessionAbort("fault", "output did not discharge below the safe voltage", "F-0802")

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
        self._abort_on_blocking_faults()
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
        self._check_meter_plausible(reading, now)
        if now - self._last_checkpoint >= self.policy.progress_persist_s:
            self._last_checkpoint = now
            self.listener.session_progress(session)
        if request.mode == "discharge":
            await self._discharge_setpoint(status, request)
        elif self.is_dc:
            await self._dc_setpoint(status)
        else:
            await self.hw.vehicle.set_pwm_duty(self._ac_duty(self.effective_limit_kw()))

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
            self._last_setpoint_sent = (float(voltage), self._current_setpoint, now)

    def _check_meter_plausible(self, reading: Any, now: float) -> None:
        """DC: the meter must see roughly what the modules deliver.

        A meter that froze while idle keeps repeating "0 kW" and a constant register;
        the meter driver cannot tell that from an idle meter. While the modules measure
        >= 10 A, a meter power below 20 % of the modules' V x I for
        ``meter_plausibility_s`` raises F-0452 and ends the session (it cannot be billed).
        """
        modules = self.hw.modules
        if modules is None or reading is None:
            self._implausible_since = None
            return
        current, voltage = modules.measured_current(), modules.measured_voltage()
        if current is None or voltage is None or abs(current) < 10.0 or voltage < 50.0:
            self._implausible_since = None
            return
        expected_kw = abs(current) * voltage / 1000.0
        if abs(reading.power_kw) >= 0.2 * expected_kw:
            self._implausible_since = None
            return
        if self._implausible_since is None:
            self._implausible_since = now
        if now - self._implausible_since >= self.policy.meter_plausibility_s:
            self._implausible_since = None
            raise SessionAbort(
                "fault",
                f"meter reads {reading.power_kw:.1f} kW while the modules deliver {expected_kw:.1f} kW",
                "F-0452",
                meter_kw=round(reading.power_kw, 2),
                modules_kw=round(expected_kw, 2),
            )

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

    def _ac_duty(self, limit_kw: float) -> float:
        """PWM duty offering min(max current, limit) per IEC 61851-1 (100 % = no offer)."""
        amps = min(self.config.max_current_a, limit_kw * 1000.0 / (AC_NOMINAL_VOLTAGE * self.config.phases))
        if amps < 6.0:
            return 100.0
        if amps <= 51.0:
            return round(amps / 0.6, 1)
        return round(min(amps, 80.0) / 2.5 + 64.0, 1)

    # ------------------------------------------------------------------ stopping

    async def _end_session(self, stop_reason: str, message: str, fault_id: str | None, details: dict[str, Any]) -> None:
        """Bring the output to a safe state, then close the session's record and commands."""
        if fault_id:
            self._latch(fault_id, details)
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
        record = build_record(
            record_id=session.record_id,
            connector_id=self.id,
            start_time=to_iso(session.start_time),
            end_time=to_iso(end),
            meter_start=session.meter_start,
            meter_end=session.meter_now,
            max_power_kw=session.max_power_kw,
            soc_start=session.soc_start,
            soc_end=session.soc_now,
            stop_reason=stop_reason,
            transaction_id=session.request.transaction_id,
            mode=session.request.mode,
            vin=session.vin if self.send_vin else None,
            extensions=self.cdr_extensions,
        )
        self.session = None
        self.listener.session_finished(session, record, {"reason": stop_reason})
        duration = int(self.clock() - session.started_mono)
        if session.request.command_id:
            clean = stop_reason in CLEAN_STOPS and fault_id is None
            self.listener.command_status(
                session.request.command_id,
                "completed" if clean else "failed",
                ("Discharge finished" if session.request.mode == "discharge" else "Charging finished")
                if clean
                else f"session ended: {stop_reason} ({message})",
                {"energy_delivered": record["energy"], "duration": duration, "stop_reason": stop_reason},
            )
        if self._stop is not None and self._stop[1]:
            self.listener.command_status(self._stop[1], "completed", "Charging stopped", {"energy_delivered": record["energy"]})
        self._stop = None
        log.info("session_finished", connector=self.id, record_id=session.record_id, reason=stop_reason, energy=record["energy"])
        self._set_state(ConnectorState.VEHICLE_CONNECTED if self._plugged else ConnectorState.IDLE)

    def _suspend_session(self, session: Session) -> None:
        """Shutdown with ``suspend``: output already safe; keep the session open for a resume."""
        reading = self.hw.meter.reading()
        if reading is not None:
            register = reading.energy_export_kwh if session.request.mode == "discharge" else reading.energy_import_kwh
            session.observe(register, reading.power_kw, self.hw.vehicle.status().soc)
        self.session = None
        self._stop = None
        self.listener.session_suspended(session)
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
