"""The driver registry: every registered class is in the mypy contract table, and resolves."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from hal import registry

REGISTRY_SOURCE = Path(registry.__file__)


def _contract_imports() -> set[str]:
    """``module:Class`` for each import in the ``if TYPE_CHECKING:`` block that holds ``_CONTRACTS``."""
    tree = ast.parse(REGISTRY_SOURCE.read_text())
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            if "_CONTRACTS" not in {t.id for s in node.body if isinstance(s, ast.AnnAssign) for t in [s.target] if isinstance(t, ast.Name)}:
                continue
            for stmt in node.body:
                if isinstance(stmt, ast.ImportFrom) and stmt.module and stmt.module.startswith("hal."):
                    found |= {f"{stmt.module}:{alias.name}" for alias in stmt.names}
    return found


def test_every_registered_driver_is_checked_against_its_protocol() -> None:
    registered = {target for kind in registry.DRIVERS.values() for target in kind.values()}
    assert registered == _contract_imports()


@pytest.mark.parametrize(
    "kind", [registry.POWER_MODULES, registry.METER, registry.IMD, registry.CONTACTOR, registry.THERMAL,
             registry.VEHICLE, registry.BIDIRECTIONAL],
)
def test_every_kind_is_registered_and_its_drivers_resolve(kind: registry.DriverKind[object]) -> None:
    assert registry.names(kind.name), f"no driver registered for {kind.name}"
    for name in registry.names(kind.name):
        spec = registry.lookup(kind.name, name)
        assert spec.options_model is spec.cls.Options


def test_unknown_driver_names_the_choices() -> None:
    with pytest.raises(registry.UnknownDriver, match="unknown meter driver 'nope' \\(expected one of: acrel_djsf1352, eastron_sdm630\\)"):
        registry.lookup("meter", "nope")
