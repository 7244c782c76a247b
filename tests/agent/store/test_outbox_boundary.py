"""Other stores queue outbox items only through the public unit-of-work API."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PRIVATE = {"_txn_put", "_enforce_budget", "_with_room", "_after_commit", "_after_commit_pair"}


def test_no_module_but_the_outbox_reaches_its_private_transaction_helpers() -> None:
    offenders = []
    for path in sorted((ROOT / "agent").rglob("*.py")):
        if path.name == "outbox.py" and path.parent.name == "store":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in PRIVATE:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}")
    assert offenders == []


def test_the_private_helpers_still_exist_so_the_check_above_means_something() -> None:
    source = (ROOT / "agent" / "store" / "outbox.py").read_text()
    assert all(f"def {name}(" in source for name in PRIVATE)
    assert "async def unit_of_work(" in source
