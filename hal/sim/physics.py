"""Physics of the simulated charger: advances a :class:`~hal.sim.world.SimWorld` in time.

The device simulators write what the charger commands (module on/setpoints, contactor
coil, pilot duty, fan duty) and read what the hardware would measure. :func:`step`
is everything in between. It is a pure function of the world and ``dt``: no clock,
no global state, no randomness, so a given sequence of ``dt`` always produces the
same world. Every lag is integrated exactly (``1 - exp(-dt/tau)``) and every ramp
is a clamped step, so the model is stable for any ``dt`` (designed for 0.01..1 s).

Model summary (constants below):

* **Contactor.** Coil on -> main contacts close ``operate_time_s`` later unless
  ``fail_to_close``; coil off -> they open ``release_time_s`` later unless ``weld``.
  Each completed close counts one cycle (:func:`advance_contactor`). Coil changes
  made between steps are registered at the old time, so a step longer than the
  operate time completes the movement within that step.
* **Module watchdog.** A module that is on and has not heard the controller for
  more than :data:`MODULE_WATCHDOG_S` of world time switches itself off.
* **DC power flow.** The battery is on the bus when the contactor is closed, the
  vehicle is plugged and the pilot is in C. Then the bus sits at the battery
  voltage; each module that is on and whose (rating-clamped) voltage setpoint is at
  least the battery voltage can deliver up to ``min(current_limit, max_current,
  rated_power_w / V)``; the total is limited by the EV's ``current_request()`` and
  shared equally (water-filling) between the able modules. Module currents ramp up
  at :data:`CURRENT_RAMP_UP_A_PER_S` and down at :data:`CURRENT_RAMP_DOWN_A_PER_S`;
  they drop to zero at once when the circuit is broken (contactor opens, unplug,
  pilot leaves C). Off the battery a module's output voltage ramps to its setpoint
  while on (slowly with ``walk_in``) and decays exponentially while off.
* **V2G.** When the connector is ``discharging`` with a positive setpoint and the
  vehicle allows it (``v2g_capable``, not ``refuse_discharge``, ``soc >
  bms_min_soc``, inverter in sync), on-modules draw ``discharge_setpoint_kw`` from
  the battery (limited by the vehicle's ``max_current`` and module ratings) as a
  negative current. A connector that is ``discharging`` never charges.
* **AC.** With the contactor closed and the pilot in C, each of the vehicle's
  ``ac_phases`` phases draws ``min(offer(duty), ac_max_current)`` at 230 V (scaled
  by the same taper as the DC request); the draw is stateless (no ramp), so it can
  always be recomputed with :func:`ac_phase_currents`. The on-board charger is
  lossless.
* **Battery.** SOC integrates the battery power over ``capacity_kwh`` and is
  clamped to 0..100 %. Charging stops at ``target_soc`` because the pilot falls to
  B there (and ``current_request()`` is 0).
* **Meter.** Voltage, current, power and energy registers follow the actual power
  flow (the same power that moves the SOC, integrated with the end-of-step value, so
  ``energy == sum(power_kw * dt)`` exactly). A **frozen** meter is a hung meter:
  :func:`step` does not touch any of its fields, so the Modbus simulator keeps
  serving the values it had when it froze, and the energy that flows meanwhile is
  never counted by it; after the freeze is cleared the registers continue from the
  frozen values. The true power flow stays observable through
  :func:`connector_power_kw` and the vehicle's SOC. A *silent* meter is updated
  normally (silence is a comms fault, handled by the Modbus simulator).
* **Temperatures.** First-order lags toward ``ambient + idle offset + load rise``,
  where load rise = thermal resistance x loss, and the thermal resistance falls with
  fan speed (``1 + FAN_COOLING_GAIN * rpm/nominal_rpm``). ``world.extra_heat`` is
  added to a sensor's equilibrium target (see :mod:`hal.sim.faults`, which also
  shifts the present value so injections act at once).
* **Fans.** rpm lags toward ``nominal_rpm * duty/100 * slowdown`` (spin-up tau
  :data:`FAN_SPIN_UP_TAU_S`, spin-down :data:`FAN_SPIN_DOWN_TAU_S`).
* **Isolation.** ``isolation_drop_kohm`` when injected, else
  :data:`ISOLATION_NOMINAL_KOHM` with a small deterministic ripple (a function of
  time and connector id).
* **Plug-in scheduling.** When ``world.time >= plug_in_at`` the vehicle plugs in
  and ``plug_in_at`` is cleared.

Why one module of ~540 lines: it is one coupled model (modules, contactor, battery, meter,
temperatures) advanced in one step; splitting it would split the equations of one tick.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from hal.sim.world import SimConnector, SimContactor, SimFan, SimModule, SimVehicle, SimWorld

#: Tolerance for comparing sums of float time steps against durations (s).
TIME_EPSILON_S = 1e-9

# --- modules --------------------------------------------------------------------------
#: A module that is on switches its output off after this long without a controller frame.
MODULE_WATCHDOG_S = 10.0
#: Per-module current ramp when the current magnitude rises (A/s).
CURRENT_RAMP_UP_A_PER_S = 50.0
#: Per-module current ramp when the current magnitude falls (A/s).
CURRENT_RAMP_DOWN_A_PER_S = 500.0
#: Open-circuit output-voltage ramp of a module that is on, with walk-in (soft start).
VOLTAGE_RAMP_WALK_IN_V_PER_S = 200.0
#: Open-circuit output-voltage ramp of a module that is on, without walk-in.
VOLTAGE_RAMP_FAST_V_PER_S = 2000.0
#: Time constant of the output-capacitor discharge of a module that is off (s).
VOLTAGE_DECAY_TAU_S = 0.5
#: Below this, a decaying output voltage reads 0 (V).
VOLTAGE_ZERO_BELOW_V = 1.0

# --- AC -------------------------------------------------------------------------------
#: Line-to-neutral voltage of every AC phase (V).
AC_PHASE_VOLTAGE = 230.0

# --- thermal --------------------------------------------------------------------------
#: Thermal resistance reduction per unit of fan speed: R = R0 / (1 + gain * rpm/nominal).
FAN_COOLING_GAIN = 3.0
#: Module heat-sink thermal resistance with the fan stopped (K/W of module loss).
MODULE_R_K_PER_W = 0.1
#: Module heat-sink time constant (s).
MODULE_TAU_S = 60.0
#: Per sensor: (idle offset above ambient degC, K per W of total module loss, tau s).
CABINET_SENSORS: dict[str, tuple[float, float, float]] = {
    "power_module": (5.0, 0.02, 60.0),
    "control_board": (10.0, 0.003, 120.0),
    "ac_inlet": (3.0, 0.0, 90.0),
    "dc_outlet": (2.0, 0.0, 90.0),
}
#: Time constant for sensors :data:`CABINET_SENSORS` does not know (target: ambient).
UNKNOWN_SENSOR_TAU_S = 60.0
#: ac_inlet rise per (grid phase current in A)^2.
AC_INLET_K_PER_A2 = 1.0e-3
#: dc_outlet rise per (largest DC connector current in A)^2.
DC_OUTLET_K_PER_A2 = 5.0e-4
#: Connector outlet (plug) rise per A^2: DC and AC (smaller contacts run hotter).
OUTLET_DC_K_PER_A2 = 6.0e-4
OUTLET_AC_K_PER_A2 = 1.0e-2
#: Connector outlet time constant (s).
OUTLET_TAU_S = 120.0
#: Meter: idle offset above ambient (degC), rise per A^2, time constant (s).
METER_IDLE_OFFSET_C = 5.0
METER_K_PER_A2 = 1.0e-4
METER_TAU_S = 300.0

# --- fans -----------------------------------------------------------------------------
FAN_SPIN_UP_TAU_S = 2.0
FAN_SPIN_DOWN_TAU_S = 4.0

# --- isolation ------------------------------------------------------------------------
#: Healthy insulation resistance DC+/DC- to PE (kOhm).
ISOLATION_NOMINAL_KOHM = 5000.0
#: Relative amplitude of the deterministic ripple on the healthy value.
ISOLATION_RIPPLE = 0.015


# ======================================================================================
# small numeric helpers


def lag(present: float, target: float, dt: float, tau: float) -> float:
    """First-order lag integrated exactly over ``dt``: never overshoots, any ``dt``."""
    if tau <= 0.0:
        return target
    return target + (present - target) * math.exp(-dt / tau)


def ramp(present: float, target: float, max_step: float) -> float:
    """Move ``present`` toward ``target`` by at most ``max_step`` (never past it)."""
    if target > present:
        return min(target, present + max_step)
    return max(target, present - max_step)


def _ramp_current(present: float, target: float, dt: float) -> float:
    """Ramp a current: magnitude rises slowly, falls fast, crosses zero only via zero."""
    if present * target < 0.0:
        return ramp(present, 0.0, CURRENT_RAMP_DOWN_A_PER_S * dt)
    rising = abs(target) > abs(present)
    rate = CURRENT_RAMP_UP_A_PER_S if rising else CURRENT_RAMP_DOWN_A_PER_S
    return ramp(present, target, rate * dt)


def fan_cooling_factor(fans: Iterable[SimFan]) -> float:
    """``1 + FAN_COOLING_GAIN * mean(rpm/nominal_rpm)``; 1 without fans (natural convection)."""
    fractions = [max(f.rpm, 0.0) / f.nominal_rpm for f in fans if f.nominal_rpm > 0.0]
    if not fractions:
        return 1.0
    return 1.0 + FAN_COOLING_GAIN * sum(fractions) / len(fractions)


def share_equally(total: float, capabilities: Sequence[float]) -> list[float]:
    """Split ``total`` (>= 0) equally, giving no one more than its capability.

    Water-filling: a module that cannot take its equal share gives the rest to the
    others. The result sums to ``min(total, sum(capabilities))``.
    """
    shares = [0.0] * len(capabilities)
    remaining = max(total, 0.0)
    order = sorted(range(len(capabilities)), key=lambda i: capabilities[i])
    for rank, index in enumerate(order):
        fair = remaining / (len(order) - rank)
        shares[index] = min(max(capabilities[index], 0.0), fair)
        remaining -= shares[index]
    return shares


# ======================================================================================
# contactor


def advance_contactor(c: SimContactor, now: float) -> None:
    """Advance the main contacts to time ``now`` (idempotent for equal ``now``).

    Same rules as ``hal.sim.gpio_files.advance_contactor`` plus a float tolerance
    and one fix: the contacts head for "closed" when the coil is energised and
    ``fail_to_close`` is not injected, else for "open" -- except that welded closed
    contacts stay closed and ``fail_to_close`` never opens energised closed contacts. A change of position starts at the first ``now`` that asks for it
    (``moving_since``) and completes ``operate_time_s`` (closing) or
    ``release_time_s`` (opening) later; while an injection holds the contacts no
    movement is pending, so clearing it starts a fresh one. A request that goes away
    before completion cancels the movement. Every completed close counts one cycle.
    """
    # fail_to_close only stops a closing: energised closed contacts stay closed
    target = c.coil and (c.closed or not c.fail_to_close)
    if c.weld and c.closed:
        target = True
    if target == c.closed:
        c.moving_since = None
        return
    if c.moving_since is None:
        c.moving_since = now
    needed = c.operate_time_s if target else c.release_time_s
    if now - c.moving_since < needed - TIME_EPSILON_S:
        return
    c.closed = target
    c.moving_since = None
    if target:
        c.cycles += 1


# ======================================================================================
# pure observations of a connector


def offered_current(duty_percent: float) -> float:
    """AC current (A) an EV reads from the pilot duty (IEC 61851-1, EV side).

    8..10 % -> 6 A; 10..85 % -> duty x 0.6; 85..96 % -> (duty - 64) x 2.5;
    96..97 % -> 80 A; anything else (digital communication, no PWM, invalid) -> 0.
    """
    d = duty_percent
    if 8.0 <= d < 10.0:
        return 6.0
    if 10.0 <= d <= 85.0:
        return d * 0.6
    if 85.0 < d <= 96.0:
        return (d - 64.0) * 2.5
    if 96.0 < d <= 97.0:
        return 80.0
    return 0.0


def battery_on_bus(conn: SimConnector) -> bool:
    """The vehicle's battery is connected: contactor closed, plugged, pilot in C."""
    return conn.contactor.closed and conn.vehicle.plugged and conn.pilot_state() == "C"


