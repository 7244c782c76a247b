"""The simulated charger with every real driver started against it, shared by the tests that
need the whole hardware stack (fault detection, self test)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from agent.cli.sim import SimulatedCharger
from agent.config import AgentConfig, load_config
from agent.service.devices import build_devices, make_context
from hal.interfaces import DeviceSet

T = TypeVar("T")

SIM_TOML = Path(__file__).resolve().parents[2] / "config" / "sim.toml"
DEADLINE_S = 15.0


async def eventually(
    probe: Callable[[], T | None | bool],
    what: str,
    *,
    timeout: float = DEADLINE_S,
    state: Callable[[], Any] | None = None,
    step: float = 0.05,
) -> T:
    """Poll ``probe`` until it returns something truthy; return it. Fails after ``timeout``
    with ``what`` and the last observed ``state()``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = probe()
        if value:
            return value  # type: ignore[return-value]
        if loop.time() > deadline:
            seen = state() if state is not None else value
            raise AssertionError(f"not within {timeout:g} s: {what}; last seen: {seen!r}")
        await asyncio.sleep(step)


async def _stop_within(device: Any, timeout_s: float) -> None:
    """A device whose stop() hangs fails the test instead of stalling the run."""
    try:
        await asyncio.wait_for(device.stop(), timeout_s)
    except asyncio.TimeoutError:
        raise AssertionError(f"{device.name}.stop() did not return within {timeout_s:g} s") from None


async def start_sim_and_devices(
    stack: AsyncExitStack, cfg: AgentConfig, sim_root: Path, *, before: str
) -> tuple[SimulatedCharger, DeviceSet]:
    """Start the simulator and every configured driver on ``stack`` (stopped when it closes,
    each device within 15 s) and wait until every device is healthy (``before`` names what
    the test does next, for the failure message)."""
    sim = await stack.enter_async_context(SimulatedCharger(cfg, sim_root))
    ctx = make_context(cfg)
    stack.push_async_callback(ctx.close)
    devices = build_devices(cfg, ctx)
    for device in devices.all():
        await device.start()
        stack.push_async_callback(_stop_within, device, 15.0)
    await eventually(
        lambda: all(d.health().ok for d in devices.all()),
        f"every device healthy before {before}",
        state=lambda: {d.name: d.health() for d in devices.all() if not d.health().ok},
    )
    return sim, devices


@asynccontextmanager
async def running_sim(
    tmp_path: Path, tune: Callable[[AgentConfig, Path], None], *, before: str
) -> AsyncIterator[tuple[AgentConfig, SimulatedCharger, DeviceSet]]:
    """``config/sim.toml`` under ``tmp_path``, adjusted by ``tune(cfg, tmp_path)``, with the
    simulator and every driver running and healthy (:func:`start_sim_and_devices`)."""
    loaded = load_config(SIM_TOML, sim_root=tmp_path / "sim")
    cfg = loaded.model
    assert loaded.sim_root is not None
    tune(cfg, tmp_path)
    async with AsyncExitStack() as stack:
        sim, devices = await start_sim_and_devices(stack, cfg, loaded.sim_root, before=before)
        yield cfg, sim, devices
