"""How a group's requested output is split over its active modules (pure functions)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from hal.interfaces import ModuleRatings


@dataclass(frozen=True, slots=True)
class Split:
    """What the modules are told: one voltage, the total current and each module's share."""

    voltage: float
    total_current: float
    shares: dict[int, float]


def split_current(voltage: float, current: float, ratings: Mapping[int, ModuleRatings]) -> Split:
    """Split a request over the modules in ``ratings`` (address -> ratings, not empty).

    The voltage is clamped to the common ``[Vmin, Vmax]`` of the modules. Each module's
    limit is ``min(Imax, P_rated / V)``; the total is clamped to the sum of the limits
    and shared in proportion to them, so no module is asked for more than it can give.
    """
    if not ratings:
        raise ValueError("no module to split the current over")
    v_max = min(r.max_voltage for r in ratings.values())
    v_min = max(r.min_voltage for r in ratings.values())
    v = min(max(voltage, v_min), v_max)
    limits = {
        a: min(r.max_current, r.rated_power_w / v) if v > 0 else r.max_current
        for a, r in sorted(ratings.items())
    }
    capacity = sum(limits.values())
    total = min(current, capacity)
    shares = {a: total * lim / capacity if capacity > 0 else 0.0 for a, lim in limits.items()}
    return Split(v, total, shares)


def combined_capability(ratings: list[ModuleRatings]) -> ModuleRatings | None:
    """Common voltage range and summed current/power of several modules (``None``: none)."""
    if not ratings:
        return None
    return ModuleRatings(
        max_voltage=min(r.max_voltage for r in ratings),
        min_voltage=max(r.min_voltage for r in ratings),
        max_current=sum(r.max_current for r in ratings),
        rated_power_w=sum(r.rated_power_w for r in ratings),
    )
