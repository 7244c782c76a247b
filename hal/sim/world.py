"""The simulated charger's physical state, shared by the physics and the device simulators.

Data only: :mod:`hal.sim.physics` advances it in time (``step(world, dt)``), and
each protocol-level device simulator (CAN modules, Modbus meters and IMD, GPIO
lines, hwmon and pilot files) reads what its real counterpart would measure and
writes what the charger commands. Nothing here does I/O.

Conventions: SI-ish units as on the wire (V, A, kW, kWh, degC, rpm); ``True`` flags
under ``faults`` are fault injections (see :data:`FAULTS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

#: Fault injections the simulator supports, with what each one does.
FAULTS: dict[str, str] = {
    "module_silence": "a power module stops answering on CAN (target: connector, module address)",
    "garbage_frames": "a power module answers with corrupted frames (target: connector, module address)",
    "meter_freeze": "the meter keeps answering but its registers stop changing (target: connector)",
    "meter_silence": "the meter stops answering Modbus requests (target: connector)",
    "contactor_weld": "the main contacts stay closed after the coil is released (target: connector)",
    "contactor_fail_to_close": "the main contacts do not close when the coil is energised (target: connector)",
    "fan_slowdown": "the cabinet fan runs at a fraction of its commanded speed (value: fraction 0..1)",
    "over_temperature": "adds heat to a sensor (target: sensor name, value: extra degC)",
    "isolation_drop": "insulation resistance drops (target: connector, value: kOhm)",
    "vehicle_unplug": "the vehicle is unplugged mid-session (target: connector)",
    "inverter_sync_loss": "the bidirectional inverter loses grid sync during discharge (target: connector)",
    "bms_refuse_discharge": "the vehicle's BMS refuses to discharge (target: connector)",
}


@dataclass
class SimModule:
    """One DC power module (InfyPower or Winline) on a simulated CAN bus."""

    address: int
    group: int = 1
    max_voltage: float = 750.0
    min_voltage: float = 150.0
    max_current: float = 40.0  # A, per module
    rated_power_w: float = 20_000.0
    efficiency: float = 0.955
    # commanded by the controller
    on: bool = False
    voltage_setpoint: float = 0.0
    current_limit: float = 0.0  # A, this module's share
    last_heard: float = 0.0  # sim time of the last controller frame addressed to it
    # measured
    output_voltage: float = 0.0
    output_current: float = 0.0
    temperature: float = 25.0
    walk_in: bool = True
    # fault injections
    silent: bool = False
    garbage: bool = False
    reply_error: int = 0  # InfyPower: error code every answer's identifier carries (0: none)


@dataclass
class SimContactor:
    coil: bool = False  # driven by the controller's GPIO output
    closed: bool = False  # main contacts
    operate_time_s: float = 0.03
    release_time_s: float = 0.02
    moving_since: float | None = None
    cycles: int = 0
    weld: bool = False  # injection: contacts stay closed
    fail_to_close: bool = False  # injection: contacts never close

    @property
    def mirror_closed(self) -> bool:
        """NC mirror contact: closed exactly when the main contacts are open."""
        return not self.closed


@dataclass
class SimMeter:
    kind: Literal["dc", "ac"] = "dc"
    voltage: float = 0.0
    current: float = 0.0
    power_kw: float = 0.0
    energy_import_kwh: float = 1000.0
    energy_export_kwh: float = 0.0
    phase_voltage: tuple[float, float, float] = (230.0, 230.0, 230.0)
    phase_current: tuple[float, float, float] = (0.0, 0.0, 0.0)
    frequency_hz: float = 50.0
    temperature: float = 30.0
    frozen: bool = False  # injection: registers stop updating
    silent: bool = False  # injection: stops answering


@dataclass
class SimVehicle:
    """An EV: battery, its charge curve, and how it behaves on the pilot/HLC."""

    plugged: bool = False
    wants_energy: bool = True  # closes S2 (pilot C) when the charger offers energy
    capacity_kwh: float = 60.0
    soc: float = 30.0  # percent, float inside the sim
    target_soc: float = 100.0  # the EV stops requesting energy at this SOC
    nominal_voltage: float = 400.0
    max_current: float = 200.0  # DC: EV's maximum current request
    ac_max_current: float = 32.0  # AC on-board charger limit per phase
    ac_phases: int = 3
    taper_start_soc: float = 80.0  # current tapers linearly from here to 100 %
    v2g_capable: bool = False
    bms_min_soc: float = 20.0
    vin: str | None = None
    plug_in_at: float | None = None  # sim time at which the vehicle plugs in (scheduled)
    refuse_discharge: bool = False  # injection

    def battery_voltage(self) -> float:
        """Open-circuit-ish battery voltage: ~-10 % at 0 % SOC, ~+8 % at 100 %."""
        return self.nominal_voltage * (0.90 + 0.18 * self.soc / 100.0)

    def current_request(self) -> float:
        """DC current the EV asks for at its present SOC (tapering above taper_start_soc)."""
        if self.soc >= self.target_soc:
            return 0.0
        if self.soc <= self.taper_start_soc:
            return self.max_current
        span = max(100.0 - self.taper_start_soc, 1e-6)
        fraction = max(0.0, (100.0 - self.soc) / span)
        return max(self.max_current * fraction, self.max_current * 0.05)


@dataclass
class SimConnector:
    connector_id: int
    kind: Literal["dc", "ac"] = "dc"
    modules: list[SimModule] = field(default_factory=list)
    contactor: SimContactor = field(default_factory=SimContactor)
    meter: SimMeter = field(default_factory=SimMeter)
    vehicle: SimVehicle = field(default_factory=SimVehicle)
    # control pilot, as driven by the charger and loaded by the EV
    pwm_duty_percent: float = 100.0  # 100 = constant +12 V (no PWM)
    # insulation, DC side
    isolation_kohm: float = 5000.0
    isolation_drop_kohm: float | None = None  # injection
    imd_self_test_until: float | None = None
    # V2G
    discharging: bool = False
    discharge_setpoint_kw: float = 0.0
    inverter_sync_lost: bool = False  # injection
    inverter_cycles: int = 0  # discharge sessions run by the V2G stage
    harmonic_distortion_pct: float = 2.4
    outlet_temperature: float = 25.0

    def pilot_state(self) -> str:
        """IEC 61851 state the EV presents: A when unplugged, C when it wants energy and may."""
        if not self.vehicle.plugged:
            return "A"
        if self.pwm_duty_percent <= 0.0:
            return "F"
        offering = self.pwm_duty_percent < 100.0
        if offering and self.vehicle.wants_energy and self.vehicle.soc < self.vehicle.target_soc:
            return "C"
        if self.discharging and offering:
            return "C"
        return "B"


@dataclass
class SimFan:
    name: str = "cabinet"
    nominal_rpm: float = 1800.0
    duty_percent: float = 40.0  # commanded by the controller (PWM)
    rpm: float = 720.0
    slowdown: float = 1.0  # injection: fraction of commanded speed actually reached


@dataclass
class SimWorld:
    """The whole simulated charger."""

    connectors: dict[int, SimConnector] = field(default_factory=dict)
    ambient_c: float = 25.0
    # named temperature sensors (hwmon), degC
    temperatures: dict[str, float] = field(
        default_factory=lambda: {
            "power_module": 30.0,
            "control_board": 35.0,
            "ac_inlet": 28.0,
            "dc_outlet": 27.0,
        }
    )
    extra_heat: dict[str, float] = field(default_factory=dict)  # injection: sensor -> +degC
    fans: dict[str, SimFan] = field(default_factory=lambda: {"cabinet": SimFan()})
    time: float = 0.0  # seconds since the simulation started
    log: list[str] = field(default_factory=list)  # injections/clears, for humans

    def connector(self, connector_id: int) -> SimConnector:
        return self.connectors[connector_id]
