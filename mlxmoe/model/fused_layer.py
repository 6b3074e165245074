"""One decoded token through a whole decoder layer on the fused path.

A single-token decode step is bound by host time per op (~4-7 µs each on the
H100 machine, `mlxmoe bench --profile`), so beyond the MoE block the layer
around it is taken over too, where its shape allows:

  attention front  Qwen3 layers: input RMSNorm + q/k/v, then q/k RMSNorm +
                   RoPE: 2 kernels (mlxmoe/kernels/attn_front.py) instead of 14
                   ops; other layouts run mlx-lm's attention without o_proj
  KV cache + SDPA  mlx-lm's cache update and MLX's attention, unchanged
  tail             o_proj + residual, RMSNorm + router, the MoE step with its
                   residual add: 4 kernels (mlxmoe/kernels/layer_tail.py,
                   moe_step.py) instead of 7 launches

`reference` takes the same route through MLX ops (mlx-lm's own, in its
order): the CPU path, and what the kernels are checked against. The step is
a MoeState field (`layer_step`, `layer_args`: moe.set_layer_step); moe.MoeLayer
runs mlx-lm's layer instead, with the block path of fused.py alone, while the
router is masked, recording or hooked (eval, calibration, remote routing).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlxmoe.kernels import attn_front, layer_tail
from mlxmoe.kernels.attn_front import Front, FusedFront
from mlxmoe.kernels.layer_tail import FusedTail, QLinear, Tail
from mlxmoe.kernels.moe_step import FusedMoE, reference

from mlxmoe.model.moe import replaced_child, set_layer_step

PATHS = ("reference", "fused-cuda", "fused-metal")  # the paths that take layers over


def _qlinear(m) -> QLinear | None:
    if "scales" not in m or "bias" in m or getattr(m, "mode", "affine") != "affine" or m.get("biases") is None:
        return None
    return QLinear(m.weight, m.scales, m.biases, m.bits, m.group_size)


def tail_of(layer, arch) -> Tail | None:
    """The layer's Tail, or None if its shape is not the one the tail takes
    (pre-norm attention + MoE block, quantized o_proj, RMSNorm, bias-free router)."""
    attn, norm = getattr(layer, "self_attn", None), getattr(layer, "post_attention_layernorm", None)
    if attn is None or "o_proj" not in attn or type(norm) is not nn.RMSNorm or "input_layernorm" not in layer:
        return None
    o, gate = _qlinear(attn.o_proj), getattr(getattr(layer, arch.block), arch.gate)
    if o is None or "bias" in gate:
        return None
    router = _qlinear(gate) if "scales" in gate else gate.weight
    return None if router is None else Tail(o, norm.weight, norm.eps, router)


def front_of(layer) -> Front | None:
    """The layer's attention Front if it is Qwen3's (quantized bias-free q/k/v,
    per-head q/k RMSNorm, plain RoPE over the whole head), else None."""
    attn = layer.self_attn
    if not all(n in attn for n in ("q_proj", "k_proj", "v_proj", "q_norm", "k_norm")):
        return None
    rope, d = getattr(attn, "rope", None), attn.q_norm.weight.size
    if type(rope) is not nn.RoPE or rope.traditional or rope.scale != 1.0 or rope.dims != d:
        return None
    if any(type(m) is not nn.RMSNorm for m in (layer.input_layernorm, attn.q_norm, attn.k_norm)):
        return None
    q, k, v = (_qlinear(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj"))
    if None in (q, k, v) or attn.k_norm.weight.size != d:
        return None
    norm = layer.input_layernorm
    return Front(norm.weight, norm.eps, q, k, v, attn.q_norm.weight, attn.k_norm.weight,
                 (attn.q_norm.eps, attn.k_norm.eps), rope.base, attn.n_heads, attn.n_kv_heads)


def _identity(a):
    return a


def make_layer_step(path: str, arch):
    from mlx_lm.models.base import scaled_dot_product_attention

    backend = path.split("-")[1] if path.startswith("fused-") else None
    tail = FusedTail(backend) if backend else layer_tail.reference
    front = FusedFront(backend) if backend else attn_front.reference
    moe = FusedMoE(backend) if backend else reference

    def step(layer, x, mask, cache, s):
        (t, f), (ex, top_k, norm, shared) = s.layer_args, s.step_args
        attn = layer.self_attn
        if f is not None and cache is not None:  # the KV cache's update and attention stay mlx-lm's
            q, k, v = front(x, f, cache.offset)
            keys, values = cache.update_and_fetch(k, v)
            a = scaled_dot_product_attention(q, keys, values, cache=cache, scale=attn.scale, mask=mask)
        else:
            with replaced_child(attn, "o_proj", _identity):  # o_proj runs in the tail
                a = attn(layer.input_layernorm(x), mask, cache)
        h, xn, logits = tail(a, x, t)
        if not shared:
            return moe(xn, logits, ex, top_k, norm, res=h).reshape(x.shape)
        block = getattr(layer, arch.block)
        y = moe(xn, logits, ex, top_k, norm) + mx.sigmoid(block.shared_expert_gate(xn)) * block.shared_expert(xn)
        return (h + y).reshape(x.shape)

    return step


def layer_args(loaded, layer: int, path: str) -> tuple[Tail | None, Front | None]:
    """(Tail, Front) of `layer` where `path` takes them over, else None."""
    if path not in PATHS:
        return None, None
    kernels = path.startswith("fused-")
    t = tail_of(loaded.model.layers[layer], loaded.arch)
    if t is None or (kernels and layer_tail.unsupported(t)):
        return None, None
    f = front_of(loaded.model.layers[layer])
    return t, None if f is None or (kernels and attn_front.unsupported(f)) else f


def set_layer_steps(loaded, path: str) -> int:
    """Give the MoE layers `path` can take over their layer step (the others
    none); returns how many."""
    step, n = make_layer_step(path, loaded.arch) if path in PATHS else None, 0
    for l in loaded.manifest.moe_layers:
        layer = loaded.model.layers[l]
        t, f = layer_args(loaded, l, path)
        set_layer_step(layer, getattr(layer, loaded.arch.block), None if t is None else step, (t, f))
        n += t is not None
    return n
