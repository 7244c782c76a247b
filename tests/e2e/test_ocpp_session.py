"""OCPP 1.6-J end to end: the agent against the local CSMS (every frame schema-validated both
ways) with the Tellus channel beside it.

Scenario (about 45 s, shared by the tests of this module): boot; plug-in -> Preparing;
Get/ChangeConfiguration, TriggerMessage, DataTransfer, malformed frames; a Tellus
``start_charging`` (refused: sessions belong to OCPP); RemoteStartTransaction ->
StartTransaction; MeterValues every 5 s; RemoteStopTransaction -> StopTransaction;
SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from ocpp.v16 import call

from agent.emulator import RequestKind
from tests.e2e.ocpp_harness import CP_ID, OcppRig, run_ocpp_scenario

pytestmark = pytest.mark.slow

REMOTE_TAG = "REMOTE-TAG-1"
TAP_TAG = "04A1B2C3D4E5F6"
RESULTS: dict[str, Any] = {}


async def scenario(rig: OcppRig) -> OcppRig:
    cs = rig.cs
    await rig.start()
    await rig.booted()
    await rig.plugged()
    await rig.until("Preparing on connector 1", lambda: any(p["connectorId"] == 1 and p["status"] == "Preparing" for p in rig.payloads("StatusNotification")))

    RESULTS["config_all"] = await cs.call(CP_ID, call.GetConfiguration())
    RESULTS["config_some"] = await cs.call(CP_ID, call.GetConfiguration(key=["NumberOfConnectors", "NoSuchKey"]))
    RESULTS["change_heartbeat"] = await cs.call(CP_ID, call.ChangeConfiguration(key="HeartbeatInterval", value="120"))
    RESULTS["change_unknown"] = await cs.call(CP_ID, call.ChangeConfiguration(key="NoSuchKey", value="1"))
    RESULTS["change_readonly"] = await cs.call(CP_ID, call.ChangeConfiguration(key="NumberOfConnectors", value="5"))
    RESULTS["change_bad_value"] = await cs.call(CP_ID, call.ChangeConfiguration(key="MeterValueSampleInterval", value="soon"))
    RESULTS["change_interval"] = await cs.call(CP_ID, call.ChangeConfiguration(key="MeterValueSampleInterval", value="5"))
    RESULTS["config_after"] = await cs.call(CP_ID, call.GetConfiguration(key=["HeartbeatInterval", "MeterValueSampleInterval"]))

    before = len(rig.payloads("StatusNotification"))
    RESULTS["trigger"] = await cs.call(CP_ID, call.TriggerMessage(requested_message="StatusNotification", connector_id=1))
    await rig.until("the triggered StatusNotification", lambda: len(rig.payloads("StatusNotification")) > before, timeout=10)
    RESULTS["triggered"] = rig.payloads("StatusNotification", before)
    RESULTS["data_transfer"] = await cs.call(CP_ID, call.DataTransfer(vendor_id="com.example.unknown", message_id="x", data="y"))

    # malformed frames: each answered with a CALLERROR, the channel keeps running
    RESULTS["missing_id_tag"] = await cs.send_raw(CP_ID, json.dumps([2, "bad-1", "RemoteStartTransaction", {"connectorId": 1}]), "bad-1")
    RESULTS["wrong_type"] = await cs.send_raw(CP_ID, json.dumps([2, "bad-2", "RemoteStartTransaction", {"idTag": 42}]), "bad-2")
    RESULTS["unknown_action"] = await cs.send_raw(CP_ID, json.dumps([2, "bad-3", "MakeCoffee", {}]), "bad-3")
    RESULTS["no_payload"] = await cs.send_raw(CP_ID, json.dumps([2, "bad-4", "Reset"]), "bad-4")

    # ChangeAvailability of the idle connector 2, local list, cache
    RESULTS["inoperative"] = await cs.call(CP_ID, call.ChangeAvailability(connector_id=2, type="Inoperative"))
    await rig.until("connector 2 Unavailable", lambda: _last_status(rig, 2) == "Unavailable", timeout=10)
    RESULTS["operative"] = await cs.call(CP_ID, call.ChangeAvailability(connector_id=2, type="Operative"))
    await rig.until("connector 2 Available again", lambda: _last_status(rig, 2) == "Available", timeout=10)
    RESULTS["send_list"] = await cs.call(
        CP_ID, call.SendLocalList(list_version=5, update_type="Full", local_authorization_list=[{"idTag": "LIST-1", "idTagInfo": {"status": "Accepted"}}])
    )
    RESULTS["list_version"] = await cs.call(CP_ID, call.GetLocalListVersion())
    RESULTS["clear_cache"] = await cs.call(CP_ID, call.ClearCache())
    RESULTS["unlock_unknown"] = await cs.call(CP_ID, call.UnlockConnector(connector_id=7))
    RESULTS["tx_profile_no_tx"] = await cs.call(CP_ID, call.SetChargingProfile(connector_id=1, cs_charging_profiles=_profile("TxProfile", 20000)))

    tellus_start = rig.emulator.queue_command(command="start_charging", connector_id=1, params={"transaction_id": "tellus-1"}, command_id="tellus-start")
    await rig.status_reached(tellus_start, "rejected", "failed", "accepted")

    RESULTS["remote_start"] = await cs.call(CP_ID, call.RemoteStartTransaction(id_tag=REMOTE_TAG, connector_id=1))
    await rig.until("StartTransaction", lambda: rig.payloads("StartTransaction"), timeout=40)
    await rig.until("three MeterValues", lambda: len(rig.payloads("MeterValues")) >= 3, timeout=30)
    tx_id = await rig.until("the transactionId", lambda: _tx_id(rig), timeout=10)
    RESULTS["set_profile"] = await cs.call(CP_ID, call.SetChargingProfile(connector_id=1, cs_charging_profiles=_profile("TxDefaultProfile", 15000)))
    RESULTS["composite"] = await cs.call(CP_ID, call.GetCompositeSchedule(connector_id=1, duration=600, charging_rate_unit="W"))
    await asyncio.sleep(1.5)
    RESULTS["limit_with_profile"] = _limit_kw(rig, 1)
    limit_id = rig.emulator.queue_command(
        command="set_power_limit", connector_id=1, params={"power_limit_percent": 25, "duration": 600}, command_id="tellus-limit"
    )
    await rig.status_reached(limit_id, "accepted", "completed", "rejected", "failed")
    await asyncio.sleep(1.5)
    RESULTS["limit_with_both"] = _limit_kw(rig, 1)
    stop_id = rig.emulator.queue_command(command="stop_charging", connector_id=1, params={}, command_id="tellus-stop")
    await rig.status_reached(stop_id, "rejected", "failed", "completed")
    RESULTS["clear_profile"] = await cs.call(CP_ID, call.ClearChargingProfile(id=7))
    await asyncio.sleep(1.5)
    RESULTS["limit_after_clear"] = _limit_kw(rig, 1)
    RESULTS["remote_stop_unknown"] = await cs.call(CP_ID, call.RemoteStopTransaction(transaction_id=tx_id + 999))
    RESULTS["remote_stop"] = await cs.call(CP_ID, call.RemoteStopTransaction(transaction_id=tx_id))
    await rig.until("StopTransaction", lambda: rig.payloads("StopTransaction"), timeout=20)
    await rig.until("the Tellus charging record", lambda: rig.records(), timeout=20)
    RESULTS["status"] = json.loads((rig.state_dir / "status.json").read_text())
    await asyncio.sleep(2.0)  # anything sent twice would arrive now
    RESULTS["first_records"] = rig.records()

    # second transaction: RemoteStart before the plug-in (Preparing while waiting), a tap of
    # the same card on the simulated reader stops it (reason Local)
    assert (await rig.control("/vehicle/1/unplug"))["ok"]
    await rig.until("connector 1 Available after unplug", lambda: _last_status(rig, 1) == "Available", timeout=15)
    RESULTS["remote_start_unplugged"] = await cs.call(CP_ID, call.RemoteStartTransaction(id_tag=TAP_TAG, connector_id=1))
    await rig.until("Preparing while waiting for the plug", lambda: _last_status(rig, 1) == "Preparing", timeout=10)
    assert (await rig.control("/vehicle/1/plug"))["ok"]
    await rig.until("the second StartTransaction", lambda: len(rig.payloads("StartTransaction")) >= 2, timeout=40)
    await rig.until("charging again", lambda: _last_status(rig, 1) == "Charging", timeout=20)
    assert (await rig.control("/auth/1/tap", {"id_tag": TAP_TAG}))["ok"]
    await rig.until("the second StopTransaction", lambda: len(rig.payloads("StopTransaction")) >= 2, timeout=20)
    await rig.until("the second Tellus record", lambda: len(rig.records()) >= 2, timeout=20)

    boots, connects = len(rig.payloads("BootNotification")), cs.connects
    reconnect_id = rig.emulator.queue_command(command="force_reconnect", params={"channel": "ocpp"}, command_id="tellus-reconnect")
    await rig.status_reached(reconnect_id, "completed", "failed", "rejected", timeout=40)
    RESULTS["boots_after_reconnect"] = len(rig.payloads("BootNotification")) - boots
    RESULTS["connects_after_reconnect"] = cs.connects - connects
    RESULTS["reset"] = await cs.call(CP_ID, call.Reset(type="Soft"))
    run = rig.run
    RESULTS["reset_exit"] = await asyncio.wait_for(run.proc.wait(), 40)
    run.exit_code = RESULTS["reset_exit"]
    return rig


def _profile(purpose: str, watts: float) -> dict[str, Any]:
    return {
        "chargingProfileId": 7,
        "stackLevel": 1,
        "chargingProfilePurpose": purpose,
        "chargingProfileKind": "Relative",
        "chargingSchedule": {"chargingRateUnit": "W", "chargingSchedulePeriod": [{"startPeriod": 0, "limit": watts}]},
    }


def _last_status(rig: OcppRig, connector: int) -> str | None:
    found = [p["status"] for p in rig.payloads("StatusNotification") if p["connectorId"] == connector]
    return found[-1] if found else None


def _limit_kw(rig: OcppRig, connector: int) -> float | None:
    status = json.loads((rig.state_dir / "status.json").read_text())
    for c in status.get("connectors", []):
        if c["id"] == connector:
            return float(c["limit_kw"])
    return None


def _tx_id(rig: OcppRig) -> int | None:
    for frame in rig.cs.frames:
        msg = frame.message
        if frame.direction == "out" and msg and msg[0] == 3 and isinstance(msg[2], dict) and "transactionId" in msg[2]:
            return int(msg[2]["transactionId"])
    return None


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> OcppRig:
    RESULTS.clear()
    return run_ocpp_scenario(tmp_path_factory, "e2e-ocpp-session", scenario, extra="send_metadata = true")


def test_every_frame_valid_and_boot_first(rig: OcppRig) -> None:
    assert rig.cs.violations == []
    assert rig.cs.calls[0].action == "BootNotification"
    boot = rig.cs.calls[0].payload
    assert boot["chargePointSerialNumber"] == CP_ID and boot["chargePointModel"]


def test_status_notifications_include_connector_zero_and_preparing(rig: OcppRig) -> None:
    statuses = rig.payloads("StatusNotification")
    assert {p["connectorId"] for p in statuses} >= {0, 1, 2}
    one = [p["status"] for p in statuses if p["connectorId"] == 1]
    assert "Preparing" in one and "Charging" in one
    assert one.index("Preparing") < one.index("Charging")
    assert all(p["errorCode"] == "NoError" for p in statuses if p["connectorId"] == 0)


def test_get_and_change_configuration(rig: OcppRig) -> None:
    keys = {k["key"]: k for k in RESULTS["config_all"].configuration_key}
    for key in ("HeartbeatInterval", "MeterValueSampleInterval", "NumberOfConnectors", "AuthorizeRemoteTxRequests",
                "LocalAuthorizeOffline", "MeterValuesSampledData", "ConnectionTimeOut", "TransactionMessageAttempts"):
        assert key in keys, key
    assert keys["NumberOfConnectors"]["readonly"] is True and keys["NumberOfConnectors"]["value"] == "2"
    assert keys["HeartbeatInterval"]["readonly"] is False
    assert "AuthorizationKey" not in keys  # write-only
    assert RESULTS["config_some"].unknown_key == ["NoSuchKey"]
    assert RESULTS["change_heartbeat"].status == "Accepted"
    assert RESULTS["change_unknown"].status == "NotSupported"
    assert RESULTS["change_readonly"].status == "Rejected"
    assert RESULTS["change_bad_value"].status == "Rejected"
    assert RESULTS["change_interval"].status == "Accepted"
    after = {k["key"]: k["value"] for k in RESULTS["config_after"].configuration_key}
    assert after == {"HeartbeatInterval": "120", "MeterValueSampleInterval": "5"}


def test_trigger_message_and_data_transfer(rig: OcppRig) -> None:
    assert RESULTS["trigger"].status == "Accepted"
    assert [p["connectorId"] for p in RESULTS["triggered"]][:1] == [1]
    assert RESULTS["data_transfer"].status == "UnknownVendorId"


def test_malformed_calls_get_callerrors(rig: OcppRig) -> None:
    for name in ("missing_id_tag", "wrong_type", "unknown_action", "no_payload"):
        frame = RESULTS[name]
        assert frame[0] == 4, (name, frame)
    assert RESULTS["missing_id_tag"][2] in ("OccurrenceConstraintViolation", "FormatViolation", "ProtocolError", "OccurenceConstraintViolation")
    assert RESULTS["wrong_type"][2] in ("TypeConstraintViolation", "FormatViolation")
    assert RESULTS["unknown_action"][2] in ("NotSupported", "NotImplemented")


def test_tellus_start_and_stop_are_refused_while_ocpp_owns_sessions(rig: OcppRig) -> None:
    for command_id in ("tellus-start", "tellus-stop"):
        statuses = rig.command(command_id).statuses
        assert [s.status for s in statuses] == ["rejected"]
        assert "OCPP" in (statuses[0].message or "")


def test_tellus_force_reconnect_rebuilds_the_ocpp_socket(rig: OcppRig) -> None:
    assert rig.statuses("tellus-reconnect") == ["accepted", "completed"]
    assert RESULTS["connects_after_reconnect"] == 1
    assert RESULTS["boots_after_reconnect"] == 0  # a reconnect is not a reboot


def test_remote_start_to_stop_transaction(rig: OcppRig) -> None:
    assert RESULTS["remote_start"].status == "Accepted"
    starts = rig.payloads("StartTransaction")
    assert len(starts) == 2 and starts[0]["idTag"] == REMOTE_TAG and starts[0]["connectorId"] == 1
    tx_id = _tx_id(rig)
    assert tx_id is not None
    values = [v for v in rig.payloads("MeterValues") if v["transactionId"] == tx_id]
    assert len(values) >= 3 and all(v["transactionId"] == tx_id for v in values)
    registers = [
        int(s["value"]) for v in values for mv in v["meterValue"] for s in mv["sampledValue"] if s.get("measurand") == "Energy.Active.Import.Register"
    ]
    assert registers == sorted(registers) and registers[0] >= starts[0]["meterStart"]
    assert RESULTS["remote_stop_unknown"].status == "Rejected"
    assert RESULTS["remote_stop"].status == "Accepted"
    stops = [s for s in rig.payloads("StopTransaction") if s["transactionId"] == tx_id]
    assert len(stops) == 1
    stop = stops[0]
    assert stop["transactionId"] == tx_id and stop["reason"] == "Remote"
    assert stop["meterStop"] >= starts[0]["meterStart"] and stop["meterStop"] >= max(registers)


def test_meter_values_every_five_seconds(rig: OcppRig) -> None:
    calls = [c for c in rig.cs.calls_of("MeterValues") if c.payload["transactionId"] == _tx_id(rig)]
    gaps = [b.at - a.at for a, b in zip(calls, calls[1:])]
    assert gaps and all(3.0 <= g <= 8.0 for g in gaps), gaps


def test_availability_local_list_cache_unlock(rig: OcppRig) -> None:
    assert RESULTS["inoperative"].status == "Accepted" and RESULTS["operative"].status == "Accepted"
    assert RESULTS["send_list"].status == "Accepted" and RESULTS["list_version"].list_version == 5
    assert RESULTS["clear_cache"].status == "Accepted"
    assert RESULTS["unlock_unknown"].status == "NotSupported"


def test_charging_profiles_feed_the_connector_limit(rig: OcppRig) -> None:
    assert RESULTS["tx_profile_no_tx"].status == "Rejected"  # no transaction to attach it to
    assert RESULTS["set_profile"].status == "Accepted"
    composite = RESULTS["composite"]
    assert composite.status == "Accepted" and composite.charging_schedule["charging_schedule_period"][0]["limit"] == 15000
    assert RESULTS["limit_with_profile"] == 15.0
    # a Tellus set_power_limit (25 % of 40 kW) combines with the OCPP profile: the lowest wins
    assert rig.statuses("tellus-limit")[0] == "accepted"
    assert RESULTS["limit_with_both"] == 10.0
    assert RESULTS["clear_profile"].status == "Accepted"
    assert RESULTS["limit_after_clear"] == 10.0  # the platform limit stays


def test_soft_reset_restarts_the_agent(rig: OcppRig) -> None:
    assert RESULTS["reset"].status == "Accepted"
    assert RESULTS["reset_exit"] == 0


def test_tellus_record_carries_the_ocpp_transaction_id(rig: OcppRig) -> None:
    records = RESULTS["first_records"]
    assert len(records) == 1
    assert records[0]["transaction_id"] == str(_tx_id(rig))
    assert len(rig.records()) == 2 and len({r["transaction_id"] for r in rig.records()}) == 2
    refused = [r for r in rig.rejected() if r.http_status != 0]  # 0: a long-poll closed at shutdown
    assert not refused, [(r.kind, r.http_status) for r in refused]
    assert any(r.accepted for r in rig.received(RequestKind.HEARTBEAT))


def test_ocpp_metadata_in_status_and_telemetry(rig: OcppRig) -> None:
    from agent.service.status import render_table

    meta = RESULTS["status"]["ocpp"]
    assert meta["ocpp_version"] == "1.6-J" and meta["connected"] is True
    assert meta["ocpp_csms_messages_per_minute"] > 0 and meta["ocpp_csms_last_message_at"].endswith("Z")
    assert {"Core", "SmartCharging", "FirmwareManagement", "RemoteTrigger", "LocalAuthListManagement"} <= set(meta["ocpp_negotiated_features"])
    assert "OCPP" in render_table(RESULTS["status"]) and "1.6-J" in render_table(RESULTS["status"])
    telemetry = [r for r in rig.received(RequestKind.TELEMETRY) if isinstance(r.body, dict)]
    with_block = [r for r in telemetry if "ocpp" in r.body]
    assert with_block and all(r.accepted for r in with_block)
    assert all(r.body["connector_id"] == 1 for r in with_block)  # device-level: on the lowest connector only
    assert set(with_block[-1].body["ocpp"]) <= {"ocpp_version", "ocpp_csms_messages_per_minute", "ocpp_csms_last_message_at", "ocpp_negotiated_features"}


def test_remote_start_before_plug_in_and_tap_to_stop(rig: OcppRig) -> None:
    assert RESULTS["remote_start_unplugged"].status == "Accepted"
    second = rig.payloads("StartTransaction")[1]
    assert second["idTag"] == TAP_TAG
    stops = rig.payloads("StopTransaction")
    assert len(stops) == 2 and stops[1]["reason"] == "Local" and stops[1]["transactionId"] != stops[0]["transactionId"]
    assert stops[1]["meterStop"] >= second["meterStart"]
