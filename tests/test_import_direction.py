"""Imports point one way (docs/architecture.md, "Package map").

    fleetgate (config, errors, ids, TLS, key files: the shared base)
      <- enrollment (CA, registry, EST service)      <- device_sdk (the device side)
          <- broker (MQTT broker, bridge)
              <- firmware_sim, fleetgate.cli (the simulator and the admin CLI, on top)

Each package may import only itself and the packages listed for it below; the test reads every
module's import statements (top-level and inside functions) with ``ast``, so a lazy import that
points the wrong way is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("fleetgate", "enrollment", "device_sdk", "broker", "firmware_sim")

MAY_IMPORT: dict[str, frozenset[str]] = {
    "fleetgate": frozenset(),
    "enrollment": frozenset({"fleetgate"}),
    "device_sdk": frozenset({"fleetgate"}),
    "broker": frozenset({"fleetgate", "enrollment", "device_sdk"}),
    "firmware_sim": frozenset({"fleetgate", "enrollment", "device_sdk", "broker"}),
    "fleetgate.cli": frozenset({"fleetgate", "enrollment", "device_sdk", "broker", "firmware_sim"}),
}


def layer_of(module: str) -> str:
    """The entry of MAY_IMPORT a dotted module name belongs to (the longest prefix)."""
    parts = module.split(".")
    if parts[:2] == ["fleetgate", "cli"]:
        return "fleetgate.cli"
    return parts[0]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every product module named by an import statement anywhere in the tree."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            names.add(target)
    return {n for n in names if n.split(".")[0] in PRODUCT}


def sources() -> list[Path]:
    return sorted(p for package in PRODUCT for p in (ROOT / package).rglob("*.py"))


def test_every_product_package_is_in_the_map():
    assert {layer_of(module_name(p)) for p in sources()} <= set(MAY_IMPORT)


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down_the_package_map(path):
    module = module_name(path)
    own = layer_of(module)
    tree = ast.parse(path.read_text(), str(path))
    wrong = sorted(
        target
        for target in imported(tree, module, path.name == "__init__.py")
        if layer_of(target) != own and layer_of(target) not in MAY_IMPORT[own]
    )
    assert not wrong, f"{module} ({own}) may not import {wrong}"


def test_the_check_catches_an_import_that_points_up():
    tree = ast.parse("def f():\n    from broker.server import run_forever\n")
    targets = imported(tree, "enrollment.service", False)
    assert targets == {"broker.server"}
    assert layer_of("broker.server") not in MAY_IMPORT["enrollment"]