def taper_fraction(vehicle: SimVehicle) -> float:
    """The EV's present request as a fraction of its maximum (0..1)."""
    if vehicle.max_current <= 0.0:
        return 0.0
    return min(1.0, max(0.0, vehicle.current_request() / vehicle.max_current))


def ac_phase_currents(conn: SimConnector) -> tuple[float, float, float]:
    """Per-phase current (A) an AC connector draws right now (zeros for DC connectors).

    ``min(offered_current(duty), ac_max_current) * taper`` on the first ``ac_phases``
    phases when the contactor is closed, the vehicle plugged and the pilot in C.
    """
    if conn.kind != "ac" or not battery_on_bus(conn):
        return (0.0, 0.0, 0.0)
    v = conn.vehicle
    per_phase = min(offered_current(conn.pwm_duty_percent), max(v.ac_max_current, 0.0))
    per_phase *= taper_fraction(v)
    phases = min(max(v.ac_phases, 0), 3)
    currents = [per_phase if i < phases else 0.0 for i in range(3)]
    return (currents[0], currents[1], currents[2])


def dc_bus_voltage(conn: SimConnector) -> float:
    """DC output voltage (V): the battery's when it is on the bus, else the highest module's."""
    if battery_on_bus(conn):
        return conn.vehicle.battery_voltage()
    return max((m.output_voltage for m in conn.modules), default=0.0)


