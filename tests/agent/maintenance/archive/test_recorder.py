"""The connector recorder and the session / record summaries."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from agent.charging.session import Session, SessionRequest
from agent.maintenance.archive import SessionArchive, SessionRecorder, summary_from_record
from hal.interfaces import TemperatureReading
from tests.agent.fakes import FakeMeter, FakeVehicle
from tests.agent.maintenance.archive.helpers import T0


def make_connector(cid: int, *, sensor: str | None = None, temps: dict[str, float | None] | None = None) -> Any:
    thermal = None
    if temps is not None:
        thermal = SimpleNamespace(
            temperatures=lambda: {k: TemperatureReading(k, v) for k, v in temps.items()}
        )
    meter = FakeMeter(energy=1000.0, power_kw=22.0)
    hw = SimpleNamespace(meter=meter, vehicle=FakeVehicle(soc=40), thermal=thermal)
    return SimpleNamespace(id=cid, session=None, hw=hw, config=SimpleNamespace(outlet_sensor=sensor))


def start(connector: Any, *, mode: str = "charge", record_id: str = "rec") -> Session:
    session = Session(
        connector_id=connector.id,
        request=SessionRequest(mode=mode),  # type: ignore[arg-type]
        start_time=datetime.fromtimestamp(T0, UTC),
        started_mono=0.0,
        meter_start=1000.0,
        soc_start=40,
        record_id=record_id,
    )
    connector.session = session
    return session


async def test_recorder_samples_running_sessions_and_closes_ended_ones(archive: SessionArchive) -> None:
    now = [T0]
    c1 = make_connector(1, sensor="dc_outlet", temps={"dc_outlet": 55.5})
    c2 = make_connector(2)  # no thermal: the meter has no temperature either
    recorder = SessionRecorder(archive, [c1, c2], clock=lambda: now[0])
    session = start(c1)
    for step in range(3):
        c1.hw.meter.energy = 1000.0 + 0.5 * step
        session.observe(c1.hw.meter.energy, 22.0, 40 + step)
        c1.hw.vehicle.soc = 40 + step
        await recorder.poll()
        now[0] += 1.0
    session.stop_reason = "soc_target_reached"
    c1.session = None
    await recorder.poll()

    info = await archive.get_session("rec")
    assert info is not None and not info.is_open and info.connector_id == 1 and info.mode == "charge"
    assert info.summary["stop_reason"] == "soc_target_reached" and info.summary["energy_kwh"] == 1.0
    assert info.summary["soc_start"] == 40 and info.summary["soc_end"] == 42 and info.end_time == T0 + 3
    rows = await archive.samples("rec")
    assert [r.energy_kwh for r in rows] == pytest.approx([0.0, 0.5, 1.0])
    assert [r.soc for r in rows] == [40, 41, 42] and rows[0].temperature == pytest.approx(55.5)
    assert rows[0].voltage == pytest.approx(400.0) and rows[0].power_kw is not None
    assert [s.record_id for s in await archive.list_sessions()] == ["rec"]  # connector 2 idle


async def test_recorder_keeps_a_suspended_session_open(archive: SessionArchive) -> None:
    c = make_connector(1)
    recorder = SessionRecorder(archive, [c], clock=lambda: T0)
    start(c)
    await recorder.poll()
    c.session = None  # suspended for a shutdown: no stop reason
    await recorder.poll()
    info = await archive.get_session("rec")
    assert info is not None and info.is_open


async def test_recorder_archives_discharge_energy_from_the_export_register(archive: SessionArchive) -> None:
    c = make_connector(1, sensor="missing", temps={})
    c.hw.meter.export = 1000.75  # Session.meter_start is the export register when discharging
    recorder = SessionRecorder(archive, [c], clock=lambda: T0)
    start(c, mode="discharge")
    await recorder.poll()
    rows = await archive.samples("rec")
    assert rows[0].energy_kwh == pytest.approx(0.75) and rows[0].temperature is None
    assert (await archive.get_session("rec")).mode == "discharge"  # type: ignore[union-attr]


async def test_recorder_survives_a_failing_device(archive: SessionArchive) -> None:
    c = make_connector(1)

    def boom() -> Any:
        raise RuntimeError("driver bug")

    c.hw.meter.reading = boom
    recorder = SessionRecorder(archive, [c], clock=lambda: T0)
    start(c)
    await recorder.poll()
    info = await archive.get_session("rec")
    assert info is not None and info.samples_1s == 0


async def test_recorder_run_compacts_polls_and_stops(archive: SessionArchive) -> None:
    c = make_connector(1)
    start(c)
    stop = asyncio.Event()
    recorder = SessionRecorder(archive, [c])
    task = asyncio.create_task(recorder.run(stop))
    await asyncio.sleep(0.1)
    c.session.stop_reason = "remote_stop"
    c.session = None
    stop.set()
    await asyncio.wait_for(task, 5.0)
    info = await archive.get_session("rec")
    assert info is not None and info.samples_1s >= 1 and info.summary["stop_reason"] == "remote_stop"


def test_summary_from_record_reads_a_charging_record() -> None:
    record = {
        "record_id": "r", "connector_id": 1, "start_time": "2024-05-01T10:00:00Z",
        "end_time": "2024-05-01T11:30:00Z", "energy": 42.5, "max_power": 60.0, "avg_power": 28.3,
        "vehicle_info": {"soc_start": 20, "soc_end": 80},
    }
    summary = summary_from_record(record, "power_loss")
    assert summary == {
        "energy_kwh": 42.5, "max_power_kw": 60.0, "avg_power_kw": 28.3, "soc_start": 20,
        "soc_end": 80, "stop_reason": "power_loss", "duration_s": 5400.0,
    }
