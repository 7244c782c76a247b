"""``firmware_upgrade`` through the real dispatcher, ledger, reporter and outbox."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.commands.dispatcher import Dispatcher
from agent.firmware.command import firmware_command_spec
from agent.channels.tellus.reporter import Reporter
from agent.store import Store

from .helpers import FakeBuilder, FileServer, Rig, fake_bundle, layout, make_keys


async def test_dispatcher_runs_and_validates_firmware_upgrade(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "db")
    reporter = Reporter(store, [1])
    await reporter.start()
    server = await FileServer().start()
    try:
        rig = Rig(tmp_path, make_keys(tmp_path / "keys"))
        layout(rig.root)
        rig.kv, rig.outbox, rig.statuses = store.kv, store.outbox, reporter.command_status  # type: ignore[assignment]
        manager = rig.manager("0.1.0", FakeBuilder())
        dispatcher = Dispatcher(store.ledger, reporter, {}, {"firmware_upgrade": firmware_command_spec(manager)})

        await dispatcher.deliver({"command_id": "c-bad", "command": "firmware_upgrade", "params": {"version": "1.0"}}, "heartbeat", None)
        result = fake_bundle(tmp_path, rig.keys, size=50_000)
        url = server.add(result.bundle.name, result.bundle.read_bytes())
        cmd = {"command_id": "c-1", "command": "firmware_upgrade", "params": {**result.params(), "url": url}}
        await dispatcher.deliver(cmd, "poll", 1)
        assert manager._task is not None
        await asyncio.wait_for(manager._task, 10)
        await dispatcher.deliver({**cmd, "command_id": "c-2"}, "poll", 1)  # one upgrade at a time
        await reporter.drain()

        bad = await store.ledger.seen("c-bad")
        assert bad is not None and bad.status == "rejected" and bad.message == "params.url: required"
        busy = await store.ledger.seen("c-2")
        assert busy is not None and busy.status == "rejected" and "already in progress" in (busy.message or "")
        entry = await store.ledger.seen("c-1")
        assert entry is not None and entry.status == "accepted" and entry.message == "restarting into 0.2.0"
        assert rig.restarts == ["agent"]

        # the restarted agent: the new version confirms itself after its first heartbeat
        await rig.manager("0.2.0", FakeBuilder()).after_start(lambda: True)
        await reporter.drain()
        entry = await store.ledger.seen("c-1")
        assert entry is not None and entry.status == "completed"
        statuses = [i.payload for i in await store.outbox.next_batch(100, kinds=["command_status"]) if i.payload["command_id"] == "c-1"]
        assert [(s["status"], s.get("message")) for s in statuses] == [
            ("accepted", "downloading firmware 0.2.0"),
            ("accepted", "installing 0.2.0"),
            ("accepted", "restarting into 0.2.0"),
            ("completed", "firmware 0.2.0 installed and running"),
        ]
    finally:
        await server.stop()
        await reporter.stop()
        await store.close()
