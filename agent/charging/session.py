"""Session bookkeeping: what authorised a session, and its accounting from the meter.

Pure data and arithmetic, no I/O. The charging record built here is exactly the
platform's ChargingRecordUpload body (plus the Project-choice extensions
``stop_reason``/``transaction_id`` when enabled). Energy is always
``meter_end - meter_start`` of the rounded register values, so a record can be
checked against the meter by anyone.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Mapping, Required, TypedDict

from agent.utctime import parse_iso, to_iso, utc_now

#: start reasons (platform-api §7.2 Project choice)
START_REASONS = ("remote_start", "local_auth", "schedule")
#: stop reasons (platform-api §7.2 Project choice)
STOP_REASONS = (
    "user_request",
    "remote_stop",
    "time_limit",
    "soc_target_reached",
    "energy_limit",
    "ev_disconnected",
    "fault",
    "schedule",
    "power_loss",
)
#: stops that F-0805 does not consider unexpected
CLEAN_STOPS = frozenset({"user_request", "remote_stop", "time_limit", "soc_target_reached", "energy_limit", "schedule"})


class Checkpoint(TypedDict, total=False):
    """A session as persisted: everything needed to close it (or resume it) after a restart.

    Written by :meth:`Session.checkpoint` into the state store on every change of its
    accounting; ``suspended_at`` is added when a clean shutdown suspended the session.
    """

    record_id: Required[str]
    connector_id: Required[int]
    start_time: Required[str]  # ISO 8601 UTC ``Z``
    meter_start: Required[float]  # kWh register (import, or export when discharging)
    meter_now: float
    max_power_kw: float
    mode: Literal["charge", "discharge"]
    start_reason: str
    command_id: str | None
    transaction_id: str | None
    soc_start: int | None
    soc_now: int | None
    vin: str | None
    checkpoint_time: str
    suspended_at: str


def as_checkpoint(raw: Mapping[str, Any]) -> Checkpoint:
    """Check a checkpoint read back from the store; raise ``ValueError`` naming the bad key.

    Keys beyond :class:`Checkpoint` are dropped; optional keys may be absent.
    """
    for key, kinds in (("record_id", (str,)), ("connector_id", (int,)), ("start_time", (str,)), ("meter_start", (int, float))):
        value = raw.get(key)
        if not isinstance(value, kinds) or isinstance(value, bool) or value == "":
            raise ValueError(f"checkpoint.{key}: expected {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    try:
        parse_iso(str(raw["start_time"]))
    except ValueError:
        raise ValueError(f"checkpoint.start_time: expected an ISO 8601 date-time, got {raw['start_time']!r}") from None
    mode = raw.get("mode", "charge")
    if mode not in ("charge", "discharge"):
        raise ValueError(f"checkpoint.mode: expected 'charge' or 'discharge', got {mode!r}")
    known = Checkpoint.__annotations__.keys()
    return Checkpoint(**{k: v for k, v in raw.items() if k in known})  # type: ignore[typeddict-item]


@dataclass
class SessionRequest:
    """What authorised (or will authorise) a session on one connector."""

    mode: Literal["charge", "discharge"] = "charge"
    start_reason: str = "remote_start"
    command_id: str | None = None
    power_kw: float | None = None  # charge_power / discharge_power
    duration_s: float | None = None
    target_soc: int | None = None
    min_soc: int | None = None
    transaction_id: str | None = None
    schedule_id: str | None = None
    resume: Checkpoint | None = None  # checkpoint of a suspended session to continue


@dataclass
class Session:
    """A running session. ``meter_*`` are kWh register values (import, or export when discharging)."""

    connector_id: int
    request: SessionRequest
    start_time: datetime
    started_mono: float
    meter_start: float
    soc_start: int | None
    record_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    meter_now: float = 0.0
    max_power_kw: float = 0.0
    soc_now: int | None = None
    vin: str | None = None
    stop_reason: str | None = None

    def __post_init__(self) -> None:
        if self.meter_now == 0.0:
            self.meter_now = self.meter_start
        if self.soc_now is None:
            self.soc_now = self.soc_start

    @property
    def energy_kwh(self) -> float:
        return round(self.meter_now, 3) - round(self.meter_start, 3)

    def observe(self, meter_kwh: float, power_kw: float, soc: int | None) -> None:
        """Account one fresh meter reading (the register never goes backwards here)."""
        if meter_kwh >= self.meter_now:
            self.meter_now = meter_kwh
        self.max_power_kw = max(self.max_power_kw, abs(power_kw))
        if soc is not None:
            self.soc_now = soc

    @classmethod
    def from_checkpoint(cls, cp: Checkpoint, request: SessionRequest, now_mono: float) -> "Session":
        """Continue a suspended session: same record, start and meter_start."""
        start = parse_iso(str(cp["start_time"]))
        elapsed = max((utc_now() - start).total_seconds(), 0.0)
        return cls(
            connector_id=int(cp["connector_id"]),
            request=request,
            start_time=start,
            started_mono=now_mono - elapsed,
            meter_start=float(cp["meter_start"]),
            soc_start=cp.get("soc_start"),
            record_id=str(cp["record_id"]),
            meter_now=float(cp.get("meter_now", cp["meter_start"])),
            max_power_kw=float(cp.get("max_power_kw", 0.0)),
            soc_now=cp.get("soc_now"),
            vin=cp.get("vin"),
        )

    def checkpoint(self) -> Checkpoint:
        """Everything needed to close this session after a power loss."""
        return {
            "record_id": self.record_id,
            "connector_id": self.connector_id,
            "mode": self.request.mode,
            "start_reason": self.request.start_reason,
            "command_id": self.request.command_id,
            "transaction_id": self.request.transaction_id,
            "start_time": to_iso(self.start_time),
            "meter_start": self.meter_start,
            "meter_now": self.meter_now,
            "max_power_kw": self.max_power_kw,
            "soc_start": self.soc_start,
            "soc_now": self.soc_now,
            "vin": self.vin,
            "checkpoint_time": to_iso(utc_now()),
        }


def build_record(
    *,
    record_id: str,
    connector_id: int,
    start_time: str,
    end_time: str,
    meter_start: float,
    meter_end: float,
    max_power_kw: float,
    soc_start: int | None,
    soc_end: int | None,
    stop_reason: str,
    transaction_id: str | None = None,
    mode: str = "charge",
    vin: str | None = None,
    extensions: bool = True,
) -> dict[str, Any]:
    """The ChargingRecordUpload body. ``energy`` = rounded ``meter_end - meter_start``."""
    m_start = round(meter_start, 3)
    m_end = round(max(meter_end, meter_start), 3)
    energy = round(m_end - m_start, 3)
    t0 = parse_iso(start_time)
    t1 = parse_iso(end_time)
    hours = max((t1 - t0).total_seconds(), 1.0) / 3600.0
    avg = round(min(energy / hours, max_power_kw) if max_power_kw > 0 else energy / hours, 3)
    record: dict[str, Any] = {
        "record_id": record_id,
        "connector_id": connector_id,
        "start_time": start_time,
        "end_time": end_time,
        "energy": energy,
        "max_power": round(max(max_power_kw, avg), 3),
        "avg_power": avg,
        "meter_start": m_start,
        "meter_end": m_end,
    }
    vehicle: dict[str, Any] = {}
    if soc_start is not None:
        vehicle["soc_start"] = soc_start
    if soc_end is not None:
        vehicle["soc_end"] = soc_end
    if vin:
        vehicle["vin"] = vin
    if vehicle:
        record["vehicle_info"] = vehicle
    if extensions:
        record["stop_reason"] = stop_reason
        if transaction_id:
            record["transaction_id"] = transaction_id
        if mode == "discharge":
            record["direction"] = "discharge"
    return record


def record_from_checkpoint(
    cp: Checkpoint, *, end_time: str, meter_end: float | None, stop_reason: str, extensions: bool, send_vin: bool
) -> dict[str, Any]:
    """Close a session from its last checkpoint (power loss, or a restart mid-session).

    ``meter_end`` is the meter's register read after the restart when available: it
    includes energy delivered after the last checkpoint. It is ignored if it is
    below the checkpoint (a replaced meter must not produce negative energy).
    """
    end = float(cp["meter_now"])
    if meter_end is not None and meter_end >= end:
        end = meter_end
    return build_record(
        record_id=cp["record_id"],
        connector_id=int(cp["connector_id"]),
        start_time=cp["start_time"],
        end_time=end_time,
        meter_start=float(cp["meter_start"]),
        meter_end=end,
        max_power_kw=float(cp["max_power_kw"]),
        soc_start=cp.get("soc_start"),
        soc_end=cp.get("soc_now"),
        stop_reason=stop_reason,
        transaction_id=cp.get("transaction_id"),
        mode=str(cp.get("mode", "charge")),
        vin=cp.get("vin") if send_vin else None,
        extensions=extensions,
    )
