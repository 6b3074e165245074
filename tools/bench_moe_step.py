"""Where a single token's MoE block (and its decoder layer) spends its time, piece by piece.

One Qwen3-30B-A3B MoE layer (hidden 2048, 128 experts of 768, top-8, 4-bit
experts, bfloat16 router) with random weights; each piece is called `--reps`
times per evaluation (launches queued back to back, as in a decode step) and
reported in microseconds per call:

    python tools/bench_moe_step.py [--reps 64] [--bits 4]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from mlxmoe.kernels.moe_step import FusedMoE, geometry, reference, template  # noqa: E402
from mlxmoe.bundle.arch import get_arch  # noqa: E402
from mlxmoe.model import fused, moe  # noqa: E402


def per_call_us(fn, reps, runs=9):
    mx.eval(fn(0))
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        mx.eval([fn(i) for i in range(reps)])
        ts.append((time.perf_counter() - t0) / reps * 1e6)
    return round(statistics.median(ts), 2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=64)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--reference", action="store_true", help="Also time the pure-MLX reference step.")
    a = ap.parse_args()
    from mlx_lm.models.qwen3_moe import ModelArgs, Qwen3MoeSparseMoeBlock

    args = ModelArgs(model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=1, intermediate_size=6144,
                     num_attention_heads=32, num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1,
                     mlp_only_layers=[], moe_intermediate_size=768, rms_norm_eps=1e-6, vocab_size=64,
                     num_key_value_heads=4, head_dim=128, rope_theta=1e6, tie_word_embeddings=False,
                     max_position_embeddings=4096, norm_topk_prob=True)
    block = Qwen3MoeSparseMoeBlock(args)
    block.set_dtype(mx.bfloat16)
    nn.quantize(block, group_size=a.group_size, bits=a.bits,
                class_predicate=lambda p, m: p.startswith("switch_mlp") and hasattr(m, "to_quantized"))
    mx.eval(block.parameters())
    arch = get_arch("qwen3_moe")
    moe.install(block, arch.gate, arch.experts, 0, arch.scoring, 128, None)
    ex = fused.experts_of(block, arch)
    hs = [(0.5 * mx.random.normal((1, 1, 2048), key=mx.random.key(i))).astype(mx.bfloat16) for i in range(a.reps)]
    mx.eval(hs)
    logits = [block.gate(h) for h in hs]
    mx.eval(logits)
    backend = fused.default_path()
    out = {"device": str(mx.default_device()), "bits": a.bits, "group_size": a.group_size, "reps": a.reps}
    out["mlx-lm block"] = per_call_us(lambda i: block(hs[i]), a.reps)
    out["router matmul alone"] = per_call_us(lambda i: block.gate(hs[i]), a.reps)
    if a.reference:
        out["reference step (float32)"] = per_call_us(lambda i: reference(hs[i], block.gate(hs[i]), ex, 8, True), a.reps)
    if backend.startswith("fused-"):
        k = FusedMoE(backend.split("-")[1])
        step = fused.make_step(backend, arch, "qwen3_moe")
        out["fused step (router + 2 kernels)"] = per_call_us(lambda i: step(block, hs[i]), a.reps)
        consts = tuple(template(ex, 8, True, mx.bfloat16))
        gate_up, down, geo = k.kernel("gate_up", consts), k.kernel("down", consts), geometry(ex, 8)
        up = lambda i: gate_up(inputs=[hs[i], logits[i], *ex.gate, *ex.up], grid=geo["gate_up"]["grid"],
                               threadgroup=geo["gate_up"]["threadgroup"], output_shapes=[(8, 768)],
                               output_dtypes=[mx.float32])[0]
        hid = [up(i) for i in range(a.reps)]
        mx.eval(hid)
        out["gate_up kernel alone"] = per_call_us(up, a.reps)
        out["down kernel alone"] = per_call_us(
            lambda i: down(inputs=[hid[i], logits[i], *ex.down], grid=geo["down"]["grid"],
                           threadgroup=geo["down"]["threadgroup"], output_shapes=[(1, 1, 2048)],
                           output_dtypes=[mx.bfloat16])[0], a.reps)
        make = mx.fast.cuda_kernel if backend == "fused-cuda" else mx.fast.metal_kernel
        idx = "threadIdx.x" if backend == "fused-cuda" else "thread_position_in_grid.x"
        empty = make(name="mlxmoe_empty", input_names=["x"], output_names=["y"], source=f"if ({idx} == 0) y[0] = x[0];")
        out["empty custom kernel (launch floor)"] = per_call_us(
            lambda i: empty(inputs=[hs[i]], grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(1,)],
                            output_dtypes=[mx.bfloat16])[0], a.reps)
        out["elementwise add (launch floor, built-in op)"] = per_call_us(lambda i: hs[i] + 1, a.reps)
        out.update(layer_pieces(args, arch, backend, hs, a))
    print(json.dumps(out))


def layer_pieces(args, arch, backend, hs, a) -> dict:
    """One whole decoder layer on a KV cache of 1024+ tokens (8-bit attention,
    dense router): mlx-lm's layer, the fused layer step, and the attention
    front and tail kernels alone."""
    from mlx_lm.models.cache import KVCache
    from mlx_lm.models.qwen3_moe import Qwen3MoeDecoderLayer

    from mlxmoe.kernels.attn_front import FusedFront
    from mlxmoe.kernels.layer_tail import FusedTail
    from mlxmoe.model import fused_layer

    layer = Qwen3MoeDecoderLayer(args, 0)
    layer.set_dtype(mx.bfloat16)
    nn.quantize(layer, group_size=a.group_size, bits=a.bits,
                class_predicate=lambda p, m: p.startswith("mlp.switch_mlp") and hasattr(m, "to_quantized"))
    nn.quantize(layer, group_size=64, bits=8, class_predicate=lambda p, m: p.startswith("self_attn.") and isinstance(m, nn.Linear))
    mx.eval(layer.parameters())
    cache = KVCache()
    mx.eval(layer(0.5 * mx.random.normal((1, 1024, 2048), key=mx.random.key(99)).astype(mx.bfloat16), "causal", cache))
    out = {"mlx-lm decoder layer": per_call_us(lambda i: layer(hs[i], None, cache), a.reps)}
    t, f = fused_layer.tail_of(layer, arch), fused_layer.front_of(layer)
    moe.install(layer.mlp, arch.gate, arch.experts, 0, arch.scoring, 128, None)
    moe.state_of(layer.mlp).step_args = fused.block_args(layer.mlp, arch, "qwen3_moe")
    moe.set_layer_step(layer, layer.mlp, fused_layer.make_layer_step(backend, arch), (t, f))
    out["fused decoder layer (6 kernels, cache update, attention)"] = per_call_us(lambda i: layer(hs[i], None, cache), a.reps)
    front, tail = FusedFront(backend.split("-")[1]), FusedTail(backend.split("-")[1])
    out["attention front kernels alone (qkv, heads)"] = per_call_us(lambda i: front(hs[i], f, 1024)[0], a.reps)
    attn = mx.zeros((1, 32, 1, 128), mx.bfloat16)
    out["tail kernels alone (attn_out, norm_router)"] = per_call_us(lambda i: tail(attn, hs[i], t)[2], a.reps)
    return out


if __name__ == "__main__":
    main()
