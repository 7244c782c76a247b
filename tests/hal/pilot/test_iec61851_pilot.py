"""Iec61851Vehicle against PilotSimulator's IIO / sysfs-PWM / HLC files."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from hal import registry
from hal.context import BuildContext
from hal.interfaces import HealthState, PilotState, Vehicle
from hal.pilot.iec61851 import Iec61851Vehicle, classify, duty_to_ns
from hal.sim.pilot_files import PilotSimulator
from hal.sim.world import SimConnector, SimVehicle


async def wait_until(predicate: Callable[[], bool], timeout: float = 1.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.connector = SimConnector(
            connector_id=1, vehicle=SimVehicle(plugged=False, soc=55.4, vin="WVWZZZ1JZXW000001")
        )
        self.sim = PilotSimulator(
            tmp_path / "sys", self.connector, interval_s=0.004, hlc_interval_s=0.05
        )
        self.drivers: list[Iec61851Vehicle] = []

    def vehicle(self, **overrides: Any) -> Iec61851Vehicle:
        raw: dict[str, Any] = {
            "poll_interval_s": 0.01,
            "idle_poll_interval_s": 0.05,  # detection logic here, not the idle cadence
            "hlc_stale_after_s": 0.3,
        }
        raw.update(overrides)
        options = Iec61851Vehicle.Options(**self.sim.layout.driver_options(**raw))
        ctx = BuildContext(can={}, modbus={}, state_dir=self.tmp_path, connector_id=1)
        v = Iec61851Vehicle("cp1", options, ctx)
        self.drivers.append(v)
        return v

    def pwm(self, name: str) -> str:
        return (self.sim.layout.pwm_dir / name).read_text().strip()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = Rig(tmp_path)
    await r.sim.start()
    yield r
    for v in r.drivers:
        await v.stop()
    await r.sim.stop()


@pytest.mark.parametrize("state", ["A", "B", "C", "D", "E", "F"])
async def test_each_state_through_the_adc_scaling(rig: Rig, state: str) -> None:
    rig.sim.force_state = state
    v = rig.vehicle()
    await v.start()
    await wait_until(lambda: v.status().pilot == PilotState(state))
    nominal = {"A": 12.0, "B": 9.0, "C": 6.0, "D": 3.0, "E": 0.0, "F": -12.0}[state]
    raw = int(rig.sim.layout.adc_raw.read_text())
    scale = float(rig.sim.layout.adc_scale.read_text())
    assert raw == round(
        (nominal + 13.2) / 8.0 * 1000.0 / scale
    )  # what a 12-bit, 3.3 V ADC would read
    assert v.describe()["cp_volts"] == pytest.approx(nominal, abs=0.01)
    st = v.status()
    assert st.plugged is (state in "BCD") and st.ev_ready is (state in "CD")
    assert st.health.state is not HealthState.FAULT


async def test_natural_session_and_unplug(rig: Rig) -> None:
    v = rig.vehicle()
    assert isinstance(v, Vehicle)
    await v.start()
    await wait_until(lambda: v.status().pilot is PilotState.A)
    assert not v.status().plugged and v.status().soc is None

    rig.connector.vehicle.plugged = True
    await wait_until(lambda: v.status().pilot is PilotState.B)
    await v.set_pwm_duty(5.0)  # digital communication: the EV closes S2
    await wait_until(lambda: v.status().pilot is PilotState.C)
    st = v.status()
    assert (
        st.ev_ready
        and st.pwm_duty_percent == 5.0
        and rig.connector.pwm_duty_percent == pytest.approx(5.0)
    )
    await wait_until(lambda: v.status().soc is not None)

    rig.connector.vehicle.plugged = False  # unplug mid-session
    await wait_until(lambda: v.status().pilot is PilotState.A)
    st = v.status()
    assert not st.plugged and not st.ev_ready
    assert st.soc is None and st.vin is None and st.target_current is None


async def test_debounce_needs_equal_samples(rig: Rig) -> None:
    await rig.sim.stop()  # step the files by hand
    v = rig.vehicle(poll_interval_s=1.0, debounce_samples=3)

    def present(state: str) -> None:
        rig.sim.force_state = state
        rig.sim.step(0.0)

    present("B")
    await v.start()  # sample 1
    assert v.status().pilot is PilotState.UNKNOWN
    assert v.health().state is HealthState.STALE and v.health().code is None
    await v.sample_now()
    assert v.status().pilot is PilotState.UNKNOWN
    await v.sample_now()
    assert v.status().pilot is PilotState.B and v.health().ok

    present("C")
    await v.sample_now()
    await v.sample_now()
    assert v.status().pilot is PilotState.B
    present("B")  # two-sample glitch does not publish
    await v.sample_now()
    assert v.status().pilot is PilotState.B
    present("C")
    for _ in range(3):
        await v.sample_now()
    assert v.status().pilot is PilotState.C


async def test_out_of_window_is_unknown_with_pilot_error(rig: Rig) -> None:
    rig.connector.vehicle.plugged = True
    v = rig.vehicle()
    await v.start()
    await wait_until(lambda: v.status().pilot is PilotState.B)
    rig.sim.force_volts = 7.5  # between B and C
    await wait_until(lambda: v.status().pilot is PilotState.UNKNOWN)
    st = v.status()
    assert not st.plugged and not st.ev_ready
    assert st.health.state is HealthState.FAULT and st.health.code == "pilot_error"
    assert "7.5" in (st.health.detail or "")
    rig.sim.force_volts = None
    await wait_until(lambda: v.status().pilot is PilotState.B)


def test_window_edges() -> None:
    assert classify(11.0, 1.0) is PilotState.A
    assert classify(10.9, 1.0) is PilotState.UNKNOWN
    assert classify(10.0, 1.0) is PilotState.B
    assert classify(-11.0, 1.0) is PilotState.F
    assert classify(1.2, 1.0) is PilotState.UNKNOWN
    assert classify(1.2, 1.4) is PilotState.E


async def test_stale_adc_gives_unknown_and_recovers(rig: Rig) -> None:
    v = rig.vehicle(stale_after_s=0.1)
    await v.start()
    await wait_until(lambda: v.status().pilot is PilotState.A)
    await rig.sim.stop()
    rig.sim.layout.adc_raw.unlink()
    await wait_until(lambda: v.health().state is HealthState.STALE)
    st = v.status()
    assert st.pilot is PilotState.UNKNOWN and st.health.code == "comm_timeout"
    await rig.sim.start()
    await wait_until(lambda: v.status().pilot is PilotState.A)


async def test_pwm_files_written_in_ns(rig: Rig) -> None:
    v = rig.vehicle()
    await v.start()
    assert (rig.pwm("period"), rig.pwm("duty_cycle"), rig.pwm("enable")) == (
        "1000000",
        "1000000",
        "1",
    )
    assert v.status().pwm_duty_percent == 100.0
    await v.set_pwm_duty(5.0)
    assert rig.pwm("duty_cycle") == "50000"
    await v.set_pwm_duty(53.3)  # 32 A offer
    assert rig.pwm("duty_cycle") == "533000"
    await wait_until(lambda: rig.connector.pwm_duty_percent == pytest.approx(53.3))
    await v.set_pwm_duty(0.0)
    assert rig.pwm("duty_cycle") == "0" and rig.pwm("enable") == "1"
    await wait_until(lambda: v.status().pilot is PilotState.F)
    for bad in (-1.0, 100.5, float("nan")):
        with pytest.raises(ValueError):
            await v.set_pwm_duty(bad)
    await v.set_pwm_duty(100.0)
    await v.stop()
    assert rig.pwm("duty_cycle") == "0"  # stopped: state F
    assert duty_to_ns(10.0) == 100_000


async def test_period_rewritten_safely_from_another_setting(rig: Rig) -> None:
    (rig.sim.layout.pwm_dir / "period").write_text("20000000\n")  # left at 50 Hz by someone else
    (rig.sim.layout.pwm_dir / "duty_cycle").write_text("15000000\n")
    v = rig.vehicle()
    await v.start()
    assert rig.pwm("period") == "1000000" and rig.pwm("duty_cycle") == "1000000"


async def test_missing_pwm_channel_is_a_transport_fault(rig: Rig, tmp_path: Path) -> None:
    v = rig.vehicle(pwm_dir=str(tmp_path / "pwmchip9" / "pwm0"))
    await v.start()
    h = v.health()
    assert h.state is HealthState.FAULT and h.code == "transport_error"
    assert "pwmchip9" in (h.detail or "") and "does not exist" in (h.detail or "")
    await v.set_pwm_duty(5.0)  # reported, not raised
    assert v.health().code == "transport_error"


async def test_hlc_fields_from_the_document(rig: Rig) -> None:
    ev = rig.connector.vehicle
    ev.plugged, ev.v2g_capable = True, True
    v = rig.vehicle()
    await v.start()
    await wait_until(lambda: v.status().soc is not None)
    st = v.status()
    assert st.soc == 55 and st.vin == "WVWZZZ1JZXW000001"
    assert st.target_voltage == pytest.approx(ev.battery_voltage() + 10.0, abs=0.05)
    assert st.target_current == pytest.approx(ev.current_request())
    assert st.discharge_allowed is True and st.discharge_refusal is None
    assert st.max_discharge_current == ev.max_current
    assert st.health.ok

    ev.refuse_discharge = True
    await wait_until(lambda: v.status().discharge_allowed is False)
    assert v.status().discharge_refusal == "bms_refused"
    ev.refuse_discharge, ev.soc = False, 15.0
    await wait_until(lambda: v.status().discharge_refusal == "soc_below_minimum")
    assert v.status().soc == 15


async def test_hlc_staleness_and_recovery(rig: Rig) -> None:
    rig.connector.vehicle.plugged = True
    v = rig.vehicle()
    await v.start()
    await wait_until(lambda: v.status().soc == 55)
    rig.sim.hlc_enabled = False  # the HLC stack dies
    await wait_until(lambda: v.status().soc is None, timeout=1.5)
    st = v.status()
    assert st.pilot is PilotState.B  # the pilot is still trusted
    assert st.health.state is HealthState.DEGRADED and st.health.code == "comm_timeout"
    assert st.target_voltage is None and st.vin is None
    rig.sim.hlc_enabled = True
    await wait_until(lambda: v.status().soc == 55)
    assert v.health().ok


async def test_invalid_hlc_document_is_ignored(rig: Rig) -> None:
    rig.connector.vehicle.plugged = True
    v = rig.vehicle(hlc_stale_after_s=5.0)
    await v.start()
    await wait_until(lambda: v.status().soc == 55)
    rig.sim.hlc_enabled = False
    rig.sim.layout.hlc_path.write_text('{"soc": 250}')  # out of range: bad input
    await wait_until(lambda: v.describe()["hlc_bad_documents"] >= 1)
    assert v.status().soc == 55
    rig.sim.layout.hlc_path.write_text("{not json")
    await wait_until(lambda: v.describe()["hlc_bad_documents"] >= 2)
    assert v.status().soc == 55


async def test_old_hlc_file_is_stale_at_start(rig: Rig) -> None:
    rig.connector.vehicle.plugged = True
    await rig.sim.stop()
    rig.sim.hlc_enabled = False
    rig.sim.force_state = "B"
    rig.sim.step(0.0)
    path = rig.sim.layout.hlc_path
    path.write_text(json.dumps({"soc": 80}))
    old = time.time() - 60
    os.utime(path, (old, old))
    v = rig.vehicle(poll_interval_s=1.0, debounce_samples=1)
    await v.start()
    assert v.status().pilot is PilotState.B
    assert v.status().soc is None and v.health().code == "comm_timeout"


async def test_hlc_none_leaves_fields_empty(rig: Rig) -> None:
    rig.connector.vehicle.plugged = True
    options = Iec61851Vehicle.Options(
        **rig.sim.layout.driver_options(hlc=False, poll_interval_s=0.01, idle_poll_interval_s=0.05)
    )
    v = Iec61851Vehicle("cp1", options, BuildContext(can={}, modbus={}, state_dir=rig.tmp_path))
    rig.drivers.append(v)
    await v.start()
    await wait_until(lambda: v.status().pilot is PilotState.B)
    st = v.status()
    assert st.soc is None and st.discharge_allowed is None and st.health.ok


def test_options_validation_and_registry(tmp_path: Path) -> None:
    assert registry.lookup("vehicle", "iec61851").cls is Iec61851Vehicle
    base: dict[str, Any] = {
        "adc_raw_path": "/r",
        "adc_scale_path": "/s",
        "divider_ratio": 8.0,
        "pwm_dir": "/p",
    }
    o = Iec61851Vehicle.Options.model_validate(base)
    assert (o.poll_interval_s, o.window_v, o.debounce_samples, o.hlc) == (0.05, 1.0, 3, "none")
    with pytest.raises(ValidationError, match="needs 'hlc_path'"):
        Iec61851Vehicle.Options.model_validate({**base, "hlc": "file"})
    with pytest.raises(ValidationError, match="non-zero"):
        Iec61851Vehicle.Options.model_validate({**base, "divider_ratio": 0.0})
    with pytest.raises(ValidationError):
        Iec61851Vehicle.Options.model_validate({**base, "window_v": 1.6})  # windows would overlap


async def test_sampling_is_fast_only_while_charging_is_offered(rig: Rig) -> None:
    v = rig.vehicle(poll_interval_s=0.05, idle_poll_interval_s=0.2)
    await v.start()
    assert v.sample_period() == 0.05  # no state known yet: settle fast
    await wait_until(lambda: v.status().pilot is PilotState.A, timeout=1.0)
    assert v.sample_period() == 0.2  # 100 %: no PWM, the EV cannot draw current
    await v.set_pwm_duty(53.3)
    assert v.sample_period() == 0.05
    await v.set_pwm_duty(0.0)
    assert v.sample_period() == 0.2


async def test_one_missed_idle_sample_is_not_stale(rig: Rig) -> None:
    v = rig.vehicle(poll_interval_s=0.01, idle_poll_interval_s=0.2, stale_after_s=0.1)
    await v.start()
    await wait_until(lambda: v.status().pilot is PilotState.A, timeout=2.0)
    assert v.stale_limit() == pytest.approx(0.4)  # two idle periods: longer than stale_after_s
    await rig.sim.stop()
    rig.sim.layout.adc_raw.unlink()
    await wait_until(lambda: v.describe()["bad_samples"] == 1, timeout=1.0)
    # one idle sample missed, 0.2 s after the last good one: past stale_after_s, not stale
    assert v.health().state is HealthState.OK
    await wait_until(lambda: v.health().state is HealthState.STALE, timeout=1.0)
    assert "0.4 s" in v.health().detail
    await v.set_pwm_duty(53.3)
    assert v.stale_limit() == pytest.approx(0.1)  # charging offered: stale_after_s as set


async def test_an_unchanged_duty_is_not_rewritten(rig: Rig) -> None:
    v = rig.vehicle()
    await v.start()
    await v.set_pwm_duty(53.3)
    duty_file = rig.sim.layout.pwm_dir / "duty_cycle"
    duty_file.write_text("123\n")  # somebody else's write shows whether we write again
    await v.set_pwm_duty(53.3)
    assert rig.pwm("duty_cycle") == "123"
    await v.set_pwm_duty(5.0)
    assert rig.pwm("duty_cycle") == "50000"


async def test_the_first_state_is_known_within_the_pilot_error_grace(rig: Rig) -> None:
    """Default cadences (50 ms charging, 0.5 s idle, 3 equal samples): the start-up debounce
    runs at the fast period, so the agent's supervisor (0.5 s grace for an unknown pilot)
    never sees a pilot error at start-up. Sampling at the idle period, the state took 1 s."""
    from agent.charging.supervision import PILOT_ERROR_GRACE_S

    v = rig.vehicle(poll_interval_s=0.05, idle_poll_interval_s=0.5)
    started = asyncio.get_running_loop().time()
    await v.start()
    assert v.status().pilot is PilotState.UNKNOWN and v.health().code is None  # settling
    await wait_until(lambda: v.status().pilot is PilotState.A, timeout=2.0)
    assert asyncio.get_running_loop().time() - started < PILOT_ERROR_GRACE_S
    assert v.sample_period() == 0.5  # known, nothing offered: back to the idle period