def connector_current(conn: SimConnector) -> float:
    """Actual current (A): DC signed output current, AC sum over phases."""
    if conn.kind == "ac":
        return sum(ac_phase_currents(conn))
    return sum(m.output_current for m in conn.modules)


def connector_power_kw(conn: SimConnector) -> float:
    """Actual power (kW) through the connector; negative while discharging (V2G)."""
    if conn.kind == "ac":
        return AC_PHASE_VOLTAGE * sum(ac_phase_currents(conn)) / 1000.0
    return dc_bus_voltage(conn) * connector_current(conn) / 1000.0


def discharge_allowed(conn: SimConnector) -> bool:
    """Every V2G precondition on the vehicle and inverter side holds."""
    v = conn.vehicle
    return (
        conn.discharging
        and conn.discharge_setpoint_kw > 0.0
        and v.v2g_capable
        and not v.refuse_discharge
        and v.soc > v.bms_min_soc
        and not conn.inverter_sync_lost
    )


# ======================================================================================
# DC modules


def module_capability(m: SimModule, voltage: float) -> float:
    """Largest current magnitude (A) module ``m`` can carry at ``voltage`` right now."""
    if not m.on or voltage <= 0.0:
        return 0.0
    limit = min(max(m.current_limit, 0.0), m.max_current)
    return max(0.0, min(limit, m.rated_power_w / voltage))


