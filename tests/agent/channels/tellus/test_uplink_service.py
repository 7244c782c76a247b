"""Uplink loops against the real emulator: commands in, outbox out, shaping, lifecycle
(virtual time: see vtime.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from agent.emulator import OutageMode, RequestKind
from tests.agent.channels.tellus.harness import (
    Delivered,
    command_status,
    event,
    firmware_status,
    harness,
    record,
    telemetry,
    telemetry_seq,
    wait_for,
)
from tests.agent.channels.tellus.vtime import virtual_time

KIND_OF_REQUEST = {
    RequestKind.COMMAND_STATUS: "command_status",
    RequestKind.CHARGING_RECORDS: "charging_record",
    RequestKind.EVENTS: "event",
    RequestKind.FIRMWARE_STATUS: "firmware_status",
    RequestKind.TELEMETRY: "telemetry",
}


@virtual_time()
async def test_heartbeat_piggybacked_commands_reach_deliver(tmp_path: Path) -> None:
    async with harness(tmp_path / "state", connector_ids=[]) as h:  # no long-poll: heartbeat only
        uplink = await h.started()
        first = h.emu.queue_command(command="firmware_upgrade", params={"url": "https://x/fw.bin"})
        second = h.emu.queue_command(command="reboot")
        uplink.heartbeat_soon()
        await h.wait_delivered(2)
        assert [(d.command["command_id"], d.channel, d.connector_id) for d in h.delivered] == [
            (first, "heartbeat", None),
            (second, "heartbeat", None),
        ]
        assert h.delivered[0].command["params"] == {"url": "https://x/fw.bin"}


@virtual_time()
async def test_long_poll_delivers_a_connector_command_on_its_own_channel(tmp_path: Path) -> None:
    async with harness(tmp_path / "state", connector_ids=[1, 2], long_poll_wait_s=30) as h:
        await h.started()
        await asyncio.sleep(1)
        command_id = h.emu.queue_command(command="stop_charging", connector_id=2)
        await h.wait_delivered(1)
        (delivered,) = h.delivered
        assert (delivered.command["command_id"], delivered.channel, delivered.connector_id) == (
            command_id,
            "long_poll:2",
            2,
        )
        # held polls are never cut off locally (read timeout wait + 15 s): 10 idle minutes,
        # every poll ran its full 30 s and answered 200
        await asyncio.sleep(600)
        done = h.received(RequestKind.COMMANDS)
        assert {r.query["connector_id"] for r in done} == {"1", "2"}
        assert all(r.query["wait"] == "30" and r.http_status == 200 for r in done)
        assert 2 * 19 <= len(done) <= 2 * 21 + 1


@virtual_time()
async def test_outbox_is_sent_in_priority_order(tmp_path: Path) -> None:
    async with harness(tmp_path / "state") as h:
        await h.make_uplink().tokens.token()  # registered; nothing is running yet
        commands = [h.emu.queue_command(command="reboot", deliveries=1) for _ in range(2)]
        outbox = h.store.outbox
        for i in range(3):  # queued lowest priority first
            await outbox.put("telemetry", telemetry(i))
            await outbox.put("firmware_status", firmware_status(10 * i))
            await outbox.put("event", event(i))
            await outbox.put("charging_record", record(f"rec-{i}"))
        for cid in commands:
            await outbox.put("command_status", command_status(cid))
        await h.started()
        await h.drained()
        sent = [KIND_OF_REQUEST[r.kind] for r in h.received() if r.kind in KIND_OF_REQUEST]
        assert sent[0] == "command_status"
        # strict priority within the shaped "other" class; telemetry has a bucket of its own
        # and is not held behind that class's shaping (one class never stalls the other)
        assert (
            [k for k in sent if k != "telemetry"]
            == ["command_status"] * 2
            + ["charging_record"] * 3
            + ["event"] * 3
            + ["firmware_status"] * 3
        )
        assert sent.count("telemetry") == 3
        assert [telemetry_seq(r.body) for r in h.received(RequestKind.TELEMETRY)] == [
            0,
            1,
            2,
        ]  # oldest first


@virtual_time()
async def test_items_are_acked_only_after_the_platform_accepted_them(tmp_path: Path) -> None:
    async with harness(tmp_path / "state") as h:
        uplink = await h.started()
        h.emu.start_outage(90, OutageMode.HTTP_503)
        await h.store.outbox.put("charging_record", record("rec-outage"))
        await wait_for(lambda: not uplink.online, timeout=10)
        await asyncio.sleep(60)
        assert h.store.outbox.depth()["charging_record"] == 1  # failed attempts keep it queued
        (queued,) = await h.store.outbox.next_batch(5)
        assert queued.attempts >= 1 and "503" in (queued.last_error or "")
        await h.drained(timeout=300)
        stored = h.emu.context.store.charging_records()
        assert [r.record_id for r in stored] == ["rec-outage"] and stored[0].duplicate_attempts == 0


@virtual_time()
async def test_permanent_rejections_are_dead_lettered_and_do_not_block_the_queue(
    tmp_path: Path,
) -> None:
    async with harness(tmp_path / "state") as h:
        uplink = await h.started()
        outbox = h.store.outbox
        bad_telemetry = {**telemetry(0), "state": "preparing"}  # not in the enum: 400/1001
        await outbox.put("telemetry", bad_telemetry)
        await outbox.put("telemetry", telemetry(1))
        bad_record = {k: v for k, v in record("rec-bad").items() if k != "meter_end"}  # 400/1002
        await outbox.put("charging_record", bad_record)
        await outbox.put("charging_record", record("rec-good"))
        await outbox.put("command_status", command_status("cmd_unknown"))  # 404/3001: dropped
        await h.drained()
        dead = await outbox.dead_letters()
        assert sorted(d.kind for d in dead) == ["charging_record", "command_status", "telemetry"]
        by_kind = {d.kind: d for d in dead}
        assert (
            by_kind["telemetry"].payload == bad_telemetry and "1001" in by_kind["telemetry"].reason
        )
        assert (
            by_kind["charging_record"].payload == bad_record
            and "1002" in by_kind["charging_record"].reason
        )
        assert "3001" in by_kind["command_status"].reason
        assert [telemetry_seq(r.body) for r in h.accepted(RequestKind.TELEMETRY)] == [1]
        assert [r.record_id for r in h.emu.context.store.charging_records()] == ["rec-good"]
        assert uplink.stats.dead_lettered == 3 and uplink.online
        assert all(r.http_status < 500 for r in h.received())  # nothing was retried as transient
        assert len(h.received(RequestKind.TELEMETRY)) == 2  # the rejected item was sent once


@virtual_time()
async def test_duplicate_charging_record_counts_as_delivered(tmp_path: Path) -> None:
    async with harness(tmp_path / "state") as h:
        uplink = await h.started()
        await h.store.outbox.put("charging_record", record("rec-1"))
        await h.store.outbox.put("charging_record", record("rec-1"))  # e.g. replayed after a crash
        await h.drained()
        answers = [(r.http_status, r.code) for r in h.received(RequestKind.CHARGING_RECORDS)]
        assert answers == [(200, 0), (409, 4001)]
        assert await h.store.outbox.dead_letters() == []
        assert uplink.stats.sent["charging_record"] == 2
        (stored,) = h.emu.context.store.charging_records()
        assert stored.duplicate_attempts == 1


@virtual_time()
async def test_429_pauses_the_class_for_retry_after_seconds_while_telemetry_keeps_flowing(
    tmp_path: Path,
) -> None:
    loop = asyncio.get_running_loop()
    async with harness(tmp_path / "state", rate_limits_enabled=True) as h:
        uplink = await h.started()
        # Someone else spends this device's 60/min "other" budget in one burst (e.g. a second
        # agent instance on the same credentials).
        creds = h.store.credentials.load()
        assert creds is not None
        async with aiohttp.ClientSession() as session:
            async with session.post(
                h.emu.api_url + "/device/token",
                json={
                    "device_id": creds.device_id,
                    "device_secret": creds.device_secret,
                    "grant_type": "client_credentials",
                },
            ) as resp:
                token = (await resp.json())["access_token"]
            for i in range(60):
                async with session.post(
                    h.emu.api_url + "/device/events",
                    json=event(1000 + i),
                    headers={"Authorization": f"Bearer {token}"},
                ) as resp:
                    assert resp.status == 200
        burst_end = loop.time()
        await h.store.outbox.put("event", event(1))
        await h.store.outbox.put("event", event(2))
        for i in range(5):
            await h.store.outbox.put("telemetry", telemetry(i))
        await h.drained(timeout=300)

        ours = [
            (t, r)
            for t, r in h.log
            if r.kind == RequestKind.EVENTS
            and r.body["data"]["reason"] in ("remote_start-1", "remote_start-2")
        ]
        limited = [(t, r) for t, r in ours if r.code == 5001]
        assert len(limited) == 1  # one 429, then the whole class waited
        t429, rejected = limited[0]
        retry_after = rejected.response["details"]["retry_after_seconds"]
        assert 55 <= retry_after <= 60
        accepted = [t for t, r in ours if r.accepted]
        assert len(accepted) == 2
        assert min(accepted) >= t429 + retry_after
        assert min(accepted) - burst_end <= retry_after + 5  # and not much later
        telemetry_times = h.times(RequestKind.TELEMETRY, accepted=True)
        assert (
            len(telemetry_times) == 5 and max(telemetry_times) < t429 + retry_after
        )  # not blocked
        assert uplink.stats.rate_limited == 1


@virtual_time()
async def test_stop_sends_a_final_offline_heartbeat(tmp_path: Path) -> None:
    async with harness(tmp_path / "state", connector_ids=[1, 2]) as h:
        uplink = await h.started()
        h.status = ("fault", 1001)
        await uplink.stop(final_heartbeat=True)
        last = h.received(RequestKind.HEARTBEAT)[-1]
        assert (
            last.accepted and last.body["status"] == "offline" and last.body["fault_code"] == 1001
        )
        count = len(h.received())
        await asyncio.sleep(120)
        assert len(h.received()) == count  # nothing after the final heartbeat
        assert not uplink.online


@virtual_time()
async def test_force_reconnect_drops_connections_gets_a_new_token_and_counts_against_the_budget(
    tmp_path: Path,
) -> None:
    loop = asyncio.get_running_loop()
    async with harness(tmp_path / "state", connector_ids=[1, 2]) as h:
        uplink = await h.started()
        await asyncio.sleep(5)  # both long-polls are held now
        tokens_before = len(h.accepted(RequestKind.TOKEN))
        await uplink.force_reconnect()
        await wait_for(lambda: uplink.online, timeout=60)
        assert len(h.accepted(RequestKind.TOKEN)) == tokens_before + 1
        assert uplink.budget.used() == 1 and uplink.stats.reconnects == 1
        dropped = [r for r in h.received(RequestKind.COMMANDS) if r.http_status == 0]
        assert len(dropped) == 2  # the held polls were cut, not left dangling
        command_id = h.emu.queue_command(command="stop_charging", connector_id=1)
        await h.wait_delivered(1)
        assert h.delivered[0].command["command_id"] == command_id  # fresh polls are running

        # an operator (or a bug) hammering force_reconnect cannot cause a reconnect storm
        for _ in range(7):
            await uplink.force_reconnect()
            await wait_for(lambda: uplink.online, timeout=900)
        times = list(uplink.stats.reconnect_times)
        assert len(times) == 8
        assert all(sum(1 for t in times if s <= t < s + 600) <= 5 for s in times)
        assert loop.time() - times[0] >= 600  # the budget held some of them back


def test_shaping_cannot_be_configured_above_the_documented_limits(tmp_path: Path) -> None:
    import pytest

    from agent.channels.tellus.uplink import Uplink

    async def deliver(cmd: object, channel: str, connector_id: int | None) -> None:
        return None

    base = {
        "http": None,
        "tokens": None,
        "outbox": None,
        "deliver": deliver,
        "heartbeat_status": lambda: ("online", 0),
        "connector_ids": [1],
    }
    uplink = Uplink(**base)  # type: ignore[arg-type]
    assert uplink.high.max_in_window(1.0) <= 10 and uplink.other.max_in_window(60.0) <= 60
    with pytest.raises(ValueError):
        Uplink(**base, high_rate=8.0, high_burst=8.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Uplink(**base, other_per_minute=50.0, other_burst=20.0)  # type: ignore[arg-type]


@virtual_time()
async def test_a_failing_dispatcher_does_not_stop_the_uplink(tmp_path: Path) -> None:
    async with harness(tmp_path / "state", connector_ids=[1]) as h:
        uplink = await h.started()
        calls = 0

        async def broken(item: object) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("dispatcher bug")

        h.on_deliver = broken
        h.emu.queue_command(command="stop_charging", connector_id=1)
        await h.wait_delivered(1)
        second = h.emu.queue_command(command="stop_charging", connector_id=1)
        await h.wait_delivered(2)
        assert h.delivered[1].command["command_id"] == second
        await h.store.outbox.put("event", event(1))
        await h.drained()
        assert uplink.online


@virtual_time()
async def test_force_reconnect_from_inside_a_command_handler(tmp_path: Path) -> None:
    async with harness(tmp_path / "state", connector_ids=[1, 2]) as h:
        uplink = await h.started()

        async def handler(item: Delivered) -> None:
            if item.command["command"] == "force_reconnect":
                await uplink.force_reconnect()

        h.on_deliver = handler
        tokens_before = len(h.accepted(RequestKind.TOKEN))
        h.emu.queue_command(command="force_reconnect", connector_id=1)
        await h.wait_delivered(1)
        await wait_for(lambda: uplink.online and uplink.stats.reconnects == 1, timeout=60)
        assert len(h.accepted(RequestKind.TOKEN)) == tokens_before + 1
        await asyncio.sleep(5)
        assert h.emu.context.broker.waiting == 2  # one held poll per connector, no leftovers
        later = h.emu.queue_command(command="stop_charging", connector_id=1)
        await h.wait_delivered(2)
        await asyncio.sleep(5)
        assert [d.command["command_id"] for d in h.delivered[1:]] == [later]
