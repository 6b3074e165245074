#!/usr/bin/env python3
"""Engine-level batching benchmark (no HTTP): N concurrent generations on one
node's engine, driven in rounds as the engine worker drives them, beside
mlx-lm's own BatchGenerator on the same model and machine, in one process.
tools/bench_concurrency.py measures the same through the router and
mlx_lm.server; this one isolates the engine.

    python tools/bench_batch.py --synthesize qwen3-30b-a3b --layers 12 --bits 4 --streams 1,2,4,8,16

Prints one JSON line per row: {"server", "streams", "tokens", "agg_tok_s", "ttft_ms", "wall_s", ...}.
`--table FILE.jsonl` prints those rows as the Markdown table of docs/PERFORMANCE.md, with
the decode-only rate (tokens after the first over the time after the first), which
leaves out a first step's one-time kernel compilation.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402


def drive_node(node, prompts, n_tokens):
    from mlxmoe.node.contract import PENDING, GenParams

    params = GenParams(max_tokens=n_tokens, temperature=0.0, repetition_penalty=1.0)
    streams = [node.generate(f"s{i}-{time.monotonic_ns()}", p, params) for i, p in enumerate(prompts)]
    t0, first, count = time.perf_counter(), None, 0
    while streams:
        for it in list(streams):
            ev = next(it, None)
            if ev is None:
                streams.remove(it)
            elif ev is not PENDING:
                count += 1
                first = first or time.perf_counter()
    return count, time.perf_counter() - t0, first - t0


def drive_mlx_lm(model, prompts, n_tokens):
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(model, max_tokens=n_tokens, completion_batch_size=max(32, len(prompts)),
                         prefill_batch_size=min(8, len(prompts)))
    gen.insert(prompts, max_tokens=[n_tokens] * len(prompts))
    t0, first, count, done = time.perf_counter(), None, 0, 0
    while done < len(prompts):
        for r in gen.next_generated():
            count += 1
            first = first or time.perf_counter()
            done += r.finish_reason is not None
    gen.close()
    return count, time.perf_counter() - t0, first - t0


def main(argv=None):
    from mlxmoe.bundle.split import split
    from mlxmoe.model.reference import mlx_lm_model
    from mlxmoe.node.bench import synthesize
    from mlxmoe.node.engine import Node

    ap = argparse.ArgumentParser()
    ap.add_argument("--synthesize", default="qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--streams", default="1,2,4,8,16")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--kv-bits", type=int, default=8)
    ap.add_argument("--groups", default="all,0", help="node rows: 'all' (every expert) and group numbers")
    ap.add_argument("--work", default="/tmp/mlxmoe-bench-batch")
    ap.add_argument("--table", metavar="JSONL", help="print the Markdown table of a run and exit")
    args = ap.parse_args(argv)
    if args.table:
        return print(table([json.loads(x) for x in Path(args.table).read_text().splitlines() if x.strip()]))
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    src = synthesize(args.synthesize, args.layers, args.bits, work / "src")
    split(str(src), work / "bundle", 3, bits=args.bits, group_size=64, kv_bits=args.kv_bits)
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    counts = [int(x) for x in args.streams.split(",")]
    from mlxmoe.bundle.manifest import Manifest

    engines = [("mlx-lm BatchGenerator", mlx_lm_model(src, Manifest.load(work / "bundle")))]  # the node's dtype
    for g in args.groups.split(","):
        node = Node.load(str(work / "bundle"), None if g == "all" else int(g), kv_bits=args.kv_bits, verify=False,
                         tokenizer=False)
        engines.append((f"mlxmoe node, {'all experts' if g == 'all' else 'group ' + g}", node))
    for name, e in engines:  # warm-up (JIT) at the largest batch
        prompts = _prompts(max(counts), args.prompt_tokens, vocab, 99)
        (drive_mlx_lm if name.startswith("mlx-lm") else drive_node)(e, prompts, 8)
    for n in counts:
        for name, e in engines:
            prompts = _prompts(n, args.prompt_tokens, vocab, n)
            tokens, wall, ttft = (drive_mlx_lm if name.startswith("mlx-lm") else drive_node)(e, prompts, args.tokens)
            print(json.dumps({"server": name, "streams": n, "tokens": tokens, "agg_tok_s": round(tokens / wall, 1),
                              "ttft_ms": round(ttft * 1e3, 1), "wall_s": round(wall, 3),
                              "date": time.strftime("%Y-%m-%d"), "device": _device()}), flush=True)


def table(rows: list[dict]) -> str:
    servers = list(dict.fromkeys(r["server"] for r in rows))
    out = ["| streams | " + " | ".join(f"{s}: agg tok/s (decode-only)" for s in servers) + " |",
           "| ---: | " + " | ".join("---:" for _ in servers) + " |"]
    for n in sorted({r["streams"] for r in rows}):
        cells = []
        for s in servers:
            r = next((r for r in rows if r["server"] == s and r["streams"] == n), None)
            if r is None:
                cells.append("-")
                continue
            decode = (r["tokens"] - r["streams"]) / (r["wall_s"] - r["ttft_ms"] / 1e3)
            cells.append(f"{r['agg_tok_s']:.0f} ({decode:.0f})")
        out.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _prompts(n, length, vocab, seed):
    ids = mx.random.randint(1, vocab - 1, (n, length), key=mx.random.key(seed)).tolist()
    return [list(map(int, p)) for p in ids]


def _device():
    from mlxmoe.node.bench import _device as dev

    return dev()


if __name__ == "__main__":
    main()
