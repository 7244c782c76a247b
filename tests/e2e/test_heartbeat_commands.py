"""Issue 8, failure 2: a connector command delivered only in a heartbeat response.

Scenario (about a minute; shared by the tests of this module): ``config/sim.toml`` with a
heartbeat every 10 s and a second simulated vehicle on connector 2, against the emulator's
heartbeat-only delivery (the heartbeat and ``PendingCommand`` carry no connector):

1. sessions charge on connectors 1 and 2;
2. ``stop_charging`` X arrives by heartbeat: ambiguous, held, then rejected naming both;
3. ``stop_charging`` Y arrives by heartbeat and, within the hold window, its copy on
   connector 2's long-poll: executed there;
4. ``stop_charging`` Z arrives by heartbeat with one session left: it stops that one.
"""

from __future__ import annotations

from typing import Any

import pytest

from agent.emulator import DeliveryChannel, RequestKind
from tests.e2e.harness import Rig, run_scenario, sim_config_variant

pytestmark = pytest.mark.slow

SECOND_VEHICLE = """
[[sim.vehicles]]                 # plugs into connector 2 (AC) and waits for a start command
connector = 2
plug_in_after_s = 3
soc = 40
capacity_kwh = 60
"""


async def scenario(rig: Rig) -> Rig:
    emu = rig.emulator
    config = sim_config_variant(
        rig.workdir, replace={"heartbeat_interval_s = 30": "heartbeat_interval_s = 10"}, append=SECOND_VEHICLE
    )
    await rig.start(config)
    await rig.registered()
    await rig.plugged(1)
    await rig.plugged(2)
    for cid in (1, 2):
        emu.queue_command(command="start_charging", connector_id=cid, command_id=f"hb-start-{cid}",
                          params={"transaction_id": f"hb-tx-{cid}"})
    await rig.charging(1)
    await rig.charging(2)

    emu.queue_command(command="stop_charging", command_id="hb-x", channel=DeliveryChannel.HEARTBEAT)
    await rig.status_reached("hb-x", "rejected", "accepted", timeout=40)

    emu.queue_command(command="stop_charging", command_id="hb-y", channel=DeliveryChannel.HEARTBEAT)
    await rig.until("Y delivered by a heartbeat", lambda: rig.command("hb-y").deliveries, timeout=30, interval=0.05)
    emu.redeliver("hb-y", channel=DeliveryChannel.LONG_POLL, connector_id=2)  # the copy, within the hold
    await rig.status_reached("hb-y", "completed", "failed", "rejected", timeout=40)
    await rig.until("connector 2's record", lambda: rig.record_with("hb-tx-2"))

    emu.queue_command(command="stop_charging", command_id="hb-z", channel=DeliveryChannel.HEARTBEAT)
    await rig.status_reached("hb-z", "completed", "failed", "rejected", timeout=40)
    await rig.until("connector 1's record", lambda: rig.record_with("hb-tx-1"))
    await rig.sigterm()
    return rig


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Rig:
    return run_scenario(tmp_path_factory, "e2e-heartbeat-commands", scenario)


def _stop_events(rig: Rig, connector_id: int) -> list[dict[str, Any]]:
    return [e for e in rig.events(connector_id=connector_id) if e["event_type"] == "stop"]


def test_ambiguous_stop_is_rejected_naming_both_connectors(rig: Rig) -> None:
    statuses = rig.command("hb-x").statuses
    assert [s.status for s in statuses] == ["rejected"]
    assert statuses[0].message is not None and "connectors 1 and 2" in statuses[0].message
    assert [d.channel for d in rig.command("hb-x").deliveries] == [DeliveryChannel.HEARTBEAT]


def test_long_poll_copy_within_the_hold_window_is_executed_not_a_duplicate(rig: Rig) -> None:
    assert rig.statuses("hb-y") == ["accepted", "completed"]
    channels = [d.channel for d in rig.command("hb-y").deliveries]
    assert channels == [DeliveryChannel.HEARTBEAT, DeliveryChannel.LONG_POLL]
    assert len(_stop_events(rig, 2)) == 1
    assert len(rig.record_with("hb-tx-2")) == 1


def test_stop_by_heartbeat_stops_the_one_running_session(rig: Rig) -> None:
    assert rig.statuses("hb-z") == ["accepted", "completed"]
    assert [d.channel for d in rig.command("hb-z").deliveries] == [DeliveryChannel.HEARTBEAT]
    stops = _stop_events(rig, 1)
    assert len(stops) == 1 and stops[0]["data"]["reason"] == "remote_stop"
    [record] = rig.record_with("hb-tx-1")
    assert record["connector_id"] == 1 and record["stop_reason"] == "remote_stop"
    assert [r.body["record_id"] for r in rig.received(RequestKind.CHARGING_RECORDS) if r.accepted].count(
        record["record_id"]) == 1


def test_the_platform_refused_nothing(rig: Rig) -> None:
    refused = [(r.kind, r.http_status, r.code, r.response) for r in rig.rejected()
               if not (r.kind is RequestKind.COMMANDS and r.http_status == 0)]
    assert refused == []
