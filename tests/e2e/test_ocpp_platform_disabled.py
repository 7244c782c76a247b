"""``[platform] enabled = false`` with OCPP configured: the OCPP channel alone runs the session.

Boot, Preparing on plug-in, RemoteStart -> StartTransaction, MeterValues every 5 s,
RemoteStop -> exactly one StopTransaction, a clean SIGTERM -- and not one request reaches the
Tellus platform. About 30 s.
"""

from __future__ import annotations

from typing import Any

import pytest
from ocpp.v16 import call

from tests.e2e.ocpp_harness import CP_ID, OcppRig, run_ocpp_scenario

pytestmark = pytest.mark.slow

RESULTS: dict[str, Any] = {}


async def scenario(rig: OcppRig) -> OcppRig:
    assert rig.config is not None
    text = rig.config.read_text()
    assert text.count("[platform]\n") == 1
    rig.config.write_text(text.replace("[platform]\n", "[platform]\nenabled = false\n"))
    cs = rig.cs
    await rig.start()
    await rig.booted()
    await rig.until("Preparing on connector 1", lambda: any(p["connectorId"] == 1 and p["status"] == "Preparing" for p in rig.payloads("StatusNotification")))
    assert (await cs.call(CP_ID, call.ChangeConfiguration(key="MeterValueSampleInterval", value="5"))).status == "Accepted"
    assert (await cs.call(CP_ID, call.RemoteStartTransaction(id_tag="NO-PLATFORM-1", connector_id=1))).status == "Accepted"
    await rig.until("StartTransaction", lambda: rig.payloads("StartTransaction"), timeout=40)
    await rig.until("two MeterValues", lambda: len(rig.payloads("MeterValues")) >= 2, timeout=20)
    tx = int(rig.payloads("MeterValues")[-1]["transactionId"])
    RESULTS["tx"] = tx
    RESULTS["stop"] = await cs.call(CP_ID, call.RemoteStopTransaction(transaction_id=tx))
    await rig.until("StopTransaction", lambda: rig.payloads("StopTransaction"), timeout=20)
    RESULTS["exit"] = await rig.sigterm()
    return rig


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> OcppRig:
    RESULTS.clear()
    return run_ocpp_scenario(tmp_path_factory, "e2e-ocpp-no-platform", scenario)


def test_the_ocpp_session_runs_without_the_platform(rig: OcppRig) -> None:
    assert RESULTS["stop"].status == "Accepted"
    starts, stops = rig.payloads("StartTransaction"), rig.payloads("StopTransaction")
    assert len(starts) == 1 and starts[0]["idTag"] == "NO-PLATFORM-1"
    assert len(stops) == 1 and stops[0]["reason"] == "Remote" and stops[0]["transactionId"] == RESULTS["tx"]
    assert stops[0]["meterStop"] >= starts[0]["meterStart"]
    assert rig.cs.violations == []
    assert RESULTS["exit"] == 0


def test_nothing_reaches_the_disabled_platform(rig: OcppRig) -> None:
    assert rig.emulator.received() == []
