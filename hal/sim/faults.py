"""Fault injection into a :class:`~hal.sim.world.SimWorld` (used by the sim CLI and HTTP control).

:func:`inject` and :func:`clear` take a fault name from :data:`~hal.sim.world.FAULTS`
and the target arguments that fault needs; anything missing, unknown, out of range or
not applicable raises :class:`ValueError` with a message naming the argument. Both
return a human sentence describing what was done and append it to ``world.log``.

Targets per fault:

==========================  ===================================================
fault                       arguments
==========================  ===================================================
module_silence              ``module`` (address), ``connector`` optional when
garbage_frames              the address is unique across connectors
meter_freeze, meter_silence ``connector``
contactor_weld              ``connector``
contactor_fail_to_close     ``connector``
isolation_drop              ``connector``, ``value`` kOhm >= 0 (default 50)
vehicle_unplug              ``connector``
inverter_sync_loss          ``connector``
bms_refuse_discharge        ``connector``
fan_slowdown                ``value`` fraction 0..1 (default 0.3), ``sensor`` =
                            fan name (default: every fan)
over_temperature            ``sensor`` (default ``power_module``), ``value``
                            extra degC > 0 (default 60)
==========================  ===================================================

``connector`` may be omitted whenever the world has exactly one connector.

Semantics worth knowing:

* ``over_temperature`` puts the offset into ``world.extra_heat`` (part of the
  sensor's equilibrium target in :mod:`hal.sim.physics`) *and* shifts the present
  reading by the same amount, so the sensor jumps at once and then keeps following
  the physics, offset included. Clearing removes the offset the same way.
* ``isolation_drop`` sets the reading at once; clearing restores the nominal value.
* ``vehicle_unplug`` is an event, not a state: it unplugs the vehicle (and cancels
  a scheduled plug-in); "clearing" it plugs the vehicle back in. It is therefore
  never listed by :func:`active_faults`.
* ``contactor_weld`` injected while the contacts are open takes effect at the next
  release; ``contactor_fail_to_close`` while they are closed at the next close.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hal.sim.physics import ISOLATION_NOMINAL_KOHM
from hal.sim.world import FAULTS, SimConnector, SimModule, SimWorld

DEFAULT_FAN_SLOWDOWN = 0.3
DEFAULT_OVER_TEMPERATURE_C = 60.0
DEFAULT_OVER_TEMPERATURE_SENSOR = "power_module"
DEFAULT_ISOLATION_DROP_KOHM = 50.0

#: Which of the optional arguments each fault accepts.
_ACCEPTS: dict[str, frozenset[str]] = {
    "module_silence": frozenset({"connector", "module"}),
    "garbage_frames": frozenset({"connector", "module"}),
    "meter_freeze": frozenset({"connector"}),
    "meter_silence": frozenset({"connector"}),
    "contactor_weld": frozenset({"connector"}),
    "contactor_fail_to_close": frozenset({"connector"}),
    "fan_slowdown": frozenset({"sensor", "value"}),
    "over_temperature": frozenset({"sensor", "value"}),
    "isolation_drop": frozenset({"connector", "value"}),
    "vehicle_unplug": frozenset({"connector"}),
    "inverter_sync_loss": frozenset({"connector"}),
    "bms_refuse_discharge": frozenset({"connector"}),
}
if set(_ACCEPTS) != set(FAULTS):  # pragma: no cover - guards edits to world.FAULTS
    raise RuntimeError("hal.sim.faults: every fault in world.FAULTS needs a target rule")


@dataclass(frozen=True)
class _Args:
    """The raw optional arguments of one inject/clear call."""

    connector: int | None
    module: int | None
    sensor: str | None
    value: float | None

    def given(self) -> dict[str, object]:
        """The arguments that were actually passed (not ``None``)."""
        raw = {
            "connector": self.connector,
            "module": self.module,
            "sensor": self.sensor,
            "value": self.value,
        }
        return {k: v for k, v in raw.items() if v is not None}


# ======================================================================================
# validation


def _check_fault(fault: object) -> str:
    """The fault name, or ValueError listing the known ones."""
    if not isinstance(fault, str) or fault not in FAULTS:
        known = ", ".join(sorted(FAULTS))
        raise ValueError(f"fault: unknown fault {fault!r}; expected one of: {known}")
    return fault


def _check_types(args: _Args) -> None:
    """Reject wrongly typed arguments (they arrive from JSON and argv)."""
    for name in ("connector", "module"):
        v = getattr(args, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"{name}: must be an integer, got {v!r}")
    if args.sensor is not None and (not isinstance(args.sensor, str) or not args.sensor):
        raise ValueError(f"sensor: must be a non-empty name, got {args.sensor!r}")
    v = args.value
    if v is not None:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"value: must be a number, got {v!r}")
        if not math.isfinite(v):
            raise ValueError(f"value: must be finite, got {v!r}")


def _check_applicable(fault: str, args: _Args) -> None:
    """Reject arguments the fault does not use (usually a CLI/HTTP mistake)."""
    for name in args.given():
        if name not in _ACCEPTS[fault]:
            takes = ", ".join(sorted(_ACCEPTS[fault]))
            raise ValueError(f"{name}: does not apply to {fault} (it takes: {takes})")


def _validate(fault: object, args: _Args) -> str:
    """Full argument validation; returns the fault name."""
    name = _check_fault(fault)
    _check_types(args)
    _check_applicable(name, args)
    return name


def _resolve_connector(world: SimWorld, fault: str, connector: int | None) -> SimConnector:
    """The target connector; may be omitted when the world has exactly one."""
    ids = ", ".join(str(i) for i in sorted(world.connectors)) or "none"
    if connector is None:
        if len(world.connectors) == 1:
            return next(iter(world.connectors.values()))
        raise ValueError(f"connector: required for {fault} (connectors: {ids})")
    if connector not in world.connectors:
        raise ValueError(f"connector: no connector {connector} (connectors: {ids})")
    return world.connectors[connector]


def _resolve_module(world: SimWorld, fault: str, args: _Args) -> tuple[SimConnector, SimModule]:
    """The target module by address, searched on ``connector`` or on every connector."""
    if args.module is None:
        raise ValueError(f"module: required for {fault} (a power-module address)")
    if args.connector is not None:
        candidates = [_resolve_connector(world, fault, args.connector)]
    else:
        candidates = list(world.connectors.values())
    hits = [(c, m) for c in candidates for m in c.modules if m.address == args.module]
    if not hits:
        where = f"connector {args.connector}" if args.connector is not None else "any connector"
        raise ValueError(f"module: no module with address {args.module} on {where}")
    if len(hits) > 1:
        ids = ", ".join(str(c.connector_id) for c, _ in hits)
        raise ValueError(
            f"connector: required, module address {args.module} exists on connectors {ids}"
        )
    return hits[0]


def _resolve_sensor(world: SimWorld, sensor: str | None) -> str:
    """The temperature sensor for over_temperature (default ``power_module``)."""
    name = DEFAULT_OVER_TEMPERATURE_SENSOR if sensor is None else sensor
    if name not in world.temperatures:
        known = ", ".join(sorted(world.temperatures))
        raise ValueError(f"sensor: no temperature sensor {name!r} (sensors: {known})")
    return name


def _resolve_fans(world: SimWorld, sensor: str | None) -> list[str]:
    """The fans for fan_slowdown: the named one, or every fan."""
    if sensor is None:
        if not world.fans:
            raise ValueError("sensor: the world has no fans to slow down")
        return list(world.fans)
    if sensor not in world.fans:
        known = ", ".join(sorted(world.fans)) or "none"
        raise ValueError(f"sensor: no fan {sensor!r} (fans: {known})")
    return [sensor]


def _value_in(
    value: float | None,
    default: float,
    low: float,
    high: float,
    what: str,
    *,
    low_open: bool = False,
) -> float:
    """``value`` (or ``default``) checked against ``[low, high]`` (``(low, high]``)."""
    v = default if value is None else float(value)
    too_low = v <= low if low_open else v < low
    if too_low or v > high:
        bracket = "(" if low_open else "["
        raise ValueError(f"value: {what} must be in {bracket}{low:g}, {high:g}], got {v:g}")
    return v


# ======================================================================================
# the individual faults: each returns the sentence body


def _module_flag(world: SimWorld, fault: str, args: _Args, on: bool) -> str:
    conn, m = _resolve_module(world, fault, args)
    where = f"module {m.address} on connector {conn.connector_id}"
    if fault == "module_silence":
        was, m.silent = m.silent, on
        what = "stops answering on CAN" if on else "answers on CAN again"
    else:
        was, m.garbage = m.garbage, on
        what = "answers with corrupted frames" if on else "answers with valid frames again"
    return f"{where} {what}{_was_note(was, on)}"


def _meter_flag(conn: SimConnector, fault: str, on: bool) -> str:
    meter = conn.meter
    if fault == "meter_freeze":
        was, meter.frozen = meter.frozen, on
        what = (
            "keeps answering but its registers stop changing"
            if on
            else "updates its registers again"
        )
    else:
        was, meter.silent = meter.silent, on
        what = "stops answering Modbus requests" if on else "answers Modbus requests again"
    return f"the meter of connector {conn.connector_id} {what}{_was_note(was, on)}"


def _contactor_flag(conn: SimConnector, fault: str, on: bool) -> str:
    c = conn.contactor
    name = f"the contactor of connector {conn.connector_id}"
    if fault == "contactor_weld":
        was, c.weld = c.weld, on
        if not on:
            return f"{name} is no longer welded{_was_note(was, on)}"
        when = (
            "its contacts are welded closed"
            if c.closed
            else "its contacts will weld when they next close"
        )
        return f"{name}: {when}{_was_note(was, on)}"
    was, c.fail_to_close = c.fail_to_close, on
    what = "will not close when energised" if on else "closes normally again"
    return f"{name} {what}{_was_note(was, on)}"


def _fan_slowdown(world: SimWorld, args: _Args, on: bool) -> str:
    names = _resolve_fans(world, args.sensor)
    fraction = _value_in(args.value, DEFAULT_FAN_SLOWDOWN, 0.0, 1.0, "fan_slowdown fraction")
    for name in names:
        world.fans[name].slowdown = fraction if on else 1.0
    fans = ", ".join(names)
    if on:
        return f"fan {fans} runs at {fraction:.0%} of its commanded speed"
    return f"fan {fans} runs at its commanded speed again"


def _set_extra_heat(world: SimWorld, sensor: str, offset: float) -> float:
    """Set a sensor's extra heat to ``offset`` (0 removes it); returns the previous offset."""
    before = world.extra_heat.pop(sensor, 0.0)
    if offset != 0.0:
        world.extra_heat[sensor] = offset
    world.temperatures[sensor] += offset - before
    return before


