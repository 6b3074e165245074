"""Benchmark `mlxmoe split`: MB/s and peak RSS on a generated multi-GB
checkpoint (Qwen3-MoE layout, HF names, bf16, sharded with an index).

    python tools/bench_split.py --gb 4 [--dir /tmp/bench-split] [--groups 3]

Prints one JSON object. Peak RSS is the split child process's ru_maxrss; the
claim to check is that it stays near the largest single tensor, not the model."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mlxmoe.bundle.checkpoint import BundleWriter, Entry  # noqa: E402


def config_for(gb: float) -> dict:
    # Qwen3-30B-A3B widths; layers chosen so the checkpoint is ~gb GB in bf16
    H, I, E = 2048, 768, 128
    per_layer = E * 3 * H * I * 2 + 4 * H * H * 2
    layers = max(1, round((gb * 1e9 - 2 * 32000 * H * 2) / per_layer))
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": H,
            "intermediate_size": 6144, "moe_intermediate_size": I, "num_hidden_layers": layers,
            "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 128, "num_experts": E,
            "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "vocab_size": 32000, "tie_word_embeddings": False, "max_position_embeddings": 4096,
            "rope_theta": 1e6, "rms_norm_eps": 1e-6}


def tensors(c):
    H, I, E, V = c["hidden_size"], c["moe_intermediate_size"], c["num_experts"], c["vocab_size"]
    hd, nh, nkv = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    yield "model.embed_tokens.weight", (V, H)
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        yield p + "input_layernorm.weight", (H,)
        yield p + "post_attention_layernorm.weight", (H,)
        yield p + "self_attn.q_proj.weight", (nh * hd, H)
        yield p + "self_attn.k_proj.weight", (nkv * hd, H)
        yield p + "self_attn.v_proj.weight", (nkv * hd, H)
        yield p + "self_attn.o_proj.weight", (H, nh * hd)
        yield p + "self_attn.q_norm.weight", (hd,)
        yield p + "self_attn.k_norm.weight", (hd,)
        yield p + "mlp.gate.weight", (E, H)
        for e in range(E):
            yield p + f"mlp.experts.{e}.gate_proj.weight", (I, H)
            yield p + f"mlp.experts.{e}.up_proj.weight", (I, H)
            yield p + f"mlp.experts.{e}.down_proj.weight", (H, I)
    yield "model.norm.weight", (H,)
    yield "lm_head.weight", (V, H)


def generate(d: Path, gb: float, shard_gb: float = 1.0):
    d.mkdir(parents=True, exist_ok=True)
    c = config_for(gb)
    (d / "config.json").write_text(json.dumps(c))
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(1 << 24, dtype=np.float32) * 0.02).view(np.uint32) >> 16
    pool = pool.astype(np.uint16).tobytes()
    shards, cur, size = [], [], 0
    for name, shape in tensors(c):
        cur.append((name, shape))
        size += int(np.prod(shape)) * 2
        if size >= shard_gb * 1e9:
            shards.append(cur)
            cur, size = [], 0
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        w = BundleWriter(d / fname, [Entry(n, "BF16", s) for n, s in shard])
        for j, (n, s) in enumerate(shard):
            nb = int(np.prod(s)) * 2
            off = (j * 7919) % (len(pool) - nb) if nb < len(pool) else 0
            data = pool[off:off + nb] if nb <= len(pool) else (pool * (nb // len(pool) + 1))[:nb]
            w.put(n, data)
            weight_map[n] = fname
        w.close()
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return c


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=4.0)
    ap.add_argument("--dir", default="/tmp/mlxmoe-bench-split")
    ap.add_argument("--groups", type=int, default=3)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    root = Path(a.dir)
    src, out = root / "src", root / "out"
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.time()
    c = generate(src, a.gb)
    gen_s = time.time() - t0
    src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    largest = max(int(np.prod(s)) * 2 for _, s in tensors(c))
    # baseline: the interpreter with mlx, mlx-lm and mlxmoe imported, splitting nothing
    subprocess.run([sys.executable, "-c", "import mlxmoe.bundle.split, mlx_lm.utils, mlx.core as mx; mx.eval(mx.ones(1))"], check=True)
    base = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "mlxmoe.cli", "split", str(src), str(out), "--groups", str(a.groups),
                    "--quiet"], check=True, stdout=subprocess.DEVNULL)
    secs = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(json.dumps({"bench": "split", "source_gb": round(src_bytes / 1e9, 3), "layers": c["num_hidden_layers"],
                      "groups": a.groups, "seconds": round(secs, 2), "source_mb_per_s": round(src_bytes / 1e6 / secs, 1),
                      "output_gb": round(out_bytes / 1e9, 3), "peak_rss_mb": round(peak / 1e6, 1),
                      "baseline_rss_mb": round(base / 1e6, 1),
                      "largest_tensor_mb": round(largest / 1e6, 1), "generate_seconds": round(gen_s, 1),
                      "machine": os.uname().machine, "cpus": os.cpu_count()}))
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
