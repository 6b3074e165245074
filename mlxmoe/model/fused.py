"""The MoE step of a single decoded token, on the fastest path this machine has.

At batch size 1 mlx-lm's MoE block is a chain of ~13 small ops; decode is
bound by their launch and dispatch cost, not by bytes. For one token each MoE
block is given a subclass whose __call__ keeps the block's own router (masked
or local rows, recording intact) and replaces everything after it:

  fused-metal  Apple GPU: two Metal kernels (mlxmoe/kernels/moe_step.py)
  fused-cuda   NVIDIA GPU (MLX's CUDA backend): the same two kernels in CUDA
  reference    plain MLX ops on the k selected experts only, in float32: the
               CPU path (MLX's bfloat16 CPU kernels are several times slower)
  mlx-lm       the block's own code (also: any shape the kernels do not take)

The step is a MoeState field (moe.py: `step`, `step_args`, set here).
On a kernel path (and `reference`) the whole decoder layer of one token is
taken over where its shape allows (fused_layer.py): ~31 ops per layer become
6 kernels, the KV cache update and MLX's attention.

Prompts (more than one token) always run the block's own code. The path is
chosen once at load; a kernel path is checked against the reference on the
first MoE block (against dequantized dense matmuls) and, if it fails or disagrees, the node falls back (CPU:
`reference`; GPU: `mlx-lm`, as the reference's extra ops are slower there).
`MLXMOE_MOE_PATH` forces a path (benchmarks, tests).
"""

from __future__ import annotations

import os

import mlx.core as mx

from mlxmoe.kernels import attn_front, layer_tail
from mlxmoe.kernels.attn_front import FusedFront
from mlxmoe.kernels.layer_tail import FusedTail
from mlxmoe.kernels.moe_step import FusedMoE, QuantizedExperts, dense, reference, unsupported

from mlxmoe.model.fused_layer import layer_args, set_layer_steps
from mlxmoe.model.moe import state_of

PATHS = ("fused-metal", "fused-cuda", "reference", "mlx-lm")
ENV = "MLXMOE_MOE_PATH"

# model_type -> (top-k attribute, renormalise the top-k weights?, shared expert?)
# mixtral's softmax over its top-k logits equals softmax-then-top-k renormalised.
RULES = {
    "qwen3_moe": ("top_k", "norm_topk_prob", False),
    "olmoe": ("top_k", "norm_topk_prob", False),
    "qwen2_moe": ("top_k", False, True),
    "mixtral": ("num_experts_per_tok", True, False),
}


def default_path() -> str:
    """The fastest path this machine's MLX offers (before any model is seen)."""
    if mx.default_device() == mx.cpu:
        return "reference"
    if mx.metal.is_available():
        return "fused-metal"
    if getattr(mx, "cuda", None) is not None and mx.cuda.is_available() and hasattr(mx.fast, "cuda_kernel"):
        return "fused-cuda"
    return _fallback()


