"""Session archive compaction: tiers, stale open sessions, and the bounds on sessions, summaries
and bytes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.maintenance.archive import ARCHIVE_FILENAME, STALE_OPEN_S, SessionArchive
from tests.agent.maintenance.archive.helpers import DAY, T0, cfg, record


async def test_tiers_go_from_seconds_to_minute_means_to_summary(archive: SessionArchive) -> None:
    # three whole minutes; power 10..69 in each minute (mean 39.5), SOC missing in minute 0
    await record(
        archive, "r", T0, 180,
        power=lambda i: 10.0 + i % 60,
        soc=lambda i: None if i < 60 else float(i // 60 * 10),
    )
    report = await archive.compact(T0 + 10 * DAY)
    assert report is not None and report.minute_rows_created == 0
    assert (await archive.get_session("r")).resolution == "1s"  # type: ignore[union-attr]

    report = await archive.compact(T0 + 31 * DAY)
    assert report is not None and (report.minute_rows_created, report.second_rows_merged) == (3, 180)
    rows = await archive.samples("r")
    assert [r.resolution for r in rows] == ["1min"] * 3
    assert [r.t for r in rows] == [T0, T0 + 60, T0 + 120]
    assert all(r.power_kw == pytest.approx(39.5) for r in rows)
    assert [r.soc for r in rows] == [None, 10.0, 20.0]
    assert [r.energy_kwh for r in rows] == pytest.approx([0.59, 1.19, 1.79])  # last of each minute
    assert rows[0].voltage == pytest.approx(401.0) and rows[0].temperature == pytest.approx(30.0)
    summary_before = (await archive.get_session("r")).summary  # type: ignore[union-attr]

    report = await archive.compact(T0 + 91 * DAY)
    assert report is not None and report.expired_rows == 3
    info = await archive.get_session("r")
    assert info is not None and info.resolution == "summary" and await archive.samples("r") == []
    assert info.summary == summary_before and info.summary["energy_kwh"] == pytest.approx(1.79)


async def test_tier_boundary_merges_whole_minutes_only(archive: SessionArchive) -> None:
    await record(archive, "r", T0, 180)
    # the cut falls 90 s into the session: minute 0 merges, minute 1 (straddling) stays at 1 s
    await archive.compact(T0 + 30 * DAY + 90)
    info = await archive.get_session("r")
    assert info is not None and info.resolution == "1s+1min"
    assert (info.samples_1min, info.samples_1s) == (1, 120)
    rows = await archive.samples("r")
    assert rows[0].resolution == "1min" and rows[1].t == T0 + 60 and rows[1].resolution == "1s"


async def test_stale_open_session_gets_an_interrupted_summary(tmp_path: Path) -> None:
    a = await SessionArchive.open(tmp_path, cfg())
    await record(a, "crashed", T0, 60, end=False)
    await a.close()  # the agent died: nobody will end it
    a = await SessionArchive.open(tmp_path, cfg())
    try:
        report = await a.compact(T0 + 59 + STALE_OPEN_S - 10)
        assert report is not None and report.finalized == 0
        report = await a.compact(T0 + 59 + STALE_OPEN_S + 10)
        assert report is not None and report.finalized == 1
        info = await a.get_session("crashed")
        assert info is not None and not info.is_open and info.end_time == T0 + 59
        assert info.summary["interrupted"] is True and info.summary["energy_kwh"] == pytest.approx(0.59)
    finally:
        await a.close()


async def test_recording_session_is_never_finalized_or_trimmed(archive: SessionArchive) -> None:
    await record(archive, "live", T0, 60, end=False)
    await record(archive, "newer", T0 + 100, 10)
    archive.config = cfg(max_sessions=1)
    report = await archive.compact(T0 + 59 + 2 * STALE_OPEN_S)
    assert report is not None and report.finalized == 0
    assert report.sessions_trimmed == 0  # "newer" is within the limit, "live" is recording
    live = await archive.get_session("live")
    assert live is not None and live.is_open and live.samples_1s == 60
    await archive.end_session("live", {"stop_reason": "user_request"})
    report = await archive.compact(T0 + 59 + 2 * STALE_OPEN_S)
    assert report is not None and report.sessions_trimmed == 1
    assert (await archive.get_session("live")).resolution == "summary"  # type: ignore[union-attr]


async def test_max_sessions_drops_the_oldest_samples_and_keeps_summaries(tmp_path: Path) -> None:
    a = await SessionArchive.open(tmp_path, cfg(max_sessions=3))
    try:
        for n in range(5):
            await record(a, f"s{n}", T0 + n * 3600, 30)
        report = await a.compact(T0 + DAY)
        assert report is not None and report.sessions_trimmed == 2
        kept = {s.record_id: s.resolution for s in await a.list_sessions()}
        assert kept == {"s4": "1s", "s3": "1s", "s2": "1s", "s1": "summary", "s0": "summary"}
        s0 = await a.get_session("s0")
        assert s0 is not None and s0.summary["stop_reason"] == "user_request"
        assert s0.summary["energy_kwh"] == pytest.approx(0.29)
    finally:
        await a.close()


async def test_max_summaries_bounds_the_session_list(tmp_path: Path) -> None:
    a = await SessionArchive.open(tmp_path, cfg(max_sessions=2, max_summaries=3))
    try:
        for n in range(5):
            await record(a, f"s{n}", T0 + n * 3600, 5)
        report = await a.compact(T0 + DAY)
        assert report is not None and report.summaries_dropped == 2
        assert [s.record_id for s in await a.list_sessions()] == ["s4", "s3", "s2"]
        assert await a.get_session("s0") is None and await a.samples("s0") == []
    finally:
        await a.close()


async def test_max_bytes_trims_the_oldest_sessions_until_it_fits(tmp_path: Path) -> None:
    budget = 1024 * 1024
    a = await SessionArchive.open(tmp_path, cfg(max_bytes=budget))
    try:
        for n in range(4):
            await record(a, f"s{n}", T0 + n * DAY, 12_000, power=lambda i: 11.0 + i * 0.001)
        assert await a.bytes_used() > budget
        report = await a.compact(T0 + 5 * DAY)
        assert report is not None and report.sessions_trimmed >= 1 and report.bytes_used <= budget
        assert await a.bytes_used() <= budget
        kept = {s.record_id: s.resolution for s in await a.list_sessions()}
        assert kept["s3"] == "1s" and kept["s0"] == "summary"
        assert len(kept) == 4  # summaries survive the byte budget when samples suffice
    finally:
        await a.close()
    # freed pages went back to the file system
    assert (tmp_path / ARCHIVE_FILENAME).stat().st_size <= budget + 64 * 1024