def _over_temperature(world: SimWorld, args: _Args, on: bool) -> str:
    if on:
        sensor = _resolve_sensor(world, args.sensor)
        extra = _value_in(
            args.value,
            DEFAULT_OVER_TEMPERATURE_C,
            0.0,
            1000.0,
            "over_temperature extra degC",
            low_open=True,
        )
        _set_extra_heat(world, sensor, extra)
        return f"sensor {sensor} reads {extra:g} degC hotter (now {world.temperatures[sensor]:.1f} degC)"
    sensors = [_resolve_sensor(world, args.sensor)] if args.sensor else sorted(world.extra_heat)
    removed = [s for s in sensors if _set_extra_heat(world, s, 0.0) != 0.0]
    if not removed:
        return "no sensor had extra heat (over_temperature was not active)"
    return f"extra heat removed from sensor {', '.join(removed)}"


def _isolation_drop(conn: SimConnector, args: _Args, on: bool) -> str:
    name = f"connector {conn.connector_id}"
    if on:
        kohm = _value_in(args.value, DEFAULT_ISOLATION_DROP_KOHM, 0.0, 1.0e6, "isolation kOhm")
        conn.isolation_drop_kohm = kohm
        conn.isolation_kohm = kohm
        return f"insulation resistance on {name} drops to {kohm:g} kOhm"
    was = conn.isolation_drop_kohm is not None
    conn.isolation_drop_kohm = None
    conn.isolation_kohm = ISOLATION_NOMINAL_KOHM
    return f"insulation resistance on {name} is healthy again{_was_note(was, False)}"


