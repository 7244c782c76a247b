"""Fixtures for the state-store tests: a fresh state directory and an opened :class:`Store`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.store import Store, StoreConfig


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """A state directory that does not exist yet (the store creates it)."""
    return tmp_path / "state"


@pytest.fixture
async def store(state_dir: Path) -> AsyncIterator[Store]:
    """An opened store with default limits, closed after the test."""
    s = await Store.open(state_dir, StoreConfig())
    yield s
    await s.close()
