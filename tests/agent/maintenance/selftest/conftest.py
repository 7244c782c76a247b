"""The simulated charger with every real driver, started for a self test; stopped afterwards."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from agent.config import load_config
from tests.agent.maintenance.selftest.helpers import SIM_TOML, Rig, _fast_driver_timings
from tests.agent.sim_rig import start_sim_and_devices


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    loaded = load_config(SIM_TOML, sim_root=tmp_path / "sim")
    cfg = loaded.model
    assert loaded.sim_root is not None
    _fast_driver_timings(cfg, tmp_path)
    async with AsyncExitStack() as stack:
        sim, devices = await start_sim_and_devices(stack, cfg, loaded.sim_root, before="the self test")
        yield Rig(sim, devices)
