"""Recovery of a damaged state database: ``python -m agent.store recover`` salvages every readable
row and keeps the damaged file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.store import StateDB, Store, StoreCorruptError, check_database, recover_database
from agent.store.recovery import main as store_main
from tests.agent.store.helpers import _raw, _sha


async def _fill_and_corrupt(state_dir: Path) -> int:
    store = await Store.open(state_dir)
    for i in range(400):
        await store.outbox.put("charging_record", {"record_id": f"r{i}", "pad": "x" * 200})
    await store.kv.set("limit", {"kw": 7})
    await store.close()
    path = state_dir / "agent.db"
    with _raw(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'outbox'").fetchone()
    # Smash a few pages in the middle of the outbox b-tree (not the schema page).
    data = bytearray(path.read_bytes())
    pages = len(data) // page_size
    target = max(root[0] + 3, pages // 2)
    for p in (target, target + 1):
        data[(p - 1) * page_size : p * page_size] = bytes([0xA5]) * page_size
    path.write_bytes(bytes(data))
    return 400


async def test_corrupt_pages_refused_then_recovered(state_dir: Path) -> None:
    total = await _fill_and_corrupt(state_dir)
    path = state_dir / "agent.db"
    before = _sha(path)
    with pytest.raises(StoreCorruptError):
        await StateDB.open(state_dir)
    assert _sha(path) == before
    assert check_database(state_dir) != ["ok"]

    report = recover_database(state_dir)
    assert report.moved_to is not None and report.moved_to.exists()
    assert _sha(report.moved_to) == before  # the evidence is kept byte for byte
    assert 0 < report.salvaged["outbox"] < total
    assert report.salvaged["kv"] == 1

    store = await Store.open(state_dir)
    try:
        items = await store.outbox.next_batch(1000)
        assert len(items) == report.salvaged["outbox"]
        assert all(item.payload["pad"] == "x" * 200 for item in items)
        assert await store.kv.get("limit") == {"kw": 7}
        assert store.outbox.depth()["charging_record"] == len(items)
    finally:
        await store.close()
    assert check_database(state_dir) == ["ok"]


async def test_recover_cli(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    await _fill_and_corrupt(state_dir)
    assert store_main(["check", "--state-dir", str(state_dir)]) == 1
    assert store_main(["recover", "--state-dir", str(state_dir)]) == 0
    out = capsys.readouterr().out
    assert "damaged database kept as" in out and "rows salvaged" in out
    assert store_main(["check", "--state-dir", str(state_dir)]) == 0
