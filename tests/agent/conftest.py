"""Fixtures shared by the agent tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.store import Store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """A real state store in a temporary directory."""
    s = await Store.open(tmp_path / "state")
    yield s
    await s.close()
