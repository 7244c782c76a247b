"""One agent run, end to end: a full remote session, a repeated command delivery, SIGTERM.

Scenario (about 35 s; shared by every test in this module):

1. the agent starts, registers and its simulated vehicle plugs into connector 1;
2. ``start_charging`` -> charging -> ``stop_charging`` after ~3 s: the record goes out;
3. a second ``start_charging`` is delivered twice (emulator ``deliveries=2``);
4. while that session charges the agent gets SIGTERM.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agent.emulator import RequestKind
from tests.e2e.harness import Rig, assert_no_secrets_logged, run_scenario

pytestmark = pytest.mark.slow

FULL_TX = "e2e-full"
SIGTERM_TX = "e2e-sigterm"


async def scenario(rig: Rig) -> Rig:
    emu = rig.emulator
    await rig.start()
    await rig.registered()
    await rig.plugged()

    start_id = emu.queue_command(command="start_charging", connector_id=1, params={"transaction_id": FULL_TX}, command_id="e2e-start")
    await rig.charging()
    await asyncio.sleep(3.0)
    stop_id = emu.queue_command(command="stop_charging", connector_id=1, params={}, command_id="e2e-stop")
    await rig.until("the first charging record", lambda: rig.record_with(FULL_TX))
    await rig.status_reached(start_id, "completed", "failed")
    await rig.status_reached(stop_id, "completed", "failed")

    dup_id = emu.queue_command(
        command="start_charging", connector_id=1, params={"transaction_id": SIGTERM_TX}, deliveries=2, command_id="e2e-dup"
    )
    await rig.until("both deliveries of the repeated command", lambda: len(rig.command(dup_id).deliveries) == 2)
    await rig.charging(count=2)
    await asyncio.sleep(2.0)
    await rig.sigterm()
    return rig


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Rig:
    return run_scenario(tmp_path_factory, "e2e-session", scenario)


def _one_record(rig: Rig, tx: str) -> dict[str, Any]:
    records = rig.record_with(tx)
    assert len(records) == 1, records
    return records[0]


def test_full_session_record_and_command_statuses(rig: Rig) -> None:
    record = _one_record(rig, FULL_TX)
    stored = [r for r in rig.emulator.context.store.charging_records() if r.record_id == record["record_id"]]
    assert len(stored) == 1 and stored[0].duplicate_attempts == 0
    uploads = [r for r in rig.received(RequestKind.CHARGING_RECORDS) if isinstance(r.body, dict) and r.body.get("record_id") == record["record_id"]]
    assert [u.accepted for u in uploads] == [True]  # accepted exactly once, never re-sent

    assert record["connector_id"] == 1
    assert record["stop_reason"] == "remote_stop"
    assert record["energy"] > 0
    assert record["energy"] == round(record["meter_end"] - record["meter_start"], 3)
    assert record["max_power"] >= record["avg_power"] > 0
    assert record["start_time"] < record["end_time"]

    assert rig.statuses("e2e-start") == ["accepted", "completed"]
    assert rig.statuses("e2e-stop") == ["accepted", "completed"]
    completed = rig.command("e2e-start").statuses[-1]
    assert completed.details is not None and completed.details["energy_delivered"] == record["energy"]
    assert completed.details["stop_reason"] == "remote_stop"

    # the platform saw the session as events, in order, on connector 1
    types = rig.event_types()
    assert types.index("plug_in") < types.index("start") < types.index("stop")


def test_every_request_accepted_by_the_strict_emulator(rig: Rig) -> None:
    """The emulator validates with the project's wire models plus its stricter oracle rules
    (:mod:`agent.emulator.strict`), not with the OpenAPI document itself."""
    received = rig.received()
    # a long-poll the agent dropped at shutdown was never answered: that is no rejection
    rejected = [
        (r.kind.value, r.http_status, r.code, r.response)
        for r in received
        if not r.accepted and not (r.kind is RequestKind.COMMANDS and r.http_status == 0)
    ]
    assert rejected == []
    # and every kind of request the agent makes was exercised (and accepted)
    kinds = {r.kind for r in received if r.accepted}
    for kind in (
        RequestKind.REGISTER, RequestKind.TOKEN, RequestKind.HEARTBEAT, RequestKind.TELEMETRY,
        RequestKind.EVENTS, RequestKind.CHARGING_RECORDS, RequestKind.COMMANDS, RequestKind.COMMAND_STATUS,
    ):
        assert kind in kinds, f"no accepted {kind.value} request"
    assert not any(r.kind is RequestKind.UNKNOWN for r in received)


def test_repeated_delivery_is_executed_once(rig: Rig) -> None:
    view = rig.command("e2e-dup")
    assert len(view.deliveries) == 2 and view.remaining_deliveries == 0
    statuses = rig.statuses("e2e-dup")
    # the repeated delivery re-sends the last status; executed twice it would be "rejected"
    # ("already has a session") -- the status history shows no second execution
    assert "rejected" not in statuses
    assert statuses[0] == "accepted" and 1 <= statuses.count("accepted") <= 2
    assert rig.event_types().count("start") == 2  # the first session and this one: no third
    # the agent's own audit log: executed once, then recognised as a duplicate
    audit = rig.query_state("SELECT source, outcome FROM command_audit WHERE command_id = ? ORDER BY id", "e2e-dup")
    decisions = [row for row in audit if row[0] != "agent"]
    assert decisions == [("long_poll:1", "accepted"), ("long_poll:1", "duplicate")]
    # its final outcome (the session it started ended) is audited once as well
    assert len([row for row in audit if row[0] == "agent"]) == 1
    ledger = rig.query_state("SELECT count(*) FROM command_ledger WHERE command_id = ?", "e2e-dup")
    assert ledger == [(1,)]


def test_sigterm_exits_0_with_a_final_offline_heartbeat(rig: Rig) -> None:
    assert rig.run.exit_code == 0, rig.run.log_tail()
    heartbeats = [r for r in rig.received(RequestKind.HEARTBEAT) if r.accepted]
    assert heartbeats[-1].body["status"] == "offline"
    assert [h.body["status"] for h in heartbeats].count("offline") == 1
    # nothing but the long-polls being cut came after it
    assert heartbeats[-1].seq == max(r.seq for r in rig.received() if r.kind is not RequestKind.COMMANDS)


def test_sigterm_closes_the_session_with_stop_reason_shutdown(rig: Rig) -> None:
    record = _one_record(rig, SIGTERM_TX)
    assert record["stop_reason"] == "shutdown"
    assert record["energy"] > 0
    assert record["energy"] == round(record["meter_end"] - record["meter_start"], 3)
    assert rig.terminal("e2e-dup") == ["failed"]
    last = rig.command("e2e-dup").statuses[-1]
    assert last.details is not None and last.details["stop_reason"] == "shutdown"
    assert last.details["energy_delivered"] == record["energy"]
    # the record, its stop event and the command status went out before the goodbye
    offline = [r for r in rig.received(RequestKind.HEARTBEAT) if r.accepted][-1]
    record_seq = max(r.seq for r in rig.received(RequestKind.CHARGING_RECORDS) if r.accepted)
    assert record_seq < offline.seq
    assert rig.event_types()[-1] == "stop"
    assert rig.open_session_count() == 0


def test_secrets_never_logged(rig: Rig) -> None:
    assert_no_secrets_logged(rig)


def test_a_healthy_charger_reports_no_fault_from_start_up_to_shutdown(rig: Rig) -> None:
    """Nothing in this run is faulty, so the platform gets no fault or alarm event on either
    connector: in particular no pilot error while the pilots settle at start-up (the idle
    pilot cadence once made every start-up raise and clear F-0801 on each connector)."""
    faults = [e for e in rig.events(connector_id=None) if e["event_type"] in ("fault", "alarm")]
    assert faults == []
    assert '"fault_raised"' not in rig.run.log_text()
