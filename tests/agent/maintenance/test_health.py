"""component_health block (platform-api §14.1): field list, V2G fields, relay and fan status,
unknown values, persisted isolation results and discharge closures."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.maintenance.health import ComponentHealth, HealthConfig, fan_status
from agent.charging.session import Session, SessionRequest
from agent.utctime import utc_now
from agent.store import Store
from hal.interfaces import OK, ContactorPosition, FanStatus, Health, HealthState
from tests.agent.fakes import FakeContactor
from tests.agent.health_fakes import FakeThermal, MeasuringStage, ScriptedContactor, make_connector

# The project's own copy of the §14.1 field list: name -> JSON type.
CORE_TYPES: dict[str, str] = {
    "contactor_cycles": "number",
    "contactor_max_cycles": "number",
    "cooling_fan_rpm": "number",
    "cooling_fan_status": "enum:ok,warning,fault",
    "internal_temps": "object",
    "relay_state": "enum:closed,open,fault",
    "isolation_test_kohms": "number",
    "last_isolation_test": "iso8601",
}
V2G_TYPES: dict[str, str] = {
    "bidirectional_inverter_cycles": "number",
    "bidirectional_inverter_max_cycles": "number",
    "harmonic_distortion_v2g_pct": "number",
    "discharge_contactor_cycles": "number",
}
TEMP_KEYS = {"power_module", "control_board", "ac_inlet", "dc_outlet"}
ISO_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


def check_types(block: dict[str, Any], spec: dict[str, str]) -> None:
    for name, kind in spec.items():
        if name not in block:
            continue
        value = block[name]
        if kind == "number":
            assert isinstance(value, (int, float)) and not isinstance(value, bool), name
        elif kind == "object":
            assert isinstance(value, dict), name
            assert set(value) <= TEMP_KEYS
            assert all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()
            )
        elif kind == "iso8601":
            assert isinstance(value, str) and ISO_Z.match(value), (name, value)
        else:
            assert value in kind.removeprefix("enum:").split(","), (name, value)


def full_thermal() -> FakeThermal:
    thermal = FakeThermal(
        temps={"power_module": 41.26, "control_board": 35.0, "ac_inlet": 28.5, "dc_outlet": 30.04}
    )
    thermal.set_fan("cabinet", 1790.4, duty=100.0)
    return thermal


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path / "state")
    yield s
    await s.close()


async def test_full_block_has_exactly_the_core_fields_with_their_types(store: Store) -> None:
    health = ComponentHealth(store.kv)
    await health.load()
    connector = make_connector(kind="dc", thermal=full_thermal())
    connector.last_isolation_kohm = 5123.44
    connector.last_isolation_at = "2025-03-01T10:00:00Z"

    block = health.build(connector)

    assert set(block) == set(CORE_TYPES)
    check_types(block, CORE_TYPES)
    assert block["internal_temps"] == {
        "power_module": 41.3,
        "control_board": 35.0,
        "ac_inlet": 28.5,
        "dc_outlet": 30.0,
    }
    assert block["cooling_fan_rpm"] == 1790 and block["cooling_fan_status"] == "ok"
    assert block["relay_state"] == "open"
    assert block["isolation_test_kohms"] == 5123.4
    assert block["last_isolation_test"] == "2025-03-01T10:00:00Z"
    assert block["contactor_max_cycles"] == 100_000  # DC default without a driver rating


async def test_v2g_fields_only_with_a_bidirectional_stage(store: Store) -> None:
    health = ComponentHealth(store.kv, HealthConfig(bidirectional_max_cycles=8000))
    await health.load()
    plain = health.build(make_connector(thermal=full_thermal()))
    assert not set(plain) & set(V2G_TYPES)

    stage = MeasuringStage(cycles=17, thd_pct=2.437)
    block = health.build(make_connector(thermal=full_thermal(), stage=stage))
    assert set(V2G_TYPES) <= set(block)
    check_types(block, {**CORE_TYPES, **V2G_TYPES})
    assert block["bidirectional_inverter_cycles"] == 17
    assert block["bidirectional_inverter_max_cycles"] == 8000
    assert block["harmonic_distortion_v2g_pct"] == 2.44
    assert block["discharge_contactor_cycles"] == 0

    stage.thd_pct = None  # stale stage: distortion unknown, omitted; the rest stays
    block = health.build(make_connector(thermal=full_thermal(), stage=stage))
    assert "harmonic_distortion_v2g_pct" not in block
    assert block["bidirectional_inverter_cycles"] == 17


@pytest.mark.parametrize(
    ("contactor", "expected"),
    [
        (ScriptedContactor(), "open"),
        (ScriptedContactor(closed=True, coil=True), "closed"),
        (ScriptedContactor(welded=True), "fault"),
        (ScriptedContactor(forced_position=ContactorPosition.FAULT), "fault"),
        (
            ScriptedContactor(
                closed=True,
                coil=True,
                forced_health=Health(HealthState.FAULT, "mirror_mismatch", "x"),
            ),
            "fault",
        ),
        (ScriptedContactor(forced_health=Health(HealthState.DEGRADED, "mirror_mismatch")), "fault"),
    ],
)
async def test_relay_state(store: Store, contactor: FakeContactor, expected: str) -> None:
    health = ComponentHealth(store.kv)
    block = health.build(make_connector(contactor=contactor, thermal=full_thermal()))
    assert block["relay_state"] == expected


async def test_contactor_counts_and_rating_come_from_the_driver(store: Store) -> None:
    health = ComponentHealth(store.kv)
    rated = ScriptedContactor(cycles=412, rated_cycles=250_000)
    block = health.build(make_connector(contactor=rated))
    assert (block["contactor_cycles"], block["contactor_max_cycles"]) == (412, 250_000)
    ac = health.build(make_connector(kind="ac", contactor=FakeContactor(cycles=3)))
    assert (ac["contactor_cycles"], ac["contactor_max_cycles"]) == (3, 60_000)


def fan(rpm: float | None, duty: float = 100.0, health: Health = OK) -> FanStatus:
    return FanStatus("cabinet", rpm, duty, 1800.0, health)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (fan(1800.0), "ok"),
        (fan(0.85 * 1800.0), "ok"),
        (fan(0.85 * 1800.0 - 1), "warning"),
        (fan(0.5 * 1800.0), "warning"),
        (fan(0.5 * 1800.0 - 1), "fault"),
        (fan(0.0), "fault"),
        (fan(None), "fault"),
        (fan(500.0, duty=50.0), "warning"),  # expected 900 rpm at 50 %: 450 <= 500 < 765
        (fan(440.0, duty=50.0), "fault"),
        (fan(800.0, duty=50.0), "ok"),
        (fan(40.0, duty=5.0), "fault"),  # 0.5 x 90 = 45 > 40, and at/below stopped_rpm anyway
        (fan(0.0, duty=0.0), "ok"),  # commanded off
        (fan(1800.0, health=Health(HealthState.DEGRADED, "fan_low")), "warning"),
        (fan(1800.0, health=Health(HealthState.FAULT, "fan_stopped")), "fault"),
    ],
)
def test_fan_status_thresholds(status: FanStatus, expected: str) -> None:
    assert fan_status(status, HealthConfig()) == expected


async def test_unknown_values_are_omitted_never_invented(store: Store) -> None:
    health = ComponentHealth(store.kv)
    await health.load()
    thermal = FakeThermal(temps={"power_module": 40.0, "control_board": None})
    thermal.set_fan("cabinet", None, health=Health(HealthState.FAULT, "sensor_missing"))
    block = health.build(make_connector(kind="ac", thermal=thermal))

    # never tested: both isolation fields absent (no 0 kOhm, no epoch)
    assert "isolation_test_kohms" not in block and "last_isolation_test" not in block
    # unreadable / unconfigured sensors are left out of the object
    assert block["internal_temps"] == {"power_module": 40.0}
    # unreadable fan: no rpm, but the status says fault
    assert "cooling_fan_rpm" not in block and block["cooling_fan_status"] == "fault"
    # always known
    assert {"contactor_cycles", "contactor_max_cycles", "relay_state", "internal_temps"} <= set(
        block
    )
    check_types(block, CORE_TYPES)

    bare = health.build(make_connector(kind="ac", thermal=None))
    assert bare["internal_temps"] == {}
    assert "cooling_fan_rpm" not in bare and "cooling_fan_status" not in bare


async def test_sensor_mapping_and_connector_outlet_sensor(store: Store) -> None:
    thermal = FakeThermal(
        temps={"hs1": 50.0, "cpu": 45.0, "inlet": 20.0, "gun1": 33.0, "gun2": 38.0}
    )
    thermal.set_fan("fan0", 1700.0)
    cfg = HealthConfig.model_validate(
        {
            "internal_temps": {
                "power_module": "hs1",
                "control_board": "cpu",
                "ac_inlet": "inlet",
                "dc_outlet": "gun1",
            },
            "fan": "fan0",
        }
    )
    health = ComponentHealth(store.kv, cfg)
    one = health.build(make_connector(cid=1, thermal=thermal))
    two = health.build(make_connector(cid=2, thermal=thermal, outlet_sensor="gun2"))
    assert one["internal_temps"] == {
        "power_module": 50.0,
        "control_board": 45.0,
        "ac_inlet": 20.0,
        "dc_outlet": 33.0,
    }
    assert two["internal_temps"]["dc_outlet"] == 38.0
    assert one["cooling_fan_rpm"] == 1700


def test_health_config_rejects_inverted_fan_thresholds() -> None:
    with pytest.raises(ValueError, match="fan_fault_fraction"):
        HealthConfig(fan_warning_fraction=0.5, fan_fault_fraction=0.6)
    with pytest.raises(ValueError):
        HealthConfig.model_validate({"fans": "typo"})


async def test_isolation_result_survives_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = await Store.open(state)
    try:
        health = ComponentHealth(store.kv)
        await health.load()
        connector = make_connector(cid=2, thermal=full_thermal())
        await health.sync([connector])  # nothing measured yet: nothing written
        assert await store.kv.items("health/isolation/") == {}
        connector.last_isolation_kohm = 2500.0
        connector.last_isolation_at = "2025-03-01T10:00:00Z"
        await health.sync([connector])
    finally:
        await store.close()

    store = await Store.open(state)
    try:
        health = ComponentHealth(store.kv)
        await health.load()
        fresh = make_connector(cid=2, thermal=full_thermal())  # after a restart: nothing in memory
        block = health.build(fresh)
        assert block["isolation_test_kohms"] == 2500.0
        assert block["last_isolation_test"] == "2025-03-01T10:00:00Z"
        # a newer in-memory result wins and replaces the stored one
        fresh.last_isolation_kohm = 1800.0
        fresh.last_isolation_at = "2025-03-02T09:00:00Z"
        assert health.build(fresh)["isolation_test_kohms"] == 1800.0
        assert await health.isolation.observe(fresh) is True
        assert await health.isolation.observe(fresh) is False
        assert await store.kv.get("health/isolation/2") == {
            "kohm": 1800.0,
            "at": "2025-03-02T09:00:00Z",
        }
        # another connector does not inherit it
        assert "isolation_test_kohms" not in health.build(
            make_connector(cid=1, thermal=full_thermal())
        )
    finally:
        await store.close()


def session(cid: int, mode: str) -> Session:
    return Session(
        connector_id=cid,
        request=SessionRequest(mode=mode),  # type: ignore[arg-type]
        start_time=utc_now(),
        started_mono=0.0,
        meter_start=0.0,
        soc_start=None,
    )


async def test_discharge_contactor_cycles_count_discharge_starts_and_persist(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    store = await Store.open(state)
    try:
        health = ComponentHealth(store.kv)
        await health.load()
        health.discharge.note_session_started(session(1, "discharge"))
        health.discharge.note_session_started(session(1, "charge"))
        health.discharge.note_session_started(session(1, "discharge"))
        health.discharge.note_session_started(session(2, "discharge"))
        connector = make_connector(cid=1, stage=MeasuringStage())
        assert health.build(connector)["discharge_contactor_cycles"] == 2
        await health.sync([connector])
    finally:
        await store.close()

    store = await Store.open(state)
    try:
        health = ComponentHealth(store.kv)
        await health.load()
        assert (health.discharge.count(1), health.discharge.count(2)) == (2, 1)
        assert await health.discharge.reset(1) == 2
        assert health.discharge.count(1) == 0
        health2 = ComponentHealth(store.kv)
        await health2.load()
        assert health2.discharge.count(1) == 0 and health2.discharge.count(2) == 1
    finally:
        await store.close()
