"""The decode benchmark behind `mlxmoe bench` (and tools/bench_decode.py): mlx-lm's own generation vs an
mlxmoe node, same model, same machine, one process. The rows and columns are what `mlxmoe bench --help`
says (commands/bench.py)."""

from __future__ import annotations

import gc
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

from mlxmoe.bundle.arch import normalize_config
from mlxmoe.bundle.manifest import OVERLAY_FILE, TRUNK_FILE, Manifest, group_file


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def synthesize(preset: str, layers: int, bits: int, out: Path) -> Path:
    """An mlx-community style directory with random weights of a preset's shapes."""
    import mlx.nn as nn
    from mlx_lm.utils import _get_classes, save_config, save_model

    from mlxmoe.bundle.plan import PRESETS

    cfg = json.loads((PRESETS / f"{preset}.json").read_text())
    cfg = {k: v for k, v in normalize_config(cfg).items() if not k.startswith("_")}
    cfg["num_hidden_layers"] = layers
    model_class, args_class = _get_classes(cfg)
    model = model_class(args_class.from_dict(cfg))
    model.set_dtype(mx.bfloat16)
    nn.quantize(model, group_size=64, bits=bits, class_predicate=lambda p, m: hasattr(m, "to_quantized") and not p.endswith("mlp.gate"))
    out.mkdir(parents=True, exist_ok=True)
    save_model(out, model)
    save_config({**cfg, "quantization": {"group_size": 64, "bits": bits}}, out / "config.json")
    return out


def measure_bandwidth() -> float:
    """Bytes/s of a large device copy (read + write counted)."""
    a = mx.zeros((256 * 1024 * 1024,), dtype=mx.float32)
    mx.eval(a)
    for _ in range(2):
        mx.eval(a + 1)
    t0 = time.perf_counter()
    for _ in range(5):
        mx.eval(a + 1)
    return 2 * a.nbytes * 5 / (time.perf_counter() - t0)


def touched_bytes(m: Manifest, trunk_bytes: int, embed_bytes: int, kv_bytes_per_token: float, context: int) -> dict:
    """Bytes read per decoded token: trunk (less the embedding table, of which one
    row is read) + top-k experts at every MoE layer + the KV cache at `context`."""
    parts = {"trunk": trunk_bytes - embed_bytes, "experts": m.top_k * len(m.moe_layers) * m.expert_bytes(),
             "kv": kv_bytes_per_token * context}
    return {**{k: int(v) for k, v in parts.items()}, "total": int(sum(parts.values()))}


def run_decode(gen_fn, prompt, n_gen, runs):
    """gen_fn(prompt, n) yields tokens; returns (ttft_s, prompt_tok_s, decode_tok_s) medians."""
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        first = None
        n = 0
        for _ in gen_fn(prompt, n_gen):
            n += 1
            if first is None:
                first = time.perf_counter()
        t1 = time.perf_counter()
        out.append((first - t0, len(prompt) / (first - t0), (n - 1) / (t1 - first)))
    return tuple(statistics.median(x[i] for x in out) for i in range(3))


