import json

import pytest
from click.testing import CliRunner

from mlxmoe.cli import main
from mlxmoe.bundle.plan import PRESETS, counts_from_config, counts_from_headers, node_bytes, parse_nodes, plan


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS.glob("*.json")))
def test_presets_match_published_parameter_counts(preset):
    cfg = json.loads((PRESETS / f"{preset}.json").read_text())
    k = counts_from_config(cfg)
    assert abs(k.total / cfg["_published_params"] - 1) < 0.02, (preset, k.total / 1e9)
    assert abs(k.active / cfg["_published_active"] - 1) < 0.10, (preset, k.active / 1e9)


def test_headers_agree_with_config_arithmetic(ckpt):
    for arch in ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3"):
        src = ckpt(arch)
        a, b = counts_from_headers(str(src)), counts_from_config(json.loads((src / "config.json").read_text()))
        assert a == b, arch


def test_plan_arithmetic_and_fit():
    r = plan("qwen3-30b-a3b", parse_nodes("3x16GB"), bits=4, trunk_bits=8, group_size=64, overlay_per_layer=2,
             context=8192, kv_bits=8)
    b = r["per_node"]
    assert r["n_groups"] == 3 and b["total"] == pytest.approx(b["trunk"] + b["group"] + b["overlay"] + b["kv"])
    assert 4.5e9 < b["group"] < 5.5e9  # 43 of 128 experts x 48 layers x 4.7M params at ~4.5 bits
    assert b["kv"] == pytest.approx(2 * 48 * 4 * 128 * 8192 * (1 + 4 / 64))
    assert all(n["fits"] for n in r["nodes"]) and r["smallest_fitting_groups"] <= 3
    big = plan("kimi-k2.5", parse_nodes("3x128GB"), bits=4, trunk_bits=8, group_size=64, overlay_per_layer=0,
               context=32768, kv_bits=8)
    assert not any(n["fits"] for n in big["nodes"]) and big["smallest_fitting_groups"] > 3


def test_cli_plan(ckpt):
    r = CliRunner().invoke(main, ["plan", "mixtral-8x7b", "--nodes", "2x64GB"])
    assert r.exit_code == 0 and "46.7B parameters" in r.output and "smallest group count that fits" in r.output
    r = CliRunner().invoke(main, ["plan", str(ckpt("olmoe")), "--nodes", "8GB", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["basis"] == "safetensors headers"
    r = CliRunner().invoke(main, ["plan", "mixtral-8x7b", "--nodes", "lots"])
    assert r.exit_code != 0 and "expected e.g. 3x64GB" in r.output


def test_plan_says_gpt_oss_kv_stays_16_bit(ckpt):
    r = plan(str(ckpt("gpt_oss")), parse_nodes("2x16GB"), context=1024, kv_bits=8)
    k = r["counts"]
    assert k["kv_plain_elems_per_token"] == k["kv_elems_per_token"] and "16-bit" in r["kv_note"]
    assert r["per_node"]["kv"] == pytest.approx(k["kv_elems_per_token"] * 1024 * 2)
    assert plan(str(ckpt("gpt_oss")), parse_nodes("16GB"), kv_bits=None)["kv_note"] is None
    assert plan(str(ckpt("qwen3_moe")), parse_nodes("16GB"), kv_bits=8)["kv_note"] is None
    out = CliRunner().invoke(main, ["plan", str(ckpt("gpt_oss")), "--nodes", "16GB"]).output
    assert "kv: 100% of the KV cache stays 16-bit" in out
