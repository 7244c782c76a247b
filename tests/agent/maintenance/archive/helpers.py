"""Shared helpers of the session archive tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agent.maintenance.archive import ArchiveConfig, SessionArchive

T0 = 1_699_999_980.0  # a whole UTC minute


DAY = 86_400.0


def cfg(**kw: Any) -> ArchiveConfig:
    return ArchiveConfig(**kw)


async def record(
    archive: SessionArchive,
    record_id: str,
    start: float,
    seconds: int,
    *,
    connector: int = 1,
    power: Callable[[int], float | None] = lambda i: 10.0,
    soc: Callable[[int], float | None] = lambda i: 20.0 + i / 60.0,
    end: bool = True,
    stop_reason: str = "user_request",
) -> None:
    """A session of ``seconds`` 1 s samples starting at ``start``; energy grows 0.01 kWh/s."""
    await archive.begin_session(record_id, connector, start, "charge")
    for i in range(seconds):
        archive.add_sample(record_id, connector, start + i, power(i), 400.0 + i % 3, 25.0, soc(i), 30.0, 0.01 * i)
    if end:
        await archive.end_session(record_id, {"stop_reason": stop_reason})
