"""The shared tick grid: periodic loops with commensurate periods wake at the same instant."""

from __future__ import annotations

import asyncio

import pytest

from hal.tick import Pace, Wakeup, next_boundary, sleep_to_grid, wait_event_to_grid


def test_next_boundary_is_the_next_multiple() -> None:
    assert next_boundary(10.03, 0.1) == pytest.approx(10.1)
    assert next_boundary(10.1, 0.1) == pytest.approx(10.2)  # on a boundary: the next one
    assert next_boundary(3.2, 1.0) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        next_boundary(1.0, 0.0)


async def test_loops_with_commensurate_periods_share_wakeups() -> None:
    loop = asyncio.get_running_loop()
    woke: dict[str, list[float]] = {"fast": [], "slow": []}

    async def run(name: str, period: float, count: int) -> None:
        for _ in range(count):
            await sleep_to_grid(period)
            woke[name].append(loop.time())

    await asyncio.gather(run("fast", 0.05, 8), run("slow", 0.1, 4))
    fast = {round(t / 0.05) for t in woke["fast"]}
    slow = {round(t / 0.05) for t in woke["slow"]}
    assert slow <= fast  # every slow wake-up is also a fast one: one wake-up for both
    assert all(t % 0.05 < 0.02 or t % 0.05 > 0.048 for t in woke["fast"])  # on the grid


async def test_wakeup_ends_the_wait_early_and_stays_set_until_cleared() -> None:
    loop = asyncio.get_running_loop()
    flag = Wakeup()
    t0 = loop.time()
    loop.call_later(0.02, flag.set)
    await flag.wait_until(t0 + 5.0)
    assert loop.time() - t0 < 1.0 and flag.is_set()
    await flag.wait_for_tick(10.0)  # still set: returns at once
    flag.clear()
    t1 = loop.time()
    await flag.wait_until(t1 + 0.05)  # nobody sets it: the deadline ends the wait
    assert loop.time() - t1 >= 0.045


async def test_wait_event_to_grid_returns_on_the_grid_or_when_set() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    assert await wait_event_to_grid(stop, 0.05) is False  # nobody set it: the next grid slot
    assert loop.time() % 0.05 < 0.02 or loop.time() % 0.05 > 0.048
    loop.call_later(0.01, stop.set)
    t0 = loop.time()
    assert await wait_event_to_grid(stop, 10.0) is True  # set: long before the 10 s slot
    assert loop.time() - t0 < 1.0
    assert await wait_event_to_grid(stop, 10.0) is True  # already set: at once


def test_idle_periods_share_one_grid() -> None:
    """The idle wake-ups coincide: pilot sampling, connector control, service-mode poll, 1 s
    jobs and the idle-pace polls of the meters, the IMD and the power modules.

    Changing one default without the others would add a wake-up of its own (README: footprint).
    """
    from agent.charging.config import ChargingSection
    from agent.maintenance.service_mode import POLL_INTERVAL_S
    from hal.pilot.iec61851 import Iec61851Vehicle

    from hal.can.module_options import ModuleGroupOptions
    from hal.modbus.poller import PolledOptions

    pilot = Iec61851Vehicle.Options.model_fields["idle_poll_interval_s"].default
    control = ChargingSection.model_fields["idle_tick_s"].default
    idle_polls = (
        PolledOptions.model_fields["idle_poll_interval_s"].default,
        ModuleGroupOptions.model_fields["idle_poll_interval_s"].default,
    )
    for period in (control, POLL_INTERVAL_S, 1.0, *idle_polls):
        ratio = period / pilot
        assert ratio == pytest.approx(round(ratio)) and round(ratio) >= 1, (period, pilot)


async def test_pace_is_busy_until_reported_idle_and_busy_ends_an_idle_sleep() -> None:
    loop = asyncio.get_running_loop()
    pace = Pace()
    assert not pace.idle and pace.period(0.05, 1.0) == 0.05  # nobody reported: normal period
    pace.report(1, False)
    pace.report(2, False)
    assert pace.idle and pace.period(0.05, 1.0) == 1.0
    assert pace.period(0.5, 0.1) == 0.5  # never faster than the normal period
    await pace.sleep(0.01, 0.2)  # idle: on the 0.2 s grid
    t0 = loop.time()
    await pace.sleep(0.01, 0.2)
    assert 0.15 < loop.time() - t0 < 0.5  # one idle period, not 0.01 s
    loop.call_later(0.03, pace.report, 2, True)
    t1 = loop.time()
    await pace.sleep(0.01, 30.0)  # connector 2 got busy: the 30 s idle sleep ends now
    assert loop.time() - t1 < 1.0 and not pace.idle
    pace.report(2, False)
    assert pace.idle
