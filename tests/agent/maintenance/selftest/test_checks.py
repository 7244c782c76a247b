"""Self-test checks against the simulator: each injected fault fails exactly its check; a
plugged-in vehicle keeps the contactor still.
"""

from __future__ import annotations

from typing import Any

import pytest

from agent.maintenance.selftest import Outcome
from hal.interfaces import PilotState
from tests.agent.maintenance.selftest.helpers import (
    FAST,
    Rig,
    _assert_left_safe,
    _failing,
    _fan_duty,
    _outcomes,
)
from tests.agent.sim_rig import eventually


@pytest.mark.parametrize(
    ("fault", "target", "failing"),
    [
        pytest.param(
            "module_silence",
            {"connector": 1, "module": 1},
            {"connector1.power_modules.communication"},
            id="module_silence",
        ),
        pytest.param(
            "contactor_fail_to_close", {"connector": 1}, {"connector1.contactor"}, id="fail_to_close"
        ),
        pytest.param(
            "contactor_weld", {"connector": 1}, {"connector1.contactor", "connector1.weld"}, id="weld"
        ),
        pytest.param(
            "isolation_drop", {"connector": 1, "value": 50.0}, {"connector1.imd"}, id="isolation_drop"
        ),
        pytest.param("meter_silence", {"connector": 2}, {"connector2.meter"}, id="meter_silence"),
        pytest.param(
            "fan_slowdown", {"sensor": "cabinet", "value": 0.3}, {"fan.cabinet"}, id="fan_slowdown"
        ),
        pytest.param(
            "over_temperature",
            {"sensor": "power_module", "value": 150.0},
            {"temperature_sensors"},
            id="over_temperature",
        ),
    ],
)
async def test_each_fault_fails_exactly_its_check(
    rig: Rig, fault: str, target: dict[str, Any], failing: set[str]
) -> None:
    duty = _fan_duty(rig)
    rig.sim.inject(fault, **target)
    if fault == "over_temperature":  # a snapshot check: let the driver poll the new value first
        thermal = rig.devices.thermal
        assert thermal is not None
        await eventually(
            lambda: (thermal.temperatures()["power_module"].celsius or 0.0) > FAST.temperature_max_c,
            "the thermal driver reads the injected heat",
        )

    report = await rig.run()

    assert not report.passed
    assert _failing(report) == failing, [c.to_dict() for c in report.failed()]
    skipped = {c.name for c in report.checks if c.result is Outcome.SKIPPED}
    if fault == "module_silence":  # never power modules the controller cannot talk to
        assert skipped == {"connector1.power_modules.output"}
        comm = report.check("connector1.power_modules.communication")
        assert comm.value["silent"] == [1] and "did not answer" in comm.detail
        assert not any(m.on for m in rig.sim.world.connector(1).modules)
    else:
        assert skipped == set()
    for name in failing:
        result = report.check(name)
        assert result.detail and result.limit is not None
    assert report.to_details()["summary"]["fail"] == len(failing)
    await _assert_left_safe(rig, duty)
    if fault == "contactor_weld":
        weld = report.check("connector1.weld")
        assert weld.value["mirror_says_open"] is False and "welded" in weld.detail
        assert "contactor_welded" in report.check("connector1.contactor").detail
    if fault == "isolation_drop":
        assert report.check("connector1.imd").value["resistance_kohm"] == pytest.approx(50.0, abs=1.0)


async def test_with_a_vehicle_plugged_in_the_contactor_is_not_switched(rig: Rig) -> None:
    rig.sim.clear("vehicle_unplug", connector=1)  # "clearing" the unplug plugs the EV in
    vehicle = rig.devices.vehicles[1]
    await eventually(lambda: vehicle.status().pilot is PilotState.B, "pilot B")
    cycles = rig.sim.world.connector(1).contactor.cycles

    report = await rig.run()

    contactor = report.check("connector1.contactor")
    assert contactor.result is Outcome.SKIPPED and "vehicle is plugged in" in contactor.detail
    assert rig.sim.world.connector(1).contactor.cycles == cycles  # never energised
    outcomes = _outcomes(report)
    assert outcomes.pop("connector1.contactor") is Outcome.SKIPPED
    assert set(outcomes.values()) == {Outcome.PASS}  # the other connector is still switched
    assert report.passed
