"""The open archive fixture of the session archive tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.maintenance.archive import SessionArchive
from tests.agent.maintenance.archive.helpers import cfg


@pytest.fixture
async def archive(tmp_path: Path) -> Any:
    a = await SessionArchive.open(tmp_path, cfg())
    yield a
    await a.close()
