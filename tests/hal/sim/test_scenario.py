"""World builders and the live-display snapshot (hal.sim.scenario)."""

from __future__ import annotations

import json

import pytest

from hal.sim import faults, physics, scenario
from hal.sim.world import SimVehicle


def test_make_dc_connector() -> None:
    conn = scenario.make_dc_connector(3, [10, 11], module_max_current=25.0, walk_in=False)
    assert conn.kind == "dc" and conn.meter.kind == "dc"
    assert [m.address for m in conn.modules] == [10, 11]
    assert all(m.group == 3 and m.max_current == 25.0 and not m.walk_in for m in conn.modules)
    assert scenario.make_dc_connector(3, [10], 7).modules[0].group == 7
    assert not conn.vehicle.plugged
    vehicle = SimVehicle(soc=80.0)
    assert scenario.make_dc_connector(1, [1], vehicle=vehicle).vehicle is vehicle


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((1, []), r"^module_addresses: a DC connector needs at least one module"),
        ((1, [1, 1]), r"^module_addresses: duplicate address"),
        ((1, [-1]), r"^module_addresses: must be a non-negative integer"),
        ((-1, [1]), r"^connector_id: must be"),
        ((1, [1], True), r"^group: must be"),
    ],
)
def test_make_dc_connector_rejects_bad_arguments(args: tuple[object, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        scenario.make_dc_connector(*args)  # type: ignore[arg-type]


def test_make_ac_connector() -> None:
    conn = scenario.make_ac_connector(2, ac_max_current=16.0, phases=1, plugged=True)
    assert conn.kind == "ac" and conn.meter.kind == "ac" and conn.modules == []
    assert conn.vehicle.ac_max_current == 16.0 and conn.vehicle.ac_phases == 1
    assert conn.vehicle.plugged
    with pytest.raises(ValueError, match=r"^phases: must be 1, 2 or 3"):
        scenario.make_ac_connector(2, phases=4)


def test_make_world_rejects_duplicate_connector_ids() -> None:
    with pytest.raises(ValueError, match=r"^connectors: duplicate connector id 1"):
        scenario.make_world([scenario.make_ac_connector(1), scenario.make_ac_connector(1)])


def test_snapshot_is_json_and_reflects_actual_flow() -> None:
    world = scenario.make_world(
        [
            scenario.make_dc_connector(2, [1, 2], plugged=True),
            scenario.make_ac_connector(1, plugged=True),
        ]
    )
    dc = world.connectors[2]
    dc.pwm_duty_percent = 5.0
    dc.contactor.coil = True
    for m in dc.modules:
        m.on, m.voltage_setpoint, m.current_limit = True, 500.0, 40.0
    faults.inject(world, "meter_freeze", connector=2)
    physics.run(world, 5.0, dt=0.5)
    snap = scenario.world_snapshot(world)
    assert json.loads(json.dumps(snap)) == snap
    assert snap["time"] == 5.0
    assert [c["id"] for c in snap["connectors"]] == [1, 2]
    dc_snap = snap["connectors"][1]
    assert dc_snap["pilot"] == "C" and dc_snap["contactor"]["closed"]
    assert dc_snap["current"] == pytest.approx(80.0)
    assert dc_snap["power_kw"] > 25.0
    assert dc_snap["meter"]["power_kw"] == 0.0 and dc_snap["meter"]["frozen"]
    assert [m["output_current"] for m in dc_snap["modules"]] == [40.0, 40.0]
    assert dc_snap["soc"] > 30.0
    assert snap["connectors"][0]["pilot"] == "B"  # AC: no PWM offered
    assert snap["faults"][0]["fault"] == "meter_freeze"
    assert set(snap["temperatures"]) == {"power_module", "control_board", "ac_inlet", "dc_outlet"}
    assert snap["fans"]["cabinet"]["rpm"] == pytest.approx(720.0)


def test_run_steps_exactly_the_duration() -> None:
    world = scenario.make_world([scenario.make_ac_connector(1)])
    physics.run(world, 1.05, dt=0.1)
    assert world.time == pytest.approx(1.05)
    with pytest.raises(ValueError, match="dt"):
        physics.run(world, 1.0, dt=0.0)
