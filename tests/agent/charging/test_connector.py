"""Connector state machine: safety interlocks and session accounting, against HAL fakes."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import pytest

from agent.charging.config import ChargingSection, ConnectorConfig, DeviceSection
from agent.charging.connector import Connector, ConnectorHardware, ConnectorState, Rejected
from agent.charging.faults import FaultBoard
from agent.charging.session import SessionRequest
from hal.tick import Pace

from tests.agent.fakes import (
    FakeBidirectional,
    FakeContactor,
    FakeImd,
    FakeMeter,
    FakeModules,
    FakeVehicle,
    RecordingListener,
)


class Faults:
    def __init__(self) -> None:
        self.raised: list[str] = []
        self.cleared: list[str] = []

    def fault_raised(self, fault: Any) -> None:
        self.raised.append(fault.fault_id)

    def fault_cleared(self, fault: Any) -> None:
        self.cleared.append(fault.fault_id)


def dev(driver: str) -> DeviceSection:
    return DeviceSection(driver=driver)


class Rig:
    def __init__(self, kind: str = "dc", **policy: Any) -> None:
        self.contactor = FakeContactor()
        self.modules = FakeModules(contactor=self.contactor)
        self.meter = FakeMeter(modules=self.modules)
        self.vehicle = FakeVehicle()
        self.imd = FakeImd()
        self.v2g = FakeBidirectional(meter=self.meter)
        self.listener = RecordingListener()
        self.pace = Pace()
        self.fault_log = Faults()
        self.faults = FaultBoard(self.fault_log)
        cfg = ConnectorConfig(
            id=1,
            kind=kind,  # type: ignore[arg-type]
            max_power_kw=60,
            max_current_a=150 if kind == "dc" else 32,
            power_modules=dev("x") if kind == "dc" else None,
            meter=dev("x"),
            contactor=dev("x"),
            vehicle=dev("x"),
        )
        defaults: dict[str, Any] = dict(
            tick_s=0.02, isolation_grace_s=0.0, isolation_readings=2, current_ramp_a_per_s=1000.0,
            meter_loss_grace_s=0.1, ev_ready_timeout_s=1.0,
        )
        defaults.update(policy)
        hw = ConnectorHardware(
            meter=self.meter, contactor=self.contactor, vehicle=self.vehicle,  # type: ignore[arg-type]
            modules=self.modules if kind == "dc" else None, imd=self.imd if kind == "dc" else None,  # type: ignore[arg-type]
            bidirectional=self.v2g if kind == "dc" else None,  # type: ignore[arg-type]
            pace=self.pace,
        )
        self.connector = Connector(cfg, hw, ChargingSection(**defaults), self.faults, self.listener)
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "Rig":
        self.task = asyncio.create_task(self.connector.run())
        await asyncio.sleep(0.05)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.connector.shutdown()
        assert self.task is not None
        await asyncio.wait_for(self.task, 5)
        assert not self.contactor.coil, "output left live after shutdown"

    async def until(self, cond: Callable[[], bool], timeout: float = 3.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not cond():
            assert asyncio.get_running_loop().time() < deadline, "condition not reached"
            await asyncio.sleep(0.01)


async def test_full_dc_session_accounts_energy_from_the_meter() -> None:
    async with Rig() as rig:
        rig.vehicle.plug()
        await rig.until(lambda: rig.connector.state is ConnectorState.VEHICLE_CONNECTED)
        rig.connector.request_start(SessionRequest(command_id="c1", transaction_id="tx-9"))
        await rig.until(lambda: rig.connector.state is ConnectorState.CHARGING)
        assert rig.contactor.closed and rig.modules.on
        await asyncio.sleep(0.3)
        rig.connector.request_stop("remote_stop", "c2")
        await rig.until(lambda: rig.listener.records != [])
        assert not rig.contactor.closed and not rig.modules.on
    record = rig.listener.records[0]
    assert record["energy"] == pytest.approx(record["meter_end"] - record["meter_start"], abs=1e-9)
    assert record["energy"] > 0
    assert record["stop_reason"] == "remote_stop" and record["transaction_id"] == "tx-9"
    assert rig.listener.event_types()[:3] == ["plug_in", "start", "stop"]
    statuses = {(c, s) for c, s, _m, _d in rig.listener.statuses}
    assert ("c1", "completed") in statuses and ("c2", "completed") in statuses


async def test_the_connector_is_busy_on_the_pace_from_a_start_request_to_the_end_of_its_session() -> None:
    async with Rig() as rig:
        await rig.until(lambda: rig.pace.idle)
        rig.vehicle.plug()
        await rig.until(lambda: rig.connector.state is ConnectorState.VEHICLE_CONNECTED)
        assert rig.pace.idle  # plugged and waiting for a start: the pollers may slow down
        idle_at_setpoints: list[bool] = []
        real_set_output = rig.modules.set_output

        async def spy(voltage: float, current: float) -> None:
            idle_at_setpoints.append(rig.pace.idle)
            await real_set_output(voltage, current)

        rig.modules.set_output = spy  # type: ignore[method-assign]
        rig.connector.request_start(SessionRequest())
        await rig.until(lambda: rig.connector.state is ConnectorState.CHARGING)
        assert idle_at_setpoints and not any(idle_at_setpoints)  # busy from the cable check on
        assert not rig.pace.idle
        rig.connector.request_stop("remote_stop", None)
        await rig.until(lambda: rig.listener.records != [])
        await rig.until(lambda: rig.pace.idle)
        assert not rig.contactor.closed


async def test_cable_check_runs_before_contactor_closes() -> None:
    async with Rig() as rig:
        rig.vehicle.plug()
        await rig.until(lambda: rig.connector.state is ConnectorState.VEHICLE_CONNECTED)
        rig.connector.request_start(SessionRequest())
        await rig.until(lambda: rig.connector.state is ConnectorState.CHARGING)
    calls = rig.modules.calls
    # cable check at 500 V / 2 A, then off, and only then the session voltage
    assert calls[1] == ("set", 500.0, 2.0)
    first_off_after_check = next(i for i, c in enumerate(calls) if c[0] == "off" and i > 1)
    assert calls[first_off_after_check + 1][0] == "set" and calls[first_off_after_check + 1][1] == 400.0


async def test_low_isolation_in_idle_blocks_the_connector() -> None:
    async with Rig() as rig:
        rig.imd.kohm = 50.0
        rig.vehicle.plug()
        await rig.until(lambda: rig.connector.state is ConnectorState.FAULT)
        with pytest.raises(Rejected, match="F-0102"):
            rig.connector.request_start(SessionRequest(command_id="c1"))
        rig.imd.kohm = 5000.0
        await rig.until(lambda: rig.connector.state is ConnectorState.VEHICLE_CONNECTED)
        assert "F-0102" in rig.fault_log.cleared


async def test_low_isolation_in_cable_check_never_closes_the_contactor() -> None:
    async with Rig() as rig:
        rig.imd.modules = rig.modules
        rig.imd.kohm_under_voltage = 50.0
        rig.vehicle.plug()
        await rig.until(lambda: rig.connector.state is ConnectorState.VEHICLE_CONNECTED)
        rig.connector.request_start(SessionRequest(command_id="c1"))
        await rig.until(lambda: any(s == "failed" for _c, s, _m, _d in rig.listener.statuses))
        assert rig.contactor.cycles == 0 and not rig.modules.on
        assert "F-0102" in rig.fault_log.raised
        await rig.until(lambda: rig.connector.state is ConnectorState.FAULT)


async def test_mirror_not_open_refuses_session_with_weld_fault() -> None:
    async with Rig() as rig:
        rig.contactor.closed = True  # a welded main contact: mirror says closed with the coil off
        rig.vehicle.plug()
        await rig.until(lambda: "F-0101" in rig.fault_log.raised)
        with pytest.raises(Rejected, match="F-0101"):
            rig.connector.request_start(SessionRequest(command_id="c1"))
        assert rig.contactor.cycles == 0
        rig.contactor.closed = False


async def test_contactor_failing_to_close_raises_f0421() -> None:
    async with Rig() as rig:
        rig.contactor.fail_to_close = True
        rig.vehicle.plug()
        await rig.until(lambda: rig.connector.state is ConnectorState.VEHICLE_CONNECTED)
        rig.connector.request_start(SessionRequest(command_id="c1"))
        await rig.until(lambda: "F-0421" in rig.fault_log.raised)
        await rig.until(lambda: ("c1", "failed") in {(c, s) for c, s, _m, _d in rig.listener.statuses})
        assert not rig.contactor.coil and not rig.modules.on


async def test_unplug_mid_session_opens_and_reports_f0805() -> None:
    async with Rig() as rig:
        rig.vehicle.plug()
        await rig.until(lambda: rig.connector.state is ConnectorState.VEHICLE_CONNECTED)
        rig.connector.request_start(SessionRequest())
        await rig.until(lambda: rig.connector.state is ConnectorState.CHARGING)
        rig.vehicle.unplug()
        await rig.until(lambda: rig.listener.records != [])
        assert not rig.contactor.closed
        assert rig.listener.records[0]["stop_reason"] == "ev_disconnected"
        assert "F-0805" in rig.fault_log.raised
        await rig.until(lambda: "plug_out" in rig.listener.event_types())


async def test_weld_on_open_is_latched_as_f0101() -> None:
    async with Rig() as rig:
        rig.vehicle.plug()
        await rig.until(lambda: rig.connector.state is ConnectorState.VEHICLE_CONNECTED)
        rig.connector.request_start(SessionRequest())
        await rig.until(lambda: rig.connector.state is ConnectorState.CHARGING)
        rig.contactor.weld_on_open = True
        rig.connector.request_stop("remote_stop")
        await rig.until(lambda: "F-0101" in rig.fault_log.raised)
        assert not rig.modules.on
        await rig.until(lambda: rig.connector.state is ConnectorState.FAULT)
        rig.contactor.weld_on_open = False
        rig.contactor.welded = False
        rig.contactor.closed = False


async def test_meter_loss_stops_the_session() -> None:
    async with Rig() as rig:
        rig.vehicle.plug()
        await rig.until(lambda: rig.connector.state is ConnectorState.VEHICLE_CONNECTED)
        rig.connector.request_start(SessionRequest())
        await rig.until(lambda: rig.connector.state is ConnectorState.CHARGING)
        rig.meter.silent = True
        await rig.until(lambda: rig.listener.records != [])
        assert rig.listener.records[0]["stop_reason"] == "fault"
        assert "F-0451" in rig.fault_log.raised and not rig.contactor.closed


async def test_duration_limit_ends_with_time_limit() -> None:
    async with Rig() as rig:
        rig.vehicle.plug()
        await rig.until(lambda: rig.connector.state is ConnectorState.VEHICLE_CONNECTED)
        rig.connector.request_start(SessionRequest(duration_s=0.3, command_id="c1"))
        await rig.until(lambda: rig.listener.records != [])
        assert rig.listener.records[0]["stop_reason"] == "time_limit"
        assert ("c1", "completed") in {(c, s) for c, s, _m, _d in rig.listener.statuses}


async def test_power_limit_caps_the_current_setpoint() -> None:
    async with Rig() as rig:
        rig.vehicle.plug()
        await rig.until(lambda: rig.connector.state is ConnectorState.VEHICLE_CONNECTED)
        rig.connector.request_start(SessionRequest())
        await rig.until(lambda: rig.connector.state is ConnectorState.CHARGING)
        rig.connector.set_limit("command", 20.0)
        await rig.until(lambda: abs(rig.modules.current_set - 50.0) < 0.6)  # 20 kW / 400 V


async def test_start_rejected_without_vehicle_and_stop_without_session() -> None:
    async with Rig() as rig:
        with pytest.raises(Rejected, match="no vehicle"):
            rig.connector.request_start(SessionRequest())
        with pytest.raises(Rejected, match="no active session"):
            rig.connector.request_stop("remote_stop")


async def test_ac_session_offers_current_by_pwm() -> None:
    async with Rig(kind="ac") as rig:
        rig.vehicle.plug()
        await rig.until(lambda: rig.connector.state is ConnectorState.VEHICLE_CONNECTED)
        rig.connector.request_start(SessionRequest())
        await rig.until(lambda: rig.connector.state is ConnectorState.CHARGING)
        assert rig.vehicle.duty == pytest.approx(32 / 0.6, abs=0.1)
        assert rig.contactor.closed
        rig.connector.set_limit("command", 0.0)
        await rig.until(lambda: rig.vehicle.duty == 100.0)


async def start_discharge(rig: Rig, **kw: Any) -> None:
    rig.vehicle.plug()
    await rig.until(lambda: rig.connector.state is ConnectorState.VEHICLE_CONNECTED)
    rig.connector.request_start(SessionRequest(mode="discharge", command_id="d1", power_kw=10.0, **kw))


async def test_discharge_exports_and_records_the_export_register() -> None:
    async with Rig() as rig:
        await start_discharge(rig)
        await rig.until(lambda: rig.connector.state is ConnectorState.DISCHARGING)
        await rig.until(lambda: rig.v2g.power_kw == 10.0)
        await asyncio.sleep(0.3)
        rig.connector.request_stop("remote_stop")
        await rig.until(lambda: rig.listener.records != [])
        assert rig.v2g.power_kw == 0.0 and not rig.contactor.closed
    record = rig.listener.records[0]
    assert record["direction"] == "discharge" and record["energy"] > 0
    assert record["energy"] == pytest.approx(record["meter_end"] - record["meter_start"], abs=1e-9)
    assert ("d1", "completed") in {(c, s) for c, s, _m, _d in rig.listener.statuses}


async def test_bms_refusal_is_f0702_and_the_command_fails() -> None:
    async with Rig() as rig:
        rig.vehicle.discharge_allowed = False
        rig.vehicle.discharge_refusal = "bms_refused"
        await start_discharge(rig)
        await rig.until(lambda: ("d1", "failed") in {(c, s) for c, s, _m, _d in rig.listener.statuses})
        assert "F-0702" in rig.fault_log.raised and rig.contactor.cycles == 0 and rig.v2g.cycles == 0


async def test_inverter_sync_loss_aborts_with_f0701() -> None:
    async with Rig() as rig:
        await start_discharge(rig)
        await rig.until(lambda: rig.connector.state is ConnectorState.DISCHARGING)
        rig.v2g.synced = False
        await rig.until(lambda: rig.listener.records != [])
        assert "F-0701" in rig.fault_log.raised and rig.v2g.power_kw == 0.0 and not rig.contactor.closed
        assert rig.listener.records[0]["stop_reason"] == "fault"
        assert ("d1", "failed") in {(c, s) for c, s, _m, _d in rig.listener.statuses}
        rig.v2g.synced = True


async def test_discharge_stops_at_the_soc_floor() -> None:
    async with Rig() as rig:
        rig.vehicle.soc = 25
        await start_discharge(rig, min_soc=30)
        await rig.until(lambda: rig.listener.records != [])
        assert rig.listener.records[0]["stop_reason"] == "soc_target_reached"


async def test_discharge_is_refused_without_a_v2g_stage() -> None:
    async with Rig(kind="ac") as rig:
        with pytest.raises(Rejected, match="not V2G-capable"):
            rig.connector.request_start(SessionRequest(mode="discharge", power_kw=5))


async def test_meter_frozen_before_the_session_is_caught_by_plausibility() -> None:
    async with Rig(meter_plausibility_s=1.0) as rig:
        rig.meter.frozen = True  # froze while idle: still answers "0 kW"
        rig.vehicle.plug()
        await rig.until(lambda: rig.connector.state is ConnectorState.VEHICLE_CONNECTED)
        rig.connector.request_start(SessionRequest(command_id="c1"))
        await rig.until(lambda: rig.listener.records != [], timeout=6.0)
        assert "F-0452" in rig.fault_log.raised and not rig.contactor.closed
        assert rig.listener.records[0]["stop_reason"] == "fault"
        rig.meter.frozen = False


async def charging_rig(rig: Rig) -> None:
    rig.vehicle.plug()
    await rig.until(lambda: rig.connector.state is ConnectorState.VEHICLE_CONNECTED)
    rig.connector.request_start(SessionRequest(command_id="c1", transaction_id="tx"))
    await rig.until(lambda: rig.connector.state is ConnectorState.CHARGING)


async def test_shutdown_stop_closes_the_running_session_with_its_record() -> None:
    rig = Rig()
    task = asyncio.create_task(rig.connector.run())
    await charging_rig(rig)
    await rig.connector.shutdown("shutdown")
    await asyncio.wait_for(task, 5)
    assert [r["stop_reason"] for r in rig.listener.records] == ["shutdown"]
    assert not rig.contactor.closed and not rig.modules.on
    assert ("c1", "failed") in {(c, s) for c, s, _m, _d in rig.listener.statuses}


async def test_suspend_then_resume_continues_the_same_record() -> None:
    rig = Rig()
    task = asyncio.create_task(rig.connector.run())
    await charging_rig(rig)
    record_id = rig.connector.session.record_id  # type: ignore[union-attr]
    await asyncio.sleep(0.2)
    await rig.connector.shutdown("shutdown", suspend=True)
    await asyncio.wait_for(task, 5)
    assert rig.listener.records == [] and len(rig.listener.suspended) == 1
    assert not rig.contactor.closed and not rig.modules.on
    checkpoint = rig.listener.suspended[0]
    assert checkpoint["record_id"] == record_id and checkpoint["meter_now"] > checkpoint["meter_start"]

    # the agent restarts: a new connector on the same hardware, the vehicle still plugged in
    again = Rig()
    again.contactor, again.modules, again.meter, again.vehicle = rig.contactor, rig.modules, rig.meter, rig.vehicle
    again.connector.hw.contactor, again.connector.hw.modules = rig.contactor, rig.modules  # type: ignore[assignment]
    again.connector.hw.meter, again.connector.hw.vehicle = rig.meter, rig.vehicle  # type: ignore[assignment]
    again.connector.resume(checkpoint, wait_s=3.0)
    async with again:
        await again.until(lambda: again.connector.state is ConnectorState.CHARGING)
        assert again.connector.session is not None and again.connector.session.record_id == record_id
        again.connector.request_stop("remote_stop")
        await again.until(lambda: again.listener.records != [])
    record = again.listener.records[0]
    assert record["record_id"] == record_id and record["meter_start"] == round(checkpoint["meter_start"], 3)
    assert record["energy"] == pytest.approx(record["meter_end"] - record["meter_start"], abs=1e-9)
    assert ("c1", "completed") in {(c, s) for c, s, _m, _d in again.listener.statuses}


async def test_resume_without_the_vehicle_closes_the_checkpoint_once() -> None:
    async with Rig() as rig:
        checkpoint = {"record_id": "r-1", "connector_id": 1, "mode": "charge", "start_time": "2025-01-01T00:00:00Z",
                      "meter_start": 10.0, "meter_now": 12.0, "max_power_kw": 20.0, "command_id": "c9"}
        rig.connector.resume(checkpoint, wait_s=0.3)
        await rig.until(lambda: rig.listener.closed != [])
        await asyncio.sleep(0.3)
        assert rig.listener.closed == [(checkpoint, "ev_disconnected")]
        assert rig.connector.session is None and rig.contactor.cycles == 0


async def test_shutdown_during_preparation_never_starts_the_session() -> None:
    rig = Rig(kind="ac", ev_ready_timeout_s=5.0)
    rig.vehicle.wants_energy = False  # the EV keeps the connector waiting in preparation
    task = asyncio.create_task(rig.connector.run())
    rig.vehicle.plug()
    await rig.until(lambda: rig.connector.state is ConnectorState.VEHICLE_CONNECTED)
    rig.connector.request_start(SessionRequest(command_id="c1"))
    await rig.until(lambda: rig.connector.state is ConnectorState.PREPARING)
    await rig.connector.shutdown("shutdown")
    rig.vehicle.wants_energy = True
    await asyncio.wait_for(task, 5)
    assert rig.connector.session is None and not rig.contactor.closed and rig.contactor.cycles == 0
    assert ("c1", "failed") in {(c, s) for c, s, _m, _d in rig.listener.statuses}
