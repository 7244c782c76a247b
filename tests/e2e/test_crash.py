"""kill -9 at several moments of a session, restarting on the same state directory each time.

Scenario (about 80 s; shared by every test in this module): one state directory, one
agent run per kill plus a final one. In each run a session is started on connector 1
(a fresh transaction id per run) and the agent is killed with SIGKILL

* during preparation (twice: early, and while the cable check has the output energised),
* while charging,
* right after a ``stop_charging`` was queued (twice, with different delays),
* right after the session's record was committed to the state store (its open-session
  row gone) -- it may or may not have been sent yet.

The next run starts on the same state directory, closes what the crash left open and
sends it; the final run is stopped with SIGTERM. Across all of it every session that
reached charging must produce exactly one charging record on the platform.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from agent.channels.tellus.models import ErrorCode
from agent.emulator import RequestKind
from tests.e2e.harness import Rig, assert_no_secrets_logged, run_scenario

pytestmark = pytest.mark.slow

#: (moment, seconds to wait at that moment before the kill)
PLAN: list[tuple[str, float]] = [
    ("preparing", 0.5),
    ("preparing", 4.0),
    ("charging", 2.0),
    ("stop_queued", 0.0),
    ("stop_queued", 0.4),
    ("record_committed", 0.0),
]


@dataclass
class Kill:
    index: int
    moment: str
    delay: float
    start_id: str
    stop_id: str | None = None
    charged: bool = False  # the session reached charging before the kill

    @property
    def tx(self) -> str:
        return f"kill-{self.index}-{self.moment}"

    def __str__(self) -> str:
        return f"kill #{self.index} ({self.moment} +{self.delay} s)"


KILLS: list[Kill] = []


async def scenario(rig: Rig) -> Rig:
    emu = rig.emulator
    await rig.start()
    await rig.registered()
    for index, (moment, delay) in enumerate(PLAN):
        await rig.plugged()
        kill = Kill(index, moment, delay, start_id=f"start-{index}")
        emu.queue_command(command="start_charging", connector_id=1, params={"transaction_id": kill.tx}, command_id=kill.start_id)
        await rig.status_reached(kill.start_id, "accepted")
        if moment == "preparing":
            await asyncio.sleep(delay)
            assert "start" not in rig.event_types(rig.run.first_seq), f"{kill}: charging started too early"
        else:
            await rig.charging()
            kill.charged = True
            await rig.until(f"{kill}: open session stored", lambda: rig.open_session_count() == 1)
            if moment == "charging":
                await asyncio.sleep(delay)
            else:
                await asyncio.sleep(1.0)
                kill.stop_id = f"stop-{index}"
                emu.queue_command(command="stop_charging", connector_id=1, params={}, command_id=kill.stop_id)
                if moment == "stop_queued":
                    await asyncio.sleep(delay)
                else:
                    await rig.until(f"{kill}: record committed", lambda: rig.open_session_count() == 0, interval=0.005)
        await rig.kill9()
        KILLS.append(kill)
        await rig.start()
        await rig.registered()

    # the last run delivers what the crashes left behind; give it time, then stop it cleanly
    def settled() -> bool:
        for kill in KILLS:
            if kill.charged:
                records = rig.record_with(kill.tx)
                if not records:
                    return False
            if not rig.terminal(kill.start_id):
                return False
        return True

    try:
        await rig.until("every record and its command status", settled, timeout=30.0)
    except AssertionError:
        pass  # the tests say what is missing
    await asyncio.sleep(1.0)  # a late duplicate would show up now
    await rig.sigterm()
    return rig


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Rig:
    KILLS.clear()
    return run_scenario(tmp_path_factory, "e2e-crash", scenario)


def _kills(moment: str) -> list[Kill]:
    found = [k for k in KILLS if k.moment == moment]
    assert found, f"the scenario made no kill {moment!r}"
    return found


def test_scenario_ran_every_kill(rig: Rig) -> None:
    assert [(k.moment, k.delay) for k in KILLS] == PLAN
    assert len(rig.runs) == len(PLAN) + 1
    assert all(r.exit_code == -9 for r in rig.runs[:-1])
    assert rig.run.exit_code == 0, rig.run.log_tail()
    assert [k.charged for k in KILLS] == [m != "preparing" for m, _ in PLAN]


def test_kill_while_charging_closes_the_session_as_power_loss(rig: Rig) -> None:
    for kill in _kills("charging"):
        records = rig.record_with(kill.tx)
        assert len(records) == 1, f"{kill}: {records}"
        record = records[0]
        assert record["stop_reason"] == "power_loss"
        assert record["energy"] >= 0
        assert record["energy"] == round(record["meter_end"] - record["meter_start"], 3)
        assert rig.terminal(kill.start_id) == ["failed"], rig.statuses(kill.start_id)
        final = rig.command(kill.start_id).statuses[-1]
        assert final.message is not None and "power loss" in final.message
        assert final.details is not None and final.details["stop_reason"] == "power_loss"
        assert final.details["energy_delivered"] == record["energy"]


def test_no_record_lost_or_duplicated_across_all_kills(rig: Rig) -> None:
    for kill in KILLS:
        records = rig.record_with(kill.tx)
        expected = 1 if kill.charged else 0
        assert len(records) == expected, f"{kill}: {len(records)} records"
        for record in records:
            assert record["energy"] == round(record["meter_end"] - record["meter_start"], 3), f"{kill}: {record}"
    stored = rig.emulator.context.store.charging_records()
    assert len(stored) == sum(k.charged for k in KILLS)
    assert len({r.record_id for r in stored}) == len(stored)
    # a re-sent record is refused as a duplicate (409 / 4001), which the agent counts as delivered;
    # an upload cut by the kill may also show as unanswered (0)
    uploads = rig.received(RequestKind.CHARGING_RECORDS)
    refused = [(u.http_status, u.code) for u in uploads if not u.accepted]
    assert all(r in ((409, ErrorCode.CONFLICT), (0, None)) for r in refused), refused
    conflicts = sum(1 for u in uploads if u.http_status == 409)
    assert sum(r.duplicate_attempts for r in stored) == conflicts
    # nothing left behind in the agent: no open session, no queued or dead-lettered record
    assert rig.open_session_count() == 0
    assert rig.query_state("SELECT count(*) FROM outbox WHERE kind = 'charging_record'") == [(0,)]
    assert rig.query_state("SELECT count(*) FROM outbox_dead") == [(0,)]


def test_stop_reason_matches_the_moment_of_the_kill(rig: Rig) -> None:
    for kill in KILLS:
        if not kill.charged:
            continue
        (record,) = rig.record_with(kill.tx)
        allowed = {
            "charging": {"power_loss"},
            "stop_queued": {"power_loss", "remote_stop"},
            "record_committed": {"remote_stop"},
        }[kill.moment]
        assert record["stop_reason"] in allowed, f"{kill}: {record['stop_reason']}"


def test_interrupted_commands_never_get_contradictory_statuses(rig: Rig) -> None:
    for kill in KILLS:
        terminal = set(rig.terminal(kill.start_id))
        assert len(terminal) <= 1, f"{kill}: start statuses {rig.statuses(kill.start_id)}"
        assert "rejected" not in rig.statuses(kill.start_id)
        records = rig.record_with(kill.tx)
        if records and records[0]["stop_reason"] == "power_loss":
            assert terminal == {"failed"}, f"{kill}: {rig.statuses(kill.start_id)}"
            message = rig.command(kill.start_id).statuses[-1].message or ""
            assert "power loss" in message
        if kill.stop_id is not None:
            stop_terminal = set(rig.terminal(kill.stop_id))
            assert len(stop_terminal) <= 1, f"{kill}: stop {rig.statuses(kill.stop_id)}"


def test_every_interrupted_start_command_ends_exactly_once(rig: Rig) -> None:
    for kill in KILLS:
        terminal = rig.terminal(kill.start_id)
        assert len(terminal) == 1, f"{kill}: start statuses {rig.statuses(kill.start_id)}"
        if not kill.charged:  # killed during preparation: closed at the next start
            assert terminal == ["failed"], f"{kill}: {terminal}"
            message = rig.command(kill.start_id).statuses[-1].message or ""
            assert "restart" in message or "power loss" in message, message
    # a stop command the agent had received reaches a final status too
    for kill in KILLS:
        if kill.stop_id is not None and rig.statuses(kill.stop_id):
            assert len(rig.terminal(kill.stop_id)) == 1, f"{kill}: stop {rig.statuses(kill.stop_id)}"


def test_no_request_rejected_apart_from_cut_polls_and_duplicate_records(rig: Rig) -> None:
    rejected: list[Any] = []
    for r in rig.received():
        if r.accepted:
            continue
        if r.http_status == 0 and r.kind in (RequestKind.COMMANDS, RequestKind.CHARGING_RECORDS):
            continue  # cut by a kill (or by the final shutdown): never answered
        if r.kind is RequestKind.CHARGING_RECORDS and r.http_status == 409:
            continue  # a record sent again after a kill: the platform already has it
        rejected.append((r.kind.value, r.http_status, r.code, r.body, r.response))
    assert rejected == []


def test_restarts_reuse_the_stored_credentials(rig: Rig) -> None:
    registrations = rig.received(RequestKind.REGISTER)
    assert len(registrations) == 1 and registrations[0].accepted
    tokens = [r for r in rig.received(RequestKind.TOKEN) if r.accepted]
    assert len(tokens) >= len(rig.runs)
    assert len({r.device_id for r in rig.received() if r.device_id}) == 1


def test_secrets_never_logged_across_restarts(rig: Rig) -> None:
    assert len(rig.tokens) >= len(rig.runs)
    assert_no_secrets_logged(rig)
