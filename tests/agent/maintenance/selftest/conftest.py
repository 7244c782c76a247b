"""The simulated charger with every real driver, started for a self test; stopped afterwards."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from agent.cli.sim import SimulatedCharger
from agent.config import load_config
from agent.service.devices import build_devices, make_context
from tests.agent.maintenance.selftest.helpers import SIM_TOML, Rig, eventually, _fast_driver_timings


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    loaded = load_config(SIM_TOML, sim_root=tmp_path / "sim")
    cfg = loaded.model
    assert loaded.sim_root is not None
    _fast_driver_timings(cfg, tmp_path)
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(SimulatedCharger(cfg, loaded.sim_root))
        ctx = make_context(cfg)
        stack.push_async_callback(ctx.close)
        devices = build_devices(cfg, ctx)
        for device in devices.all():
            await device.start()
            stack.push_async_callback(device.stop)
        await eventually(
            lambda: all(d.health().ok for d in devices.all()),
            "every device healthy before the self test",
        )
        yield Rig(sim, devices)
