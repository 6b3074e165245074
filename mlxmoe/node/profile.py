"""Per-op profile of one decode step (used by `mlxmoe bench --profile`).

MLX has no per-kernel timer, so two measurements stand in for one:
- ops: the primitives of one decode step's graph (mx.export_to_dot), by name.
  Each primitive is one kernel launch or more; a `Compiled` primitive is one
  fused elementwise kernel.
- host or device: one step alone split into graph building (Python),
  encoding (MLX's async_eval) and waiting for the device.
- time shares: the step itself, and each kind of module (attention, MoE block,
  lm_head) timed alone at one token, chained `reps` times per evaluation so
  that, as in a real step, launches are queued back to back. Attention runs
  without a cache here (its KV read is not in its share); the remainder of
  the step (embedding, norms, residual adds, cache writes, sampling) is "rest".
"""

from __future__ import annotations

import re
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import mlx.core as mx


def step_ops(model, cache) -> Counter:
    """Primitive names of one decode step's graph (the cache is advanced)."""
    out = model(mx.array([[1]]), cache=cache)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "step.dot"
        mx.export_to_dot(str(path), out)
        names = re.findall(r'label ="([^"]+)", shape=rectangle', path.read_text())
    mx.eval(out)
    return Counter(names)


def _time(fn, reps: int, runs: int = 7) -> float:
    """Seconds per call of fn, `reps` calls chained per evaluation."""
    mx.eval(fn(reps))  # warm-up (JIT, compile)
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        mx.eval(fn(reps))
        ts.append((time.perf_counter() - t0) / reps)
    return statistics.median(ts)


def _chain(module, h):
    def run(reps):
        y = h
        for _ in range(reps):
            y = module(y)
        return y

    return run


def _cpu_split(model, cache, steps: int = 16) -> dict:
    """Where one decode step's wall time goes: building its graph in Python
    (build), MLX encoding and launching it (encode: async_eval's return), and
    waiting for the device (wait). wait near 0: the step is bound by the host."""
    parts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(mx.array([[1]]), cache=cache)
        t1 = time.perf_counter()
        mx.async_eval(out)
        t2 = time.perf_counter()
        mx.eval(out)
        parts.append((t1 - t0, time.perf_counter() - t2, t2 - t1))
    build, wait, encode = (statistics.median(p[i] for p in parts) for i in range(3))
    return {"build_ms": round(build * 1e3, 3), "encode_ms": round(encode * 1e3, 3), "wait_ms": round(wait * 1e3, 3)}


def profile_step(model, prompt: list[int], kv_bits=None, moe_layers=(), reps: int = 16) -> dict:
    """Ops by primitive and time shares of one decode step at the prompt's context."""
    from mlx_lm.generate import maybe_quantize_kv_cache
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    model(mx.array([prompt]), cache=cache)
    maybe_quantize_kv_cache(cache, 0, 64, kv_bits)
    mx.eval([c.state for c in cache])
    ops = step_ops(model, cache)

    def step(reps):
        outs = [model(mx.array([[1]]), cache=cache) for _ in range(reps)]
        return outs[-1]

    t_step = _time(step, 4, runs=5)
    cpu = _cpu_split(model, cache)
    layers = model.layers
    dim = model.args.hidden_size if hasattr(model, "args") else layers[0].input_layernorm.weight.shape[0]
    dtype = layers[0].input_layernorm.weight.dtype
    h = (0.5 * mx.random.normal((1, 1, dim), key=mx.random.key(3))).astype(dtype)
    moe = [l for l in moe_layers if l < len(layers)]
    block_attr = "mlp" if hasattr(layers[moe[0]], "mlp") else "block_sparse_moe"
    t_moe = _time(_chain(getattr(layers[moe[0]], block_attr), h), reps) * len(moe) if moe else 0.0
    t_attn = _time(_chain(lambda y: layers[0].self_attn(y, mask=None, cache=None), h), reps) * len(layers)
    head = model.lm_head if hasattr(model, "lm_head") else None
    t_head = _time(lambda reps: [head(h) for _ in range(reps)][-1], reps) if head is not None else 0.0
    parts = {"moe_blocks": t_moe, "attention_no_kv": t_attn, "lm_head": t_head}
    parts["rest"] = max(t_step - sum(parts.values()), 0.0)
    return {"step_ms": round(t_step * 1e3, 3), **cpu, "ops": sum(ops.values()), "ops_by_primitive": dict(ops.most_common()),
            "ms": {k: round(v * 1e3, 3) for k, v in parts.items()},
            "share": {k: round(v / t_step, 3) for k, v in parts.items()},
            "us_per_op": round(t_step / max(sum(ops.values()), 1) * 1e6, 2)}


def print_profile(name: str, p: dict) -> None:
    top = ", ".join(f"{k} {v}" for k, v in list(p["ops_by_primitive"].items())[:12])
    shares = ", ".join(f"{k} {p['ms'][k]:.3f} ms ({p['share'][k]:.0%})" for k in p["ms"])
    print(f"# profile {name}: step {p['step_ms']:.3f} ms (alone: build {p['build_ms']:.3f} + encode {p['encode_ms']:.3f}"
          f" + wait {p['wait_ms']:.3f} ms), {p['ops']} ops ({p['us_per_op']} us/op); {shares}")
    print(f"#   ops: {top}")
