"""Every third-party module the package (or its tests) imports is a declared
dependency: an undeclared one works only where some other Python happens to
have it (cryptography did, until a fresh venv showed it)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOCAL = {p.stem for d in ("tests", "tools") for p in (ROOT / d).rglob("*.py")}  # tests put tools/ on sys.path
# modules of optional extras that need not be installed on this (Linux) machine, by distribution name
NOT_HERE = {"rumps": "rumps", "matplotlib": "matplotlib"}


def imported_modules(folder: Path) -> dict[str, str]:
    """Top-level module -> one file importing it, every import (lazy ones too)."""
    out = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                out.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return out


def third_party(modules: dict[str, str]) -> dict[str, str]:
    return {m: f for m, f in modules.items()
            if m not in sys.stdlib_module_names and m != "mlxmoe" and m not in LOCAL}


def declared(*extras: str) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return {normalise(re.match(r"[A-Za-z0-9_.\-]+", r).group(0)) for r in reqs}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def distributions(module: str) -> set[str]:
    found = {normalise(d) for d in packages_distributions().get(module, [])}
    return found or ({NOT_HERE[module]} if module in NOT_HERE else set())


def undeclared(folder: str, *extras: str) -> list[str]:
    names = declared(*extras)
    return [f"{m} (imported in {f}; installed by {sorted(distributions(m)) or 'nothing'})"
            for m, f in sorted(third_party(imported_modules(ROOT / folder)).items())
            if not distributions(m) & names]


def test_package_imports_are_declared():
    # optional extras: the menu-bar app (rumps, macOS) and eval --plot (matplotlib)
    missing = undeclared("mlxmoe", "menubar", "plot")
    assert not missing, "imported but not declared in pyproject.toml: " + "; ".join(missing)


def test_optional_imports_are_in_their_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert any(r.startswith("rumps") for r in extras["menubar"])
    assert any(r.startswith("matplotlib") for r in extras["plot"])


def test_test_imports_are_declared():
    missing = undeclared("tests", "test")
    assert not missing, "tests import modules not declared in the test extra: " + "; ".join(missing)