def _vehicle_unplug(conn: SimConnector, on: bool) -> str:
    v = conn.vehicle
    was_plugged = v.plugged
    v.plugged = not on
    v.plug_in_at = None
    name = f"connector {conn.connector_id}"
    if on:
        return f"the vehicle on {name} is unplugged" + (
            "" if was_plugged else " (it was not plugged in)"
        )
    return f"the vehicle is plugged back into {name}" + (
        " (it was already plugged in)" if was_plugged else ""
    )


def _vehicle_side(conn: SimConnector, fault: str, on: bool) -> str:
    name = f"connector {conn.connector_id}"
    if fault == "inverter_sync_loss":
        was, conn.inverter_sync_lost = conn.inverter_sync_lost, on
        what = "loses grid sync" if on else "is in grid sync again"
        return f"the inverter of {name} {what}{_was_note(was, on)}"
    was, conn.vehicle.refuse_discharge = conn.vehicle.refuse_discharge, on
    what = "refuses to discharge" if on else "allows discharge again"
    return f"the BMS of the vehicle on {name} {what}{_was_note(was, on)}"


def _was_note(was: bool, now: bool) -> str:
    """A remark when the call did not change anything."""
    if was == now:
        return " (it already was)" if now else " (it was not active)"
    return ""


def _apply(world: SimWorld, fault: str, args: _Args, on: bool) -> str:
    """Dispatch one validated inject (``on``) or clear."""
    if fault in ("module_silence", "garbage_frames"):
        return _module_flag(world, fault, args, on)
    if fault == "fan_slowdown":
        return _fan_slowdown(world, args, on)
    if fault == "over_temperature":
        return _over_temperature(world, args, on)
    conn = _resolve_connector(world, fault, args.connector)
    if fault in ("meter_freeze", "meter_silence"):
        return _meter_flag(conn, fault, on)
    if fault in ("contactor_weld", "contactor_fail_to_close"):
        return _contactor_flag(conn, fault, on)
    if fault == "isolation_drop":
        return _isolation_drop(conn, args, on)
    if fault == "vehicle_unplug":
        return _vehicle_unplug(conn, on)
    return _vehicle_side(conn, fault, on)