def bench(bundle=None, source=None, synthetic=None, layers=12, bits=4, groups=3, group=0, prompt_tokens=128,
          gen_tokens=128, runs=3, kv_bits=8, bandwidth=None, workdir="/tmp/mlxmoe-bench-decode", unfused_row=False,
          profile=False):
    """Run the benchmark (see the module doc); prints the table and JSON lines."""
    kv_bits = kv_bits or None

    from mlx_lm.generate import generate_step

    from mlxmoe.params import GenParams
    from mlxmoe.model import fused
    from mlxmoe.node.engine import Node, backend_name
    from mlxmoe.model.reference import mlx_lm_model
    from mlxmoe.bundle.split import split

    work = Path(workdir)
    source = Path(source) if source else None
    if synthetic:
        shutil.rmtree(work, ignore_errors=True)
        log(f"synthesizing {synthetic} with {layers} layers, {bits}-bit")
        source = synthesize(synthetic, layers, bits, work / "src")
    given = bundle
    bundle = Path(given) if given else work / "bundle"
    if not given:
        shutil.rmtree(bundle, ignore_errors=True)
        log("splitting")
        split(str(source), bundle, groups, bits=bits, group_size=64, kv_bits=kv_bits)
    m = Manifest.load(bundle)
    cfg = m.model["config"]
    prompt = [int(x) for x in mx.random.randint(1, cfg["vocab_size"] - 1, (prompt_tokens,), key=mx.random.key(0))]
    bw = bandwidth * 1e9 if bandwidth else measure_bandwidth()
    sizes = {n: f["size"] for n, f in m.files.items()}
    embed_bytes = _embed_bytes(bundle)
    ctx = prompt_tokens + gen_tokens // 2

    # Load every row first (weights measured as the active-memory growth of
    # each load), warm each up at the full prompt length, then time the rows
    # interleaved, so drift of the machine hits every row alike.
    rows, gens = [], []
    # every expert once (overlapping groups repeat some in their files)
    full_bytes = sizes[TRUNK_FILE] + m.expert_bytes() * m.n_experts * len(m.moe_layers)

    def add(name, group, load, expected):
        gc.collect()  # arrays of earlier objects freed during the load would hide part of its growth
        mx.synchronize()
        before = mx.get_active_memory()
        obj, gen = load()
        mx.synchronize()
        rows.append({"row": name, "group": group, "weights_bytes": mx.get_active_memory() - before,
                     "expected_weights_bytes": expected})
        rows[-1]["weights_vs_expected"] = round(rows[-1]["weights_bytes"] / expected, 4)
        if isinstance(obj, Node):
            rows[-1]["kv_bytes_per_token"] = obj.sessions.per_token
            rows[-1]["moe_path"] = obj.loaded.moe_path
            if obj.loaded.moe_path_reason:
                rows[-1]["moe_path_reason"] = obj.loaded.moe_path_reason
        else:
            rows[-1]["moe_path"] = "mlx-lm"
        gens.append((obj, gen))

    if source is not None:  # 1. mlx-lm, full model, its own generation loop
        def load_ref():
            ref = mlx_lm_model(source, m)
            return ref, lambda p, n: (t for t, _ in generate_step(mx.array(p), ref, max_tokens=n, kv_bits=kv_bits,
                                                                   kv_group_size=64, quantized_kv_start=0))
        add("mlx-lm (full model)", None, load_ref, full_bytes)
    # 2. node with every expert, 3. node with one group (+ overlay), on the MoE
    # path picked at load; optionally 4. all experts on mlx-lm's own MoE code
    node_rows = [("mlxmoe node, all experts", None, None), (f"mlxmoe node, group {group} of {m.n_groups}", group, None)]
    if unfused_row:
        node_rows.append(("mlxmoe node, all experts, unfused", None, "mlx-lm"))
    for name, g, path in node_rows:
        def load_node(g=g, path=path):
            node = Node.load(str(bundle), g, kv_bits=kv_bits, verify=False, tokenizer=(bundle / "tokenizer.json").exists())
            if path:
                fused.install(node.loaded, path)
            return node, lambda p, n: node.generate(None, p, GenParams(max_tokens=n))
        expected = full_bytes if g is None else sizes[TRUNK_FILE] + sizes[group_file(g)] + sizes.get(OVERLAY_FILE, 0)
        add(name, g, load_node, expected)

    for r, (_, gen) in zip(rows, gens):
        log(f"warm-up: {r['row']}")
        run_decode(gen, prompt, gen_tokens, 1)
    samples = [[] for _ in rows]
    for i in range(runs):
        for j, (_, gen) in enumerate(gens):
            samples[j].append(run_decode(gen, prompt, gen_tokens, 1))
        log(f"timed round {i + 1}/{runs}")
    for r, ss in zip(rows, samples):
        ttft, ptps, dtps = (statistics.median(x[k] for x in ss) for k in range(3))
        r.update(prompt_tok_s=round(ptps, 1), decode_tok_s=round(dtps, 2), ttft_s=round(ttft, 4),
                 decode_tok_s_runs=[round(x[2], 2) for x in ss])

    per_token_kv = next((r["kv_bytes_per_token"] for r in rows if "kv_bytes_per_token" in r), 0)
    touched_parts = touched_bytes(m, sizes[TRUNK_FILE], embed_bytes, per_token_kv, ctx)
    touched = touched_parts["total"]
    for r in rows:
        r["roofline_share"] = round(touched * r["decode_tok_s"] / bw, 4)
    base = rows[0]["decode_tok_s"] if source is not None else None
    meta = {"date": time.strftime("%Y-%m-%d"), "backend": backend_name(), "device": _device(), "machine": platform.machine(),
            "model": synthetic or str(source), "layers": cfg["num_hidden_layers"], "experts": m.n_experts,
            "top_k": m.top_k, "bits": (m.quantization.get("experts") or {}).get("bits"), "kv_bits": kv_bits,
            "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "bandwidth_gb_s": round(bw / 1e9, 1),
            "bytes_touched_per_token": int(touched), "bytes_touched_parts": touched_parts, "context": ctx}
    print(f"# decode benchmark {json.dumps(meta)}")
    print(f"{'row':34s} {'moe path':>11s} {'prompt tok/s':>12s} {'decode tok/s':>12s} {'ratio':>6s} {'ttft s':>7s} "
          f"{'weights GB':>10s} {'vs arith':>8s} {'roofline':>8s}")
    for r in rows:
        ratio = f"{r['decode_tok_s'] / base:.2f}" if base else "-"
        print(f"{r['row']:34s} {r['moe_path']:>11s} {r['prompt_tok_s']:12.1f} {r['decode_tok_s']:12.2f} {ratio:>6s} "
              f"{r['ttft_s']:7.3f} {r['weights_bytes'] / 1e9:10.3f} {r['weights_vs_expected']:8.3f} {r['roofline_share']:8.2%}")
    if profile:
        from mlxmoe.node.profile import print_profile, profile_step

        for r, (obj, _) in zip(rows, gens):
            model = obj.model if isinstance(obj, Node) else obj
            r["profile"] = profile_step(model, prompt, kv_bits=kv_bits, moe_layers=m.moe_layers)
            print_profile(r["row"], r["profile"])
    for r in rows:
        print(json.dumps({**meta, **r, "ratio_vs_mlx_lm": round(r["decode_tok_s"] / base, 3) if base else None}))


def _embed_bytes(bundle: Path) -> int:
    from mlxmoe.bundle.checkpoint import SafetensorsFile

    f = SafetensorsFile(bundle / TRUNK_FILE)
    return sum(t.nbytes for n, t in f.tensors.items() if "embed_tokens" in n)


def _device() -> str:
    if mx.default_device() == mx.cpu:
        return f"{platform.processor() or platform.machine()} CPU x{os.cpu_count()}"
    try:
        return mx.device_info().get("device_name", "gpu")
    except Exception:
        return "gpu"
