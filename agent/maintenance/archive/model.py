"""The session archive's vocabulary: its config, errors, rows and the scaled-integer encoding of
sample values (see :mod:`agent.maintenance.archive` for the contract).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

from pydantic import Field, model_validator

from agent.utctime import to_iso
from hal.config import StrictModel

ARCHIVE_FILENAME: Final = "archive.db"


#: Samples kept in memory between two commits; beyond this the oldest are dropped.
MAX_BUFFERED: Final = 20_000


#: A session neither ended nor recording, silent this long, is closed by :meth:`compact`.
STALE_OPEN_S: Final = 6 * 3600.0


_MIB: Final = 1024 * 1024


_DAY_MS: Final = 86_400_000


_MINUTE_MS: Final = 60_000


_INT_LIMIT: Final = 2**62


Resolution = Literal["1s", "1min"]


#: (public name, stored column, scale): stored = round(value * scale)
_VALUES: Final = (
    ("power_kw", "power_w", 1000.0),
    ("voltage", "voltage_dv", 10.0),
    ("current", "current_ca", 100.0),
    ("soc", "soc_dp", 10.0),
    ("temperature", "temp_dc", 10.0),
    ("energy_kwh", "energy_wh", 1000.0),
)


_STORED: Final = ", ".join(col for _, col, _ in _VALUES)


class ArchiveConfig(StrictModel):
    """The ``[archive]`` table: tiered, bounded retention of per-session 1 s telemetry."""

    enabled: bool = Field(True, description="record every session's 1 s samples in archive.db")
    full_resolution_days: int = Field(30, ge=1, le=365, description="1 s samples kept this long")
    minute_means_days: int = Field(
        90, ge=1, le=3650, description="1-minute means kept this long; after that only the summary"
    )
    max_sessions: int = Field(
        2000, ge=1, le=100_000, description="sessions that keep samples; the oldest lose theirs first"
    )
    max_summaries: int = Field(
        50_000, ge=1, le=1_000_000, description="sessions kept at all (summary only beyond max_sessions)"
    )
    max_bytes: int = Field(
        200 * _MIB,
        ge=1 * _MIB,
        le=64 * 1024 * _MIB,
        description="data size budget of archive.db (the WAL beside it adds up to 4 MiB)",
    )
    flush_interval_s: float = Field(5.0, ge=0.5, le=60.0, description="buffered samples are committed this often")
    compact_interval_s: float = Field(3600.0, ge=60.0, le=86_400.0, description="tiers and bounds applied this often")

    @model_validator(mode="after")
    def _ordered(self) -> ArchiveConfig:
        if self.minute_means_days < self.full_resolution_days:
            raise ValueError("minute_means_days must be at least full_resolution_days")
        if self.max_summaries < self.max_sessions:
            raise ValueError("max_summaries must be at least max_sessions")
        return self


class ArchiveError(Exception):
    """The archive cannot be read (missing, damaged, closed, or a schema this code does not know)."""


class ArchiveNotFoundError(ArchiveError):
    """There is no ``archive.db`` in the given state directory."""


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One archived session. Times are Unix seconds; ``summary`` is ``{}`` while it is open.

    ``resolution`` is what is kept of its samples: ``"1s"``, ``"1min"``, ``"1s+1min"`` (a
    session straddling the tier boundary) or ``"summary"`` (samples gone).
    """

    record_id: str
    connector_id: int
    mode: str | None
    start_time: float
    end_time: float | None
    summary: dict[str, Any]
    samples_1s: int
    samples_1min: int

    @property
    def resolution(self) -> str:
        if self.samples_1s and self.samples_1min:
            return "1s+1min"
        if self.samples_1s:
            return "1s"
        if self.samples_1min:
            return "1min"
        return "summary"

    @property
    def is_open(self) -> bool:
        return self.end_time is None

    @property
    def duration_s(self) -> float | None:
        value = self.summary.get("duration_s")
        if isinstance(value, (int, float)):
            return float(value)
        return None if self.end_time is None else max(self.end_time - self.start_time, 0.0)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready view: ISO 8601 UTC times plus the derived ``resolution``."""
        out = asdict(self)
        out["start_time"] = to_iso(self.start_time)
        out["end_time"] = to_iso(self.end_time) if self.end_time is not None else None
        out["resolution"] = self.resolution
        return out


@dataclass(frozen=True, slots=True)
class SampleRow:
    """One stored sample. ``t`` is Unix seconds (the minute's start for ``"1min"`` rows)."""

    t: float
    resolution: Resolution
    power_kw: float | None
    voltage: float | None
    current: float | None
    soc: float | None
    temperature: float | None
    energy_kwh: float | None


#: Column order of :class:`SampleRow` (CSV header of ``sessions show --csv``).
SAMPLE_COLUMNS: Final = ("t", "resolution", *(name for name, _, _ in _VALUES))


@dataclass(frozen=True, slots=True)
class CompactReport:
    """What one :meth:`SessionArchive.compact` did."""

    finalized: int  # stale open sessions closed with a computed summary
    minute_rows_created: int
    second_rows_merged: int
    expired_rows: int  # samples older than minute_means_days deleted
    sessions_trimmed: int  # sessions whose samples were dropped for max_sessions / max_bytes
    summaries_dropped: int  # sessions removed entirely for max_summaries / max_bytes
    bytes_used: int


def _unix(value: datetime | float) -> float:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.timestamp()
    return float(value)


def _enc(value: float | None, scale: float) -> int | None:
    if value is None:
        return None
    try:
        x = float(value) * scale
    except (TypeError, ValueError):
        return None
    if not math.isfinite(x):
        return None
    return max(-_INT_LIMIT, min(_INT_LIMIT, math.floor(x + 0.5)))  # half up, not to even


def _dec(value: Any, scale: float) -> float | None:
    return None if value is None else value / scale
