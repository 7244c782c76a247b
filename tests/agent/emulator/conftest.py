"""Fixtures: an emulator on 127.0.0.1 with a fake monotonic clock, HTTP session, operator
client and a registered device."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from agent.emulator import Emulator, OperatorClient
from tests.agent.emulator.emu_testkit import DeviceClient, FakeClock, register_device


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def emulator(clock: FakeClock) -> AsyncIterator[Emulator]:
    emu = Emulator(token_ttl=60, clock=clock)
    await emu.start()
    try:
        yield emu
    finally:
        await emu.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def operator(
    emulator: Emulator, http: aiohttp.ClientSession
) -> AsyncIterator[OperatorClient]:
    client = OperatorClient(emulator.base_url, session=http)
    yield client
    await client.close()


@pytest.fixture
async def device(emulator: Emulator, http: aiohttp.ClientSession) -> DeviceClient:
    return await register_device(http, emulator.api_url)
