"""Building simulated chargers and summarising them for humans.

* :func:`make_dc_connector` / :func:`make_ac_connector` build a connector with its
  modules, meter and vehicle; :func:`make_world` puts connectors into a world.
* :func:`world_snapshot` is the JSON-able summary a live display polls: time,
  ambient, per connector (pilot, contactor, modules, meter, vehicle/SOC, actual
  power, insulation), temperatures, fans and active faults. Floats are rounded for
  display; the snapshot is a copy, never a view into the world.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from hal.sim import physics
from hal.sim.faults import active_faults
from hal.sim.world import (
    SimConnector,
    SimContactor,
    SimFan,
    SimMeter,
    SimModule,
    SimVehicle,
    SimWorld,
)


def _check_id(name: str, value: object) -> int:
    """A non-negative integer id, else ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: must be a non-negative integer, got {value!r}")
    return value


def make_dc_connector(
    connector_id: int,
    module_addresses: Sequence[int],
    group: int | None = None,
    *,
    module_max_current: float = 40.0,
    module_rated_power_w: float = 20_000.0,
    module_max_voltage: float = 750.0,
    walk_in: bool = True,
    vehicle: SimVehicle | None = None,
    plugged: bool = False,
) -> SimConnector:
    """A DC connector fed by one module per address, all in ``group`` (default: the id).

    The meter is a DC meter; the vehicle defaults to :class:`SimVehicle` with
    ``plugged`` applied (an explicit ``vehicle`` is used as given). Raises ValueError
    for an empty or duplicated address list.
    """
    _check_id("connector_id", connector_id)
    addresses = [_check_id("module_addresses", a) for a in module_addresses]
    if not addresses:
        raise ValueError("module_addresses: a DC connector needs at least one module")
    if len(set(addresses)) != len(addresses):
        raise ValueError(f"module_addresses: duplicate address in {addresses}")
    group_id = connector_id if group is None else _check_id("group", group)
    modules = [
        SimModule(
            address=a,
            group=group_id,
            max_current=module_max_current,
            rated_power_w=module_rated_power_w,
            max_voltage=module_max_voltage,
            walk_in=walk_in,
        )
        for a in addresses
    ]
    return SimConnector(
        connector_id=connector_id,
        kind="dc",
        modules=modules,
        contactor=SimContactor(),
        meter=SimMeter(kind="dc"),
        vehicle=vehicle if vehicle is not None else SimVehicle(plugged=plugged),
    )


def make_ac_connector(
    connector_id: int,
    *,
    ac_max_current: float = 32.0,
    phases: int = 3,
    vehicle: SimVehicle | None = None,
    plugged: bool = False,
) -> SimConnector:
    """An AC connector (no modules, AC meter) with a vehicle drawing up to ``ac_max_current``
    on ``phases`` phases (ignored when an explicit ``vehicle`` is given)."""
    _check_id("connector_id", connector_id)
    if phases not in (1, 2, 3):
        raise ValueError(f"phases: must be 1, 2 or 3, got {phases!r}")
    if vehicle is None:
        vehicle = SimVehicle(plugged=plugged, ac_max_current=ac_max_current, ac_phases=phases)
    return SimConnector(
        connector_id=connector_id,
        kind="ac",
        contactor=SimContactor(),
        meter=SimMeter(kind="ac"),
        vehicle=vehicle,
    )


def make_world(
    connectors: Iterable[SimConnector],
    *,
    ambient_c: float = 25.0,
    fans: Iterable[SimFan] | None = None,
) -> SimWorld:
    """A world holding ``connectors`` (unique ids) and ``fans`` (default: one cabinet fan)."""
    world = SimWorld(ambient_c=ambient_c)
    for conn in connectors:
        if conn.connector_id in world.connectors:
            raise ValueError(f"connectors: duplicate connector id {conn.connector_id}")
        world.connectors[conn.connector_id] = conn
    if fans is not None:
        world.fans = {f.name: f for f in fans}
    return world


