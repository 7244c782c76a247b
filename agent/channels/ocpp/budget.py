"""Sharing a charge-point power budget (ChargePointMaxProfile) among connectors.

Contract of :func:`share`: given the budget in kW and, per connector, its *ceiling* (the most
it could take: its own TxProfile/TxDefaultProfile limit, its rating, and its other limit
sources such as a Tellus ``set_power_limit``), every connector is first granted up to its
ceiling out of an equal share, and what a connector cannot use is shared equally among the
rest ("max-min fair" water filling). Consequences, all tested:

* the grants never add up to more than the budget (values are rounded *down* to 1 W);
* no connector gets more than its ceiling;
* a connector whose ceiling is below the equal share keeps its ceiling, the others split
  what is left equally;
* a negative budget counts as 0.
"""

from __future__ import annotations

import math


def _floor_w(kw: float) -> float:
    return math.floor(kw * 1000.0 + 1e-6) / 1000.0


def share(budget_kw: float, ceilings_kw: dict[int, float]) -> dict[int, float]:
    """Grant per connector (kW) of ``budget_kw`` shared among ``ceilings_kw``'s connectors."""
    left = max(0.0, budget_kw)
    remaining = len(ceilings_kw)
    grants: dict[int, float] = {}
    for cid, ceiling in sorted(ceilings_kw.items(), key=lambda item: (item[1], item[0])):
        grant = _floor_w(min(max(0.0, ceiling), left / remaining))
        grants[cid] = grant
        left -= grant
        remaining -= 1
    return grants