def _can_push_into(m: SimModule, voltage: float) -> bool:
    """A module only drives current into a battery below its (clamped) setpoint."""
    return min(m.voltage_setpoint, m.max_voltage) >= voltage


def module_current_targets(conn: SimConnector) -> list[float]:
    """Per-module current each module is heading to, with the battery on the bus."""
    v_bat = conn.vehicle.battery_voltage()
    if v_bat <= 0.0:
        return [0.0] * len(conn.modules)
    if conn.discharging:
        if not discharge_allowed(conn):
            return [0.0] * len(conn.modules)
        wanted = min(conn.discharge_setpoint_kw * 1000.0 / v_bat, conn.vehicle.max_current)
        caps = [module_capability(m, v_bat) for m in conn.modules]
        return [-share for share in share_equally(wanted, caps)]
    caps = [module_capability(m, v_bat) if _can_push_into(m, v_bat) else 0.0 for m in conn.modules]
    return share_equally(conn.vehicle.current_request(), caps)


def _open_circuit_voltage(m: SimModule, dt: float) -> float:
    """Module output voltage off the battery: ramps to the setpoint if on, decays if off."""
    if m.on:
        rate = VOLTAGE_RAMP_WALK_IN_V_PER_S if m.walk_in else VOLTAGE_RAMP_FAST_V_PER_S
        target = min(max(m.voltage_setpoint, 0.0), m.max_voltage)
        return ramp(m.output_voltage, target, rate * dt)
    decayed = lag(m.output_voltage, 0.0, dt, VOLTAGE_DECAY_TAU_S)
    return 0.0 if decayed < VOLTAGE_ZERO_BELOW_V else decayed


def module_watchdog(m: SimModule, now: float) -> None:
    """Switch the module off when the controller has been silent for too long."""
    if m.on and now - m.last_heard > MODULE_WATCHDOG_S:
        m.on = False


