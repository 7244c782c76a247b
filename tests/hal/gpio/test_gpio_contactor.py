"""GpioContactor against ContactorLineSimulator through gpio-sim-style files."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from hal.interfaces import monotonic

from hal.context import BuildContext
from hal.gpio.contactor import GpioContactor
from hal.gpio.lines import LineError, LinePair
from hal.interfaces import Contactor, ContactorError, ContactorPosition, HealthState
from hal.sim.gpio_files import ContactorLineSimulator, advance_contactor
from hal.sim.world import SimContactor

CHIP = "gpiochip0"
COIL, MIRROR = 3, 4


async def wait_until(predicate: Callable[[], bool], timeout: float = 1.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.002)


class Rig:
    def __init__(self, root: Path, state_dir: Path, active_low: bool = True) -> None:
        self.root = root
        self.state_dir = state_dir
        self.active_low = active_low
        self.mech = SimContactor(operate_time_s=0.02, release_time_s=0.015)
        self.sim = ContactorLineSimulator(
            root, CHIP, COIL, MIRROR, active_low, self.mech, mechanics=True
        )
        self.drivers: list[GpioContactor] = []

    def contactor(self, name: str = "dc1", **overrides: Any) -> GpioContactor:
        options = GpioContactor.Options(**self.sim.layout.driver_options(**overrides))
        ctx = BuildContext(can={}, modbus={}, state_dir=self.state_dir, connector_id=1)
        driver = GpioContactor(name, options, ctx)
        self.drivers.append(driver)
        return driver

    def coil_file(self) -> str:
        return self.sim.layout.coil_value.read_text().strip()

    def mirror_file(self) -> str:
        return self.sim.layout.mirror_value.read_text().strip()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = Rig(tmp_path / "gpio", tmp_path / "state")
    await r.sim.start()
    yield r
    for d in r.drivers:
        await d.stop()
    await r.sim.stop()


async def test_close_confirmed_then_open(rig: Rig) -> None:
    c = rig.contactor()
    assert isinstance(c, Contactor)
    assert c.health().state is HealthState.OFFLINE
    await c.start()
    st = c.status()
    assert st.position is ContactorPosition.OPEN and st.mirror_says_open and not st.coil_energised
    assert c.health().ok

    await c.close()
    st = c.status()
    assert st.position is ContactorPosition.CLOSED and st.coil_energised and not st.mirror_says_open
    assert st.cycles == 1 and rig.mech.closed and rig.coil_file() == "1"

    await c.open()
    st = c.status()
    assert st.position is ContactorPosition.OPEN and st.mirror_says_open and not st.coil_energised
    assert not rig.mech.closed and rig.coil_file() == "0"
    assert c.health().ok and st.cycles == 1


async def test_fail_to_close_releases_coil_and_raises(rig: Rig) -> None:
    rig.mech.fail_to_close = True
    c = rig.contactor(close_timeout_ms=80)
    await c.start()
    with pytest.raises(ContactorError) as err:
        await c.close()
    assert err.value.code == "contactor_failed_to_close"
    st = c.status()
    assert not st.coil_energised and rig.coil_file() == "0" and st.cycles == 0
    assert st.health.state is HealthState.FAULT and st.health.code == "contactor_failed_to_close"
    await wait_until(lambda: not rig.mech.coil)

    rig.mech.fail_to_close = False
    await c.close()  # a confirmed close clears the operation fault
    assert c.health().ok and c.status().cycles == 1


async def test_weld_on_open_is_latched(rig: Rig) -> None:
    c = rig.contactor()
    await c.start()
    await c.close()
    rig.mech.weld = True
    with pytest.raises(ContactorError) as err:
        await c.open()
    assert err.value.code == "contactor_welded"
    st = c.status()
    assert st.welded and st.position is ContactorPosition.FAULT and not st.coil_energised
    assert st.health.code == "contactor_welded" and rig.coil_file() == "0"

    with pytest.raises(ContactorError) as err:
        await c.close()  # latched: refused even without looking at the mirror
    assert err.value.code == "contactor_welded" and rig.coil_file() == "0"

    c.clear_weld()  # cleared, but the contacts are still stuck: the pre-close check re-latches
    with pytest.raises(ContactorError):
        await c.close()
    assert c.status().welded

    rig.mech.weld = False  # "repaired": contacts drop open
    await wait_until(lambda: not rig.mech.closed)
    c.clear_weld()
    await c.close()
    assert c.status().position is ContactorPosition.CLOSED and c.health().ok


async def test_pre_close_check_refuses_when_mirror_says_closed(rig: Rig) -> None:
    rig.mech.closed = True
    rig.mech.weld = True  # stuck closed while the coil is off
    await wait_until(lambda: rig.mirror_file() == "1")  # active-low: mirror open == high
    c = rig.contactor()
    await c.start()
    with pytest.raises(ContactorError) as err:
        await c.close()
    assert err.value.code == "contactor_welded"
    assert c.status().welded
    await asyncio.sleep(0.02)
    assert not rig.mech.coil and rig.coil_file() == "0"  # never energised


async def test_mirror_mismatch_while_idle(rig: Rig) -> None:
    c = rig.contactor()
    await c.start()
    await asyncio.sleep(0.03)
    assert c.health().ok
    rig.mech.weld = True
    rig.mech.closed = True  # contacts close by themselves with the coil off
    await wait_until(lambda: c.health().code == "mirror_mismatch")
    assert c.health().state is HealthState.FAULT
    assert c.status().position is ContactorPosition.FAULT


async def test_mirror_mismatch_while_closed_then_open_recovers(rig: Rig) -> None:
    c = rig.contactor()
    await c.start()
    await c.close()
    rig.sim.mechanics = False
    rig.mech.closed = False  # main contacts drop out although the coil is energised
    await wait_until(lambda: c.health().code == "mirror_mismatch")
    assert c.status().position is ContactorPosition.FAULT and c.status().coil_energised
    assert "coil is on" in (c.health().detail or "")
    await c.open()  # mirror confirms open: a confirmed operation clears the fault
    assert c.health().ok and c.status().position is ContactorPosition.OPEN


async def test_short_mirror_glitch_is_debounced(rig: Rig) -> None:
    c = rig.contactor(debounce_ms=40)
    await c.start()
    await asyncio.sleep(0.02)
    rig.sim.mechanics = False
    rig.mech.closed = True
    await asyncio.sleep(0.012)
    rig.mech.closed = False
    await asyncio.sleep(0.08)
    assert c.health().ok


@pytest.mark.parametrize("active_low", [True, False])
async def test_active_low_on_the_electrical_level(tmp_path: Path, active_low: bool) -> None:
    r = Rig(tmp_path / "gpio", tmp_path / "state", active_low=active_low)
    await r.sim.start()
    c = r.contactor()
    try:
        await c.start()
        # mirror contact closed (main open): electrical low when active-low
        assert r.mirror_file() == ("0" if active_low else "1")
        assert c.status().mirror_says_open
        await c.close()
        assert r.mirror_file() == ("1" if active_low else "0")
        assert not c.status().mirror_says_open
        await c.open()
        assert c.health().ok
    finally:
        await c.stop()
        await r.sim.stop()


async def test_wrong_polarity_configuration_is_caught(rig: Rig) -> None:
    c = rig.contactor(mirror_active_low=False)  # the simulator wires it active-low
    await c.start()
    await wait_until(lambda: c.health().code == "mirror_mismatch", timeout=0.5)
    with pytest.raises(ContactorError) as err:
        await c.close()
    assert err.value.code == "contactor_welded" and not rig.mech.coil


async def test_cycle_counter_persists_across_instances_and_reset(rig: Rig) -> None:
    c = rig.contactor()
    await c.start()
    for _ in range(2):
        await c.close()
        await c.open()
    assert c.status().cycles == 2
    await c.stop()
    counter = rig.state_dir / "contactor-dc1.json"
    assert json.loads(counter.read_text())["cycles"] == 2
    assert [p.name for p in rig.state_dir.iterdir()] == ["contactor-dc1.json"]  # no temp files left

    again = rig.contactor()
    assert again.status().cycles == 2  # loaded at construction
    await again.start()
    await again.close()
    await again.open()
    assert again.status().cycles == 3
    again.reset_cycles()
    assert again.status().cycles == 0
    await again.stop()
    assert json.loads(counter.read_text())["cycles"] == 0
    assert rig.contactor().status().cycles == 0


async def test_corrupt_counter_file_starts_from_zero(rig: Rig) -> None:
    rig.state_dir.mkdir(parents=True)
    (rig.state_dir / "contactor-dc1.json").write_text("{not json")
    c = rig.contactor()
    assert c.status().cycles == 0
    assert "unreadable" in str(c.describe()["counter_error"])


async def test_release_never_raises(rig: Rig) -> None:
    c = rig.contactor()
    c.release()  # before start
    await c.start()
    await c.close()
    c.release()
    assert not c.status().coil_energised and rig.coil_file() == "0"
    await wait_until(lambda: not rig.mech.closed)
    await c.stop()
    c.release()  # after stop


class BrokenLines:
    """A backend whose every I/O fails after the request."""

    location = "broken"

    def request(self, pair: LinePair) -> None:
        pass

    def release(self) -> None:
        pass

    def set_output(self, active: bool) -> None:
        raise LineError("broken: cannot set line")

    def get_input(self) -> bool:
        raise LineError("broken: cannot read line")

    def event_fd(self) -> int | None:
        return None

    def read_events(self) -> int:
        return 0

    def describe(self) -> dict[str, Any]:
        return {"backend": "broken"}


async def test_release_with_failing_backend_does_not_raise(tmp_path: Path) -> None:
    options = GpioContactor.Options(
        backend="sim", root=str(tmp_path), chip="x", coil_line=0, mirror_line=1
    )
    ctx = BuildContext(can={}, modbus={}, state_dir=tmp_path)
    c = GpioContactor("broken", options, ctx, lines=BrokenLines())
    await c.start()
    try:
        c.release()
        assert c.health().code == "transport_error"
        with pytest.raises(ContactorError) as err:
            await c.close()
        assert err.value.code == "contactor_failed_to_close"
    finally:
        await c.stop()


async def test_emergency_release_during_close_aborts_it(rig: Rig) -> None:
    rig.mech.operate_time_s = 0.1
    c = rig.contactor(close_timeout_ms=300)
    await c.start()
    closing = asyncio.create_task(c.close())
    await wait_until(lambda: rig.mech.coil)
    c.release()
    with pytest.raises(ContactorError) as err:
        await closing
    assert err.value.code == "contactor_failed_to_close" and "released" in err.value.detail
    assert rig.coil_file() == "0"


async def test_close_refused_while_already_closed(rig: Rig) -> None:
    c = rig.contactor()
    await c.start()
    await c.close()
    with pytest.raises(ContactorError):
        await c.close()
    assert not c.status().welded and c.status().cycles == 1


async def test_missing_sim_chip_goes_offline_then_recovers(tmp_path: Path) -> None:
    mech = SimContactor(operate_time_s=0.01)
    sim = ContactorLineSimulator(tmp_path / "gpio", CHIP, COIL, MIRROR, True, mech, mechanics=True)
    options = GpioContactor.Options(**sim.layout.driver_options())
    c = GpioContactor("dc2", options, BuildContext(can={}, modbus={}, state_dir=tmp_path / "s"))
    await c.start()
    try:
        h = c.health()
        assert h.state is HealthState.OFFLINE and h.code == "transport_error"
        assert str(tmp_path / "gpio" / CHIP) in (h.detail or "")
        with pytest.raises(ContactorError) as err:
            await c.close()
        assert err.value.code == "contactor_failed_to_close"
        await sim.start()
        await wait_until(lambda: c.health().ok, timeout=2.5)
        await c.close()
        assert c.status().position is ContactorPosition.CLOSED
    finally:
        await c.stop()
        await sim.stop()


def test_describe_reports_wear_and_config(tmp_path: Path) -> None:
    options = GpioContactor.Options(
        backend="sim", root=str(tmp_path), chip=CHIP, coil_line=1, mirror_line=2, rated_cycles=200
    )
    c = GpioContactor("dc1", options, BuildContext(can={}, modbus={}, state_dir=tmp_path))
    d = c.describe()
    assert d["backend"] == "sim" and d["coil_line"] == 1 and d["mirror_line"] == 2
    assert (
        d["rated_cycles"] == 200 and d["wear_percent"] == 0.0 and d["health"]["state"] == "offline"
    )


def test_advance_contactor_mechanics() -> None:
    c = SimContactor(operate_time_s=0.03, release_time_s=0.02)
    c.coil = True
    advance_contactor(c, 10.0)
    advance_contactor(c, 10.02)
    assert not c.closed
    advance_contactor(c, 10.031)
    assert c.closed and c.cycles == 1 and not c.mirror_closed
    c.coil = False
    advance_contactor(c, 11.0)
    advance_contactor(c, 11.021)
    assert not c.closed
    # a coil pulse shorter than the operate time does not close the contacts
    c.coil = True
    advance_contactor(c, 12.0)
    c.coil = False
    advance_contactor(c, 12.01)
    advance_contactor(c, 12.1)
    assert not c.closed and c.cycles == 1
    # weld: stays closed after release; fail_to_close: never closes
    c.coil, c.weld = True, True
    advance_contactor(c, 13.0)
    advance_contactor(c, 13.05)
    c.coil = False
    advance_contactor(c, 14.0)
    advance_contactor(c, 15.0)
    assert c.closed
    c.weld, c.closed, c.fail_to_close, c.coil = False, False, True, True
    advance_contactor(c, 16.0)
    advance_contactor(c, 17.0)
    assert not c.closed
    # fail_to_close injected while closed does not open energised contacts
    c.fail_to_close = False
    advance_contactor(c, 18.0)
    advance_contactor(c, 18.1)
    assert c.closed
    c.fail_to_close = True
    advance_contactor(c, 19.0)
    assert c.closed


async def test_cancelled_close_releases_the_coil(rig: Rig) -> None:
    rig.mech.operate_time_s = 0.2
    c = rig.contactor(close_timeout_ms=400)
    await c.start()
    closing = asyncio.create_task(c.close())
    await wait_until(lambda: rig.mech.coil)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert not c.status().coil_energised and rig.coil_file() == "0"


async def test_broken_mirror_wire_never_reads_open_with_default_wiring(tmp_path: Path) -> None:
    """Default wiring (active-low, pull-up): an undriven mirror input must not confirm 'open'."""
    from hal.gpio.lines import sim_value_path

    root, state = tmp_path / "gpio", tmp_path / "state"
    options = GpioContactor.Options(backend="sim", root=str(root), chip=CHIP, coil_line=COIL, mirror_line=MIRROR)
    assert options.mirror_bias == "pull_up"
    sim_value_path(root, CHIP, MIRROR).parent.mkdir(parents=True, exist_ok=True)  # the line exists, nothing drives it
    driver = GpioContactor("dc1", options, BuildContext(can={}, modbus={}, state_dir=state, connector_id=1))
    await driver.start()
    try:
        await asyncio.sleep(0.05)
        assert driver.status().mirror_says_open is False
        with pytest.raises(ContactorError) as info:
            await driver.close()
        assert info.value.code == "contactor_welded"
        assert driver.status().coil_energised is False
    finally:
        await driver.stop()


async def test_idle_watcher_waits_for_edges_not_a_poll(rig: Rig) -> None:
    # the backstop and the idle poll are far longer than the test: only an edge can tell
    c = rig.contactor(edge_backstop_ms=10_000.0, idle_poll_interval_ms=1000.0)
    await c.start()
    await wait_until(lambda: c.health().ok)
    # past the start-up settle window (it ends one fast poll after _settle_until): steady state
    await wait_until(lambda: monotonic() > c._settle_until + 0.1)
    await asyncio.sleep(0.1)
    loop = asyncio.get_running_loop()
    if loop.time() % 10.0 > 9.0:  # the edge backstop fires on the 10 s grid: keep the window clear of it
        await asyncio.sleep(1.5)
    reads = 0
    original = c._lines.get_input

    def counting() -> bool:
        nonlocal reads
        reads += 1
        return original()

    c._lines.get_input = counting  # type: ignore[method-assign]
    await asyncio.sleep(0.3)
    assert reads == 0  # nothing polled the mirror while nothing happened
    rig.mech.weld = True
    rig.mech.closed = True  # the simulator rewrites the mirror file: an inotify edge
    await wait_until(lambda: c.health().code == "mirror_mismatch", timeout=1.0)
    assert reads > 0
