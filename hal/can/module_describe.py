"""What ``probe`` and diagnostics show about a power-module group (plain dicts)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hal.interfaces import ModuleRatings, monotonic

if TYPE_CHECKING:
    from hal.can.modules_base import PowerModuleGroup


def _ratings(r: ModuleRatings | None) -> dict[str, float] | None:
    if r is None:
        return None
    return {
        "max_voltage": r.max_voltage,
        "min_voltage": r.min_voltage,
        "max_current": r.max_current,
        "rated_power_w": r.rated_power_w,
    }


def describe_group(group: PowerModuleGroup) -> dict[str, Any]:
    """Protocol, bus, group, setpoints, capability, health and per-module values."""
    now = monotonic()
    health = group.health()
    modules = []
    for status in group.modules():
        m = group._modules[status.address]
        modules.append(
            {
                "address": status.address,
                "online": status.online,
                "active": status.address in group._active,
                "voltage": status.voltage,
                "current": status.current,
                "temperature": status.temperature,
                "output_on": status.output_on,
                "flags": sorted(status.flags),
                "ratings": _ratings(status.ratings),
                "reported_group": m.reported_group,
                "last_seen_s_ago": None if m.last_valid is None else round(now - m.last_valid, 3),
                "garbage_frames": m.garbage,
                "health": status.health.state.value,
                "code": status.health.code,
                "detail": status.health.detail,
            }
        )
    effective = group._effective
    request = group._request
    return {
        "name": group.name,
        "protocol": group.protocol,
        "bus": group._opts.bus,
        "controller_address": f"0x{group._controller:02X}",
        "group": group._opts.group,
        "discovery": group._discovery_mode,
        "started": group._started,
        "output_on": group._on,
        "requested": None if request is None else {"voltage": request[0], "current": request[1]},
        "effective": None
        if effective is None
        else {
            "voltage": effective[0],
            "current": effective[1],
            "shares": {str(a): round(i, 3) for a, i in sorted(effective[2].items())},
        },
        "capability": _ratings(group.capability()),
        "measured_voltage": group.measured_voltage(),
        "measured_current": group.measured_current(),
        "health": health.state.value,
        "code": health.code,
        "detail": health.detail,
        "garbage_frames": group._table.garbage_total,
        "port": group._port.describe(),
        "modules": modules,
        **group._describe_extra(),
    }