def _record(world: SimWorld, verb: str, fault: str, body: str) -> str:
    sentence = f"t={world.time:.1f} s: {verb} {fault}: {body}."
    world.log.append(sentence)
    return sentence


# ======================================================================================
# public API


def inject(
    world: SimWorld,
    fault: str,
    *,
    connector: int | None = None,
    module: int | None = None,
    sensor: str | None = None,
    value: float | None = None,
) -> str:
    """Inject ``fault`` (a key of ``world.FAULTS``) into ``world``.

    Returns a sentence such as ``"t=12.0 s: injected meter_freeze: the meter of
    connector 1 registers stop changing."`` and appends it to ``world.log``.
    Injecting an already active fault is allowed (the sentence says so; a new
    ``value`` replaces the old one). Raises ValueError naming the bad argument.
    """
    args = _Args(connector, module, sensor, value)
    name = _validate(fault, args)
    return _record(world, "injected", name, _apply(world, name, args, True))


def clear(
    world: SimWorld,
    fault: str,
    *,
    connector: int | None = None,
    module: int | None = None,
    sensor: str | None = None,
    value: float | None = None,
) -> str:
    """Undo ``fault`` on its target (same arguments as :func:`inject`; ``value`` is ignored
    except for validation). ``over_temperature`` without ``sensor`` clears every
    sensor's extra heat; ``fan_slowdown`` without ``sensor`` restores every fan.
    Clearing an inactive fault is allowed (the sentence says so).
    """
    args = _Args(connector, module, sensor, value)
    name = _validate(fault, args)
    cleared = _Args(args.connector, args.module, args.sensor, None)
    return _record(world, "cleared", name, _apply(world, name, cleared, False))


def _entry(
    fault: str,
    connector: int | None = None,
    module: int | None = None,
    sensor: str | None = None,
    value: float | None = None,
) -> dict[str, Any]:
    return {
        "fault": fault,
        "connector": connector,
        "module": module,
        "sensor": sensor,
        "value": value,
        "description": FAULTS[fault],
    }


def _connector_faults(conn: SimConnector) -> list[dict[str, Any]]:
    cid = conn.connector_id
    out = [_entry("module_silence", cid, m.address) for m in conn.modules if m.silent]
    out += [_entry("garbage_frames", cid, m.address) for m in conn.modules if m.garbage]
    flags = [
        ("meter_freeze", conn.meter.frozen),
        ("meter_silence", conn.meter.silent),
        ("contactor_weld", conn.contactor.weld),
        ("contactor_fail_to_close", conn.contactor.fail_to_close),
        ("inverter_sync_loss", conn.inverter_sync_lost),
        ("bms_refuse_discharge", conn.vehicle.refuse_discharge),
    ]
    out += [_entry(name, cid) for name, active in flags if active]
    if conn.isolation_drop_kohm is not None:
        out.append(_entry("isolation_drop", cid, value=conn.isolation_drop_kohm))
    return out


def active_faults(world: SimWorld) -> list[dict[str, Any]]:
    """Every injection active now, as JSON-able dicts.

    Keys: ``fault``, ``connector``, ``module``, ``sensor``, ``value`` (``None`` where
    not applicable) and ``description``. Order: connectors by id, then fans by name,
    then sensors by name. ``vehicle_unplug`` is an event and never listed.
    """
    out: list[dict[str, Any]] = []
    for cid in sorted(world.connectors):
        out += _connector_faults(world.connectors[cid])
    for name in sorted(world.fans):
        if world.fans[name].slowdown < 1.0:
            out.append(_entry("fan_slowdown", sensor=name, value=world.fans[name].slowdown))
    for sensor in sorted(world.extra_heat):
        out.append(_entry("over_temperature", sensor=sensor, value=world.extra_heat[sensor]))
    return out
