"""The command line is apart from the library: every verb lives in
mlxmoe/commands/, `mlxmoe --help` lists them all, library packages and
base modules import no click."""

import ast
from pathlib import Path

from click.testing import CliRunner

from mlxmoe.cli import COMMANDS, main

PKG = Path(__file__).parents[2] / "mlxmoe"
LIBRARY = ("bundle", "kernels", "model", "node", "quality", "cluster", "ui")


def test_every_command_is_a_commands_module_and_listed_in_help():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    for name, (mod, attr, _) in COMMANDS.items():
        assert mod == f"mlxmoe.commands.{name}" and (PKG / "commands" / f"{name}.py").is_file()
        assert f"  {name} " in r.output
        assert CliRunner().invoke(main, [name, "--help"]).exit_code == 0


def test_library_packages_import_no_click():
    bad = []
    base = [f for f in PKG.glob("*.py") if f.name != "cli.py"]  # errors, units, progress, modes, wire, ...
    for f in base + [f for pkg in LIBRARY for f in (PKG / pkg).rglob("*.py")]:
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{f.relative_to(PKG)}: {n}" for n in names if n.split(".")[0] == "click"]
    assert bad == []


def test_node_stream_limits_are_checked_before_anything_loads(tmp_path):
    for args in (["--max-streams", "0"], ["--max-queue", "-1"], ["--max-streams", "many"]):
        r = CliRunner().invoke(main, ["node", str(tmp_path), "--group", "0", *args])
        assert r.exit_code == 2 and args[0] in r.output
