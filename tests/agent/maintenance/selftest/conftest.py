"""The simulated charger with every real driver, started for a self test; stopped afterwards."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.agent.maintenance.selftest.helpers import Rig, _fast_driver_timings
from tests.agent.sim_rig import running_sim


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    async with running_sim(tmp_path, _fast_driver_timings, before="the self test") as (cfg, sim, devices):
        yield Rig(sim, devices)
