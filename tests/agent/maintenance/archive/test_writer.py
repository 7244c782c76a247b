"""The session archive's storage: WAL file, round trips, buffering, failures, disabled, newer and
damaged files.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import agent.maintenance.archive.writer as archive_writer
from agent.maintenance.archive import ARCHIVE_FILENAME, ArchiveError, ArchiveReader, SessionArchive
from tests.agent.maintenance.archive.helpers import T0, cfg, record


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
    monkeypatch.setattr(archive_writer, "MAX_BUFFERED", 5)
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
