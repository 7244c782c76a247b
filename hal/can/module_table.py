"""The module table of a power-module group: what each module last said, and what it means.

One :class:`ModuleEntry` per module address holds the time of its last valid answer,
the latest voltage/current/temperature (each with its own receive time), status
flags, the condition its last answer reported, ratings and a garbage counter.
:class:`ModuleTable` applies decoded :class:`Reading` objects to it and answers the
questions the group asks: is a module online (last valid answer at most
``comm_timeout_s`` old), which modules can share the output, what a module's
:class:`~hal.interfaces.ModuleStatus` and health are, and the group's health.
Values older than ``comm_timeout_s`` are withheld (``None``). Nothing here does I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from hal.can.current_split import combined_capability
from hal.interfaces import OK, Health, HealthState, ModuleRatings, ModuleStatus

#: ``_source`` result for a frame answered by the group (or all modules) as a whole.
GROUP_SOURCE = -1

#: Status flags that make a module (and the group) FAULT / module_alarm.
ALARM_FLAGS = frozenset(
    {
        "fault",
        "protection",
        "short_circuit",
        "discharge_abnormal",
        "over_temperature",
        "output_over_voltage",
        "dcdc_over_voltage",
        "load_sharing_alarm",
        "current_imbalance",
        "input_phase_lost",
        "input_unbalanced",
        "input_under_voltage",
        "input_over_voltage",
        "pfc_voltage_abnormal",
        "internal_comm_fault",
        "input_wiring_error",
        "input_mode_mismatch",
    }
)
#: Status flags that make a module DEGRADED / module_alarm (it still delivers power).
#: ``command_invalid``/``data_invalid``/``reply_error`` are conditions an answer's
#: identifier reported (InfyPower error codes 2, 3, others).
WARNING_FLAGS = frozenset(
    {"fan_fault", "can_comm_fault", "duplicate_address", "command_invalid", "data_invalid",
     "reply_error"}
)

Frame = tuple[int, bytes]  # (29-bit arbitration id, payload), as the codecs return them


@dataclass(frozen=True, slots=True)
class Reading:
    """What one valid frame told about one module (``None``: not in this frame).

    ``condition`` is the module's condition as the answer's identifier states it
    (protocols that carry one): an empty set for "normal", else flag names such as
    ``start_processing``. It replaces the previous condition.
    """

    address: int
    voltage: float | None = None
    current: float | None = None
    temperature: float | None = None
    flags: frozenset[str] | None = None
    output_on: bool | None = None
    max_voltage: float | None = None
    min_voltage: float | None = None
    max_current: float | None = None
    rated_power_w: float | None = None
    group: int | None = None
    condition: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class Discovery:
    """Module addresses found in our group."""

    addresses: tuple[int, ...]


@dataclass(slots=True)
class ModuleEntry:
    """One module's row in the table."""

    address: int
    last_valid: float | None = None
    online: bool = False  # as last evaluated (drives the loss/recovery log lines)
    ever_online: bool = False
    voltage: float | None = None
    voltage_at: float = -math.inf
    current: float | None = None
    current_at: float = -math.inf
    temperature: float | None = None
    temperature_at: float = -math.inf
    flags: frozenset[str] = frozenset()
    flags_at: float = -math.inf
    condition: frozenset[str] = frozenset()
    condition_at: float = -math.inf
    output_on: bool | None = None
    output_at: float = -math.inf
    max_voltage: float | None = None
    min_voltage: float | None = None
    max_current: float | None = None
    rated_power_w: float | None = None
    reported_group: int | None = None
    garbage: int = 0
    last_garbage: float = -math.inf
    command_at: float = -math.inf  # last on/off command sent to it
    mismatch: str | None = None
    resetting: bool = False

    @property
    def ratings(self) -> ModuleRatings | None:
        if (
            self.max_voltage is None
            or self.min_voltage is None
            or self.max_current is None
            or self.rated_power_w is None
        ):
            return None
        return ModuleRatings(
            self.max_voltage, self.min_voltage, self.max_current, self.rated_power_w
        )

    def apply(self, r: Reading, now: float) -> bool:
        """Store what ``r`` says; True if the module's ratings just became complete."""
        self.last_valid = now
        if r.voltage is not None:
            self.voltage, self.voltage_at = r.voltage, now
        if r.current is not None:
            self.current, self.current_at = r.current, now
        if r.temperature is not None:
            self.temperature, self.temperature_at = r.temperature, now
        if r.flags is not None:
            self.flags, self.flags_at = r.flags, now
        if r.condition is not None:
            self.condition, self.condition_at = r.condition, now
        if r.output_on is not None:
            self.output_on, self.output_at = r.output_on, now
        if (
            r.max_voltage is None
            and r.min_voltage is None
            and r.max_current is None
            and r.rated_power_w is None
        ):
            return False
        had = self.ratings is not None
        if r.max_voltage is not None:
            self.max_voltage = r.max_voltage
        if r.min_voltage is not None:
            self.min_voltage = r.min_voltage
        if r.max_current is not None:
            self.max_current = r.max_current
        if r.rated_power_w is not None:
            self.rated_power_w = r.rated_power_w
        return not had and self.ratings is not None


