"""The committed reference MoE (mlxmoe/assets/reference-moe) loads in transformers and
mlx-lm, generates, and both agree on the logits; the prompt suites are well formed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "mlxmoe" / "assets" / "reference-moe"
SUITES = REPO / "mlxmoe" / "assets" / "suites"
DOMAINS = {"code", "prose_en", "prose_de", "prose_es", "prose_it", "structured"}
PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def test_repo_layout_is_a_released_checkpoint():
    cfg = json.loads((MODEL / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe"
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"]
    assert cfg["num_experts"] == 48 and cfg["num_experts_per_tok"] == 6
    assert cfg["rope_theta"] == 1e6
    assert cfg["norm_topk_prob"] is True and cfg["tie_word_embeddings"] is False
    assert cfg["output_router_logits"] is False
    index = json.loads((MODEL / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(s.startswith("model-") and (MODEL / s).is_file() for s in shards)
    keys = set(index["weight_map"])
    for layer in range(cfg["num_hidden_layers"]):
        for e in (0, cfg["num_experts"] - 1):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" in keys
        assert f"model.layers.{layer}.mlp.gate.weight" in keys
    assert "lm_head.weight" in keys
    total = sum(p.stat().st_size for p in MODEL.iterdir())
    assert total <= 40 * 2**20
    tc = json.loads((MODEL / "tokenizer_config.json").read_text())
    assert tc["eos_token"] == "<|im_end|>" and "<|im_start|>" in tc["chat_template"]
    for name in ("generation_config.json", "tokenizer.json", "TRAINING.md", "training_report.json"):
        assert (MODEL / name).is_file()


def test_training_report_beats_unigram_everywhere():
    rep = json.loads((MODEL / "training_report.json").read_text())
    doms = rep["eval"]["domains"]
    assert set(doms) == DOMAINS
    for d, r in doms.items():
        assert r["loss"] < r["unigram_loss"] - 1.0, d
    assert len(rep["eval"]["layers"]) == 6


@pytest.mark.parametrize("name", ["heldout.jsonl", "calibration.jsonl"])
def test_suites(name):
    path = SUITES / name
    assert path.stat().st_size < 300_000
    recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    counts = {d: 0 for d in DOMAINS}
    for r in recs:
        assert set(r) == {"domain", "text"}
        assert 200 <= len(r["text"]) <= 400
        counts[r["domain"]] += 1
    assert all(c == 40 for c in counts.values()), counts
    assert len({r["text"] for r in recs}) == len(recs)


@pytest.fixture(scope="module")
def hf():
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(MODEL)
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    model.eval()
    return torch, tok, model


def test_transformers_chat_template_and_generate(hf):
    torch, tok, model = hf
    text = tok.apply_chat_template([{"role": "user", "content": "Tell me a fortune."}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nTell me a fortune.<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.convert_tokens_to_ids("<|im_start|>")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False)
    new = out[0, ids.shape[1]:]
    assert len(new) > 0
    assert tok.decode(new, skip_special_tokens=True).strip()
    # the model has learnt code: greedy continuation of a def is indented Python
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    cont = tok.decode(out[0, ids.shape[1]:])
    assert cont.startswith("    "), repr(cont)


def test_mlx_lm_matches_transformers(hf):
    torch, tok, model = hf
    import mlx.core as mx
    import mlx_lm

    m, t = mlx_lm.load(str(MODEL))
    m.set_dtype(mx.float32)  # unquantized MoE gather_mm on mlx's CPU backend needs float32
    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert list(t.encode(PROMPT)) == ids[0].tolist()
    with torch.no_grad():
        ref = model(ids).logits[0].numpy()
    got = np.array(m(mx.array(ids.numpy()))[0])
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())
    assert (got.argmax(-1) == ref.argmax(-1)).all()
