"""The per-session telemetry archive: storage, tiers, bounds, readers and the connector recorder."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

import agent.maintenance.archive as archive_mod
from agent.maintenance.archive import (
    ARCHIVE_FILENAME,
    STALE_OPEN_S,
    ArchiveConfig,
    ArchiveError,
    ArchiveNotFoundError,
    ArchiveReader,
    SessionArchive,
    SessionRecorder,
    summary_from_record,
)
from agent.charging.session import Session, SessionRequest
from hal.interfaces import TemperatureReading
from tests.agent.fakes import FakeMeter, FakeVehicle

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


@pytest.fixture
async def archive(tmp_path: Path) -> Any:
    a = await SessionArchive.open(tmp_path, cfg())
    yield a
    await a.close()


# --------------------------------------------------------------------------- config


def test_config_defaults_follow_the_proposed_tiers() -> None:
    c = ArchiveConfig()
    assert (c.enabled, c.full_resolution_days, c.minute_means_days) == (True, 30, 90)
    assert c.max_sessions == 2000 and c.max_bytes == 200 * 1024 * 1024


@pytest.mark.parametrize(
    "bad",
    [
        {"full_resolution_days": 40, "minute_means_days": 30},
        {"max_sessions": 10, "max_summaries": 5},
        {"max_bytes": 1000},
        {"full_resolution_days": 0},
        {"retention": 3},
    ],
)
def test_config_rejects_unbounded_or_inconsistent_values(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ArchiveConfig(**bad)


# --------------------------------------------------------------------------- storage


async def test_open_creates_a_wal_database_with_incremental_vacuum(tmp_path: Path) -> None:
    a = await SessionArchive.open(tmp_path / "state", cfg())
    try:
        assert a.available and a.path == tmp_path / "state" / ARCHIVE_FILENAME
        pragmas = await a._job(
            lambda c: [c.execute(f"PRAGMA {p}").fetchone()[0] for p in ("journal_mode", "synchronous", "auto_vacuum", "user_version")],
            write=False,
        )
        assert pragmas == ["wal", 1, 2, 1]  # synchronous NORMAL, auto_vacuum INCREMENTAL, schema v1
    finally:
        await a.close()


async def test_samples_round_trip_with_their_resolution_and_summary(archive: SessionArchive) -> None:
    await archive.begin_session("rec-1", 2, datetime.fromtimestamp(T0, UTC), "charge")
    for i in range(10):
        archive.add_sample("rec-1", 2, T0 + i, 50.123 + i, 401.27, 125.456, 40 + i, 31.25, 0.0139 * i)
    archive.add_sample("rec-1", 2, T0 + 10, None, None, None, None, None, None)
    # no explicit flush: reads see every sample added before them
    rows = await archive.samples("rec-1")
    assert len(rows) == 11 and {r.resolution for r in rows} == {"1s"}
    first = rows[0]
    assert first.t == T0 and first.power_kw == pytest.approx(50.123) and first.voltage == pytest.approx(401.3)
    assert first.current == pytest.approx(125.46) and first.temperature == pytest.approx(31.3)
    assert rows[-1].power_kw is None and rows[-1].energy_kwh is None

    assert await archive.end_session("rec-1", {"stop_reason": "soc_target_reached", "vin_seen": False})
    info = await archive.get_session("rec-1")
    assert info is not None and info.connector_id == 2 and info.mode == "charge"
    s = info.summary
    assert s["stop_reason"] == "soc_target_reached" and s["vin_seen"] is False
    assert s["energy_kwh"] == pytest.approx(0.125) and s["max_power_kw"] == pytest.approx(59.123)
    assert (s["soc_start"], s["soc_end"], s["duration_s"], s["samples_recorded"]) == (40.0, 49.0, 10.0, 11)
    assert info.end_time == T0 + 10 and info.resolution == "1s"


async def test_callers_summary_wins_and_sets_the_end(archive: SessionArchive) -> None:
    await record(archive, "r", T0, 30, end=False)
    await archive.end_session("r", {"energy_kwh": 1.5, "duration_s": 3600, "stop_reason": "remote_stop"})
    info = await archive.get_session("r")
    assert info is not None and info.summary["energy_kwh"] == 1.5 and info.end_time == T0 + 3600
    assert info.duration_s == 3600


async def test_end_of_an_unknown_record_is_refused(archive: SessionArchive) -> None:
    assert await archive.end_session("nope", {"stop_reason": "x"}) is False


async def test_samples_without_begin_create_the_session(archive: SessionArchive) -> None:
    archive.add_sample("orphan", 3, T0 + 5, 1.0, 230.0, 4.0, None, None, 0.0)
    info = await archive.get_session("orphan")
    assert info is not None and info.connector_id == 3 and info.start_time == T0 + 5 and info.is_open


async def test_buffer_is_committed_periodically(tmp_path: Path) -> None:
    a = await SessionArchive.open(tmp_path, cfg(flush_interval_s=0.5))
    try:
        a.add_sample("r", 1, T0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
        with ArchiveReader.open(tmp_path) as reader:
            assert reader.samples("r") == []  # still in memory
            await asyncio.sleep(0.8)
            assert len(reader.samples("r")) == 1
    finally:
        await a.close()


async def test_close_commits_the_buffer(tmp_path: Path) -> None:
    a = await SessionArchive.open(tmp_path, cfg(flush_interval_s=0.5))
    for i in range(50):
        a.add_sample("r", 1, T0 + i, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    await asyncio.sleep(0.5)  # the flusher may be mid-commit when close() cancels it
    for i in range(50, 60):
        a.add_sample("r", 1, T0 + i, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    await a.close()
    a.add_sample("r", 1, T0 + 99, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)  # after close: ignored
    with ArchiveReader.open(tmp_path) as reader:
        assert len(reader.samples("r")) == 60


async def test_cancelled_flush_still_commits_its_batch(tmp_path: Path) -> None:
    a = await SessionArchive.open(tmp_path, cfg())
    gate = threading.Event()
    blocker = asyncio.ensure_future(a._job(lambda c: gate.wait(5.0), write=None))
    a.add_sample("r", 1, T0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    flushing = asyncio.create_task(a.flush())
    await asyncio.sleep(0.05)  # the batch left the buffer; its job waits behind the blocker
    flushing.cancel()
    gate.set()
    assert await blocker is True
    await a.close()
    with ArchiveReader.open(tmp_path) as reader:
        assert len(reader.samples("r")) == 1


async def test_buffer_is_bounded(archive: SessionArchive, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archive_mod, "MAX_BUFFERED", 5)
    for i in range(8):
        archive.add_sample("r", 1, T0 + i, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    assert archive.dropped_samples == 3
    assert [r.t for r in await archive.samples("r")] == [T0 + i for i in range(3, 8)]


async def test_write_failures_are_counted_not_raised(archive: SessionArchive, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fn: Any, write: bool) -> Any:
        raise sqlite3.OperationalError("disk I/O error")

    archive.add_sample("r", 1, T0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    archive.add_sample("r", 1, T0 + 1, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    monkeypatch.setattr(archive, "_in_transaction", broken)
    assert await archive.flush() is False
    assert archive.dropped_samples == 2
    assert await archive.begin_session("x", 1, T0) is False
    assert await archive.compact(T0) is None


async def test_resumed_session_reopens_its_record(tmp_path: Path) -> None:
    a = await SessionArchive.open(tmp_path, cfg())
    await record(a, "r", T0, 20, end=False)
    await a.close()  # agent restart with the session suspended
    a = await SessionArchive.open(tmp_path, cfg())
    try:
        await a.begin_session("r", 1, T0, "charge")
        for i in range(20, 30):
            a.add_sample("r", 1, T0 + i, 10.0, 400.0, 25.0, 50.0, 30.0, 0.01 * i)
        await a.end_session("r", {"stop_reason": "ev_disconnected"})
        info = await a.get_session("r")
        assert info is not None and info.samples_1s == 30 and info.summary["stop_reason"] == "ev_disconnected"
        assert info.end_time == T0 + 29
    finally:
        await a.close()


async def test_disabled_archive_creates_nothing(tmp_path: Path) -> None:
    a = await SessionArchive.open(tmp_path, cfg(enabled=False))
    a.add_sample("r", 1, T0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    assert not a.available and "disabled" in (a.disabled_reason or "")
    assert await a.begin_session("r", 1, T0) is False and await a.list_sessions() == []
    await a.close()
    assert not (tmp_path / ARCHIVE_FILENAME).exists()


async def test_newer_schema_disables_the_archive_and_keeps_the_file(tmp_path: Path) -> None:
    path = tmp_path / ARCHIVE_FILENAME
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE future (x)")
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    a = await SessionArchive.open(tmp_path, cfg())
    assert not a.available and "99" in (a.disabled_reason or "")
    a.add_sample("r", 1, T0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    await a.close()
    assert path.read_bytes() == before
    with pytest.raises(ArchiveError, match="schema version 99"):
        ArchiveReader.open(tmp_path)


async def test_damaged_file_is_kept_aside_and_replaced(tmp_path: Path) -> None:
    (tmp_path / ARCHIVE_FILENAME).write_bytes(b"this is not a database, just junk " * 200)
    a = await SessionArchive.open(tmp_path, cfg())
    try:
        assert a.available
        await record(a, "r", T0, 3)
        assert len(await a.samples("r")) == 3
    finally:
        await a.close()
    kept = list(tmp_path.glob(f"{ARCHIVE_FILENAME}.corrupt-*"))
    assert len(kept) == 1 and kept[0].read_bytes().startswith(b"this is not a database")


async def test_reads_after_close_raise(tmp_path: Path) -> None:
    a = await SessionArchive.open(tmp_path, cfg())
    await a.close()
    await a.close()  # idempotent
    with pytest.raises(ArchiveError):
        await a.list_sessions()


# --------------------------------------------------------------------------- tiers


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


# --------------------------------------------------------------------------- bounds


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


# --------------------------------------------------------------------------- readers


def test_reader_reports_a_missing_archive_and_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(ArchiveNotFoundError):
        ArchiveReader.open(tmp_path)
    assert list(tmp_path.iterdir()) == []


async def test_reader_reads_while_the_agent_writes(tmp_path: Path) -> None:
    a = await SessionArchive.open(tmp_path, cfg())
    try:
        await record(a, "r", T0, 10, end=False)
        await a.flush()
        reader = ArchiveReader.open(tmp_path)
        try:
            # a long read transaction does not block the writer, and sees a stable snapshot
            reader._conn.execute("BEGIN")
            assert len(reader.samples("r")) == 10
            for i in range(10, 20):
                a.add_sample("r", 1, T0 + i, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
            assert await asyncio.wait_for(a.flush(), 5.0) is True
            assert len(reader.samples("r")) == 10
            reader._conn.execute("COMMIT")
            assert len(reader.samples("r")) == 20

            # many reads on another thread while the writer keeps committing
            seen: list[int] = []
            errors: list[BaseException] = []

            def read_loop() -> None:
                try:
                    with ArchiveReader.open(tmp_path) as r2:
                        for _ in range(50):
                            seen.append(len(r2.samples("r")))
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)

            thread = threading.Thread(target=read_loop)
            thread.start()
            for i in range(20, 220):
                a.add_sample("r", 1, T0 + i, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
                if i % 20 == 0:
                    await a.flush()
            await a.flush()
            await asyncio.to_thread(thread.join, 10)
            assert not errors and seen == sorted(seen) and 20 <= seen[0] and seen[-1] <= 220
            assert len(reader.samples("r")) == 220
        finally:
            reader.close()
    finally:
        await a.close()


async def test_reader_lists_newest_first_and_finds_prefixes(archive: SessionArchive, tmp_path: Path) -> None:
    await record(archive, "abc-1", T0, 3)
    await record(archive, "abd-2", T0 + 60, 3)
    await archive.flush()
    with ArchiveReader.open(tmp_path) as reader:
        assert [s.record_id for s in reader.list_sessions()] == ["abd-2", "abc-1"]
        assert [s.record_id for s in reader.list_sessions(limit=1)] == ["abd-2"]
        assert reader.find("ab") == ["abd-2", "abc-1"] and reader.find("abc") == ["abc-1"]
        assert reader.find("a%") == [] and reader.get_session("zzz") is None


# --------------------------------------------------------------------------- recorder


def make_connector(cid: int, *, sensor: str | None = None, temps: dict[str, float | None] | None = None) -> Any:
    thermal = None
    if temps is not None:
        thermal = SimpleNamespace(
            temperatures=lambda: {k: TemperatureReading(k, v) for k, v in temps.items()}
        )
    meter = FakeMeter(energy=1000.0, power_kw=22.0)
    hw = SimpleNamespace(meter=meter, vehicle=FakeVehicle(soc=40), thermal=thermal)
    return SimpleNamespace(id=cid, session=None, hw=hw, config=SimpleNamespace(outlet_sensor=sensor))


def start(connector: Any, *, mode: str = "charge", record_id: str = "rec") -> Session:
    session = Session(
        connector_id=connector.id,
        request=SessionRequest(mode=mode),  # type: ignore[arg-type]
        start_time=datetime.fromtimestamp(T0, UTC),
        started_mono=0.0,
        meter_start=1000.0,
        soc_start=40,
        record_id=record_id,
    )
    connector.session = session
    return session


async def test_recorder_samples_running_sessions_and_closes_ended_ones(archive: SessionArchive) -> None:
    now = [T0]
    c1 = make_connector(1, sensor="dc_outlet", temps={"dc_outlet": 55.5})
    c2 = make_connector(2)  # no thermal: the meter has no temperature either
    recorder = SessionRecorder(archive, [c1, c2], clock=lambda: now[0])
    session = start(c1)
    for step in range(3):
        c1.hw.meter.energy = 1000.0 + 0.5 * step
        session.observe(c1.hw.meter.energy, 22.0, 40 + step)
        c1.hw.vehicle.soc = 40 + step
        await recorder.poll()
        now[0] += 1.0
    session.stop_reason = "soc_target_reached"
    c1.session = None
    await recorder.poll()

    info = await archive.get_session("rec")
    assert info is not None and not info.is_open and info.connector_id == 1 and info.mode == "charge"
    assert info.summary["stop_reason"] == "soc_target_reached" and info.summary["energy_kwh"] == 1.0
    assert info.summary["soc_start"] == 40 and info.summary["soc_end"] == 42 and info.end_time == T0 + 3
    rows = await archive.samples("rec")
    assert [r.energy_kwh for r in rows] == pytest.approx([0.0, 0.5, 1.0])
    assert [r.soc for r in rows] == [40, 41, 42] and rows[0].temperature == pytest.approx(55.5)
    assert rows[0].voltage == pytest.approx(400.0) and rows[0].power_kw is not None
    assert [s.record_id for s in await archive.list_sessions()] == ["rec"]  # connector 2 idle


async def test_recorder_keeps_a_suspended_session_open(archive: SessionArchive) -> None:
    c = make_connector(1)
    recorder = SessionRecorder(archive, [c], clock=lambda: T0)
    start(c)
    await recorder.poll()
    c.session = None  # suspended for a shutdown: no stop reason
    await recorder.poll()
    info = await archive.get_session("rec")
    assert info is not None and info.is_open


async def test_recorder_archives_discharge_energy_from_the_export_register(archive: SessionArchive) -> None:
    c = make_connector(1, sensor="missing", temps={})
    c.hw.meter.export = 1000.75  # Session.meter_start is the export register when discharging
    recorder = SessionRecorder(archive, [c], clock=lambda: T0)
    start(c, mode="discharge")
    await recorder.poll()
    rows = await archive.samples("rec")
    assert rows[0].energy_kwh == pytest.approx(0.75) and rows[0].temperature is None
    assert (await archive.get_session("rec")).mode == "discharge"  # type: ignore[union-attr]


async def test_recorder_survives_a_failing_device(archive: SessionArchive) -> None:
    c = make_connector(1)

    def boom() -> Any:
        raise RuntimeError("driver bug")

    c.hw.meter.reading = boom
    recorder = SessionRecorder(archive, [c], clock=lambda: T0)
    start(c)
    await recorder.poll()
    info = await archive.get_session("rec")
    assert info is not None and info.samples_1s == 0


async def test_recorder_run_compacts_polls_and_stops(archive: SessionArchive) -> None:
    c = make_connector(1)
    start(c)
    stop = asyncio.Event()
    recorder = SessionRecorder(archive, [c])
    task = asyncio.create_task(recorder.run(stop))
    await asyncio.sleep(0.1)
    c.session.stop_reason = "remote_stop"
    c.session = None
    stop.set()
    await asyncio.wait_for(task, 5.0)
    info = await archive.get_session("rec")
    assert info is not None and info.samples_1s >= 1 and info.summary["stop_reason"] == "remote_stop"


def test_summary_from_record_reads_a_charging_record() -> None:
    record = {
        "record_id": "r", "connector_id": 1, "start_time": "2024-05-01T10:00:00Z",
        "end_time": "2024-05-01T11:30:00Z", "energy": 42.5, "max_power": 60.0, "avg_power": 28.3,
        "vehicle_info": {"soc_start": 20, "soc_end": 80},
    }
    summary = summary_from_record(record, "power_loss")
    assert summary == {
        "energy_kwh": 42.5, "max_power_kw": 60.0, "avg_power_kw": 28.3, "soc_start": 20,
        "soc_end": 80, "stop_reason": "power_loss", "duration_s": 5400.0,
    }