class ModuleTable:
    """Every module of one group by address, judged against ``comm_timeout_s``."""

    def __init__(self, addresses: Iterable[int], comm_timeout_s: float) -> None:
        self.entries: dict[int, ModuleEntry] = {a: ModuleEntry(a) for a in addresses}
        self.comm_timeout_s = comm_timeout_s
        self.garbage_total = 0
        self.last_garbage = -math.inf
        self.group_garbage_at = -math.inf

    def fresh(self, stamp: float, now: float) -> bool:
        return now - stamp <= self.comm_timeout_s

    def is_online(self, m: ModuleEntry, now: float) -> bool:
        return m.last_valid is not None and now - m.last_valid <= self.comm_timeout_s

    def active(self, now: float) -> frozenset[int]:
        """Modules that may share the output: online, ratings known, not being reset."""
        return frozenset(
            a
            for a, m in self.entries.items()
            if not m.resetting and m.ratings is not None and self.is_online(m, now)
        )

    def count_garbage(self, source: int, now: float) -> bool:
        """Count one garbage frame; True if it is the first after a quiet period."""
        quiet_since = self.last_garbage
        self.garbage_total += 1
        self.last_garbage = now
        if source == GROUP_SOURCE:
            self.group_garbage_at = now
        else:
            m = self.entries[source]
            m.garbage += 1
            m.last_garbage = now
        return not self.fresh(quiet_since, now)

    def flags(self, m: ModuleEntry, now: float) -> frozenset[str]:
        """Fresh status flags plus the fresh condition of the last answer."""
        flags = m.flags if self.fresh(m.flags_at, now) else frozenset()
        if m.condition and self.fresh(m.condition_at, now):
            flags = flags | m.condition
        return flags

    def status(self, m: ModuleEntry, now: float) -> ModuleStatus:
        if not self.is_online(m, now):
            return ModuleStatus(
                address=m.address,
                online=False,
                ratings=m.ratings,
                last_seen=m.last_valid,
                health=Health(
                    HealthState.STALE,
                    "comm_timeout",
                    "no valid answer yet" if m.last_valid is None
                    else f"no valid answer for {now - m.last_valid:.1f} s",
                ),
            )
        return ModuleStatus(
            address=m.address,
            online=True,
            voltage=m.voltage if self.fresh(m.voltage_at, now) else None,
            current=m.current if self.fresh(m.current_at, now) else None,
            temperature=m.temperature if self.fresh(m.temperature_at, now) else None,
            output_on=m.output_on if self.fresh(m.output_at, now) else None,
            flags=self.flags(m, now),
            ratings=m.ratings,
            last_seen=m.last_valid,
            health=self.module_health(m, now),
        )

    def module_health(self, m: ModuleEntry, now: float) -> Health:
        flags = self.flags(m, now)
        alarms = flags & ALARM_FLAGS
        if alarms:
            return Health(HealthState.FAULT, "module_alarm", ", ".join(sorted(alarms)))
        if m.mismatch is not None and "stays on" in m.mismatch:
            return Health(HealthState.FAULT, "module_alarm", m.mismatch)
        warnings = flags & WARNING_FLAGS
        if warnings:
            return Health(HealthState.DEGRADED, "module_alarm", ", ".join(sorted(warnings)))
        if m.mismatch is not None:
            return Health(HealthState.DEGRADED, "module_alarm", m.mismatch)
        if self.fresh(m.last_garbage, now):
            return Health(HealthState.DEGRADED, "garbage_frames",
                          f"{m.garbage} garbage frame(s) in total")
        return OK

    def measured_voltage(self, now: float) -> float | None:
        """Mean fresh output voltage of the online modules, ``None`` if there is none."""
        values = [
            m.voltage
            for m in self.entries.values()
            if m.voltage is not None and self.fresh(m.voltage_at, now) and self.is_online(m, now)
        ]
        return sum(values) / len(values) if values else None

    def measured_current(self, now: float) -> float | None:
        """Sum of the fresh output currents of the online modules, ``None`` if none."""
        values = [
            m.current
            for m in self.entries.values()
            if m.current is not None and self.fresh(m.current_at, now) and self.is_online(m, now)
        ]
        return sum(values) if values else None

    def capability(self, now: float) -> ModuleRatings | None:
        """Common voltage range and summed current/power of the active modules."""
        return combined_capability(
            [r for a in self.active(now) if (r := self.entries[a].ratings) is not None]
        )

    def group_health(
        self, *, group: int, started_at: float, answer_timeout_s: float,
        poll_interval_s: float, now: float,
    ) -> Health:
        """The group's health once started and the bus is fine, first match wins:
        STALE comm_timeout (no module online); FAULT module_alarm (alarm flags, or
        output on although commanded off); DEGRADED comm_timeout (some module lost, or
        never answered a few polls after start); DEGRADED module_alarm /
        garbage_frames; OK. A module that has not answered yet since start counts as
        *lost* only after ``comm_timeout_s``."""
        if not self.entries:
            return Health(HealthState.STALE, "comm_timeout", f"no module found in group {group}")
        statuses = [(m, self.status(m, now)) for _, m in sorted(self.entries.items())]
        if not any(s.online for _, s in statuses):
            return Health(
                HealthState.STALE,
                "comm_timeout",
                f"no valid answer from any module within {self.comm_timeout_s:g} s",
            )
        for _, s in statuses:
            if s.health.state is HealthState.FAULT:
                return Health(HealthState.FAULT, s.health.code,
                              f"module {s.address}: {s.health.detail}")
        lost = [
            s.address for m, s in statuses
            if not s.online and (m.ever_online or now - started_at > self.comm_timeout_s)
        ]
        if lost:
            return Health(HealthState.DEGRADED, "comm_timeout",
                          f"module(s) {', '.join(map(str, lost))} lost")
        # a configured module that has not answered a few polls after start is worth
        # showing (a wiring check), even before it counts as lost
        silent = [
            s.address for m, s in statuses
            if not s.online and not m.ever_online
            and now - started_at > 2 * answer_timeout_s + 2 * poll_interval_s
        ]
        if silent:
            return Health(HealthState.DEGRADED, "comm_timeout",
                          f"module(s) {', '.join(map(str, silent))} not answering since start")
        for _, s in statuses:
            if s.health.state is HealthState.DEGRADED:
                return Health(HealthState.DEGRADED, s.health.code,
                              f"module {s.address}: {s.health.detail}")
        if self.fresh(self.group_garbage_at, now):
            return Health(HealthState.DEGRADED, "garbage_frames",
                          f"{self.garbage_total} garbage frame(s) in total")
        return OK
