"""The read-only archive reader: missing file, reading while the agent writes, listing and
prefixes.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from agent.maintenance.archive import ArchiveNotFoundError, ArchiveReader, SessionArchive
from tests.agent.maintenance.archive.helpers import T0, cfg, record


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
