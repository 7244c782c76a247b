"""Fault injection API (hal.sim.faults)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import pytest

from hal.sim import faults, physics, scenario
from hal.sim.world import FAULTS, SimFan, SimVehicle, SimWorld


def two_connector_world() -> SimWorld:
    return scenario.make_world(
        [
            scenario.make_dc_connector(1, [1, 2], vehicle=SimVehicle(plugged=True)),
            scenario.make_dc_connector(2, [3, 4], vehicle=SimVehicle(plugged=True)),
        ]
    )


def one_connector_world() -> SimWorld:
    return scenario.make_world([scenario.make_dc_connector(1, [1, 2], plugged=True)])


# fault -> (inject kwargs, predicate on the world that is True exactly while injected)
CASES: dict[str, tuple[dict[str, Any], Callable[[SimWorld], bool]]] = {
    "module_silence": ({"connector": 2, "module": 3}, lambda w: w.connectors[2].modules[0].silent),
    "garbage_frames": ({"module": 4}, lambda w: w.connectors[2].modules[1].garbage),
    "meter_freeze": ({"connector": 1}, lambda w: w.connectors[1].meter.frozen),
    "meter_silence": ({"connector": 2}, lambda w: w.connectors[2].meter.silent),
    "contactor_weld": ({"connector": 1}, lambda w: w.connectors[1].contactor.weld),
    "contactor_fail_to_close": (
        {"connector": 1},
        lambda w: w.connectors[1].contactor.fail_to_close,
    ),
    "fan_slowdown": ({"value": 0.5}, lambda w: w.fans["cabinet"].slowdown == 0.5),
    "over_temperature": (
        {"sensor": "dc_outlet", "value": 30.0},
        lambda w: w.extra_heat.get("dc_outlet") == 30.0,
    ),
    "isolation_drop": (
        {"connector": 2, "value": 100.0},
        lambda w: w.connectors[2].isolation_drop_kohm == 100.0,
    ),
    "vehicle_unplug": ({"connector": 1}, lambda w: not w.connectors[1].vehicle.plugged),
    "inverter_sync_loss": ({"connector": 1}, lambda w: w.connectors[1].inverter_sync_lost),
    "bms_refuse_discharge": (
        {"connector": 2},
        lambda w: w.connectors[2].vehicle.refuse_discharge,
    ),
}


def test_every_world_fault_has_a_case() -> None:
    assert set(CASES) == set(FAULTS)


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_inject_and_clear_every_fault(fault: str) -> None:
    world = two_connector_world()
    kwargs, active = CASES[fault]
    assert not active(world)
    sentence = faults.inject(world, fault, **kwargs)
    assert active(world)
    assert fault in sentence and sentence.startswith("t=0.0 s: injected")
    assert world.log == [sentence]
    listed = [f["fault"] for f in faults.active_faults(world)]
    if fault == "vehicle_unplug":
        assert listed == []  # an event, not a state
    else:
        assert listed == [fault]
    cleared = faults.clear(world, fault, **kwargs)
    assert not active(world)
    assert "cleared" in cleared and world.log == [sentence, cleared]
    assert faults.active_faults(world) == []


def test_active_faults_describe_targets_and_values() -> None:
    world = two_connector_world()
    faults.inject(world, "module_silence", connector=2, module=3)
    faults.inject(world, "isolation_drop", connector=1)
    faults.inject(world, "over_temperature")
    faults.inject(world, "fan_slowdown")
    listed = faults.active_faults(world)
    assert [(f["fault"], f["connector"], f["module"], f["sensor"], f["value"]) for f in listed] == [
        ("isolation_drop", 1, None, None, 50.0),
        ("module_silence", 2, 3, None, None),
        ("fan_slowdown", None, None, "cabinet", 0.3),
        ("over_temperature", None, None, "power_module", 60.0),
    ]
    assert all(f["description"] == FAULTS[f["fault"]] for f in listed)
    json.dumps(listed)


def test_defaults() -> None:
    world = one_connector_world()
    faults.inject(world, "fan_slowdown")
    assert world.fans["cabinet"].slowdown == 0.3
    faults.inject(world, "over_temperature")
    assert world.extra_heat == {"power_module": 60.0}
    assert world.temperatures["power_module"] == pytest.approx(90.0)
    faults.inject(world, "isolation_drop")  # the only connector
    assert world.connectors[1].isolation_drop_kohm == 50.0
    assert world.connectors[1].isolation_kohm == 50.0


def test_connector_may_be_omitted_only_with_a_single_connector() -> None:
    world = one_connector_world()
    faults.inject(world, "meter_freeze")
    assert world.connectors[1].meter.frozen
    with pytest.raises(ValueError, match=r"^connector: required for meter_freeze"):
        faults.inject(two_connector_world(), "meter_freeze")


def test_reinjecting_over_temperature_replaces_the_offset() -> None:
    world = one_connector_world()
    faults.inject(world, "over_temperature", value=60.0)
    faults.inject(world, "over_temperature", value=10.0)
    assert world.extra_heat == {"power_module": 10.0}
    assert world.temperatures["power_module"] == pytest.approx(40.0)
    faults.clear(world, "over_temperature", sensor="power_module")
    assert world.temperatures["power_module"] == pytest.approx(30.0)
    assert world.extra_heat == {}


def test_clear_over_temperature_without_sensor_clears_all() -> None:
    world = one_connector_world()
    faults.inject(world, "over_temperature", sensor="control_board", value=5.0)
    faults.inject(world, "over_temperature", sensor="ac_inlet", value=7.0)
    text = faults.clear(world, "over_temperature")
    assert world.extra_heat == {}
    assert "ac_inlet" in text and "control_board" in text
    assert world.temperatures["control_board"] == pytest.approx(35.0)


def test_clearing_an_inactive_fault_says_so() -> None:
    world = one_connector_world()
    assert "not active" in faults.clear(world, "meter_silence")
    assert "already" in faults.inject(world, "meter_silence", connector=1) + faults.inject(
        world, "meter_silence", connector=1
    )


def test_weld_message_depends_on_contact_position() -> None:
    world = one_connector_world()
    assert "will weld when they next close" in faults.inject(world, "contactor_weld")
    world = one_connector_world()
    world.connectors[1].contactor.closed = True
    assert "welded closed" in faults.inject(world, "contactor_weld")


def test_vehicle_unplug_cancels_scheduled_plug_in_and_clear_replugs() -> None:
    world = scenario.make_world(
        [scenario.make_dc_connector(1, [1], vehicle=SimVehicle(plug_in_at=5.0))]
    )
    faults.inject(world, "vehicle_unplug")
    physics.step(world, 10.0)
    assert not world.connectors[1].vehicle.plugged
    faults.clear(world, "vehicle_unplug")
    assert world.connectors[1].vehicle.plugged


def test_sentence_carries_world_time() -> None:
    world = one_connector_world()
    physics.step(world, 12.0)
    text = faults.inject(world, "garbage_frames", module=2)
    assert text.startswith("t=12.0 s: injected garbage_frames: module 2 on connector 1")
    assert text.endswith(".")


@pytest.mark.parametrize(
    ("fault", "kwargs", "message"),
    [
        ("no_such_fault", {}, r"^fault: unknown fault 'no_such_fault'"),
        ("meter_freeze", {"connector": 9}, r"^connector: no connector 9 \(connectors: 1, 2\)"),
        ("meter_freeze", {"connector": True}, r"^connector: must be an integer"),
        ("meter_freeze", {"connector": "1"}, r"^connector: must be an integer"),
        ("meter_freeze", {"connector": 1, "module": 1}, r"^module: does not apply to meter_freeze"),
        ("meter_freeze", {"connector": 1, "value": 1.0}, r"^value: does not apply"),
        ("fan_slowdown", {"connector": 1}, r"^connector: does not apply to fan_slowdown"),
        ("module_silence", {"connector": 1}, r"^module: required for module_silence"),
        (
            "module_silence",
            {"connector": 1, "module": 3},
            r"^module: no module with address 3 on connector 1",
        ),
        ("module_silence", {"module": 99}, r"^module: no module with address 99 on any connector"),
        ("fan_slowdown", {"value": 1.5}, r"^value: fan_slowdown fraction must be in \[0, 1\]"),
        ("fan_slowdown", {"value": -0.1}, r"^value: fan_slowdown fraction"),
        ("fan_slowdown", {"sensor": "exhaust"}, r"^sensor: no fan 'exhaust' \(fans: cabinet\)"),
        ("fan_slowdown", {"value": math.nan}, r"^value: must be finite"),
        ("fan_slowdown", {"value": "fast"}, r"^value: must be a number"),
        ("over_temperature", {"sensor": "cpu"}, r"^sensor: no temperature sensor 'cpu'"),
        ("over_temperature", {"value": 0.0}, r"^value: over_temperature extra degC must be in \(0"),
        ("over_temperature", {"sensor": ""}, r"^sensor: must be a non-empty name"),
        ("isolation_drop", {"connector": 1, "value": -5.0}, r"^value: isolation kOhm must be in"),
        ("isolation_drop", {"connector": 1, "value": math.inf}, r"^value: must be finite"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(
    fault: str, kwargs: dict[str, Any], message: str
) -> None:
    world = two_connector_world()
    before = repr(world)
    with pytest.raises(ValueError, match=message):
        faults.inject(world, fault, **kwargs)
    assert repr(world) == before  # nothing half-applied, nothing logged


def test_ambiguous_module_address_needs_connector() -> None:
    world = scenario.make_world(
        [scenario.make_dc_connector(1, [1]), scenario.make_dc_connector(2, [1])]
    )
    with pytest.raises(
        ValueError, match=r"^connector: required, module address 1 exists on connectors 1, 2"
    ):
        faults.inject(world, "module_silence", module=1)
    faults.inject(world, "module_silence", module=1, connector=2)
    assert world.connectors[2].modules[0].silent and not world.connectors[1].modules[0].silent


def test_clear_validates_too() -> None:
    world = two_connector_world()
    with pytest.raises(ValueError, match=r"^fault: unknown"):
        faults.clear(world, "gremlins")
    with pytest.raises(ValueError, match=r"^module: does not apply"):
        faults.clear(world, "contactor_weld", connector=1, module=2)
    assert world.log == []


def test_fan_slowdown_targets_one_fan_by_name() -> None:
    world = scenario.make_world(
        [scenario.make_dc_connector(1, [1])],
        fans=[SimFan(name="cabinet"), SimFan(name="module_bay")],
    )
    faults.inject(world, "fan_slowdown", sensor="module_bay", value=0.0)
    assert world.fans["module_bay"].slowdown == 0.0
    assert world.fans["cabinet"].slowdown == 1.0
    physics.step(world, 30.0)
    assert world.fans["module_bay"].rpm < 1.0
    faults.clear(world, "fan_slowdown")
    assert world.fans["module_bay"].slowdown == 1.0
