"""The package layers import only downward: gptq_format <- models <- {quantizer, server} <- rpiq.

Checked from the source (every import statement, including those inside functions), so a lazy
import that runs back up fails here instead of hiding until some code path executes it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Which of our packages each package may import (besides itself).
ALLOWED: dict[str, set[str]] = {
    "gptq_format": set(),
    "models": {"gptq_format"},
    "quantizer": {"gptq_format", "models"},
    "server": {"gptq_format", "models"},
    "rpiq": {"gptq_format", "models", "quantizer", "server"},
}


def _imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_layers_below(package):
    bad = {
        str(f.relative_to(ROOT)): sorted(pkgs - ALLOWED[package] - {package})
        for f in sorted((ROOT / package).rglob("*.py"))
        if (pkgs := _imported_packages(f)) - ALLOWED[package] - {package}
    }
    assert not bad, f"{package} imports from layers above or beside it: {bad}"
