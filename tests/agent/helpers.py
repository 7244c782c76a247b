"""Small helpers shared by the agent's command/dispatcher tests."""

from __future__ import annotations

import asyncio
from typing import Any, Callable


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``cond`` every 10 ms; fail the test if it is not true within ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def decision_audit(ledger: Any) -> list[Any]:
    """The dispatcher's decisions (the agent's later completed/failed rows filtered out)."""
    return [a for a in await ledger.audit_entries() if a.source != "agent"]
