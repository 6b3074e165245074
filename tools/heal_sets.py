"""Which parameters to heal (docs/QUALITY.md, Healing): train each trainable set
on one group of a bundle with the same step budget, and report the held-out KL
before/after, the bytes it adds, steps, tokens and seconds, as JSON.

    python tools/heal_sets.py BUNDLE --group 0 --steps 160 --sets router norms lora router,norms router,norms,lora
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import mlx.core as mx

from mlxmoe.model.load import load_bundle, load_tokenizer
from mlxmoe.quality import heal as qh
from mlxmoe.quality.suites import load_suites


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--group", type=int, default=0)
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--sets", nargs="+", default=["router", "norms", "lora", "router,norms", "router,norms,lora"])
    ap.add_argument("--suite", action="append")
    a = ap.parse_args()
    loaded, tok = load_bundle(a.bundle), load_tokenizer(a.bundle)
    m = loaded.manifest
    names, passages = load_suites(a.suite, "calibration")
    base = qh.HealConfig(max_steps=a.steps, patience=a.steps)  # the same budget for every set: no early stop
    t0 = time.time()
    train, held, _, _ = qh.prepare(loaded, tok, passages, base)
    teacher_s = time.time() - t0
    eligible = {l: m.eligible(a.group, l) for l in m.moe_layers}
    rows = []
    for s in a.sets:
        cfg = qh.HealConfig(**{**base.__dict__, "trainable": qh.parse_trainable(s)})
        _, info = qh.heal_group(loaded, eligible, train, held, cfg)
        rows.append(info)
        print(json.dumps({k: info[k] for k in ("trainable", "heldout_kl_before", "heldout_kl_after", "bytes", "seconds")}),
              flush=True)
    print(json.dumps({"date": time.strftime("%Y-%m-%d", time.gmtime()), "bundle": a.bundle, "group": a.group,
                      "manifest_hash": m.hash, "suites": names, "steps": a.steps, "teacher_seconds": round(teacher_s, 1),
                      "machine": f"{platform.system()} {platform.machine()}, mlx {mx.__version__} ({mx.default_device()})",
                      "sets": rows}))


if __name__ == "__main__":
    main()
