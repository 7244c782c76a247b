"""A 60 s CSMS outage mid-transaction: bounded reconnects, nothing lost, order kept.

The CSMS drops the socket and answers every WebSocket upgrade with 503 for 60 s while a
transaction runs with MeterValueSampleInterval = 5. The agent must try at most ~12 upgrades
in that minute (backoff with jitter, capped at 20 s in this config) and, once back, deliver
every MeterValues sampled during the outage, in order, with the transactionId, before the
StopTransaction. About 110 s.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from ocpp.v16 import call

from tests.e2e.ocpp_harness import CP_ID, OcppRig, run_ocpp_scenario

pytestmark = pytest.mark.slow

OUTAGE_S = 60.0
MARKS: dict[str, Any] = {}


async def scenario(rig: OcppRig) -> OcppRig:
    cs = rig.cs
    await rig.remote_start("OUTAGE-1")
    await rig.until("StartTransaction", lambda: rig.payloads("StartTransaction"), timeout=40)
    await rig.until("a MeterValues", lambda: rig.payloads("MeterValues"), timeout=20)
    MARKS["values_before"] = len(rig.payloads("MeterValues"))
    MARKS["t0_mono"], MARKS["t0"] = time.monotonic(), time.time()
    cs.refuse_for(OUTAGE_S)
    await cs.drop()
    await asyncio.sleep(OUTAGE_S)
    MARKS["t1_mono"], MARKS["t1"] = time.monotonic(), time.time()
    await rig.booted()
    await rig.until("the outage's MeterValues", lambda: len(rig.payloads("MeterValues")) >= MARKS["values_before"] + 10, timeout=40)
    tx = int(rig.cs.frames and _tx(rig))
    assert (await cs.call(CP_ID, call.RemoteStopTransaction(transaction_id=tx))).status == "Accepted"
    await rig.until("StopTransaction", lambda: rig.payloads("StopTransaction"), timeout=20)
    await rig.until("the Tellus record", lambda: rig.records(), timeout=20)
    await rig.sigterm()
    return rig


def _tx(rig: OcppRig) -> int:
    for frame in rig.cs.frames:
        msg = frame.message
        if frame.direction == "out" and msg and msg[0] == 3 and isinstance(msg[2], dict) and "transactionId" in msg[2]:
            return int(msg[2]["transactionId"])
    raise AssertionError("no transactionId given")


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> OcppRig:
    MARKS.clear()
    return run_ocpp_scenario(tmp_path_factory, "e2e-ocpp-outage", scenario)


def test_upgrade_attempts_bounded_during_the_outage(rig: OcppRig) -> None:
    during = [t for t in rig.cs.upgrade_attempts if MARKS["t0_mono"] <= t < MARKS["t1_mono"]]
    assert 2 <= len(during) <= 12, len(during)


def test_outage_meter_values_arrive_after_in_order(rig: OcppRig) -> None:
    tx = _tx(rig)
    values = rig.payloads("MeterValues")
    assert all(v["transactionId"] == tx for v in values)
    stamps = [v["meterValue"][0]["timestamp"] for v in values]
    assert stamps == sorted(stamps)
    t0 = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(MARKS["t0"] + 1))
    t1 = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(MARKS["t1"] - 1))
    sampled_offline = [s for s in stamps if t0 <= s <= t1]
    assert len(sampled_offline) >= 9, stamps  # ~12 samples in 60 s at a 5 s interval
    registers = [int(sv["value"]) for v in values for sv in v["meterValue"][0]["sampledValue"] if sv.get("measurand") == "Energy.Active.Import.Register"]
    assert registers == sorted(registers)
    actions = [c.action for c in rig.cs.calls if c.action in ("StartTransaction", "MeterValues", "StopTransaction")]
    assert actions[0] == "StartTransaction" and actions[-1] == "StopTransaction" and actions.count("StopTransaction") == 1
    stop = rig.payloads("StopTransaction")[0]
    assert stop["meterStop"] >= max(registers) and stop["reason"] == "Remote"


def test_schema_valid_and_record_has_transaction_id(rig: OcppRig) -> None:
    assert rig.cs.violations == []
    records = rig.records()
    assert len(records) == 1 and records[0]["transaction_id"] == str(_tx(rig))
