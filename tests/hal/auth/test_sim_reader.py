"""The simulated ID-token reader: taps written by the simulator's control endpoint."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hal.auth.interface import IdTokenReader, uid_to_id_tag
from hal.auth.sim import SimulatedReader, record_tap


async def test_taps_after_start_are_read_once_in_order(tmp_path: Path) -> None:
    record_tap(tmp_path, 1, "OLD")  # before the reader started: not a tap
    reader = SimulatedReader(tmp_path / "auth" / "taps-1.jsonl", poll_s=0.01)
    assert isinstance(reader, IdTokenReader)
    reader._read()
    record_tap(tmp_path, 1, "A1")
    record_tap(tmp_path, 1, "B2")
    assert await asyncio.wait_for(reader.next_tap(), 2) == "A1"
    assert await asyncio.wait_for(reader.next_tap(), 2) == "B2"
    (tmp_path / "auth" / "taps-1.jsonl").open("a").write('{"id_tag": "' + "X" * 30 + '"}\nnot json\n')
    record_tap(tmp_path, 1, "C3")
    assert await asyncio.wait_for(reader.next_tap(), 2) == "C3"  # invalid lines are skipped


def test_uid_to_id_tag() -> None:
    assert uid_to_id_tag(bytes.fromhex("04a1b2c3d4e5f6")) == "04A1B2C3D4E5F6"
    assert len(uid_to_id_tag(bytes(16))) == 20
