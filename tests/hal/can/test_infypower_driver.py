"""InfyPowerModules against the protocol-level simulator over a python-can virtual bus.

Most of the protocol-independent behaviour (comm loss, redistribution, garbage,
transport errors, verification) is exercised here; test_winline_driver.py covers the
Winline frames and a subset of the behaviour.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import can
import pytest
import structlog
from can_helpers import FlakyBus, Recorder, Rig, WaitUntil, modules_at, unique_channel
from pydantic import ValidationError

from hal.can import infypower_codec as infy
from hal.can.infypower import InfyPowerModules
from hal.can.port import CAN_ERR_BUSOFF, CAN_ERR_RESTARTED
from hal.config import CanBusConfig
from hal.context import BuildContext
from hal.interfaces import HealthState, ModuleRatings, PowerModules
from hal.sim.world import SimModule
from hal.tick import sleep_to_grid

MakeRig = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def make_rig(channel: str, tmp_path: object) -> AsyncIterator[MakeRig]:
    rigs: list[Rig] = []

    async def _make(
        modules: list[SimModule] | None = None,
        *,
        tx_spacing_ms: float = 1.0,
        interface: str = "virtual",
        start_sim: bool = True,
    ) -> Rig:
        rig = Rig(
            channel if not rigs else unique_channel(),
            "infypower",
            modules if modules is not None else modules_at(0, 1, 2),
            tmp_path,  # type: ignore[arg-type]
            tx_spacing_ms=tx_spacing_ms,
            interface=interface,
        )
        if start_sim:
            await rig.sim.start()
        rigs.append(rig)
        return rig

    yield _make
    for rig in rigs:
        await rig.close()


def decoded(frames: list[can.Message]) -> list[tuple[infy.InfyId, bytes]]:
    return [(infy.parse_id(m.arbitration_id), bytes(m.data)) for m in frames]


def is_off(ident: infy.InfyId, data: bytes) -> bool:
    return ident.command == infy.Cmd.SET_ON_OFF and data[0] == 0x01


def is_on(ident: infy.InfyId, data: bytes) -> bool:
    return ident.command == infy.Cmd.SET_ON_OFF and data[0] == 0x00


# ---------------------------------------------------------------------------- start-up


async def test_satisfies_the_power_modules_protocol(make_rig: MakeRig) -> None:
    rig = await make_rig()
    assert isinstance(rig.driver(InfyPowerModules, group=1), PowerModules)


async def test_start_commands_every_module_off_before_anything_else(
    make_rig: MakeRig, recorder: Recorder, wait_until: WaitUntil
) -> None:
    rig = await make_rig()
    for m in rig.modules.values():
        m.on = True  # left on by a previous controller
    drv = rig.driver(InfyPowerModules, group=1, addresses=[0, 1, 2])
    await drv.start()
    frames = decoded(recorder.sent_by_controller())
    assert [(i.destination, is_off(i, d)) for i, d in frames[:3]] == [
        (0, True), (1, True), (2, True)
    ]
    await wait_until(lambda: not any(m.on for m in rig.modules.values()))


async def test_discovery_sends_group_off_first_then_asks_the_module_count(
    make_rig: MakeRig, recorder: Recorder, wait_until: WaitUntil
) -> None:
    rig = await make_rig([*modules_at(0, 1, 2), SimModule(address=7, group=2)])
    rig.world.time = 42.0
    drv = rig.driver(InfyPowerModules, group=1)
    await drv.start()
    frames = recorder.sent_by_controller()
    assert frames[0].arbitration_id == 0x02DA01F0 and frames[0].data[0] == 0x01  # group 1 OFF
    assert frames[1].arbitration_id == 0x02C201F0  # module count of group 1
    first_per_module = {}
    for ident, data in decoded(frames[2:]):
        if ident.device == infy.DEV_MODULE:
            first_per_module.setdefault(ident.destination, (ident, data))
    assert all(is_off(*first) for first in first_per_module.values())
    assert [m.address for m in drv.modules()] == [0, 1, 2]
    await wait_until(lambda: drv.capability() == ModuleRatings(750.0, 150.0, 120.0, 60_000.0))
    assert [rig.modules[a].last_heard for a in (0, 1, 2, 7)] == [42.0, 42.0, 42.0, 0.0]


async def test_start_without_answers_returns_and_discovers_later(
    make_rig: MakeRig, wait_until: WaitUntil
) -> None:
    rig = await make_rig(start_sim=False)
    drv = rig.driver(InfyPowerModules, group=1)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await drv.start()
    assert loop.time() - began < 2.0  # answer_timeout_s 0.3 + sending; never hangs
    assert drv.modules() == []
    assert (drv.health().state, drv.health().code) == (HealthState.STALE, "comm_timeout")
    await rig.sim.start()  # the modules power up late: discovery is repeated every cycle
    await wait_until(lambda: drv.health().ok, what="modules discovered")
    assert [m.address for m in drv.modules()] == [0, 1, 2]


# ---------------------------------------------------------------------------- values


@pytest.mark.parametrize("measurement", ["float", "integer"])
async def test_reads_values_status_and_ratings(
    make_rig: MakeRig, wait_until: WaitUntil, measurement: str
) -> None:
    rig = await make_rig()
    for a, m in rig.modules.items():
        m.output_voltage = 500.0 + a
        m.output_current = 10.0 * (a + 1)
        m.temperature = 30.0 + a
    rig.modules[2].temperature = -3.0
    drv = rig.driver(InfyPowerModules, group=1, measurement=measurement)
    await drv.start()
    await wait_until(lambda: drv.measured_current() == pytest.approx(60.0)
                     and all(s.temperature is not None and s.voltage is not None
                             for s in drv.modules()))
    assert drv.measured_voltage() == pytest.approx(501.0)
    statuses = drv.modules()
    assert [s.temperature for s in statuses] == [30.0, 31.0, -3.0]
    assert all(s.online and s.output_on is False for s in statuses)
    assert all(s.flags == {"output_off", "walk_in"} for s in statuses)
    assert statuses[0].ratings == ModuleRatings(750.0, 150.0, 40.0, 20_000.0)
    assert drv.health().ok


async def test_describe_shows_protocol_bus_group_and_modules(
    make_rig: MakeRig, wait_until: WaitUntil
) -> None:
    rig = await make_rig()
    drv = rig.driver(InfyPowerModules, group=1, current_sharing="group")
    await drv.start()
    await wait_until(lambda: drv.measured_voltage() is not None and drv.capability() is not None)
    info = drv.describe()
    assert (info["protocol"], info["bus"], info["group"]) == ("infypower", "main", 1)
    assert info["current_sharing"] == "group"
    assert [m["address"] for m in info["modules"]] == [0, 1, 2]
    assert info["modules"][0]["voltage"] == 400.0
    assert info["modules"][0]["ratings"]["max_current"] == 40.0
    assert info["port"]["counters"]["tx"] > 0


# ---------------------------------------------------------------------------- setpoints


async def test_setpoints_are_sent_only_while_on_and_split_per_module(
    make_rig: MakeRig, wait_until: WaitUntil, recorder: Recorder
) -> None:
    rig = await make_rig()
    drv = rig.driver(InfyPowerModules, group=1)
    await drv.start()
    await drv.set_output(500.0, 90.0)
    await asyncio.sleep(0.1)
    assert not any(i.command == infy.Cmd.SET_MODULE_OUTPUT
                   for i, _ in decoded(recorder.sent_by_controller()))
    await drv.output_on()
    mods = rig.modules.values()
    await wait_until(lambda: all(m.on and m.current_limit == 30.0 for m in mods))
    assert all(m.voltage_setpoint == 500.0 for m in mods)
    await drv.set_output(500.0, 1000.0)  # more than three 40 A modules can give
    await wait_until(lambda: all(m.current_limit == 40.0 for m in mods))
    await drv.set_output(900.0, 60.0)  # above the modules' 750 V
    await wait_until(lambda: all(m.voltage_setpoint == 750.0 and m.current_limit == 20.0
                                 for m in mods))
    with pytest.raises(ValueError):
        await drv.set_output(float("nan"), 10.0)


async def test_split_respects_each_modules_power_rating(
    make_rig: MakeRig, wait_until: WaitUntil
) -> None:
    rig = await make_rig()
    rig.modules[2].rated_power_w = 10_000.0  # 20 A at 500 V
    drv = rig.driver(InfyPowerModules, group=1)
    await drv.start()
    await drv.set_output(500.0, 150.0)
    await drv.output_on()
    await wait_until(lambda: [m.current_limit for m in rig.modules.values()] == [40.0, 40.0, 20.0])
    await drv.set_output(500.0, 50.0)
    await wait_until(lambda: [m.current_limit for m in rig.modules.values()] == [20.0, 20.0, 10.0])


async def test_group_sharing_sends_the_total_to_the_group(
    make_rig: MakeRig, wait_until: WaitUntil, recorder: Recorder
) -> None:
    rig = await make_rig()
    drv = rig.driver(InfyPowerModules, group=1, current_sharing="group")
    await drv.start()
    await drv.set_output(500.0, 90.0)
    await drv.output_on()
    await wait_until(lambda: all(m.on and m.current_limit == 30.0 for m in rig.modules.values()))
    frames = recorder.sent_by_controller()
    group_sets = [m for m in frames if m.arbitration_id == 0x02DB01F0]
    assert group_sets and infy.decode_setpoint(group_sets[0].data) == (500.0, 90.0)
    assert not any(i.command == infy.Cmd.SET_MODULE_OUTPUT for i, _ in decoded(frames))


async def test_output_off_overtakes_queued_on_frames(
    make_rig: MakeRig, recorder: Recorder
) -> None:
    rig = await make_rig(tx_spacing_ms=20.0)
    drv = rig.driver(InfyPowerModules, group=1, addresses=[0, 1, 2])
    await drv.start()
    await drv.set_output(500.0, 60.0)
    recorder.clear()
    await drv.output_on()  # queues 3 setpoints + 3 ON, 20 ms apart
    await drv.output_off()  # must not be followed by a queued ON
    sent_at_return = decoded(recorder.sent_by_controller())
    assert sum(is_off(i, d) for i, d in sent_at_return) == 3  # handed to the bus already
    await asyncio.sleep(0.3)
    frames = decoded(recorder.sent_by_controller())
    first_off = next(n for n, (i, d) in enumerate(frames) if is_off(i, d))
    assert not any(is_on(i, d) for i, d in frames[first_off:])
    assert not any(m.on for m in rig.modules.values())


async def test_output_on_requires_start_and_setpoint(make_rig: MakeRig) -> None:
    rig = await make_rig()
    drv = rig.driver(InfyPowerModules, group=1)
    with pytest.raises(RuntimeError, match="not started"):
        await drv.output_on()
    await drv.start()
    with pytest.raises(RuntimeError, match="set_output"):
        await drv.output_on()


# ---------------------------------------------------------------------------- keep-alive


async def test_keep_alive_reaches_every_module_well_inside_its_watchdog(
    make_rig: MakeRig, recorder: Recorder
) -> None:
    rig = await make_rig()
    drv = rig.driver(InfyPowerModules, group=1, poll_interval_s=0.2)
    await drv.start()
    recorder.clear()
    await asyncio.sleep(1.3)
    by_module: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for msg in recorder.sent_by_controller():
        ident = infy.parse_id(msg.arbitration_id)
        if ident.device == infy.DEV_MODULE and ident.destination in by_module:
            by_module[ident.destination].append(msg.timestamp)
    for stamps in by_module.values():
        assert len(stamps) >= 5
        assert max(b - a for a, b in itertools.pairwise(stamps)) < 0.6  # 0.2 s poll, 10 s watchdog


def polls_to(recorder: Recorder, address: int) -> list[float]:
    """Send times of the read requests the controller sent to one module."""
    stamps = []
    for msg in recorder.sent_by_controller():
        ident = infy.parse_id(msg.arbitration_id)
        if ident.device == infy.DEV_MODULE and ident.destination == address and ident.command in infy.READ_COMMANDS:
            stamps.append(msg.timestamp)
    return stamps


async def test_an_idle_charger_polls_settled_modules_slowly_and_at_once_when_busy(
    make_rig: MakeRig, recorder: Recorder
) -> None:
    rig = await make_rig()
    drv = rig.driver(InfyPowerModules, group=1, poll_interval_s=0.05, idle_poll_interval_s=1.0,
                     comm_timeout_s=3.0)
    rig.ctx.pace.report(1, False)  # connector 1 idle: the charger is idle
    await drv.start()
    await asyncio.sleep(0.6)  # past verify_grace_s after start's OFF: settled
    recorder.clear()
    await asyncio.sleep(2.05)
    idle_polls = len({round(s, 2) for s in polls_to(recorder, 0)})
    assert 1 <= idle_polls <= 3  # every 1 s, not every 0.05 s (about 40)
    assert drv.modules()[0].online and drv.measured_voltage() is not None
    recorder.clear()
    busy_at = time.time()
    rig.ctx.pace.report(1, True)
    await asyncio.sleep(0.3)
    stamps = polls_to(recorder, 0)
    assert stamps and stamps[0] - busy_at < 0.1  # the first fast poll goes out at once
    assert len({round(s, 2) for s in stamps}) >= 4
    # output on ends an idle sleep and keeps the normal period whatever the pace says
    rig.ctx.pace.report(1, False)
    await sleep_to_grid(1.0)  # an idle poll slot: the loop now sleeps until the next one
    await asyncio.sleep(0.1)
    recorder.clear()
    on_at = time.time()
    await drv.set_output(400.0, 10.0)
    await drv.output_on()
    await asyncio.sleep(0.5)
    stamps = polls_to(recorder, 0)
    assert stamps and stamps[0] - on_at < 0.15  # not at the next idle slot, 0.9 s away
    assert len({round(s, 2) for s in stamps}) >= 6


async def test_frames_are_spaced_on_the_wire(make_rig: MakeRig, recorder: Recorder) -> None:
    rig = await make_rig(tx_spacing_ms=10.0)
    drv = rig.driver(InfyPowerModules, group=1, addresses=[0, 1, 2])
    await drv.start()
    await drv.set_output(400.0, 30.0)
    await drv.output_on()
    await asyncio.sleep(0.3)
    stamps = [m.timestamp for m in recorder.sent_by_controller()]
    assert len(stamps) > 10
    assert min(b - a for a, b in itertools.pairwise(stamps)) >= 0.009


# ---------------------------------------------------------------------------- comm loss


async def test_silent_module_is_lost_after_timeout_and_recovers(
    make_rig: MakeRig, wait_until: WaitUntil
) -> None:
    rig = await make_rig()
    drv = rig.driver(InfyPowerModules, group=1, comm_timeout_s=0.5)
    with structlog.testing.capture_logs() as logs:
        await drv.start()
        await wait_until(lambda: drv.measured_current() == pytest.approx(30.0))
        loop = asyncio.get_running_loop()
        rig.modules[1].silent = True
        silenced = loop.time()
        await wait_until(lambda: not drv.modules()[1].online, what="module 1 lost")
        assert loop.time() - silenced >= 0.25  # not before comm_timeout (0.5 s, minus slack)
        lost = drv.modules()[1]
        assert (lost.voltage, lost.current, lost.temperature) == (None, None, None)
        assert lost.health.state is HealthState.STALE
        health = drv.health()
        assert (health.state, health.code) == (HealthState.DEGRADED, "comm_timeout")
        assert "1" in (health.detail or "")
        assert drv.capability() is not None and drv.capability().max_current == 80.0  # type: ignore[union-attr]
        assert drv.measured_current() == pytest.approx(20.0)
        await asyncio.sleep(0.3)  # stays lost: no second log line
        rig.modules[1].silent = False
        await wait_until(lambda: drv.health().ok, what="module 1 back")
        assert drv.capability().max_current == 120.0  # type: ignore[union-attr]
    events = [(e["event"], e.get("module")) for e in logs]
    assert events.count(("power_module_lost", 1)) == 1
    assert events.count(("power_module_recovered", 1)) == 1


async def test_all_modules_silent_is_stale_with_values_withheld(
    make_rig: MakeRig, wait_until: WaitUntil
) -> None:
    rig = await make_rig()
    drv = rig.driver(InfyPowerModules, group=1)
    await drv.start()
    await wait_until(lambda: drv.measured_voltage() is not None)
    for m in rig.modules.values():
        m.silent = True
    await wait_until(lambda: drv.health().state is HealthState.STALE)
    assert drv.health().code == "comm_timeout"
    assert (drv.measured_voltage(), drv.measured_current(), drv.capability()) == (None, None, None)
    assert not any(s.online for s in drv.modules())


async def test_current_is_redistributed_when_a_module_drops_out(
    make_rig: MakeRig, wait_until: WaitUntil
) -> None:
    rig = await make_rig()
    m0, m1, m2 = rig.modules.values()
    drv = rig.driver(InfyPowerModules, group=1)
    await drv.start()
    await drv.set_output(500.0, 60.0)
    await drv.output_on()
    await wait_until(lambda: all(m.on and m.current_limit == 20.0 for m in (m0, m1, m2)))
    m2.silent = True  # still hears us, cannot answer
    await wait_until(lambda: m0.current_limit == 30.0 and m1.current_limit == 30.0)
    assert not m2.on  # a lost module is commanded off while the others take its share
    m2.silent = False
    await wait_until(lambda: m2.on and all(m.current_limit == 20.0 for m in (m0, m1, m2)))


async def test_garbage_frames_are_counted_and_never_applied(
    make_rig: MakeRig, wait_until: WaitUntil
) -> None:
    rig = await make_rig()
    drv = rig.driver(InfyPowerModules, group=1, comm_timeout_s=1.0)
    await drv.start()
    await wait_until(lambda: drv.modules()[1].voltage == 400.0)
    m1 = rig.modules[1]
    m1.garbage = True
    m1.output_voltage, m1.output_current = 123.0, 99.0
    seen: list[float | None] = []

    async def sample() -> None:
        while True:
            seen.append(drv.modules()[1].voltage)
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    try:
        await wait_until(lambda: drv.health().code == "garbage_frames")
        await wait_until(lambda: drv.describe()["garbage_frames"] >= 9)
    finally:
        sampler.cancel()
    assert 123.0 not in seen and seen
    assert drv.modules()[1].health.code == "garbage_frames"
    m1.garbage = False
    await wait_until(lambda: drv.modules()[1].voltage == 123.0)
    assert drv.describe()["garbage_frames"] == rig.sim.garbage_sent  # every one detected
    await wait_until(lambda: drv.health().ok, timeout=5.0)  # garbage ages out


async def test_module_alarm_flags_make_the_group_fault(make_rig: MakeRig,
                                                       wait_until: WaitUntil) -> None:
    rig = await make_rig()
    drv = rig.driver(InfyPowerModules, group=1)
    await drv.start()
    await wait_until(lambda: drv.health().ok)

    def status_answer(flags: set[str]) -> can.Message:
        return can.Message(
            arbitration_id=infy.response_id(infy.Cmd.READ_STATUS, 2, 0xF0),
            data=infy.encode_status(1, 40, flags),
            is_extended_id=True,
        )

    drv.on_frame(status_answer({"fault", "over_temperature"}))
    health = drv.health()
    assert (health.state, health.code) == (HealthState.FAULT, "module_alarm")
    assert health.detail == "module 2: fault, over_temperature"
    drv.on_frame(status_answer({"fan_fault"}))
    assert (drv.health().state, drv.health().code) == (HealthState.DEGRADED, "module_alarm")
    drv.on_frame(status_answer(set()))
    assert drv.health().ok


# ---------------------------------------------------------------------------- verification


async def test_module_that_drops_its_output_is_switched_on_again(
    make_rig: MakeRig, wait_until: WaitUntil
) -> None:
    rig = await make_rig()
    drv = rig.driver(InfyPowerModules, group=1)
    with structlog.testing.capture_logs() as logs:
        await drv.start()
        await drv.set_output(500.0, 30.0)
        await drv.output_on()
        await wait_until(lambda: all(m.on for m in rig.modules.values()))
        await asyncio.sleep(0.3)  # past verify_grace_s
        rig.modules[0].on = False  # e.g. an internal trip the module recovered from
        await wait_until(lambda: rig.modules[0].on, what="ON re-sent")
        await drv.output_off()
        await asyncio.sleep(0.3)
        rig.modules[2].on = True  # ignores OFF
        await wait_until(lambda: not rig.modules[2].on, what="OFF re-sent")
    mismatches = [e for e in logs if e["event"] == "power_module_output_mismatch"]
    assert {e["module"] for e in mismatches} == {0, 2}


async def test_reset_module_power_cycles_one_module(make_rig: MakeRig,
                                                    wait_until: WaitUntil) -> None:
    rig = await make_rig()
    m0, m1, m2 = rig.modules.values()
    drv = rig.driver(InfyPowerModules, group=1, reset_off_s=0.3)
    await drv.start()
    await drv.set_output(500.0, 90.0)
    await drv.output_on()
    await wait_until(lambda: all(m.on and m.current_limit == 30.0 for m in (m0, m1, m2)))
    reset = asyncio.create_task(drv.reset_module(1))
    await wait_until(lambda: not m1.on and m0.current_limit == 40.0 and m2.current_limit == 40.0)
    await reset
    await wait_until(lambda: m1.on and all(m.current_limit == 30.0 for m in (m0, m1, m2)))
    with pytest.raises(ValueError):
        await drv.reset_module(9)


# ---------------------------------------------------------------------------- transport


async def test_send_failure_latches_off_and_resends_off_when_bus_is_back(
    make_rig: MakeRig, wait_until: WaitUntil, flaky: type[FlakyBus]
) -> None:
    rig = await make_rig(interface="flaky")
    drv = rig.driver(InfyPowerModules, group=1)
    await drv.start()
    bus = flaky.instances[0]
    await drv.set_output(500.0, 60.0)
    await drv.output_on()
    await wait_until(lambda: all(m.on for m in rig.modules.values()))
    bus.fail_send = True
    await wait_until(lambda: drv.health().code == "transport_error")
    assert drv.health().state is HealthState.FAULT
    assert drv.describe()["output_on"] is False  # latched off
    with pytest.raises(RuntimeError, match="transport error"):
        await drv.output_on()
    assert all(m.on for m in rig.modules.values())  # nothing reached them
    bus.fail_send = False
    await wait_until(lambda: not any(m.on for m in rig.modules.values()), what="OFF re-sent")
    await wait_until(lambda: drv.health().ok)
    await asyncio.sleep(0.2)
    assert not any(m.on for m in rig.modules.values())  # stays off until asked
    await drv.output_on()
    await wait_until(lambda: all(m.on for m in rig.modules.values()))


async def test_bus_off_marks_transport_error(
    make_rig: MakeRig, wait_until: WaitUntil, channel: str
) -> None:
    rig = await make_rig()
    drv = rig.driver(InfyPowerModules, group=1)
    await drv.start()
    await drv.set_output(500.0, 30.0)
    await drv.output_on()
    await wait_until(lambda: all(m.on for m in rig.modules.values()))
    other = can.Bus(interface="virtual", channel=channel)
    try:
        # a bus-off controller receives nothing: model that with modules that stay quiet
        for m in rig.modules.values():
            m.silent = True
        await asyncio.sleep(0.05)
        other.send(can.Message(arbitration_id=CAN_ERR_BUSOFF, is_error_frame=True, data=bytes(8)))
        await wait_until(lambda: drv.health().code == "transport_error")
        assert drv.describe()["output_on"] is False
        await asyncio.sleep(0.2)
        assert drv.health().code == "transport_error"  # until the controller restarts
        other.send(can.Message(arbitration_id=CAN_ERR_RESTARTED, is_error_frame=True,
                               data=bytes(8)))
        for m in rig.modules.values():
            m.silent = False
        await wait_until(lambda: drv.health().ok)
        await wait_until(lambda: not any(m.on for m in rig.modules.values()))
    finally:
        other.shutdown()


# ---------------------------------------------------------------------------- lifecycle


async def test_stop_commands_off_releases_the_bus_and_can_restart(
    make_rig: MakeRig, wait_until: WaitUntil
) -> None:
    rig = await make_rig()
    drv = rig.driver(InfyPowerModules, group=1)
    await drv.start()
    await drv.set_output(500.0, 30.0)
    await drv.output_on()
    await wait_until(lambda: all(m.on for m in rig.modules.values()))
    await drv.stop()
    await wait_until(lambda: not any(m.on for m in rig.modules.values()))
    assert not rig.ctx.can_port("main").is_open
    assert drv.health().state is HealthState.OFFLINE
    await drv.stop()  # idempotent
    await drv.start()
    await wait_until(lambda: drv.health().ok)


async def test_two_groups_share_one_port(make_rig: MakeRig, wait_until: WaitUntil) -> None:
    rig = await make_rig([*modules_at(0, 1, group=1), *modules_at(2, 3, group=2, current=5.0)])
    first = rig.driver(InfyPowerModules, name="c1", group=1, addresses=[0, 1])
    second = rig.driver(InfyPowerModules, name="c2", group=2, addresses=[2, 3])
    await first.start()
    await second.start()
    await wait_until(lambda: first.measured_current() == 20.0 and second.measured_current() == 10.0)
    port = rig.ctx.can_port("main")
    await first.stop()
    assert port.is_open
    await asyncio.sleep(0.7)  # longer than comm_timeout: the second group keeps polling
    assert second.health().ok and second.measured_current() == 10.0


# ---------------------------------------------------------------------------- options


def test_options_validation(tmp_path: object) -> None:
    Options = InfyPowerModules.Options
    assert Options(bus="main").comm_timeout_s == 15.0
    assert Options(bus="main").poll_interval_s == 1.0
    Options(bus="main", comm_timeout_s=10.5)
    for bad in (
        {"comm_timeout_s": 10.0},  # must exceed the modules' 10 s watchdog
        {"poll_interval_s": 12.0},
        {"addresses": [0x3F]},  # broadcast, not a module
        {"addresses": [1, 1]},
        {"addresses": []},
        {"group": 63},
        {"current_sharing": "equal"},
        {"unknown": 1},
    ):
        with pytest.raises(ValidationError):
            Options(bus="main", **bad)  # type: ignore[arg-type]
    ctx = BuildContext(can={"main": CanBusConfig(interface="virtual", channel="x")}, modbus={},
                       state_dir=tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[can.other\]"):
        InfyPowerModules("c1", Options(bus="other"), ctx)
