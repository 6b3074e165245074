"""`mlxmoe plan`: per-node memory for a model on your Macs, before you download
or split anything. Reads config.json (and safetensors headers when present)
only: trunk + group + overlay + KV per node, and the smallest group count
that fits."""

from __future__ import annotations

from mlxmoe import ASSETS

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path


from mlxmoe.bundle.arch import get_arch, moe_facts, normalize_config
from mlxmoe.errors import MlxMoeError

PRESETS = ASSETS / "models"  # a link to configs/models: ships in the wheel
GB = 1e9


@dataclass
class Counts:
    """Parameter counts by how they are stored on a node."""

    trunk_matrix: int  # quantizable trunk weights (embeddings, lm_head, attention, dense/shared MLPs)
    trunk_other: int  # kept in 16-bit: norms, biases, router gates
    expert: int  # one routed expert at one MoE layer
    n_moe_layers: int
    n_experts: int
    top_k: int
    kv_elems_per_token: int
    hidden: int = 0  # the shape the cost model needs (bundle/cost.py)
    vocab: int = 0
    n_layers: int = 0
    kv_plain_elems_per_token: int = 0  # of kv_elems_per_token, what stays 16-bit (KV_PLAIN)

    @property
    def total(self) -> int:
        return self.trunk_matrix + self.trunk_other + self.expert * self.n_experts * self.n_moe_layers

    @property
    def active(self) -> int:
        return self.trunk_matrix + self.trunk_other + self.expert * self.top_k * self.n_moe_layers


def _attention(c: dict) -> tuple[int, int]:
    """(matrix, other) parameters of one attention block."""
    H, nh = c["hidden_size"], c["num_attention_heads"]
    if "kv_lora_rank" in c:  # MLA (DeepSeek-V3, Kimi-K2)
        qd = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
        ql, kl = c.get("q_lora_rank"), c["kv_lora_rank"]
        q = H * ql + ql * nh * qd if ql else H * nh * qd
        mat = q + H * (kl + c["qk_rope_head_dim"]) + kl * nh * (c["qk_nope_head_dim"] + c["v_head_dim"]) + nh * c["v_head_dim"] * H
        return mat, (ql or 0) + kl
    hd = c.get("head_dim") or H // nh
    nkv = c.get("num_key_value_heads", nh)
    mat = 2 * H * nh * hd + 2 * H * nkv * hd
    bias = (nh + 2 * nkv) * hd if c["model_type"] in ("qwen2_moe", "gpt_oss") else 0
    qk_norm = {"qwen3_moe": 2 * hd, "olmoe": (nh + nkv) * hd}.get(c["model_type"], 0)
    return mat, bias + qk_norm


def _kv_elems(c: dict) -> int:
    L = c["num_hidden_layers"]
    if "kv_lora_rank" in c:
        return L * (c["kv_lora_rank"] + c["qk_rope_head_dim"])
    hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return 2 * L * c.get("num_key_value_heads", c["num_attention_heads"]) * hd


# Models whose KV cache mlx-lm cannot quantize (the node keeps it 16-bit, node/engine.py):
# gpt_oss's attention sinks have no quantized attention, and its sliding-window layers'
# RotatingKVCache no to_quantized.
KV_PLAIN = {"gpt_oss": "gpt_oss: attention sinks, sliding-window layers"}


def _kv_plain_elems(c: dict) -> int:
    return _kv_elems(c) if c["model_type"] in KV_PLAIN else 0


def counts_from_config(config: dict) -> Counts:
    c = normalize_config(config)
    f = moe_facts(c)
    H, L, V = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    moe_i = c.get("moe_intermediate_size") if c["model_type"] not in ("mixtral", "olmoe", "gpt_oss") else c["intermediate_size"]
    attn_mat, attn_other = _attention(c)
    n_moe, n_dense = len(f.moe_layers), L - len(f.moe_layers)
    mat = V * H * (1 if c.get("tie_word_embeddings") else 2) + L * attn_mat + n_dense * 3 * H * c.get("intermediate_size", 0)
    other = L * (attn_other + 2 * H) + H + n_moe * f.n_experts * H
    if c.get("shared_expert_intermediate_size"):  # qwen2_moe
        mat += n_moe * 3 * H * c["shared_expert_intermediate_size"]
        other += n_moe * H
    if c.get("n_shared_experts"):  # deepseek / kimi
        mat += n_moe * c["n_shared_experts"] * 3 * H * moe_i
        other += n_moe * f.n_experts
    return Counts(mat, other, 3 * H * moe_i, n_moe, f.n_experts, f.top_k, _kv_elems(c), H, V, L, _kv_plain_elems(c))


