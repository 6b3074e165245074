"""Architecture adapters: which tensors are routed experts, how they are named
or packed, and the MoE facts of each supported model family.

Everything that is not a routed expert is trunk (shared experts, router gates
and DeepSeek's e_score_correction_bias included)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from mlxmoe.errors import CheckpointError

# HF per-expert projection names -> MLX SwitchGLU projection names.
_W123 = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_GLU = {p: p for p in ("gate_proj", "up_proj", "down_proj")}


@dataclass(frozen=True)
class Arch:
    name: str
    block: str  # attribute of a decoder layer holding the MoE block
    gate: str  # attribute of the MoE block holding the router
    experts: str  # attribute of the MoE block holding the SwitchGLU
    hf_experts: str  # HF module path of the per-expert list inside the block
    proj: dict  # HF projection name -> MLX projection name
    scoring: str  # "softmax" | "softmax_topk" | "sigmoid_group"
    packed: bool = False  # gpt_oss: experts stored as [E, ...] fused tensors

    def expert_re(self):
        """Matches HF names of routed-expert tensors: (layer, expert, proj, kind)."""
        if self.packed:
            return re.compile(
                rf"^model\.layers\.(\d+)\.{self.block}\.{self.hf_experts}\.(gate_up_proj|down_proj)(_bias|_blocks|_scales)?$"
            )
        projs = "|".join(self.proj)
        return re.compile(
            rf"^model\.layers\.(\d+)\.{self.block}\.{self.hf_experts}\.(\d+)\.({projs})\.(weight|bias|scales|biases)$"
        )

    def mlx_expert_re(self):
        """Matches MLX (stacked) names: model.layers.L.<block>.<experts>.<proj>.<kind>."""
        return re.compile(
            rf"^model\.layers\.(\d+)\.{self.block}\.{self.experts}\.(gate_proj|up_proj|down_proj)\.(weight|scales|biases|bias)$"
        )

    def mlx_name(self, layer: int, proj: str, kind: str) -> str:
        return f"model.layers.{layer}.{self.block}.{self.experts}.{proj}.{kind}"

    def is_gate(self, name: str) -> bool:
        """Router gates (and correction biases) stay unquantized: placement reads them."""
        return f".{self.block}.{self.gate}." in name or name.endswith("shared_expert_gate.weight")


ARCHS = {
    "qwen3_moe": Arch("qwen3_moe", "mlp", "gate", "switch_mlp", "experts", _GLU, "softmax"),
    "qwen2_moe": Arch("qwen2_moe", "mlp", "gate", "switch_mlp", "experts", _GLU, "softmax"),
    "olmoe": Arch("olmoe", "mlp", "gate", "switch_mlp", "experts", _GLU, "softmax"),
    "mixtral": Arch("mixtral", "block_sparse_moe", "gate", "switch_mlp", "experts", _W123, "softmax_topk"),
    "deepseek_v3": Arch("deepseek_v3", "mlp", "gate", "switch_mlp", "experts", _GLU, "sigmoid_group"),
    "kimi_k2": Arch("kimi_k2", "mlp", "gate", "switch_mlp", "experts", _GLU, "sigmoid_group"),
    "gpt_oss": Arch("gpt_oss", "mlp", "router", "experts", "experts", {}, "softmax_topk", packed=True),
}


def get_arch(model_type: str | None, where: str = "config.json") -> Arch:
    if model_type not in ARCHS:
        raise CheckpointError(
            f"{where}: model_type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHS))}"
        )
    return ARCHS[model_type]


def normalize_config(config: dict) -> dict:
    """Accept both the released and the transformers-v5 spellings, so mlx-lm's
    ModelArgs finds what it needs (num_experts / num_local_experts, rope_theta)."""
    c = dict(config)
    if "text_config" in c and "model_type" in c["text_config"] and c.get("model_type") not in ARCHS:
        c = {**c["text_config"], **{k: v for k, v in c.items() if k == "quantization"}}
    for a, b in (("num_experts", "num_local_experts"), ("num_local_experts", "num_experts")):
        if a not in c and b in c:
            c[a] = c[b]
    rp = c.get("rope_parameters")
    if isinstance(rp, dict):
        c.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
        if rp.get("rope_type", "default") != "default" and not c.get("rope_scaling"):
            c["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    return c


@dataclass
class MoEFacts:
    n_layers: int
    moe_layers: list
    n_experts: int
    top_k: int
    scoring: str
    norm_topk_prob: bool
    n_group: int = 1
    topk_group: int = 1

    def to_dict(self):
        return asdict(self)


def moe_facts(config: dict) -> MoEFacts:
    c = normalize_config(config)
    arch = get_arch(c.get("model_type"))
    n = int(c["num_hidden_layers"])
    if arch.scoring == "sigmoid_group":
        e = int(c["n_routed_experts"])
        first, freq = int(c.get("first_k_dense_replace", 0)), int(c.get("moe_layer_freq", 1))
        layers = [i for i in range(n) if i >= first and i % freq == 0]
        return MoEFacts(n, layers, e, int(c["num_experts_per_tok"]), arch.scoring,
                        bool(c.get("norm_topk_prob", True)), int(c.get("n_group") or 1),
                        int(c.get("topk_group") or 1))
    e = int(c.get("num_experts") or c.get("num_local_experts"))
    if arch.name in ("qwen3_moe", "qwen2_moe"):
        step, dense = int(c.get("decoder_sparse_step", 1)), set(c.get("mlp_only_layers") or [])
        layers = [i for i in range(n) if i not in dense and (i + 1) % step == 0]
    else:
        layers = list(range(n))
    norm = bool(c.get("norm_topk_prob", arch.scoring == "softmax_topk"))
    return MoEFacts(n, layers, e, int(c["num_experts_per_tok"]), arch.scoring, norm)