def _advance_modules(conn: SimConnector, dt: float) -> None:
    """Electrical state of every module of a DC connector over ``dt``."""
    if battery_on_bus(conn):
        v_bat = conn.vehicle.battery_voltage()
        for m, target in zip(conn.modules, module_current_targets(conn)):
            m.output_voltage = v_bat
            m.output_current = _ramp_current(m.output_current, target, dt)
        return
    for m in conn.modules:
        m.output_current = 0.0
        m.output_voltage = _open_circuit_voltage(m, dt)


def _module_temperature(m: SimModule, ambient: float, cooling: float, dt: float) -> None:
    """Heat-sink temperature lags toward ambient + R x loss, R reduced by the fan."""
    loss_w = (1.0 - m.efficiency) * abs(m.output_voltage * m.output_current)
    target = ambient + MODULE_R_K_PER_W * loss_w / cooling
    m.temperature = lag(m.temperature, target, dt, MODULE_TAU_S)


def module_loss_w(conn: SimConnector) -> float:
    """Total conversion loss (W) of the connector's modules."""
    return sum(
        (1.0 - m.efficiency) * abs(m.output_voltage * m.output_current) for m in conn.modules
    )


# ======================================================================================
# battery and meter


def _advance_battery(vehicle: SimVehicle, power_kw: float, dt: float) -> None:
    """Integrate the battery power into the SOC (clamped to 0..100 %)."""
    if vehicle.capacity_kwh <= 0.0:
        return
    delta = power_kw * dt / 3600.0 / vehicle.capacity_kwh * 100.0
    vehicle.soc = min(100.0, max(0.0, vehicle.soc + delta))


def _advance_meter(
    conn: SimConnector, voltage: float, current: float, power_kw: float, dt: float, ambient: float
) -> None:
    """Update the meter registers from the actual flow, unless the meter is frozen."""
    meter = conn.meter
    if meter.frozen:
        return
    energy_kwh = power_kw * dt / 3600.0
    if energy_kwh >= 0.0:
        meter.energy_import_kwh += energy_kwh
    else:
        meter.energy_export_kwh -= energy_kwh
    meter.power_kw = power_kw
    if conn.kind == "ac":
        phases = ac_phase_currents(conn)
        meter.phase_voltage = (AC_PHASE_VOLTAGE, AC_PHASE_VOLTAGE, AC_PHASE_VOLTAGE)
        meter.phase_current = phases
        meter.voltage = AC_PHASE_VOLTAGE
        meter.current = sum(phases) / 3.0
        hottest = max(phases)
    else:
        meter.voltage = voltage
        meter.current = current
        hottest = abs(current)
    target = ambient + METER_IDLE_OFFSET_C + METER_K_PER_A2 * hottest**2
    meter.temperature = lag(meter.temperature, target, dt, METER_TAU_S)


# ======================================================================================
# per connector


def isolation_value(conn: SimConnector, now: float) -> float:
    """Insulation resistance (kOhm): the injected drop, else nominal with a small ripple."""
    if conn.isolation_drop_kohm is not None:
        return conn.isolation_drop_kohm
    phase = float(conn.connector_id)
    ripple = 0.6 * math.sin(0.37 * now + phase) + 0.4 * math.sin(1.91 * now + 2.0 * phase)
    return ISOLATION_NOMINAL_KOHM * (1.0 + ISOLATION_RIPPLE * ripple)


def _outlet_temperature(conn: SimConnector, ambient: float, dt: float) -> None:
    """Plug temperature lags toward ambient + k x I^2 (largest conductor current)."""
    if conn.kind == "ac":
        rise = OUTLET_AC_K_PER_A2 * max(ac_phase_currents(conn)) ** 2
    else:
        rise = OUTLET_DC_K_PER_A2 * connector_current(conn) ** 2
    conn.outlet_temperature = lag(conn.outlet_temperature, ambient + rise, dt, OUTLET_TAU_S)


def _schedule_plug_in(vehicle: SimVehicle, now: float) -> None:
    """Plug the vehicle in once its scheduled time has come (one-shot)."""
    if vehicle.plug_in_at is not None and now >= vehicle.plug_in_at - TIME_EPSILON_S:
        vehicle.plugged = True
        vehicle.plug_in_at = None


