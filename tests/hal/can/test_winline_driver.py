"""WinlineModules against the protocol-level simulator over a python-can virtual bus.

The protocol-independent behaviour is covered in depth by test_infypower_driver.py;
here the Winline frames, discovery, verification through status bit 22, and the
main behaviours once more through this protocol.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import can
import pytest
import structlog
from can_helpers import Recorder, Rig, WaitUntil, modules_at
from pydantic import ValidationError

from hal.can import winline_codec as wl
from hal.can.winline import WinlineModules
from hal.interfaces import HealthState, ModuleRatings, PowerModules
from hal.sim.world import SimModule

MakeRig = Callable[..., Awaitable[Rig]]
OFF = bytes.fromhex("0300003000010000")
ON = bytes.fromhex("0300003000000000")


@pytest.fixture
async def make_rig(channel: str, tmp_path: object) -> AsyncIterator[MakeRig]:
    rigs: list[Rig] = []

    async def _make(modules: list[SimModule] | None = None) -> Rig:
        rig = Rig(channel, "winline",
                  modules if modules is not None else modules_at(3, 4, 5, group=1),
                  tmp_path)  # type: ignore[arg-type]
        await rig.sim.start()
        rigs.append(rig)
        return rig

    yield _make
    for rig in rigs:
        await rig.close()


def from_controller(recorder: Recorder) -> list[can.Message]:
    return [m for m in recorder.frames() if wl.parse_id(m.arbitration_id).source == 0xF0]


async def test_start_commands_every_module_off_first(
    make_rig: MakeRig, recorder: Recorder, wait_until: WaitUntil
) -> None:
    rig = await make_rig()
    for m in rig.modules.values():
        m.on = True
    drv = rig.driver(WinlineModules, group=1, addresses=[3, 4, 5])
    assert isinstance(drv, PowerModules)
    await drv.start()
    first = from_controller(recorder)[:3]
    assert [(wl.parse_id(m.arbitration_id).destination, bytes(m.data)) for m in first] == [
        (3, OFF), (4, OFF), (5, OFF)
    ]
    # point-to-point identifiers carry 0 in the group bits (EVerest's form), by default
    assert first[0].arbitration_id == wl.build_id(destination=3, source=0xF0, group=0)
    await wait_until(lambda: not any(m.on for m in rig.modules.values()))


async def test_discovery_reads_group_info_from_the_group_broadcast(
    make_rig: MakeRig, recorder: Recorder
) -> None:
    rig = await make_rig([*modules_at(3, 5, group=1), SimModule(address=4, group=2)])
    drv = rig.driver(WinlineModules, group=1)
    await drv.start()
    frames = from_controller(recorder)
    assert (frames[0].arbitration_id, bytes(frames[0].data)) == (0x0607F781, OFF)  # group OFF
    assert (frames[1].arbitration_id, bytes(frames[1].data)) == (
        0x0607F781, bytes.fromhex("1000004300000000"))
    assert [m.address for m in drv.modules()] == [3, 5]


async def test_reads_values_status_and_ratings(make_rig: MakeRig, wait_until: WaitUntil) -> None:
    rig = await make_rig()
    for m in rig.modules.values():
        m.output_voltage, m.output_current, m.temperature = 450.5, 12.25, 33.5
    drv = rig.driver(WinlineModules, group=1, max_voltage=950.0, min_voltage=200.0)
    await drv.start()
    await wait_until(lambda: drv.measured_current() == pytest.approx(36.75)
                     and all(s.temperature is not None for s in drv.modules())
                     and drv.capability() == ModuleRatings(950.0, 200.0, 120.0, 60_000.0))
    assert drv.measured_voltage() == pytest.approx(450.5)
    status = drv.modules()[0]
    assert (status.temperature, status.output_on, status.flags) == (33.5, False, {"output_off"})
    assert status.ratings == ModuleRatings(950.0, 200.0, 40.0, 20_000.0)
    assert drv.capability() == ModuleRatings(950.0, 200.0, 120.0, 60_000.0)
    assert drv.describe()["voltage_range"] == [200.0, 950.0]


async def test_setpoints_and_on_off_per_module(
    make_rig: MakeRig, wait_until: WaitUntil, recorder: Recorder
) -> None:
    rig = await make_rig()
    drv = rig.driver(WinlineModules, group=1)
    await drv.start()
    await drv.set_output(500.0, 90.0)
    await drv.output_on()
    mods = rig.modules.values()
    await wait_until(lambda: all(m.on and m.current_limit == 30.0 and m.voltage_setpoint == 500.0
                                 for m in mods))
    await wait_until(lambda: all(s.output_on for s in drv.modules()), what="bit 22 clear")
    payloads = {bytes(m.data) for m in from_controller(recorder)}
    assert bytes.fromhex("0300002143FA0000") in payloads  # 500.0 V
    assert bytes.fromhex("0300001B00007800") in payloads  # 30 A x 1024
    assert ON in payloads
    await drv.output_off()
    await wait_until(lambda: not any(m.on for m in mods))
    await wait_until(lambda: all(s.output_on is False for s in drv.modules()))


async def test_output_state_is_verified_through_status_bit_22(
    make_rig: MakeRig, wait_until: WaitUntil
) -> None:
    rig = await make_rig()
    drv = rig.driver(WinlineModules, group=1)
    with structlog.testing.capture_logs() as logs:
        await drv.start()
        await drv.set_output(400.0, 30.0)
        await drv.output_on()
        await wait_until(lambda: all(m.on for m in rig.modules.values()))
        await asyncio.sleep(0.3)
        rig.modules[4].on = False
        await wait_until(lambda: rig.modules[4].on, what="ON re-sent")
    assert [e["module"] for e in logs if e["event"] == "power_module_output_mismatch"] == [4]


async def test_lost_module_current_moves_to_the_others_and_back(
    make_rig: MakeRig, wait_until: WaitUntil
) -> None:
    rig = await make_rig()
    m3, m4, m5 = rig.modules.values()
    drv = rig.driver(WinlineModules, group=1)
    await drv.start()
    await drv.set_output(500.0, 60.0)
    await drv.output_on()
    await wait_until(lambda: all(m.current_limit == 20.0 for m in (m3, m4, m5)))
    m5.silent = True
    await wait_until(lambda: m3.current_limit == 30.0 and m4.current_limit == 30.0)
    assert not m5.on
    health = drv.health()
    assert (health.state, health.code) == (HealthState.DEGRADED, "comm_timeout")
    assert drv.modules()[2].voltage is None
    m5.silent = False
    await wait_until(lambda: m5.on and all(m.current_limit == 20.0 for m in (m3, m4, m5)))
    await wait_until(lambda: drv.health().ok)


async def test_garbage_frames_are_counted_and_never_applied(
    make_rig: MakeRig, wait_until: WaitUntil
) -> None:
    rig = await make_rig()
    drv = rig.driver(WinlineModules, group=1, comm_timeout_s=1.0)
    await drv.start()
    await wait_until(lambda: drv.modules()[1].voltage == 400.0)
    m4 = rig.modules[4]
    m4.garbage = True
    m4.output_voltage = 321.0
    await wait_until(lambda: drv.health().code == "garbage_frames")
    await wait_until(lambda: drv.describe()["garbage_frames"] >= 8)  # every corruption kind
    assert drv.modules()[1].voltage == 400.0  # the last valid value, never 321
    m4.garbage = False
    await wait_until(lambda: drv.modules()[1].voltage == 321.0)
    assert drv.describe()["garbage_frames"] == rig.sim.garbage_sent


def test_options_validation() -> None:
    Options = WinlineModules.Options
    assert Options(bus="main").group == 0
    for bad in (
        {"group": 8},
        {"addresses": [0x40]},
        {"min_voltage": 800.0, "max_voltage": 700.0},
        {"comm_timeout_s": 5.0},
    ):
        with pytest.raises(ValidationError):
            Options(bus="main", **bad)  # type: ignore[arg-type]
