"""Fixtures for the CAN tests: unique virtual channels, a frame recorder, a flaky bus."""

from __future__ import annotations

import asyncio
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import can.interfaces
import can.util
import pytest
from can_helpers import FlakyBus, Recorder, WaitUntil, unique_channel

from hal.config import CanBusConfig


@pytest.fixture
def channel() -> str:
    """A virtual channel no other test uses."""
    return unique_channel()


@pytest.fixture
def bus_config(channel: str) -> CanBusConfig:
    return CanBusConfig(interface="virtual", channel=channel, tx_spacing_ms=1.0)


@pytest.fixture
def recorder(channel: str) -> Iterator[Recorder]:
    rec = Recorder(channel)
    yield rec
    rec.bus.shutdown()


@pytest.fixture
def wait_until() -> WaitUntil:
    """``await wait_until(predicate, timeout=5.0)``: poll until true, fail after timeout."""

    async def _wait(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "") -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            if loop.time() > deadline:
                raise AssertionError(f"condition not reached within {timeout} s: {what}")
            await asyncio.sleep(0.01)

    return _wait


@pytest.fixture
def flaky(monkeypatch: pytest.MonkeyPatch) -> type[FlakyBus]:
    """Registers python-can interface ``flaky`` (a :class:`FlakyBus`) for this test."""
    module = types.ModuleType("_hal_can_tests_flaky")
    module.FlakyBus = FlakyBus  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(can.interfaces.BACKENDS, "flaky", (module.__name__, "FlakyBus"))
    monkeypatch.setattr(can.util, "VALID_INTERFACES", can.util.VALID_INTERFACES | {"flaky"})
    monkeypatch.setattr(FlakyBus, "instances", [])
    return FlakyBus
