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


# ------------------------------------------------------------------ layouts (calibrate --budgets)

from test_eval_nodes import layout_bundle  # noqa: E402,F401  (the fixture: a layout made with 1x,1.5x,3x)


def test_plan_shows_a_layout_bundles_nodes_and_expected_quality(layout_bundle):
    from mlxmoe.bundle.manifest import Manifest

    b, _ = layout_bundle
    m = Manifest.load(b)
    r = plan(str(b), parse_nodes("24GB,64GB,192GB"), context=1024)
    lay = r["layout"]
    assert lay["budgets"] == ["1x", "1.5x", "3x"] and lay["coverage"] == m.calibration["layout"]["coverage"]
    for nd, want, held in zip(lay["nodes"], m.grouping["nodes"], m.calibration["layout"]["nodes"]):
        assert {k: nd[k] for k in want} == want and nd["fits"]
        q = held["held_out"]
        assert nd["expected"]["ppl_ratio"] == q["mean"]["ppl_ratio"] and nd["expected"]["agreement"] == q["mean"]["agreement"]
        assert nd["expected"]["worst_ppl_ratio"] == q["worst"]["ppl_ratio"]
    full = [nd for nd in lay["nodes"] if nd["full_model"]]
    assert full and all(nd["expected"]["ppl_ratio"] == pytest.approx(1.0, abs=2e-3) for nd in full)
    assert all("layout_set" not in n for n in r["nodes"])
    out = CliRunner().invoke(main, ["plan", str(b), "--nodes", "24GB,64GB,192GB"])
    assert out.exit_code == 0, out.output
    assert "layout (1x, 1.5x, 3x" in out.output and "every expert: the exact model" in out.output
    assert out.output.count("ppl x") == 3
    js = CliRunner().invoke(main, ["plan", str(b), "--nodes", "24GB,64GB,192GB", "--json"])
    assert js.exit_code == 0 and len(json.loads(js.output)["layout"]["nodes"]) == 3


def test_plan_says_what_calibrate_budgets_would_give_each_node():
    from mlxmoe.quality.layout import node_slots

    r = CliRunner().invoke(main, ["plan", "qwen3-235b-a22b", "--nodes", "24GB,64GB,192GB", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    k, b = rep["counts"], rep["per_node"]
    every = k["n_experts"] * k["n_moe_layers"]
    small, mid, big = (n["layout_set"] for n in rep["nodes"])
    assert small["experts"] is None and "top_k" in small["why"]  # 18 GB usable: trunk + KV leave too little
    assert mid["experts"] == node_slots([("bytes", 64e9)], k["n_experts"], k["n_moe_layers"], rep["expert_bytes"],
                                        b["trunk"], b["kv"], 0.75, k["top_k"])[0]
    assert 0 < mid["experts"] < every and not mid["full_model"]
    assert big["experts"] == every and big["full_model"]
    assert "layout" not in rep
    out = CliRunner().invoke(main, ["plan", "qwen3-235b-a22b", "--nodes", "24GB,64GB,192GB"]).output
    assert f"{mid['experts']} of {every} experts" in out and "every expert: the exact model" in out


def test_plan_says_how_much_of_the_model_the_macs_hold_together():
    r = CliRunner().invoke(main, ["plan", "qwen3-235b-a22b", "--nodes", "24GB,32GB,48GB"])
    assert r.exit_code == 0 and "together:" in r.output and "least used left out" in r.output
    r = CliRunner().invoke(main, ["plan", "qwen3-235b-a22b", "--nodes", "3x192GB", "--json"])
    assert json.loads(r.output)["layout_coverage"]["coverage"] == 1.0
