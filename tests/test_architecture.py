"""The shape of the library, checked: imports point down the layers, no import cycles, no oversized modules.

Layers, low to high (a package may import only from lower ones, or from itself). Imports inside functions
count too: a lazy import that climbs back up is still a dependency on a higher layer.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "platform"

LAYERS = [
    ["aigc.errors", "aigc.console"],
    ["aigc.storage", "aigc.cluster"],
    ["aigc.config", "aigc.plots"],
    ["aigc.models"],
    ["aigc.data"],
    ["aigc.feedback", "aigc.registry"],
    ["aigc.train"],
    ["aigc.tune"],
    ["aigc.serve"],
    ["aigc.batch"],
    ["aigc.report"],
    ["aigc.pipeline"],
    ["aigc.demo"],
    ["aigc.cli"],
]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
MAX_LINES = 400  # past this a module is split in the same change


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _imports(path: Path, top_level_only: bool) -> list[tuple[str, int]]:
    """(imported aigc module, line) pairs of one file; ``from aigc.x import y`` counts as ``aigc.x.y`` when
    that is a module, else ``aigc.x``."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("aigc"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.append((sub if sub in MODULES else node.module, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("aigc")]
    return out


FILES = sorted(ROOT.joinpath("aigc").rglob("*.py"))
MODULES = {_module(p): p for p in FILES}


def test_every_package_has_a_layer():
    packages = {_package(m) for m in MODULES} - {"aigc"}
    assert packages - set(RANK) == set(), "add the new package to LAYERS in this test"


def test_no_import_climbs_from_a_lower_layer_back_up():
    climbs = []
    for module, path in MODULES.items():
        src = _package(module)
        for target, line in _imports(path, top_level_only=False):
            dst = _package(target)
            if src in RANK and dst in RANK and RANK[dst] > RANK[src]:
                climbs.append(f"{path.relative_to(ROOT)}:{line} {src} -> {dst}")
    assert climbs == []


def test_no_import_cycles_between_modules():
    graph = defaultdict(set)
    for module, path in MODULES.items():
        for target, _ in _imports(path, top_level_only=True):
            if target in MODULES and target != module:
                graph[module].add(target)
    done: set[str] = set()
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            cycles.append(" -> ".join(stack[stack.index(node) :] + [node]))
            return
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, stack + [node])
        done.add(node)

    for module in sorted(MODULES):
        visit(module, [])
    assert cycles == []


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_oversized(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines: split it by responsibility"
