"""Greedy decode of one bundle on every single-token MoE path this machine has:
are the tokens identical, and how fast is each? (The GPU check of issue 7.)

    python tools/check_fused.py BUNDLE [--tokens 256] [--group G]
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlxmoe.model import fused  # noqa: E402
from mlxmoe.node.contract import GenParams  # noqa: E402
from mlxmoe.node.engine import Node  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--group", type=int, default=None)
    ap.add_argument("--kv-bits", type=int, default=0)
    ap.add_argument("--prompt", default="def add(a, b):\n    return")
    ap.add_argument("--paths", default="reference,mlx-lm,dense", help="Paths to compare with the picked one.")
    a = ap.parse_args()
    node = Node.load(a.bundle, a.group, verify=False, kv_bits=a.kv_bits or None)
    picked, why = node.loaded.moe_path, node.loaded.moe_path_reason
    prompt = node.encode(a.prompt)
    paths = list(dict.fromkeys([picked, *a.paths.split(",")]))  # dense: the dequantized float32 judge
    out = {}
    for path in paths:
        fused.install(node.loaded, path)
        run = lambda n: [e.token for e in node.generate(None, prompt, GenParams(max_tokens=n, temperature=0.0))]
        run(8)  # warm-up (JIT)
        t0 = time.perf_counter()
        toks = run(a.tokens)
        out[path] = {"tok_s": round(len(toks) / (time.perf_counter() - t0), 1), "tokens": toks}
    first = out[picked]["tokens"]
    report = {"picked": picked, "reason": why, "tokens": a.tokens, "kv_bits": node.kv_bits, "kv_note": node.kv_note,
              **{p: {"tok_s": r["tok_s"], "identical_to_picked": r["tokens"] == first,
                     "first_difference": next((i for i, (x, y) in enumerate(zip(first, r["tokens"])) if x != y), None)}
                 for p, r in out.items()}}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
