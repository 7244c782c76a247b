"""Issue 8: one failing request never stalls the uplink (virtual time, real emulator).

* a 90 s ``9001`` outage of ``command-status``: telemetry and heartbeats keep their cadence,
  no reconnect, the held status arrives once within 30 s of the recovery;
* a 429 without ``retry_after`` and a 403 hold only their own endpoint / class;
* a charging record refused with 1001 goes again without its extension fields, and if
  refused again is dead-lettered with an alarm event and a status line;
* F-0302 (``reconnect_storm``) only at *more than* 5 wanted reconnects in 10 minutes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.channels.tellus.uplink import DEAD_LETTER_ALARM_CODE
from agent.emulator import FaultMode, OutageMode, RequestKind
from agent.service.status import render_table
from tests.agent.channels.tellus.harness import command_status, event, harness, record, telemetry, telemetry_seq, wait_for
from tests.agent.channels.tellus.vtime import virtual_time


@virtual_time(real_timeout=60.0)
async def test_a_90_s_outage_of_one_endpoint_does_not_stall_heartbeat_or_telemetry(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    async with harness(tmp_path / "state", rate_limits_enabled=True) as h:
        uplink = await h.started()
        command_id = h.emu.queue_command(command="reboot")
        await h.wait_delivered(1)
        t0 = loop.time()
        h.emu.inject_fault(RequestKind.COMMAND_STATUS, FaultMode.INTERNAL_ERROR, 90)
        await h.store.outbox.put("command_status", command_status(command_id))
        put_at: dict[int, float] = {}
        for n in range(30):  # a sample every 5 s for 150 s
            put_at[n] = loop.time()
            await h.store.outbox.put("telemetry", telemetry(n))
            await asyncio.sleep(t0 + (n + 1) * 5.0 - loop.time())
        await h.drained()

        sent = {telemetry_seq(r.body): t for t, r in h.log if r.kind is RequestKind.TELEMETRY and r.accepted}
        during = [n for n in range(18)]  # the samples taken during the outage
        on_time = [n for n in during if sent[n] - put_at[n] <= 5.0]
        assert len(on_time) >= 0.9 * len(during)
        beats = h.times(RequestKind.HEARTBEAT, accepted=True)
        window = [t for t in beats if t0 - 35 <= t <= t0 + 125]
        assert max(b - a for a, b in zip(window, window[1:])) <= 35.0
        assert uplink.stats.reconnects == 0 and uplink.online
        statuses = [t for t, r in h.log if r.kind is RequestKind.COMMAND_STATUS and r.accepted]
        assert len(statuses) == 1 and statuses[0] - (t0 + 90) <= 30.0
        assert "command_status" not in uplink.stats.endpoint_errors  # recovered


@virtual_time()
async def test_429_without_retry_after_backs_off_that_class_only(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    async with harness(tmp_path / "state") as h:
        uplink = await h.started()
        h.emu.inject_fault(RequestKind.EVENTS, FaultMode.RATE_LIMITED, 20)
        t0 = loop.time()
        await h.store.outbox.put("event", event(1))
        for n in range(6):
            await h.store.outbox.put("telemetry", telemetry(n))
            await asyncio.sleep(5)
        await h.drained()
        refused = [t for t, r in h.log if r.kind is RequestKind.EVENTS and r.code == 5001]
        assert 2 <= len(refused) <= 8  # its own backoff, not a tight loop
        assert all(b - a >= 0.9 for a, b in zip(refused, refused[1:]))
        accepted_events = [t for t, r in h.log if r.kind is RequestKind.EVENTS and r.accepted]
        assert len(accepted_events) == 1 and accepted_events[0] >= t0 + 20
        assert len(h.accepted(RequestKind.TELEMETRY)) == 6 and uplink.stats.reconnects == 0


@virtual_time()
async def test_403_holds_only_its_endpoint(tmp_path: Path) -> None:
    async with harness(tmp_path / "state") as h:
        uplink = await h.started()
        h.emu.inject_fault(RequestKind.FIRMWARE_STATUS, FaultMode.FORBIDDEN, 30)
        await h.store.outbox.put("firmware_status", {"firmware_version": "2.2.0", "status": "downloading"})
        await h.store.outbox.put("event", event(1))
        await h.store.outbox.put("charging_record", record("rec-1"))
        await wait_for(lambda: h.store.outbox.depth()["event"] == 0 and h.store.outbox.depth()["charging_record"] == 0,
                       timeout=30)
        assert h.store.outbox.depth()["firmware_status"] == 1 and uplink.online
        await h.drained(timeout=400)  # after the 5 min hold
        assert len(h.accepted(RequestKind.FIRMWARE_STATUS)) == 1


@virtual_time()
async def test_record_refused_for_its_extensions_goes_again_without_them(tmp_path: Path) -> None:
    async with harness(tmp_path / "state") as h:
        h.emu.context.store.settings.accept_extensions = False  # a server that refuses unknown fields
        uplink = await h.started()
        body = {**record("rec-x"), "stop_reason": "user_request", "transaction_id": "tx-1"}
        await h.store.outbox.put("charging_record", body, key="rec-x")
        await h.drained()
        answers = [(r.http_status, r.code) for r in h.received(RequestKind.CHARGING_RECORDS)]
        assert answers == [(400, 1001), (200, 0)]
        (stored,) = h.emu.context.store.charging_records()
        assert stored.body == record("rec-x")
        assert await h.store.outbox.dead_letters() == [] and uplink.stats.dead_lettered == 0


@virtual_time()
async def test_record_refused_again_is_dead_lettered_with_an_alarm_and_a_status_line(tmp_path: Path) -> None:
    async with harness(tmp_path / "state") as h:
        uplink = await h.started()
        body = {**record("rec-neg"), "energy": -1.0, "stop_reason": "user_request"}
        await h.store.outbox.put("charging_record", body, key="rec-neg")
        await h.store.outbox.put("charging_record", record("rec-ok"), key="rec-ok")  # not blocked
        await h.drained()
        answers = [(r.http_status, r.code) for r in h.received(RequestKind.CHARGING_RECORDS)]
        assert answers == [(400, 1001), (400, 1001), (200, 0)]
        (dead,) = await h.store.outbox.dead_letters()
        assert dead.payload == body and "1001" in dead.reason
        (alarm,) = [r.body for r in h.accepted(RequestKind.EVENTS)]
        assert alarm["event_type"] == "alarm" and alarm["connector_id"] == 1
        assert alarm["data"]["fault_code"] == DEAD_LETTER_ALARM_CODE
        assert alarm["data"]["details"]["key"] == "rec-neg" and "rec-neg" in alarm["data"]["fault_message"]
        assert uplink.stats.last_dead_letter is not None and uplink.stats.last_dead_letter["key"] == "rec-neg"
        table = render_table(
            {"uplink": {"enabled": True, "online": True, "last_dead_letter": uplink.stats.last_dead_letter},
             "outbox": {"depth": {}, "dead_letters": h.store.outbox.stats().dead_letters}}
        )
        (line,) = [ln for ln in table.splitlines() if "DEAD LETTERS" in ln]
        assert "1 item(s)" in line and "charging_record rec-neg" in line and "1001" in line


@virtual_time(real_timeout=60.0)
async def test_reconnect_storm_only_above_five_reconnects_in_ten_minutes(tmp_path: Path) -> None:
    async with harness(tmp_path / "state") as h:
        uplink = await h.started()
        h.emu.start_outage(1500, OutageMode.DROP)
        await wait_for(lambda: uplink.budget.used() == 4, timeout=900)
        assert not uplink.reconnect_storm()  # 4 made, the 5th waiting: within the limit
        await wait_for(uplink.reconnect_storm, timeout=300)  # 5 made and a 6th wanted: storm
        assert uplink.budget.used() == 5
        h.emu.context.store.end_outage()
        await wait_for(lambda: uplink.online, timeout=300)
        await asyncio.sleep(700)
        assert not uplink.reconnect_storm()
