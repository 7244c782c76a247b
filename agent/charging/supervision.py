"""Continuous fault supervision of one connector: what its devices say, turned into fault codes.

:class:`ConnectorSupervisor` is called by the connector's control loop (every tick, and
while preparation waits). Each call looks at the drivers' cached snapshots only, never
awaits, and raises or clears faults on the :class:`~agent.charging.faults.FaultBoard`:

* F-0101 weld (driver-reported, or the mirror saying "closed" with the coil off for
  0.3 s), F-0422 mirror mismatch;
* F-0801 pilot error, after :data:`PILOT_ERROR_GRACE_S` of an unknown/E/F pilot;
* F-0451 meter lost (no fresh reading for ``meter_loss_grace_s``), F-0452 meter frozen, or
  implausible against the modules while charging (which also ends the session);
* F-0411/F-0412/F-0413 module(s) offline or alarmed, F-0103 IMD lost, F-0102 insulation
  below the fault limit (cleared above 120 % of it), F-0203 outlet over-temperature
  (cleared 5 K below the warning threshold).

Faults a session procedure found are *latched*: they are not cleared by these checks
but only when the vehicle is unplugged (:meth:`ConnectorSupervisor.clear_latched`),
except a weld, which needs service.
"""

from __future__ import annotations

from typing import Any, Callable

from agent.charging.config import ChargingSection
from agent.charging.errors import SessionAbort
from agent.charging.faults import FaultBoard
from agent.charging.hardware import ConnectorHardware
from hal.interfaces import HealthState, PilotState, VehicleStatus

PILOT_ERROR_GRACE_S = 0.5


class ConnectorSupervisor:
    """Fault supervision of one connector; see the module contract."""

    def __init__(
        self,
        connector_id: int,
        hw: ConnectorHardware,
        policy: ChargingSection,
        faults: FaultBoard,
        outlet_sensor: str | None,
        clock: Callable[[], float],
    ) -> None:
        self.connector_id = connector_id
        self.hw = hw
        self.policy = policy
        self.faults = faults
        self.outlet_sensor = outlet_sensor
        self.clock = clock
        self.latched: set[str] = set()  # faults found by a session procedure: cleared at plug-out
        self._meter_bad_since: float | None = None
        self._mirror_closed_since: float | None = None
        self._pilot_bad_since: float | None = None
        self._implausible_since: float | None = None
        self._imd_bad_since: float | None = None

    def clear_latched(self) -> None:
        """The vehicle left: clear the latched faults (a weld stays: it needs service, not a new vehicle)."""
        for fault_id in sorted(self.latched):
            if fault_id != "F-0101":
                self.faults.clear(fault_id, self.connector_id)
        self.latched.clear()

    def set_fault(self, fault_id: str, connector_id: int, active: bool, **details: Any) -> None:
        """Raise or clear a continuously evaluated fault; latched faults are not cleared here."""
        if active:
            self.faults.raise_(fault_id, connector_id, **details)
        elif fault_id not in self.latched:
            self.faults.clear(fault_id, connector_id)

    def evaluate(self, status: VehicleStatus) -> None:
        """Raise or clear every continuously evaluated fault of the connector from one look at its devices."""
        now = self.clock()
        cid = self.connector_id
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
            self.set_fault("F-0101", cid, False)
        self.set_fault("F-0422", cid, contactor.health.code == "mirror_mismatch", detail=contactor.health.detail)
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
        self.set_fault("F-0801", cid, pilot_error, pilot=status.pilot.value, detail=status.health.detail)

        meter_health = self.hw.meter.health()
        meter_bad = self.hw.meter.reading() is None
        if meter_bad and self._meter_bad_since is None:
            self._meter_bad_since = now
        if not meter_bad:
            self._meter_bad_since = None
        lost = self._meter_bad_since is not None and now - self._meter_bad_since >= self.policy.meter_loss_grace_s
        frozen = meter_health.code == "meter_frozen"
        self.set_fault("F-0452", cid, frozen, detail=meter_health.detail)
        self.set_fault("F-0451", cid, lost and not frozen, detail=meter_health.detail or meter_health.state.value)

        if self.hw.modules is not None:
            modules = self.hw.modules.modules()
            offline = [m.address for m in modules if not m.online]
            self.set_fault("F-0411", cid, bool(offline) and len(offline) < len(modules), modules=offline)
            self.set_fault("F-0412", cid, bool(modules) and len(offline) == len(modules), modules=offline)
            alarms = {m.address: sorted(m.flags) for m in modules if m.health.state is HealthState.FAULT}
            self.set_fault("F-0413", cid, bool(alarms), modules=alarms)

        if self.hw.imd is not None:
            reading = self.hw.imd.reading()
            if reading is None or reading.resistance_kohm is None and not reading.testing:
                if self._imd_bad_since is None:
                    self._imd_bad_since = now
            else:
                self._imd_bad_since = None
            imd_lost = self._imd_bad_since is not None and now - self._imd_bad_since >= self.policy.imd_loss_grace_s
            self.set_fault("F-0103", cid, imd_lost, detail=self.hw.imd.health().detail)
            if reading is not None and reading.resistance_kohm is not None:
                limit = self.policy.isolation_fault_kohm
                if reading.resistance_kohm < limit:
                    self.faults.raise_("F-0102", cid, resistance_kohm=round(reading.resistance_kohm, 1), limit_kohm=limit)
                elif reading.resistance_kohm > limit * 1.2:
                    self.set_fault("F-0102", cid, False)

        if self.hw.thermal is not None and self.outlet_sensor:
            t = self.hw.thermal.temperatures().get(self.outlet_sensor)
            if t is not None and t.celsius is not None:
                if t.celsius >= self.policy.connector_warning_c:
                    self.faults.raise_("F-0203", cid, temperature=round(t.celsius, 1), threshold=self.policy.connector_warning_c)
                elif t.celsius < self.policy.connector_warning_c - 5.0:
                    self.faults.clear("F-0203", cid)

    def check_meter_plausible(self, reading: Any, now: float) -> None:
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

    def abort_on_blocking_faults(self) -> None:
        """Abort when a blocking fault is active; this connector's ones stay latched until plug-out."""
        blocking = self.faults.blocking(self.connector_id)
        if blocking:
            for f in blocking:
                if f.connector_id == self.connector_id:
                    self.latched.add(f.fault_id)
            raise SessionAbort("fault", "fault active: " + ", ".join(sorted({f.fault_id for f in blocking})))

    def latch(self, fault_id: str, details: dict[str, Any]) -> None:
        """Raise a fault found by a session procedure; it stays until the vehicle is unplugged."""
        self.latched.add(fault_id)
        self.faults.raise_(fault_id, self.connector_id, **details)
