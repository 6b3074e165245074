"""Tiny checkpoints written by `transformers` (real HF tensor names and an
independent reference implementation) and a tiny tokenizer with a chat template."""

from __future__ import annotations

import json
from pathlib import Path

COMMON = dict(vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=False)
ARCHS = {
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=64,
                      head_dim=32, norm_topk_prob=True),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=64,
                      shared_expert_intermediate_size=64),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, head_dim=32),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=32),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=64,
                        n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1, kv_lora_rank=32,
                        q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32,
                        routed_scaling_factor=1.0, norm_topk_prob=True),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, head_dim=32,
                    sliding_window=16, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_TEXT = ["the quick brown fox jumps over the lazy dog", "def add(a, b):\n    return a + b\n",
         "le renard brun saute par dessus le chien", '{"name": "mlxmoe", "groups": 3}',
         "Mixture of experts models route each token to a few experts."] * 20


def write_tokenizer(path: Path, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(_TEXT, trainers.BpeTrainer(vocab_size=vocab_size - 8, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def make_checkpoint(arch: str, path, *, seed: int = 0, shard_size: str | None = None, tokenizer: bool = True,
                    poison=None, **overrides) -> Path:
    """Write a random tiny `arch` model with transformers. `poison(name, tensor)`
    may edit tensors before saving (e.g. NaN experts)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    path = Path(path)
    cfg = AutoConfig.for_model(arch, **{**COMMON, **ARCHS[arch], **overrides})
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("e_score_correction_bias") or name.endswith("sinks"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
            else:
                p.copy_(torch.randn_like(p) * 0.08)
            if poison:
                poison(name, p)
    model.save_pretrained(path, **({"max_shard_size": shard_size} if shard_size else {}))
    if tokenizer:
        write_tokenizer(path, cfg.vocab_size)
    return path


def hf_model(path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def config(path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


# A suite of three kinds of text for the tiny tokenizer (layouts need one domain cluster per node).
SUITE = [{"domain": d, "text": t} for d, texts in {
    "code": ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n",
             "class A:\n    def f(self):\n        return 1\n", "import os\nprint(os.getcwd())\n",
             "while True:\n    break\n", "x = [i * i for i in range(5)]\n"],
    "prose": ["the quick brown fox jumps over the lazy dog", "a mixture of experts routes each token",
              "the dog sleeps in the sun all day long", "mixture models of experts are large",
              "the fox runs over the hill and away", "each token goes to a few experts"],
    "records": ['{"name": "mlxmoe", "groups": 3}', '{"id": 1, "ok": true}', '{"a": [1, 2, 3]}',
                '{"key": "value", "n": 42}', '{"x": 1.5, "y": -2}', '{"list": [], "map": {}}'],
}.items() for t in texts]


def make_layout(d: Path, budgets=(("ratio", 1.0), ("ratio", 1.3), ("ratio", 2.0))) -> tuple[Path, dict]:
    """A tiny qwen3_moe split unquantized, then `calibrate --budgets`: three unequal nodes, the
    last holding every expert (its trunk dwarfs its experts: 2x a plain share holds them all).
    Returns (the layout bundle, its calibration report)."""
    from mlxmoe.bundle.split import split
    from mlxmoe.quality.calibrate import calibrate

    d = Path(d)
    src = make_checkpoint("qwen3_moe", d / "src", seed=5)
    split(str(src), d / "b", 2, bits=None, trunk_bits=None)
    suite = d / "suite.jsonl"
    suite.write_text("\n".join(json.dumps(r) for r in SUITE))
    r = calibrate(d / "b", [str(suite)], out=d / "lay", budgets=list(budgets))
    return d / "lay", r["calibration"]["layout"]
