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


def test_run_summary_is_mlx_lms_and_says_why_a_rate_is_missing():
    from mlxmoe.commands.run import summary

    stats = {"group": 1, "prompt_tokens": 16, "generated_tokens": 30, "ttft_s": 0.32, "prompt_tok_s": 50.0,
             "decode_tok_s": 51.25, "peak_memory_gb": 0.0123, "peak_memory_source": "mlx"}
    assert summary(stats)[2:] == ["Prompt: 16 tokens, 50.000 tokens-per-sec",
                                  "Generation: 30 tokens, 51.250 tokens-per-sec", "Peak memory: 0.012 GB"]
    one = {**stats, "generated_tokens": 1, "decode_tok_s": None, "peak_memory_gb": 0.3,
           "peak_memory_source": "process peak RSS"}
    lines = summary(one)
    assert "None" not in "\n".join(lines)
    assert lines[3] == "Generation: 1 tokens, n/a (the answer ended after its first token: no decode step to time)"
    assert lines[4] == "Peak memory: 0.300 GB (process peak RSS; MLX reports none here)"


def test_peak_memory_falls_back_to_peak_rss(monkeypatch):
    import mlx.core as mx

    from mlxmoe.node.local import peak_memory

    monkeypatch.setattr(mx, "get_peak_memory", lambda: 0)  # what a CPU build may report
    m = peak_memory()
    assert m["peak_memory_source"] == "process peak RSS" and 0.001 < m["peak_memory_gb"] < 1000


def test_a_missing_path_is_no_such_directory_and_only_a_repo_id_gets_hf_download(tmp_path):
    for source in ("/nonexistent", "./nope", "~/nope-mlxmoe", "a/b/c", str(tmp_path / "x")):
        r = CliRunner().invoke(main, ["split", source, str(tmp_path / "out"), "--groups", "2"])
        assert r.exit_code == 1 and f"Error: no such directory: {source}\n" == r.output, r.output
        assert "hf download" not in r.output
    r = CliRunner().invoke(main, ["plan", "/nonexistent"])
    assert r.exit_code == 1 and r.output == "Error: no such file or directory: /nonexistent\n"
    r = CliRunner().invoke(main, ["split", "nobody/no-such-model", str(tmp_path / "out"), "--groups", "2"])
    assert r.exit_code == 1 and "`hf download nobody/no-such-model`" in r.output


def test_help_examples_stay_one_per_line():
    for verb, example in [("plan", "mlxmoe plan qwen3-235b-a22b --nodes 3x128GB --context 32768"),
                          ("plan", "mlxmoe plan qwen3-235b-a22b --nodes 3x192GB --chip m3-ultra --link tb5"),
                          ("split", "mlxmoe split Qwen/Qwen3-30B-A3B bundles/qwen3-30b --groups 3"),
                          ("copy", "mlxmoe copy ~/bundles/qwen3-30b /Volumes/USB/qwen3-30b --group 1")]:
        out = CliRunner().invoke(main, [verb, "--help"], terminal_width=60).output
        assert f"\n      {example}\n" in out, out


def test_copy_help_lists_the_files_it_promises():
    out = CliRunner().invoke(main, ["copy", "--help"]).output
    assert "--help` lists" not in out
    for name in ("distribution.json", "trunk.safetensors", "experts-group-GG.safetensors",
                 "experts-overlay.safetensors", "heal-group-GG.safetensors"):
        assert f"\n      {name}" in out, out


def test_unknown_plan_preset_lists_the_presets():
    r = CliRunner().invoke(main, ["plan", "qwen3-999b"])
    assert r.exit_code == 1
    assert r.output.startswith("Error: qwen3-999b: no such directory, and not a preset (deepseek-v3, kimi-k2.5, ")
    assert "qwen3-30b-a3b" in r.output and "qwen3-235b-a22b" in r.output


def test_up_refuses_a_lan_router_without_an_api_key(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXMOE_HOME", str(tmp_path))
    monkeypatch.delenv("MLXMOE_API_KEY", raising=False)
    r = CliRunner().invoke(main, ["up", "reference-moe", "--router-host", "10.1.2.3", "--memory", "1GB"])
    assert r.exit_code != 0 and "API key" in r.output and "10.1.2.3" in r.output
