"""The layer rule of docs/design.md, read from the source: every import of our own packages points down.

utils  <-  datasets, models, core  <-  losses  <-  engine  <-  tools

Imports are read with ``ast`` from every module (also those inside functions), so a lazy import cannot hide an
upward dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Package -> the packages of ours it may import (besides itself). `configs` holds YAML only.
ALLOWED = {
    "utils": set(),
    "datasets": {"utils"},
    "models": {"utils"},
    "core": {"utils"},
    "losses": {"utils", "core"},
    "engine": {"utils", "datasets", "models", "core", "losses"},
    "tools": {"utils", "datasets", "models", "core", "losses", "engine"},
}
OURS = set(ALLOWED) | {"configs", "tests"}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{path}:{node.lineno}: relative import; the tree uses absolute imports only")
    return found


def _violations(package: str) -> list[str]:
    problems = []
    for path in sorted((REPO / package).rglob("*.py")):
        for line, target in _imports(path):
            if target in OURS and target != package and target not in ALLOWED[package]:
                problems.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    return problems


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_down_the_layers(package: str) -> None:
    assert _violations(package) == []


def test_every_package_of_the_tree_has_a_layer() -> None:
    """A new top-level package must be given its place in ALLOWED (and in docs/design.md)."""
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")}
    assert packages - OURS == set()


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    """The reader sees imports inside functions too (a lazy import is still a dependency)."""
    module = tmp_path / "lazy.py"
    module.write_text("import os\n\ndef f():\n    from engine.step import TrainStep\n    import models.msfc\n")
    assert _imports(module) == [(1, "os"), (4, "engine"), (5, "models")]
