#!/usr/bin/env python3
"""Train mlxmoe's deep reference family concurrently on one GPU, then quantize each model to MLX.

The family (dims in FAMILY, trained by tools/train_reference_moe.py on the corpus of
tools/build_deep_corpus.py, global-batch load balancing):

    deep-moe         qwen3_moe, 16 layers, 128 routed experts, top-8 (Qwen3-30B-A3B's ratios)
    deep-moe-shared  qwen2_moe, the same + one always-on shared expert of one expert's size
                     (DeepSeek-like; qwen2_moe's sigmoid-gated shared_expert)
    single-64e       the single-node alternative with the same trunk: 16 layers, 64 experts top-8
    single-shallow   the single-node alternative with all 128 experts and fewer layers, as many
                     as fit the bytes of single-64e (fewer_layers_same_bytes)

A pinned node of a 3-node cluster holds the trunk + its group (1/3 of the experts) + an
overlay (~1/6): about half the experts, hence the two alternatives at that budget. The three
models of the premise comparison (deep-moe, single-64e, single-shallow) see the same batches
(same seed) and agree on one step count (--sync-dir); deep-moe-shared uses its own time budget.

Each model: a process of its own (tiny models are launch-bound, so several share one GPU well),
then mlx-lm's convert to 4-bit, group 64, with router gates unquantized (as `mlxmoe split`
keeps them), written as <out>/<name>/ (mlx-community layout, + TRAINING.md, training_report.json);
the bf16 HF repos stay in --work (or come back as <out>/<name>-hf/ when the conversion fails). Logs: <out>/train.log and <out>/logs/<name>.log. A model that
fails is logged and the others still come back.

    python3 tools/train_family.py --out OUT [--time-budget 270]     # the GPU job
    python3 tools/train_family.py --out OUT --tiny                  # a CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAINER = REPO / "tools" / "train_reference_moe.py"
LIMIT_BYTES = 40_000_000
GROUP = 64
# the deep family's common dims: Qwen3-like fine-grained experts (moe_intermediate = hidden / 2)
DEEP = {"layers": 16, "experts": 128, "top_k": 8, "hidden": 128, "heads": 4, "kv_heads": 2,
        "moe_intermediate": 64, "vocab": 8192}
NODE_SHARE = 0.5  # a pinned node of 3: its group (1/3) + an overlay of about 1/6 of the experts
ABOUT = ("A member of mlxmoe's deep reference family, trained from scratch by `tools/train_family.py` "
         "(`tools/train_reference_moe.py`) on the corpus of `tools/build_deep_corpus.py`: code in Python, Go, "
         "Perl and shell; the Python documentation; fortune-cookie prose in English, German, Spanish, Italian, "
         "Russian, Polish and Czech; iso-codes records; numeric tables. Man pages, Markdown and C headers are "
         "held out as unseen kinds. The 4-bit MLX model in this directory is the full-model reference.")


def quantized_bytes(layers: int, experts: int, hidden: int, moe_intermediate: int, vocab: int, heads: int,
                    kv_heads: int, shared_intermediate: int = 0, qkv_bias: bool = False, bits: int = 4,
                    group: int = GROUP, **_) -> int:
    """Bytes of the MLX model: every matrix quantized (bits/8 per weight + bf16 scale and bias per
    group) except the router gates (and the shared-expert gate), kept in bf16 like norms."""
    def q(rows, cols):
        assert cols % group == 0, f"{cols} is not a multiple of the group size {group}"
        return rows * cols * bits // 8 + rows * (cols // group) * 4

    hd = hidden // heads
    attn = q(heads * hd, hidden) + 2 * q(kv_heads * hd, hidden) + q(hidden, heads * hd)
    attn += 2 * (2 * hd if not qkv_bias else (heads + 2 * kv_heads) * hd)  # q/k norms or qkv biases
    moe = experts * (2 * q(moe_intermediate, hidden) + q(hidden, moe_intermediate)) + 2 * experts * hidden
    if shared_intermediate:
        moe += 2 * q(shared_intermediate, hidden) + q(hidden, shared_intermediate) + 2 * hidden
    layer = attn + moe + 2 * 2 * hidden
    return 2 * q(vocab, hidden) + layers * layer + 2 * hidden


def fewer_layers_same_bytes(dims: dict, experts: int, budget: int) -> int:
    """The most layers of a model with `experts` experts whose bytes stay within budget."""
    n = 1
    while quantized_bytes(**{**dims, "layers": n + 1, "experts": experts}) <= budget:
        n += 1
    return n


def family(dims: dict = DEEP) -> dict[str, dict]:
    node_experts = round(dims["experts"] * NODE_SHARE)
    budget = quantized_bytes(**{**dims, "experts": node_experts})
    return {
        "deep-moe": {"arch": "qwen3_moe", **dims, "premise": True},
        "deep-moe-shared": {"arch": "qwen2_moe", **dims, "shared_intermediate": dims["moe_intermediate"],
                            "qkv_bias": True, "premise": False},
        "single-64e": {"arch": "qwen3_moe", **dims, "experts": node_experts, "premise": True},
        "single-shallow": {"arch": "qwen3_moe", **dims, "layers": fewer_layers_same_bytes(dims, dims["experts"], budget),
                           "premise": True},
    }


TINY = {"layers": 2, "experts": 8, "top_k": 2, "hidden": 64, "heads": 2, "kv_heads": 1, "moe_intermediate": 64,
        "vocab": DEEP["vocab"]}  # the same token cache


def train_cmd(name: str, spec: dict, args, work: Path) -> list[str]:
    c = [sys.executable, str(TRAINER), "--arch", spec["arch"], "--corpus", args.corpus, "--out", str(work / name),
         "--layers", str(spec["layers"]), "--experts", str(spec["experts"]), "--top-k", str(spec["top_k"]),
         "--hidden", str(spec["hidden"]), "--heads", str(spec["heads"]), "--kv-heads", str(spec["kv_heads"]),
         "--moe-intermediate", str(spec["moe_intermediate"]), "--vocab", str(spec["vocab"]),
         "--balance", "global", "--aux-loss-coef", "0.01", "--title", f"mlxmoe deep reference family: {name}",
         "--about", ABOUT, "--eval-every", "0", "--max-shard-size", "50MB"]
    if spec.get("shared_intermediate"):
        c += ["--shared-intermediate", str(spec["shared_intermediate"])]
    if spec["premise"]:
        c += ["--sync-dir", str(work / "sync"), "--sync-n", "3"]
    if args.tiny:
        return c + ["--steps", "4", "--batch", "2", "--seq-len", "64", "--warmup", "2", "--eval-max-tokens", "256",
                    "--device", "cpu"]
    # batch 64: launch-bound models take twice the tokens per step at little extra time
    return c + ["--steps", "100000", "--batch", "64", "--time-budget", str(args.time_budget), "--measure-steps", "100,200",
                "--warmup", "200", "--eval-max-tokens", "60000"]


def keep_gates(path: str, module, *_) -> bool:
    """Router gates stay in bf16 (mlxmoe's placement reads them); every other layer is quantized."""
    return not (path.endswith("mlp.gate") or path.endswith("shared_expert_gate"))


def to_mlx(hf: Path, dst: Path) -> None:
    from mlx_lm.convert import convert

    convert(str(hf), str(dst), quantize=True, q_group_size=GROUP, q_bits=4, dtype="bfloat16",
            quant_predicate=keep_gates)
    for f in ("TRAINING.md", "training_report.json"):
        shutil.copy(hf / f, dst / f)
    size = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
    with open(dst / "TRAINING.md", "a") as fh:
        fh.write(f"\n## MLX model\n\nThis directory: mlx-lm's convert of the bf16 checkpoint, 4-bit affine, group "
                 f"{GROUP}, router gates in bf16: {size} bytes of safetensors. The held-out figures above are "
                 "of the bf16 checkpoint; `mlxmoe eval` measures the 4-bit model.\n")
    if size > LIMIT_BYTES:
        raise SystemExit(f"{dst}: {size} bytes of weights, over the {LIMIT_BYTES} limit")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", str(REPO / "out" / "family")))
    ap.add_argument("--work", default=None, help="bf16 HF repos and step sync (default: <out>/../family-work)")
    ap.add_argument("--corpus", default=str(REPO / "corpus-deep"))
    ap.add_argument("--time-budget", type=float, default=270.0, help="seconds of training per model")
    ap.add_argument("--deadline", type=float, default=510.0, help="seconds after which training processes are killed")
    ap.add_argument("--only", default=None, help="comma-separated names")
    ap.add_argument("--tiny", action="store_true", help="tiny dims, 4 steps on the CPU: a smoke test")
    ap.add_argument("--convert", nargs=2, metavar=("HF", "MLX"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.convert:
        to_mlx(Path(args.convert[0]), Path(args.convert[1]))
        return 0
    out = Path(args.out)
    work = Path(args.work or out.parent / f"{out.name}-work")
    shutil.rmtree(work / "sync", ignore_errors=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    fam = family(TINY if args.tiny else DEEP)
    if args.only:
        fam = {k: v for k, v in fam.items() if k in args.only.split(",")}
        for v in fam.values():
            v["premise"] = v["premise"] and len(fam) > 1
    t0 = time.time()
    main_log = open(out / "train.log", "a")

    def log(msg: str) -> None:
        line = f"[family {time.time() - t0:6.1f}s] {msg}"
        print(line, file=sys.stderr, flush=True)
        main_log.write(line + "\n")
        main_log.flush()

    log(f"out {out}, work {work}, models: " + ", ".join(
        f"{k} ({v['arch']}, {v['layers']}L x {v['experts']}E, ~{quantized_bytes(**v)/1e6:.1f} MB)" for k, v in fam.items()))
    # one tokenisation (cached, normally carried in) before the concurrent runs could race on it
    vocabs = sorted({v["vocab"] for v in fam.values()})
    for vocab in vocabs:
        subprocess.run([sys.executable, str(TRAINER), "--prepare-only", "--corpus", args.corpus, "--vocab", str(vocab)],
                       check=True, stdout=main_log, stderr=subprocess.STDOUT)
    log("token cache ready")
    procs = {}
    for name, spec in fam.items():
        fh = open(out / "logs" / f"{name}.log", "w")
        procs[name] = (subprocess.Popen(train_cmd(name, spec, args, work), stdout=fh, stderr=subprocess.STDOUT), fh)
    results = {}
    pending = dict(procs)
    while pending:
        for name, (p, fh) in list(pending.items()):
            rc = p.poll()
            if rc is None and time.time() - t0 > args.deadline:
                p.kill()
                rc = p.wait()
                log(f"{name}: killed at the deadline ({args.deadline:.0f}s)")
            if rc is None:
                continue
            fh.close()
            del pending[name]
            results[name] = {"train_rc": rc}
            log(f"{name}: training exited {rc}")
            if rc == 0:  # convert while the others still train
                dst = out / name
                shutil.rmtree(dst, ignore_errors=True)
                with open(out / "logs" / f"{name}.log", "a") as fh2:
                    c = subprocess.run([sys.executable, __file__, "--convert", str(work / name), str(dst)],
                                       stdout=fh2, stderr=subprocess.STDOUT)
                results[name]["convert_rc"] = c.returncode
                if c.returncode == 0:
                    results[name]["bytes"] = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
                else:  # no MLX here (or it failed): bring the bf16 repo back to convert elsewhere
                    shutil.rmtree(dst, ignore_errors=True)
                    shutil.copytree(work / name, out / f"{name}-hf")
                log(f"{name}: convert exited {c.returncode} {results[name].get('bytes', '')}")
        time.sleep(1)
    for name in fam:
        rp = work / name / "training_report.json"
        if rp.is_file():
            r = json.loads(rp.read_text())
            results[name].update(steps=r["training"]["steps"], tokens_seen=r["training"]["tokens_seen"],
                                 wall_time_s=r["training"]["wall_time_s"],
                                 heldout_loss={d: round(v["loss"], 4) for d, v in r["eval"]["domains"].items()},
                                 unseen_loss={d: round(v["loss"], 4) for d, v in r["eval"].get("unseen", {}).items()})
    (out / "family.json").write_text(json.dumps({"models": fam, "results": results,
                                                 "total_wall_s": round(time.time() - t0, 1)}, indent=1) + "\n")
    ok = [n for n, r in results.items() if r.get("convert_rc") == 0]
    log(f"done: {len(ok)}/{len(fam)} models in {out}: {', '.join(ok)}")
    return 0 if len(ok) == len(fam) else 1


if __name__ == "__main__":
    sys.exit(main())
