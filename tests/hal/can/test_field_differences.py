"""Driver details where the field-proven EVerest drivers and the protocol notes differ:
each resolved on purpose, configurable, defaulting to the field-proven behaviour; the
simulator enforces the same choice strictly."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from can_helpers import Recorder, Rig, WaitUntil, modules_at, unique_channel

from hal.can import infypower_codec as infy
from hal.can import winline_codec as wl
from hal.can.infypower import InfyPowerModules
from hal.can.winline import WinlineModules
from hal.interfaces import HealthState
from hal.sim.can_modules import DIODE_DROP_V
from hal.sim.world import SimModule

MakeRig = Callable[..., Awaitable[Rig]]


def winline_ids(recorder: Recorder) -> list[wl.WinlineId]:
    """Identifiers of the controller's Winline frames."""
    ids = [wl.parse_id(m.arbitration_id) for m in recorder.frames()]
    return [i for i in ids if i.source == 0xF0]


@pytest.fixture
async def make_rig(channel: str, tmp_path: Path) -> AsyncIterator[MakeRig]:
    rigs: list[Rig] = []

    async def _make(protocol: str, modules: list[SimModule], **sim: object) -> Rig:
        rig = Rig(channel if not rigs else unique_channel(), protocol, modules, tmp_path)
        for key, value in sim.items():
            setattr(rig.sim, key, value)
        await rig.sim.start()
        rigs.append(rig)
        return rig

    yield _make
    for rig in rigs:
        await rig.close()


# ---------------------------------------------------------------------------- Winline


async def test_winline_current_limit_is_register_0x0012_times_the_limit_point(
    make_rig: MakeRig, wait_until: WaitUntil
) -> None:
    rig = await make_rig("winline", modules_at(3, 4, group=1))  # 40 A modules, point 3.3325
    drv = rig.driver(WinlineModules, group=1)
    await drv.start()
    await wait_until(lambda: drv.capability() is not None)
    cap = drv.capability()
    assert cap is not None and cap.max_current == pytest.approx(80.0, abs=0.02)
    assert drv.describe()["current_limit_point"] == 3.3325


async def test_winline_limit_point_one_reads_0x0012_as_amps(
    make_rig: MakeRig, wait_until: WaitUntil
) -> None:
    # the protocol notes' reading: 0x0012 is the rated current in A
    rig = await make_rig("winline", modules_at(3, group=1), winline_current_limit_point=1.0)
    drv = rig.driver(WinlineModules, group=1, current_limit_point=1.0)
    await drv.start()
    await wait_until(lambda: drv.capability() is not None)
    assert drv.capability().max_current == pytest.approx(40.0)  # type: ignore[union-attr]


async def test_winline_point_to_point_group_bits_default_zero(
    make_rig: MakeRig, recorder: Recorder, wait_until: WaitUntil
) -> None:
    rig = await make_rig("winline", modules_at(3, group=5))
    drv = rig.driver(WinlineModules, group=5)
    await drv.start()
    await wait_until(lambda: drv.health().ok)
    ptp = [i for i in winline_ids(recorder) if i.ptp]
    assert ptp and all(i.group == 0 for i in ptp)


async def test_winline_group_bits_option_and_a_strict_simulator(
    make_rig: MakeRig, recorder: Recorder, wait_until: WaitUntil
) -> None:
    # modules that expect 0 ignore point-to-point frames carrying the group number
    strict = await make_rig("winline", modules_at(3, group=5))
    wrong = strict.driver(WinlineModules, group=5, addresses=[3], ptp_group_bits="group")
    await wrong.start()
    await wait_until(lambda: len(winline_ids(recorder)) > 10)
    assert not wrong.modules()[0].online
    await wrong.stop()
    # both ends set to "group": the frames carry group 5 and are answered
    rig = await make_rig("winline", modules_at(3, group=5), winline_ptp_group_bits="group")
    drv = rig.driver(WinlineModules, group=5, addresses=[3], ptp_group_bits="group")
    rec = Recorder(rig.config.channel)
    try:
        await drv.start()
        await wait_until(lambda: drv.health().ok)
        ids = winline_ids(rec)
        assert ids and all(i.group == 5 for i in ids if i.ptp)
    finally:
        rec.bus.shutdown()


# ---------------------------------------------------------------------------- InfyPower


async def test_infypower_error_code_in_reply_id_is_the_module_condition(
    make_rig: MakeRig, wait_until: WaitUntil
) -> None:
    rig = await make_rig("infypower", modules_at(0, 1))
    drv = rig.driver(InfyPowerModules, group=1)
    rig.modules[1].reply_error = 7  # "in start processing"
    await drv.start()
    await wait_until(lambda: all(s.online for s in drv.modules()))
    starting = drv.modules()[1]
    assert "start_processing" in starting.flags and starting.health.ok  # a state, not a fault
    assert drv.describe()["modules"][1]["garbage_frames"] == 0
    rig.modules[1].reply_error = 2  # "command invalid"
    await wait_until(lambda: "command_invalid" in drv.modules()[1].flags)
    health = drv.health()
    assert (health.state, health.code) == (HealthState.DEGRADED, "module_alarm")
    assert "command_invalid" in (health.detail or "")
    rig.modules[1].reply_error = 0  # a normal answer clears the condition
    await wait_until(lambda: drv.modules()[1].flags == {"output_off", "walk_in"})
    assert drv.health().ok


async def test_infypower_error_code_as_garbage_when_configured(
    make_rig: MakeRig, wait_until: WaitUntil
) -> None:
    rig = await make_rig("infypower", modules_at(0, 1))
    rig.modules[1].reply_error = 7
    drv = rig.driver(InfyPowerModules, group=1, reply_error_codes="garbage")
    await drv.start()
    await wait_until(lambda: drv.describe()["modules"][1]["garbage_frames"] > 0)
    assert not drv.modules()[1].online
    # module 0 answers cleanly: online (on a loaded machine one poll may miss its 0.5 s window)
    await wait_until(lambda: drv.modules()[0].online)
    assert not drv.modules()[1].online


@pytest.mark.parametrize(("source", "offset"), [("after_diode", 0.0), ("module", DIODE_DROP_V)])
async def test_infypower_output_voltage_after_the_diode_by_default(
    make_rig: MakeRig, recorder: Recorder, wait_until: WaitUntil, source: str, offset: float
) -> None:
    rig = await make_rig("infypower", modules_at(0, voltage=0.0, current=0.0))
    drv = rig.driver(InfyPowerModules, group=1, addresses=[0], output_voltage=source)
    await drv.start()
    await drv.set_output(500.0, 10.0)
    await drv.output_on()
    await wait_until(lambda: rig.modules[0].on)
    rig.modules[0].output_voltage = 500.0  # what the terminals carry (no physics here)
    await wait_until(lambda: drv.measured_voltage() == pytest.approx(500.0 + offset, abs=0.05))
    polled = {infy.parse_id(m.arbitration_id).command for m in recorder.sent_by_controller()}
    assert infy.Cmd.READ_AVAILABLE in polled  # 0x0C is polled either way, as EVerest does
    assert drv.describe()["output_voltage"] == source
