"""The import layering of DESIGN.md §2, enforced so it cannot rot.

Each module of trio_vhost has a rank; a module may import only modules of a strictly lower
rank (or its own package). Imports under ``if TYPE_CHECKING:`` count too: a type-only
dependency that points upward is still a design error.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "trio_vhost"

#: top-level module or subpackage of trio_vhost -> rank (higher may import lower)
RANKS: dict[str, float] = {
    "errors": 0,
    "_fd": 0,
    "proto": 1,
    "mem": 2,
    "vring": 3,
    "_io": 3,
    "device": 4,
    "snapshot": 4,
    "inflight": 4,
    "dirty_tracking": 4,
    "backend_channel": 3.5,
    "frontend_channel": 3.5,
    "slot": 5,
    "worker": 6,
    "devices": 6,
    # the guest side of a device sits on the Python frontend
    "devices.blk_driver": 8,
    "session_state": 6.5,
    "session": 7,
    "frontend": 7,
    "server": 8,
    "selfcheck": 9,
    "testing": 10,
    "cli": 10,
    "__init__": 12,
    "__main__": 12,
}


def _ranked(parts: list[str]) -> str:
    """The most specific ranked unit of a module path (``devices.blk_driver``, else ``devices``)."""
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        if name in RANKS:
            return name
    return parts[0]


def _unit(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return _ranked(list(rel.parts))


def _imported_units(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package_parts = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    units: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package_parts[: len(package_parts) - node.level + 1])
                module = ".".join([*base, node.module] if node.module else base)
                names = [module] if node.module else [f"{module}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "trio_vhost" and len(parts) > 1:
                units.add(_ranked(parts[1:]))
    return units


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_downward(path: Path) -> None:
    unit = _unit(path)
    assert unit in RANKS, f"{unit} has no rank in the layering table: add it"
    for imported in _imported_units(path) - {unit}:
        assert imported in RANKS, f"{path.name} imports unranked trio_vhost.{imported}"
        assert RANKS[imported] < RANKS[unit], (
            f"trio_vhost.{unit} (rank {RANKS[unit]}) must not import "
            f"trio_vhost.{imported} (rank {RANKS[imported]})"
        )