def experts_of(block, arch):
    """The block's experts as QuantizedExperts, or None if the kernels cannot
    read them (unquantized, biased, non-affine, or remapped ids)."""
    sw = getattr(block, arch.experts)
    projs = [getattr(sw, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
    if state_of(sw).g2l is not None or any(p is None or "scales" not in p or "bias" in p for p in projs):
        return None
    if any(getattr(p, "mode", "affine") != "affine" or p.get("biases") is None for p in projs):
        return None
    gs, bits = projs[0].group_size, projs[0].bits
    if any((p.group_size, p.bits) != (gs, bits) for p in projs):
        return None
    return QuantizedExperts(*[(p.weight, p.scales, p.biases) for p in projs], group_size=gs, bits=bits)


def block_args(block, arch, model_type) -> tuple:
    """(experts, top_k, norm, shared) of one block; cached on it at install."""
    return (experts_of(block, arch), *_rule(block, model_type))


def _rule(block, model_type):
    k_attr, norm, shared = RULES[model_type]
    return getattr(block, k_attr), (getattr(block, norm) if isinstance(norm, str) else norm), shared


def make_step(path: str, arch, model_type: str):
    """The block's step for one token on `path` (or "dense": the judge); args:
    its block_args, cached in its state (None: computed here)."""
    run = FusedMoE(path.split("-")[1]) if path.startswith("fused-") else dense if path == "dense" else reference

    def step(block, x, args=None):
        ex, top_k, norm, shared = args or block_args(block, arch, model_type)
        y = run(x, getattr(block, arch.gate)(x), ex, top_k, norm)
        if shared:
            y = y + mx.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
        return y

    return step


def _why_not(loaded, path) -> str | None:
    model_type = loaded.manifest.model["config"]["model_type"]
    if model_type not in RULES:
        return f"{model_type}: routing rule not fused (fused: {', '.join(RULES)})"
    if loaded.arch.scoring == "sigmoid_group":
        return "sigmoid group-limited routing is not fused"
    for block in loaded.blocks.values():
        ex = experts_of(block, loaded.arch)
        if ex is None:
            return "experts are not affine-quantized without bias"
        if path.startswith("fused-"):
            reason = unsupported(ex, _rule(block, model_type)[0])
            if reason:
                return reason
    return None


def _self_check(loaded, path) -> str | None:
    """Run the kernels once on the first MoE layer: the MoE step against the
    dense judge, the layer's attention front and tail against MLX's own ops."""
    block = next(iter(loaded.blocks.values()))
    model_type = loaded.manifest.model["config"]["model_type"]
    ex = experts_of(block, loaded.arch)
    x = (0.5 * mx.random.normal((1, 1, ex.shape[1]), key=mx.random.key(7))).astype(ex.gate[1].dtype)
    pairs = []
    try:
        pairs.append((make_step(path, loaded.arch, model_type)(block, x), make_step("dense", loaded.arch, model_type)(block, x)))
        t, f = layer_args(loaded, next(iter(loaded.blocks)), path)
        backend = path.split("-")[1]
        if t is not None:
            a = (0.5 * mx.random.normal((1, 1, t.o.shape[1]), key=mx.random.key(8))).astype(x.dtype)
            pairs += zip(FusedTail(backend)(a, x, t), layer_tail.reference(a, x, t))
        if f is not None:
            pairs += zip(FusedFront(backend)(x, f, 1000), attn_front.reference(x, f, 1000))
        for got, want in pairs:
            got, want = got.astype(mx.float32), want.astype(mx.float32)
            err, scale = mx.abs(got - want).max().item(), mx.abs(want).max().item() + 1e-6
            if not err <= 0.02 * scale:
                return f"{path} disagreed with MLX's ops on its self-check (max error {err:.3g}, scale {scale:.3g})"
    except Exception as e:  # a compiler or launch error: fall back
        return f"{path} failed its self-check: {type(e).__name__}: {str(e)[:200]}"
    return None


def install(loaded, path: str | None = None) -> str:
    """Give every MoE block of `loaded` the single-token path `path` (None: the
    env override, else the fastest this machine has); returns the path used and
    records it (and why, on a fallback) on `loaded`."""
    want = path or os.environ.get(ENV) or default_path()
    if want not in PATHS + ("dense",):  # dense: the slow judge, for checks only
        raise ValueError(f"MoE path {want!r}: expected one of {', '.join(PATHS)}")
    reason = None if want == "mlx-lm" else _why_not(loaded, want)
    if reason is None and want.startswith("fused-"):
        reason = _self_check(loaded, want)
    if reason is not None:
        want = _fallback() if _why_not(loaded, _fallback()) is None else "mlx-lm"
    model_type = loaded.manifest.model["config"]["model_type"]
    _set_steps(loaded, None if want == "mlx-lm" else make_step(want, loaded.arch, model_type), model_type)
    loaded.fused_layers = set_layer_steps(loaded, want)
    loaded.moe_path, loaded.moe_path_reason = want, reason
    return want


def _fallback() -> str:
    # On a GPU the reference's extra ops make it slower than mlx-lm's block
    # (measured 0.67x on an H100); on CPU its float32 compute is faster.
    return "reference" if mx.default_device() == mx.cpu else "mlx-lm"


def _set_steps(loaded, step, model_type):
    for block in loaded.blocks.values():
        s = state_of(block)  # the weights are final once loaded: the arguments are cached
        s.step, s.step_args = step, None if step is None else block_args(block, loaded.arch, model_type)