def _advance_connector(world: SimWorld, conn: SimConnector, dt: float, cooling: float) -> None:
    """Modules, power flow, battery, meter, isolation and plug temperature of one connector."""
    ambient = world.ambient_c
    if conn.kind == "dc":
        for m in conn.modules:
            module_watchdog(m, world.time)
        _advance_modules(conn, dt)
    voltage = dc_bus_voltage(conn) if conn.kind == "dc" else AC_PHASE_VOLTAGE
    current = connector_current(conn)
    power_kw = connector_power_kw(conn)
    _advance_battery(conn.vehicle, power_kw, dt)
    _advance_meter(conn, voltage, current, power_kw, dt, ambient)
    for m in conn.modules:
        _module_temperature(m, ambient, cooling, dt)
    conn.isolation_kohm = isolation_value(conn, world.time)
    _outlet_temperature(conn, ambient, dt)


# ======================================================================================
# cabinet


def _advance_fan(fan: SimFan, dt: float) -> None:
    """rpm lags toward nominal x duty x slowdown (faster spin-up than spin-down)."""
    duty = min(max(fan.duty_percent, 0.0), 100.0) / 100.0
    slowdown = min(max(fan.slowdown, 0.0), 1.0)
    target = fan.nominal_rpm * duty * slowdown
    tau = FAN_SPIN_UP_TAU_S if target > fan.rpm else FAN_SPIN_DOWN_TAU_S
    fan.rpm = lag(fan.rpm, target, dt, tau)


def _load_rise(world: SimWorld, sensor: str, loss_w: float, cooling: float) -> float:
    """Load-dependent rise (degC) of a cabinet sensor above its idle offset."""
    _, k_loss, _ = CABINET_SENSORS[sensor]
    rise = k_loss * loss_w / cooling
    if sensor == "ac_inlet":
        grid_w = loss_w + sum(
            abs(connector_power_kw(c)) * 1000.0 for c in world.connectors.values()
        )
        rise += AC_INLET_K_PER_A2 * (grid_w / (3.0 * AC_PHASE_VOLTAGE)) ** 2
    elif sensor == "dc_outlet":
        dc = [abs(connector_current(c)) for c in world.connectors.values() if c.kind == "dc"]
        rise += DC_OUTLET_K_PER_A2 * max(dc, default=0.0) ** 2
    return rise


def _advance_sensors(world: SimWorld, dt: float, cooling: float) -> None:
    """Every named temperature sensor lags toward its target (incl. ``extra_heat``)."""
    loss_w = sum(module_loss_w(c) for c in world.connectors.values())
    for sensor, present in world.temperatures.items():
        extra = world.extra_heat.get(sensor, 0.0)
        if sensor in CABINET_SENSORS:
            idle, _, tau = CABINET_SENSORS[sensor]
            target = world.ambient_c + idle + _load_rise(world, sensor, loss_w, cooling) + extra
        else:
            tau = UNKNOWN_SENSOR_TAU_S
            target = world.ambient_c + extra
        world.temperatures[sensor] = lag(present, target, dt, tau)


# ======================================================================================
# entry point


def step(world: SimWorld, dt: float) -> None:
    """Advance ``world`` by ``dt`` seconds of simulated time (``dt > 0``).

    Order: contactors register coil changes made since the last step at the old time;
    time advances; scheduled plug-ins happen; contactors complete movements; fans;
    per connector (module watchdog, power flow, battery, meter, isolation, plug
    temperature); cabinet temperature sensors.
    """
    if not (dt > 0.0 and math.isfinite(dt)):
        raise ValueError(f"dt must be a positive finite number of seconds, got {dt!r}")
    for conn in world.connectors.values():
        advance_contactor(conn.contactor, world.time)
    world.time += dt
    for conn in world.connectors.values():
        _schedule_plug_in(conn.vehicle, world.time)
        advance_contactor(conn.contactor, world.time)
    for fan in world.fans.values():
        _advance_fan(fan, dt)
    cooling = fan_cooling_factor(world.fans.values())
    for conn in world.connectors.values():
        _advance_connector(world, conn, dt, cooling)
    _advance_sensors(world, dt, cooling)


def run(world: SimWorld, duration: float, dt: float) -> None:
    """Step ``world`` for ``duration`` seconds in steps of ``dt`` (last step shortened)."""
    if not (dt > 0.0 and math.isfinite(dt)):
        raise ValueError(f"dt must be a positive finite number of seconds, got {dt!r}")
    end = world.time + duration
    while end - world.time > 1e-9:
        step(world, min(dt, end - world.time))