# ======================================================================================
# snapshot


def _r(x: float, digits: int = 3) -> float:
    return round(float(x), digits)


def _module_snapshot(m: SimModule) -> dict[str, Any]:
    return {
        "address": m.address,
        "group": m.group,
        "on": m.on,
        "voltage_setpoint": _r(m.voltage_setpoint),
        "current_limit": _r(m.current_limit),
        "output_voltage": _r(m.output_voltage),
        "output_current": _r(m.output_current),
        "temperature": _r(m.temperature, 2),
        "last_heard": _r(m.last_heard),
        "silent": m.silent,
        "garbage": m.garbage,
    }


def _meter_snapshot(conn: SimConnector) -> dict[str, Any]:
    meter = conn.meter
    return {
        "kind": meter.kind,
        "voltage": _r(meter.voltage),
        "current": _r(meter.current),
        "power_kw": _r(meter.power_kw),
        "energy_import_kwh": _r(meter.energy_import_kwh, 4),
        "energy_export_kwh": _r(meter.energy_export_kwh, 4),
        "phase_current": [_r(i) for i in meter.phase_current],
        "temperature": _r(meter.temperature, 2),
        "frozen": meter.frozen,
        "silent": meter.silent,
    }


def _vehicle_snapshot(v: SimVehicle) -> dict[str, Any]:
    return {
        "plugged": v.plugged,
        "soc": _r(v.soc, 2),
        "target_soc": _r(v.target_soc, 2),
        "battery_voltage": _r(v.battery_voltage()),
        "current_request": _r(v.current_request()),
        "v2g_capable": v.v2g_capable,
        "plug_in_at": v.plug_in_at,
        "vin": v.vin,
    }


def _connector_snapshot(conn: SimConnector) -> dict[str, Any]:
    c = conn.contactor
    return {
        "id": conn.connector_id,
        "kind": conn.kind,
        "pilot": conn.pilot_state(),
        "pwm_duty_percent": _r(conn.pwm_duty_percent, 2),
        "contactor": {
            "coil": c.coil,
            "closed": c.closed,
            "cycles": c.cycles,
            "weld": c.weld,
            "fail_to_close": c.fail_to_close,
        },
        "modules": [_module_snapshot(m) for m in conn.modules],
        "meter": _meter_snapshot(conn),
        "vehicle": _vehicle_snapshot(conn.vehicle),
        "soc": _r(conn.vehicle.soc, 2),
        "power_kw": _r(physics.connector_power_kw(conn)),
        "current": _r(physics.connector_current(conn)),
        "isolation_kohm": _r(conn.isolation_kohm, 1),
        "outlet_temperature": _r(conn.outlet_temperature, 2),
        "discharging": conn.discharging,
        "discharge_setpoint_kw": _r(conn.discharge_setpoint_kw),
    }


def world_snapshot(world: SimWorld) -> dict[str, Any]:
    """JSON-able summary of ``world`` for live displays (see the module docstring).

    ``connectors`` is a list ordered by id; ``power_kw``/``current`` per connector are
    the actual flow (from :mod:`hal.sim.physics`), which differs from the meter's
    registers while the meter is frozen.
    """
    return {
        "time": _r(world.time),
        "ambient_c": _r(world.ambient_c, 2),
        "connectors": [_connector_snapshot(world.connectors[i]) for i in sorted(world.connectors)],
        "temperatures": {k: _r(v, 2) for k, v in world.temperatures.items()},
        "extra_heat": {k: _r(v, 2) for k, v in world.extra_heat.items()},
        "fans": {
            name: {
                "rpm": _r(f.rpm, 1),
                "duty_percent": _r(f.duty_percent, 1),
                "nominal_rpm": _r(f.nominal_rpm, 1),
                "slowdown": _r(f.slowdown, 3),
            }
            for name, f in world.fans.items()
        },
        "faults": active_faults(world),
    }
