"""Fan run-time counter (integration, persistence, reset) and the contactor-counter reset helper."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.maintenance.counters import FanRuntime, UnknownFanError, reset_contactor_cycles
from agent.store import Store
from tests.agent.fakes import FakeContactor
from tests.agent.health_fakes import FakeThermal


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def two_fans() -> FakeThermal:
    thermal = FakeThermal()
    thermal.set_fan("cabinet", 1800.0)
    thermal.set_fan("module", 0.0)
    return thermal


async def test_runtime_integrates_only_while_the_fan_turns(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "state")
    try:
        thermal, clock = two_fans(), Clock()
        runtime = FanRuntime(store.kv, thermal, clock=clock)
        await runtime.load()
        runtime.sample()
        clock.t += 1800.0
        runtime.sample()
        assert runtime.hours("cabinet") == pytest.approx(0.5)
        assert runtime.hours("module") == 0.0

        thermal.set_fan("cabinet", None)  # unreadable from now on: not counted
        thermal.set_fan("module", 900.0, duty=50.0)
        clock.t += 1800.0
        runtime.sample()  # the interval before this sample still counts for cabinet
        clock.t += 3600.0
        runtime.sample()
        assert runtime.all_hours() == pytest.approx({"cabinet": 1.0, "module": 1.0})
    finally:
        await store.close()


async def test_runtime_is_persisted_and_survives_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = await Store.open(state)
    try:
        clock = Clock()
        runtime = FanRuntime(store.kv, two_fans(), clock=clock)
        await runtime.load()
        runtime.sample()
        clock.t += 7200.0
        runtime.sample()
        await runtime.persist()
    finally:
        await store.close()

    store = await Store.open(state)
    try:
        clock = Clock()
        thermal = two_fans()
        runtime = FanRuntime(store.kv, thermal, clock=clock)
        await runtime.load()
        assert runtime.hours("cabinet") == pytest.approx(2.0)
        runtime.sample()
        clock.t += 3600.0
        runtime.sample()
        assert runtime.hours("cabinet") == pytest.approx(3.0)
    finally:
        await store.close()


async def test_task_persists_periodically_and_on_stop(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "state")
    try:
        thermal = two_fans()
        runtime = FanRuntime(store.kv, thermal, sample_interval_s=0.01, persist_interval_s=0.05)
        await runtime.load()
        await runtime.start()
        stored = None
        for _ in range(500):  # periodic persist, well before stop()
            await asyncio.sleep(0.01)
            stored = await store.kv.get("counters/fan_runtime/cabinet")
            if stored is not None:
                break
        assert stored is not None and stored["seconds"] > 0.0
        await runtime.stop()
        final = await store.kv.get("counters/fan_runtime/cabinet")
        assert final["seconds"] == pytest.approx(runtime.hours("cabinet") * 3600.0)
        assert final["seconds"] >= stored["seconds"]
        assert await store.kv.get("counters/fan_runtime/module") is None  # never turned
        await runtime.stop()  # idempotent
    finally:
        await store.close()


async def test_reset_returns_previous_hours_and_persists_zero(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = await Store.open(state)
    try:
        clock = Clock()
        runtime = FanRuntime(store.kv, two_fans(), clock=clock)
        await runtime.load()
        runtime.sample()
        clock.t += 5400.0
        runtime.sample()
        assert await runtime.reset("cabinet") == pytest.approx(1.5)
        assert runtime.hours("cabinet") == 0.0
        with pytest.raises(UnknownFanError, match="known fans: cabinet, module"):
            await runtime.reset("psu")
    finally:
        await store.close()

    store = await Store.open(state)
    try:
        runtime = FanRuntime(store.kv, two_fans())
        await runtime.load()
        assert runtime.hours("cabinet") == 0.0
        stored = await store.kv.get("counters/fan_runtime/cabinet")
        assert stored["seconds"] == 0.0 and stored["reset_at"].endswith("Z")
    finally:
        await store.close()


async def test_resolve_names_indexes_and_the_single_fan_default(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "state")
    try:
        runtime = FanRuntime(store.kv, two_fans())
        assert runtime.resolve("module") == "module"
        assert runtime.resolve(1) == "cabinet" and runtime.resolve(2) == "module"
        with pytest.raises(UnknownFanError, match="out of range 1..2"):
            runtime.resolve(0)
        with pytest.raises(UnknownFanError, match="name one"):
            runtime.resolve(None)
        single = FakeThermal()
        single.set_fan("cabinet", 0.0)
        assert FanRuntime(store.kv, single).resolve(None) == "cabinet"
        with pytest.raises(UnknownFanError, match="none"):
            FanRuntime(store.kv, None).resolve("x")
    finally:
        await store.close()


def test_reset_contactor_cycles_returns_the_previous_count() -> None:
    contactor = FakeContactor(cycles=1234)
    assert reset_contactor_cycles(contactor) == 1234
    assert contactor.status().cycles == 0
