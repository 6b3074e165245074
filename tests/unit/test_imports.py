"""Import structure, beside the layer rule (test_layers.py): no module-level
import cycle among mlxmoe's modules (imports guarded by TYPE_CHECKING count:
a cycle of types is still one of design), and the node's server loads nothing
of the router or its API."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[2] / "mlxmoe"


def module_name(f: Path) -> str:
    parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(f): f for f in PACKAGE.rglob("*.py")}


def statements(tree: ast.Module, lazy: bool) -> list:
    """The import statements of a module: those run at import time (at top level,
    or under a top-level if/try/with), and with `lazy` those inside functions too."""
    if lazy:
        return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    out = []

    def visit(body: list) -> None:
        for n in body:
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                out.append(n)
            elif isinstance(n, (ast.If, ast.Try, ast.With)):
                for block in (getattr(n, "body", []), getattr(n, "orelse", []), getattr(n, "finalbody", []),
                              *[h.body for h in getattr(n, "handlers", [])]):
                    visit(block)

    visit(tree.body)
    return out


def targets(module: str, lazy: bool = False) -> set[str]:
    """The mlxmoe modules `module` imports: `from pkg import name` names the
    submodule pkg.name when there is one, else pkg itself."""
    f = MODULES[module]
    package = module if f.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for n in statements(ast.parse(f.read_text(), str(f)), lazy):
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names if a.name in MODULES}
            continue
        base = n.module or ""
        if n.level:  # relative: against the importing module's package
            parts = package.split(".")
            base = ".".join(parts[:len(parts) - n.level + 1] + ([base] if base else []))
        for a in n.names:
            sub = f"{base}.{a.name}"
            out.add(sub if sub in MODULES else base)
    return {m for m in out if m in MODULES and m != module}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def loaded_by(module: str) -> set[str]:
    """Every module importing `module` loads: its own imports (lazy ones too), then
    theirs at import time, with each one's parent packages (their __init__ runs first)."""
    seen, todo = set(), list(targets(module, lazy=True))
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parents = [".".join(m.split(".")[:i]) for i in range(1, m.count(".") + 1)]
        todo += [p for p in parents if p in MODULES] + sorted(targets(m))
    return seen


def test_no_import_cycle():
    found = cycles({m: targets(m) for m in MODULES})
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_cycle_check_sees_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_from_a_package_import_a_module_is_that_module():
    assert "mlxmoe.cluster.router.ranking" in targets("mlxmoe.cluster.router.fleet")
    assert "mlxmoe.wire" in targets("mlxmoe.cluster.node_server")  # from mlxmoe import wire


def test_the_node_server_loads_nothing_of_the_router_or_its_api():
    bad = sorted(m for m in loaded_by("mlxmoe.cluster.node_server")
                 if m.startswith(("mlxmoe.cluster.router", "mlxmoe.cluster.api")))
    assert not bad, f"node_server.py loads {bad}"
    assert "mlxmoe.cluster.accesslog" in loaded_by("mlxmoe.cluster.node_server")