def counts_from_headers(source: str) -> Counts:
    """Exact counts from a checkpoint's safetensors headers (no weights read)."""
    from mlxmoe.bundle.checkpoint import open_source

    src = open_source(source)
    c = normalize_config(src.config)
    arch, f = get_arch(c["model_type"]), moe_facts(c)
    rx = arch.mlx_expert_re() if src.is_mlx else arch.expert_re()
    bits = (c.get("quantization") or {}).get("bits")
    mat = other = expert = 0
    for name in src.files:
        t = src.info(name)
        if name.endswith((".scales", ".biases")) or name.endswith("_scale_inv"):
            continue
        n = math.prod(t.shape) * (32 // bits if bits and t.dtype == "U32" else 1)
        if rx.match(name):
            expert += n
        elif len(t.shape) < 2 or arch.is_gate(name):
            other += n
        else:
            mat += n
    return Counts(mat, other, expert // max(1, f.n_experts * len(f.moe_layers)), len(f.moe_layers),
                  f.n_experts, f.top_k, _kv_elems(c), c["hidden_size"], c["vocab_size"], c["num_hidden_layers"],
                  _kv_plain_elems(c))


def qbytes(params: float, bits: int | None, group_size: int = 64) -> float:
    """Bytes of `params` weights quantized to `bits` (+ a 16-bit scale and bias per group)."""
    return params * 2 if not bits else params * bits / 8 + params / group_size * 4


def node_bytes(k: Counts, n_groups: int, *, bits=4, trunk_bits=8, group_size=64, overlay_per_layer=0,
               context=32768, kv_bits=8) -> dict:
    per_expert = qbytes(k.expert, bits, group_size)
    kv_per_elem = kv_bits / 8 + 4 / 64 if kv_bits else 2
    b = {
        "trunk": qbytes(k.trunk_matrix, trunk_bits, group_size) + 2 * k.trunk_other,
        "group": math.ceil(k.n_experts / n_groups) * k.n_moe_layers * per_expert,
        "overlay": overlay_per_layer * k.n_moe_layers * per_expert,
        "kv": ((k.kv_elems_per_token - k.kv_plain_elems_per_token) * kv_per_elem + k.kv_plain_elems_per_token * 2) * context,
    }
    b["total"] = sum(b.values())
    return b


def human_count(n: float) -> str:
    """A parameter count as people say it: 235.1B, 30.5M, 12.3K, 512."""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def size_unit(nbytes: float) -> tuple[str, float]:
    """GB for real models, MB below 1 GB (a small model's sizes read 0.00 GB)."""
    return ("GB", GB) if nbytes >= GB else ("MB", 1e6)


def parse_nodes(spec: str) -> list[float]:
    """'3x64GB' | '64GB,128GB' | '2x64GB,1x96GB' -> bytes per node."""
    out = []
    for part in spec.replace(" ", "").split(","):
        m = re.fullmatch(r"(?:(\d+)x)?(\d+(?:\.\d+)?)(GB|G|TB|T)?", part, re.I)
        if not m:
            raise MlxMoeError(f"--nodes {spec!r}: expected e.g. 3x64GB or 64GB,128GB")
        n, size, unit = int(m.group(1) or 1), float(m.group(2)), (m.group(3) or "GB").upper()
        out += [size * (1e12 if unit.startswith("T") else GB)] * n
    return out


def resolve_counts(source: str) -> tuple[Counts, str]:
    p = Path(source)
    preset = PRESETS / f"{source}.json"
    if not p.exists() and preset.exists():
        p = preset
    elif not p.exists() and "/" not in source:  # a bare name: a preset misspelt, most likely
        names = ", ".join(sorted(f.stem for f in PRESETS.glob("*.json")))
        raise MlxMoeError(f"{source}: no such directory, and not a preset ({names}) or a Hugging Face repo id "
                          "(owner/name)")
    if p.is_file():
        return counts_from_config(json.loads(p.read_text())), "config"
    if p.is_dir() and (p / "distribution.json").is_file() and (p / "config.json").is_file():
        return counts_from_config(json.loads((p / "config.json").read_text())), "bundle config"
    if p.is_dir() and any(p.glob("*.safetensors")):
        return counts_from_headers(source), "safetensors headers"
    if p.is_dir() and (p / "config.json").exists():
        return counts_from_config(json.loads((p / "config.json").read_text())), "config"
    return counts_from_headers(source), "safetensors headers"  # HF cache repo id


def heal_bytes(source: str) -> int:
    """A healed bundle's largest healed-parameter file (`calibrate --heal`): bytes a
    node reads at load and merges into weights it already holds (0: none)."""
    from mlxmoe.bundle.manifest import FILENAME, Manifest

    p = Path(source) / FILENAME
    return Manifest.load(p).heal_bytes() if p.is_file() else 0


def layout_of(source: str) -> dict | None:
    """A layout bundle's nodes (`calibrate --budgets`): per node its set (experts, bytes of trunk +
    experts from the bundle's files, mem_ratio, whole layers, full_model) and its expected quality,
    pinned, on the calibration suite's held-out passages (None where not measured). None: no layout."""
    from mlxmoe.bundle.manifest import FILENAME, Manifest

    p = Path(source) / FILENAME
    if not p.is_file():
        return None
    m = Manifest.load(p)
    if m.grouping.get("strategy") != "layout" or not m.grouping.get("nodes"):
        return None
    lay = (m.calibration or {}).get("layout") or {}
    measured = lay.get("nodes") or []
    out = []
    for g, nd in enumerate(m.grouping["nodes"]):
        q = (measured[g].get("held_out") if g < len(measured) else None) or None
        expected = q and {"ppl_ratio": q["mean"]["ppl_ratio"], "worst_ppl_ratio": q["worst"]["ppl_ratio"],
                          "agreement": q["mean"]["agreement"], "worst_agreement": q["worst"]["agreement"],
                          "kl": q["mean"]["kl"], "passages": q.get("passages")}
        out.append({"group": g, **{k: nd.get(k) for k in ("budget", "experts", "bytes", "mem_ratio", "whole_layers",
                                                           "full_model")}, "expected": expected})
    return {"budgets": lay.get("budgets") or [nd.get("budget") for nd in out], "nodes": out,
            "coverage": lay.get("coverage", 1.0), "placement_layers": m.placement_layers(),
            "slots_per_node": m.n_experts * len(m.moe_layers)}


def plan(source: str, nodes: list[float], *, headroom=0.75, **kw) -> dict:
    k, basis = resolve_counts(source)
    usable = [n * headroom for n in nodes]
    per = {n: node_bytes(k, n, **kw) for n in range(1, k.n_experts + 1)}
    fit = next((n for n, b in per.items() if b["total"] <= min(usable)), None)
    n_groups = min(len(nodes), k.n_experts)
    b = per[n_groups]
    r = {"source": source, "basis": basis, "params_total": k.total, "params_active": k.active,
         "counts": asdict(k), "n_groups": n_groups, "per_node": b, "heal_bytes_per_node": heal_bytes(source),
         "expert_bytes": qbytes(k.expert, kw.get("bits", 4), kw.get("group_size", 64)),
         "nodes": [{"memory": n, "usable": u, "fits": b["total"] <= u} for n, u in zip(nodes, usable)],
         "smallest_fitting_groups": fit, "settings": {**kw, "headroom": headroom},
         "kv_note": kv_note(k, kw.get("kv_bits", 8))}
    lay = layout_of(source)
    if lay is not None:
        if len(lay["nodes"]) == len(nodes):  # the layout's node g on the g-th Mac: its weights + KV
            for nd, u in zip(lay["nodes"], usable):
                nd["fits"] = nd["bytes"] + b["kv"] <= u
        r["layout"] = lay
    return r


def kv_note(k: Counts, kv_bits: int | None) -> str | None:
    """What of the KV cache stays 16-bit although --kv-bits asks otherwise (said by plan and the node)."""
    if not kv_bits or not k.kv_plain_elems_per_token:
        return None
    share = k.kv_plain_elems_per_token / k.kv_elems_per_token
    return f"{share:.0%} of the KV cache stays 16-bit: mlx-lm cannot quantize it for this model ({', '.join(KV_PLAIN.values())})"
