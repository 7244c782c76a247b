"""OCPP transaction safety across kill -9, and a transaction started while the CSMS is away.

Scenario (about 70 s):

1. RemoteStart -> StartTransaction -> MeterValues; the agent is killed with SIGKILL;
2. restart: the open transaction is stopped with reason PowerLoss, exactly once;
3. the CSMS goes away; a card tap (the simulator's control endpoint) is authorised from the
   authorization cache (LocalAuthorizeOffline) and charging starts offline; when the CSMS is
   back the StartTransaction is delivered, and the MeterValues sampled meanwhile follow it
   with the transactionId it was given; a RemoteStop ends it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from ocpp.v16 import call

from tests.e2e.ocpp_harness import CP_ID, OcppRig, run_ocpp_scenario

pytestmark = pytest.mark.slow

TAG = "CARD-0001"
MARKS: dict[str, Any] = {}


async def scenario(rig: OcppRig) -> OcppRig:
    cs = rig.cs
    await rig.remote_start(TAG)
    await rig.until("StartTransaction", lambda: rig.payloads("StartTransaction"), timeout=40)
    await rig.until("a MeterValues", lambda: rig.payloads("MeterValues"), timeout=20)
    await rig.kill9()
    MARKS["killed_calls"] = len(cs.calls)

    await rig.start()
    await rig.booted()
    await rig.until("the PowerLoss StopTransaction", lambda: rig.payloads("StopTransaction"), timeout=30)
    await rig.plugged()
    await asyncio.sleep(1.0)

    cs.refuse_for(25.0)
    await cs.drop()
    MARKS["offline_at"] = time.time()
    await asyncio.sleep(1.0)
    assert (await rig.control("/auth/1/tap", {"id_tag": TAG}))["ok"]
    await rig.until("charging after the offline tap", lambda: rig.run.log_text().count("ocpp_transaction_started") >= 1, timeout=40)
    MARKS["calls_before_back"] = len(cs.calls)
    await rig.until("the CSMS back and the offline StartTransaction", lambda: len(rig.payloads("StartTransaction")) >= 2, timeout=60)
    await rig.until("MeterValues of the offline transaction", lambda: _values_of(rig, _second_tx(rig)), timeout=30)
    tx = _second_tx(rig)
    assert tx is not None
    assert (await cs.call(CP_ID, call.RemoteStopTransaction(transaction_id=tx))).status == "Accepted"
    await rig.until("the second StopTransaction", lambda: len(rig.payloads("StopTransaction")) >= 2, timeout=20)
    await rig.until("the offline session's Tellus record", lambda: _record_of(rig, tx), timeout=20)

    # a fault on the idle connector 2: Faulted with the mapped error code, then Available again
    assert (await rig.control("/inject", {"fault": "meter_silence", "connector": 2}))["ok"]
    await rig.until("connector 2 Faulted", lambda: _last_status(rig, 2) == "Faulted", timeout=30)
    MARKS["faulted"] = [p for p in rig.payloads("StatusNotification") if p["connectorId"] == 2 and p["status"] == "Faulted"][-1]
    assert (await rig.control("/clear", {"fault": "meter_silence", "connector": 2}))["ok"]
    await rig.until("connector 2 Available again", lambda: _last_status(rig, 2) == "Available", timeout=30)
    await asyncio.sleep(2.0)
    await rig.sigterm()
    return rig


def _tx_ids(rig: OcppRig) -> list[int]:
    ids = []
    for frame in rig.cs.frames:
        msg = frame.message
        if frame.direction == "out" and msg and msg[0] == 3 and isinstance(msg[2], dict) and "transactionId" in msg[2]:
            ids.append(int(msg[2]["transactionId"]))
    return ids


def _second_tx(rig: OcppRig) -> int | None:
    ids = _tx_ids(rig)
    return ids[1] if len(ids) > 1 else None


def _last_status(rig: OcppRig, connector: int) -> str | None:
    found = [p["status"] for p in rig.payloads("StatusNotification") if p["connectorId"] == connector]
    return found[-1] if found else None


def _record_of(rig: OcppRig, tx: int) -> list[dict[str, Any]]:
    return [r for r in rig.records() if r.get("transaction_id") == str(tx)]


def _values_of(rig: OcppRig, tx: int | None) -> list[dict[str, Any]]:
    return [p for p in rig.payloads("MeterValues") if tx is not None and p.get("transactionId") == tx]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> OcppRig:
    MARKS.clear()
    return run_ocpp_scenario(tmp_path_factory, "e2e-ocpp-crash", scenario)


def test_schema_valid_throughout(rig: OcppRig) -> None:
    assert rig.cs.violations == []


def test_kill9_one_start_and_one_powerloss_stop(rig: OcppRig) -> None:
    starts, stops = rig.payloads("StartTransaction"), rig.payloads("StopTransaction")
    first_tx = _tx_ids(rig)[0]
    assert [s["idTag"] for s in starts] == [TAG, TAG]  # one per session, none replayed
    first_stops = [s for s in stops if s["transactionId"] == first_tx]
    assert len(first_stops) == 1
    stop = first_stops[0]
    assert stop["reason"] == "PowerLoss"
    registers = [
        int(sv["value"]) for p in rig.payloads("MeterValues") if p["transactionId"] == first_tx
        for mv in p["meterValue"] for sv in mv["sampledValue"] if sv.get("measurand") == "Energy.Active.Import.Register"
    ]
    assert stop["meterStop"] >= starts[0]["meterStart"] and stop["meterStop"] >= max(registers)


def test_offline_transaction_gets_its_id_and_values_follow_in_order(rig: OcppRig) -> None:
    second = _second_tx(rig)
    assert second is not None and second != _tx_ids(rig)[0]
    start = rig.payloads("StartTransaction")[1]
    # started while the CSMS refused connections: its timestamp is from the outage
    assert start["timestamp"] <= time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(MARKS["offline_at"] + 25))
    calls = [c.action for c in rig.cs.calls]
    i_start = [i for i, c in enumerate(rig.cs.calls) if c.action == "StartTransaction"][1]
    values = _values_of(rig, second)
    assert values, calls
    first_value = next(i for i, c in enumerate(rig.cs.calls) if c.action == "MeterValues" and c.payload.get("transactionId") == second)
    assert first_value > i_start
    stamps = [p["meterValue"][0]["timestamp"] for p in values]
    assert stamps == sorted(stamps)
    stops = [s for s in rig.payloads("StopTransaction") if s["transactionId"] == second]
    assert len(stops) == 1 and stops[0]["reason"] == "Remote"
    # the id given after the outage reached the Tellus record of the session
    records = _record_of(rig, second)
    assert len(records) == 1 and records[0]["stop_reason"] == "remote_stop"


def test_fault_maps_to_faulted_with_the_ocpp_error_code(rig: OcppRig) -> None:
    faulted = MARKS["faulted"]
    assert faulted["errorCode"] == "PowerMeterFailure" and faulted["vendorErrorCode"] == "F-0451"
