"""The deep reference family's pure parts: global-batch load balancing
(tools/train_reference_moe.py) and the size arithmetic that picks its dims
(tools/train_family.py), the latter checked against mlx's own quantization."""

import importlib.util
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def load(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


trm = load("train_reference_moe")
fam = load("train_family")


def test_balance_loss_is_one_for_a_uniform_router_and_e_for_a_collapsed_one():
    torch = pytest.importorskip("torch")
    uniform = [torch.zeros(64, 8)]
    assert float(trm.balance_loss(uniform, 2, 8)) == pytest.approx(1.0)
    collapsed = torch.full((64, 8), -30.0)
    collapsed[:, 0] = 30.0
    assert float(trm.balance_loss([collapsed], 1, 8)) == pytest.approx(8.0, rel=1e-3)


def test_global_batch_balancing_lets_sequences_specialise():
    """Two sequences, each on its own half of the experts: balanced over the batch
    (global loss ~1), unbalanced within each sequence (per-sequence loss ~2)."""
    torch = pytest.importorskip("torch")
    rl = torch.full((2, 16, 4), -30.0)
    rl[0, ::2, 0] = rl[0, 1::2, 1] = 30.0
    rl[1, ::2, 2] = rl[1, 1::2, 3] = 30.0
    rl = rl.reshape(32, 4)
    assert float(trm.balance_loss([rl], 1, 4, groups=1)) == pytest.approx(1.0, rel=1e-3)
    assert float(trm.balance_loss([rl], 1, 4, groups=2)) == pytest.approx(2.0, rel=1e-3)
    assert float(trm.balance_loss([rl, rl], 1, 4)) == pytest.approx(1.0, rel=1e-3)  # mean over layers


def test_agreed_steps_waits_for_all_then_takes_the_minimum(tmp_path):
    trm.post_steps(str(tmp_path), "a", 900)
    assert trm.agreed_steps(str(tmp_path), 2, give_up=False) is None
    assert trm.agreed_steps(str(tmp_path), 2, give_up=True) == 900
    trm.post_steps(str(tmp_path), "b", 700)
    assert trm.agreed_steps(str(tmp_path), 2, give_up=False) == 700


def test_the_family_fits_and_the_alternatives_fit_one_node():
    f = fam.family()
    deep, alt_a, alt_b = f["deep-moe"], f["single-64e"], f["single-shallow"]
    assert deep["layers"] >= 16 and deep["experts"] == 128 and deep["top_k"] == 8
    assert f["deep-moe-shared"]["shared_intermediate"] == deep["moe_intermediate"]
    for spec in f.values():
        assert fam.quantized_bytes(**spec) <= fam.LIMIT_BYTES
    assert alt_a["layers"] == deep["layers"] and alt_a["experts"] == 64
    budget = fam.quantized_bytes(**alt_a)
    assert alt_b["experts"] == 128 and alt_b["layers"] < deep["layers"]
    assert fam.quantized_bytes(**alt_b) <= budget < fam.quantized_bytes(**{**alt_b, "layers": alt_b["layers"] + 1})
    with pytest.raises(AssertionError):
        fam.quantized_bytes(**{**deep, "moe_intermediate": 48})


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_size_arithmetic_matches_mlx_quantization(arch):
    import importlib

    dims = {"layers": 2, "experts": 4, "top_k": 2, "hidden": 128, "heads": 4, "kv_heads": 2,
            "moe_intermediate": 64, "vocab": 256}
    shared = 64 if arch == "qwen2_moe" else 0
    mod = importlib.import_module(f"mlx_lm.models.{arch}")
    args = mod.ModelArgs.from_dict(dict(
        model_type=arch, hidden_size=128, num_hidden_layers=2, intermediate_size=256, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
        moe_intermediate_size=64, rms_norm_eps=1e-6, vocab_size=256, rope_theta=1e6, max_position_embeddings=512,
        tie_word_embeddings=False, head_dim=32, norm_topk_prob=True, shared_expert_intermediate_size=shared))
    model = mod.Model(args)
    model.set_dtype(mx.bfloat16)
    nn.quantize(model, group_size=64, bits=4, class_predicate=lambda p, m: hasattr(m, "to_quantized")
                and fam.keep_gates(p, m))
    real = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    assert fam.quantized_bytes(**dims, shared_intermediate=shared, qkv_bias=arch == "qwen2_moe") == real


def test_deep_suites_are_well_formed_and_keep_the_unseen_kinds_apart():
    import json

    suites = Path(__file__).resolve().parents[2] / "mlxmoe" / "assets" / "suites"
    recs = {n: [json.loads(line) for line in (suites / f"deep-{n}.jsonl").read_text(encoding="utf-8").splitlines()]
            for n in ("heldout", "calibration", "unseen")}
    trained = {r["domain"] for r in recs["heldout"]}
    assert len(trained) >= 10 and trained == {r["domain"] for r in recs["calibration"]}
    assert {r["domain"] for r in recs["unseen"]} == {"man_page", "markdown", "c_header"}
    for name, rs in recs.items():
        assert all(set(r) == {"domain", "text"} and 200 <= len(r["text"]) <= 400 for r in rs), name
        counts = {}
        for r in rs:
            counts[r["domain"]] = counts.get(r["domain"], 0) + 1
        assert set(counts.values()) == {40}, (name, counts)
    texts = [{r["text"] for r in rs} for rs in recs.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
