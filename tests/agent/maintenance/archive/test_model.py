"""Session archive config: defaults follow the proposed tiers; unbounded or inconsistent values
are refused.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from agent.maintenance.archive import ArchiveConfig


def test_config_defaults_follow_the_proposed_tiers() -> None:
    c = ArchiveConfig()
    assert (c.enabled, c.full_resolution_days, c.minute_means_days) == (True, 30, 90)
    assert c.max_sessions == 2000 and c.max_bytes == 200 * 1024 * 1024


@pytest.mark.parametrize(
    "bad",
    [
        {"full_resolution_days": 40, "minute_means_days": 30},
        {"max_sessions": 10, "max_summaries": 5},
        {"max_bytes": 1000},
        {"full_resolution_days": 0},
        {"retention": 3},
    ],
)
def test_config_rejects_unbounded_or_inconsistent_values(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ArchiveConfig(**bad)
