"""Layers import downwards: model < data < checkpoint < training / infer / eval < commands.

Read from the source (every import, at module level or inside a function), so a shortcut taken
anywhere shows up here, not when a user's import graph happens to cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vidlora"

# package (or module) -> the vidlora modules it must never import
FORBIDDEN = {
    "model": ("vidlora.data", "vidlora.checkpoint", "vidlora.training", "vidlora.infer", "vidlora.eval",
              "vidlora.args", "vidlora.train", "vidlora.check", "vidlora.cli"),
    "data": ("vidlora.checkpoint", "vidlora.training", "vidlora.infer", "vidlora.eval", "vidlora.args",
             "vidlora.train", "vidlora.check", "vidlora.cli"),
    "checkpoint.py": ("vidlora.training", "vidlora.infer", "vidlora.eval", "vidlora.args", "vidlora.cli"),
    "jsonl.py": ("vidlora.data", "vidlora.model", "vidlora.training", "vidlora.infer"),
    "training": ("vidlora.infer", "vidlora.eval", "vidlora.cli", "vidlora.check", "vidlora.demo"),
    "infer": ("vidlora.training", "vidlora.train", "vidlora.check", "vidlora.cli", "vidlora.args"),
    "eval": ("vidlora.training", "vidlora.train", "vidlora.infer", "vidlora.cli", "vidlora.args"),
}  # fmt: skip


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("part", list(FORBIDDEN))
def test_no_upward_imports(part):
    files = [SRC / part] if part.endswith(".py") else sorted((SRC / part).rglob("*.py"))
    found = [
        f"{path.relative_to(SRC)} imports {name}"
        for path in files
        for name in sorted(imported_modules(path))
        if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[part])
    ]
    assert found == []
