"""The layer rule: a module never imports from a higher layer, lazily inside
a function included (every import statement of every module under mlxmoe/)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[2] / "mlxmoe"
# base modules (usable by all) 0 < bundle < kernels, model < node < quality < cluster < ui < commands, cli
RANK = {"errors": 0, "units": 0, "progress": 0, "modes": 0, "wire": 0, "params": 0, "children": 0, "__init__": 0,
        "bundle": 1, "kernels": 2, "model": 2, "node": 3, "quality": 4, "cluster": 5, "ui": 6,
        "commands": 7, "cli": 7}


def layer(module: str) -> str:
    """mlxmoe.<layer>[...] -> <layer>; the package itself is base."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported(tree: ast.AST, package: str) -> list[str]:
    """Every mlxmoe module a module's import statements name."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([mod] if mod else []))
            if mod == "mlxmoe":  # from mlxmoe import wire: the names are the modules
                names += [f"mlxmoe.{a.name}" for a in node.names]
            elif mod.startswith("mlxmoe."):
                names.append(mod)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.startswith("mlxmoe.")]
    return names


def violations() -> list[str]:
    bad = []
    for f in sorted(PACKAGE.rglob("*.py")):
        rel = f.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts)
        package = module if f.name == "__init__.py" else module.rsplit(".", 1)[0]
        me = layer(module)
        assert me in RANK, f"{rel}: layer {me!r} has no rank; add it to RANK"
        for name in imported(ast.parse(f.read_text(), str(f)), package.removesuffix(".__init__")):
            other = layer(name)
            if other in RANK and RANK[other] > RANK[me]:
                bad.append(f"{rel}.py ({me}, layer {RANK[me]}) imports {name} ({other}, layer {RANK[other]})")
    return bad


def test_no_module_imports_from_a_higher_layer():
    bad = violations()
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_the_check_sees_every_kind_of_import():
    tree = ast.parse("def f():\n    from mlxmoe.cluster import wire\nfrom mlxmoe import ui, errors\nimport mlxmoe.bundle.split\n")
    assert sorted(imported(tree, "mlxmoe.node")) == ["mlxmoe.bundle.split", "mlxmoe.cluster", "mlxmoe.errors", "mlxmoe.ui"]
    assert imported(ast.parse("from ..cluster import router\n"), "mlxmoe.node.remote") == ["mlxmoe.node.cluster"]
    assert imported(ast.parse("from ...cluster import router\n"), "mlxmoe.node.remote") == ["mlxmoe.cluster"]
