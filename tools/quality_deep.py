"""Quality study on the deep reference family (issue 16): the premise test,
the grouping/overlay/placement sweep and how masking loss grows with depth.

Every stage dequantizes a committed 4-bit model with mlx-lm (mx.dequantize of
every quantized layer: the same function up to bf16 rounding; MLX's CPU
quantized matmul is ~60x slower), splits it unquantized into 3 groups and
evaluates masked routing virtually on the full model (quality/eval.py).
Each stage writes benchmarks/quality-deep-<date>-<stage>.json; `render`
rewrites the tables between the markers in docs/QUALITY.md from those files.

    python3 tools/quality_deep.py premise               # deep-moe full / pinned / onehop / split
    python3 tools/quality_deep.py single single-64e     # one single-node row (re-make single-shallow so)
    python3 tools/quality_deep.py paired                # per-passage paired ppl ratios (after premise, single)
    python3 tools/quality_deep.py sweep                 # groupings x overlays x placements, deep-moe
    python3 tools/quality_deep.py sweep --model deep-moe-shared --budget-only
    python3 tools/quality_deep.py depth                 # mask layers 0..L / only layer L
    python3 tools/quality_deep.py dequant --passages 1  # the dequantized copy vs the 4-bit model
    python3 tools/quality_deep.py render                # tables -> docs/QUALITY.md

On Linux preload OpenBLAS (LD_PRELOAD=.../openblas-pthread/libblas.so.3): the
mlx[cpu] wheel's reference BLAS is ~30x slower.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import platform
import re
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mlxmoe.quality import eval as q  # noqa: E402
from mlxmoe.quality import grouping as gr  # noqa: E402
from mlxmoe.quality import intervals as ci  # noqa: E402
from mlxmoe.quality.metrics import logp_of, ref_nll_of, token_metrics  # noqa: E402
from mlxmoe.bundle.manifest import FILENAME  # noqa: E402

ASSETS = REPO / "mlxmoe" / "assets"
SUITES = [str(ASSETS / "suites" / "deep-heldout.jsonl"), str(ASSETS / "suites" / "deep-unseen.jsonl")]
CALIB = str(ASSETS / "suites" / "deep-calibration.jsonl")
UNSEEN = ("c_header", "man_page", "markdown")
BENCH = REPO / "benchmarks"
DOC = REPO / "docs" / "QUALITY.md"
DATE = "2026-12-02"
BEGIN, END = "<!-- quality-deep:begin -->", "<!-- quality-deep:end -->"


@functools.cache
def tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------ pure parts

def balanced(domains, num, den, exp: bool = False) -> dict:
    """Per domain sum(num)/sum(den) (exp'd for perplexities) and their
    domain-balanced mean, each with a bootstrap 95% interval over passages
    (resampled within each domain, quality/intervals.py)."""
    doms = sorted(set(domains))
    draws = ci.resample_indices(domains)
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    f = np.exp if exp else (lambda x: x)
    samples = f(ci.ratio_of_sums(num, den, draws))  # [resamples, domains]
    sel = [np.asarray(domains) == d for d in doms]
    point = [float(f(num[s].sum() / den[s].sum())) for s in sel]
    out = {d: {"value": p, "ci": ci.interval(samples[:, j])} for j, (d, p) in enumerate(zip(doms, point))}
    return {"domains": out, "mean": {"value": float(np.mean(point)), "ci": ci.interval(samples.mean(1))}}


def summarize_rows(rows: list[dict], ref_nll: dict) -> dict:
    """For per-passage rows {domain, tokens, nll[, kl, agree]}: ppl (and, for
    masked rows, ppl ratio to the reference, KL/token, agreement), seen and
    unseen domains apart. `ref_nll`: passage index -> reference NLL."""
    out = {}
    for part, keep in (("seen", lambda d: d not in UNSEEN), ("unseen", lambda d: d in UNSEEN)):
        idx = [i for i, r in enumerate(rows) if keep(r["domain"])]
        if not idx:
            continue
        doms = [rows[i]["domain"] for i in idx]
        tok = [rows[i]["tokens"] for i in idx]
        s = {"ppl": balanced(doms, [rows[i]["nll"] for i in idx], tok, exp=True)}
        if "kl" in rows[0]:
            s["ppl_ratio"] = balanced(doms, [rows[i]["nll"] - ref_nll[i] for i in idx], tok, exp=True)
            s["kl"] = balanced(doms, [rows[i]["kl"] for i in idx], tok)
            s["agreement"] = balanced(doms, [rows[i]["agree"] * rows[i]["tokens"] for i in idx], tok)
        out[part] = s
    return out


def depth_sets(sets: list[dict], layers: list[int], L: int, mode: str) -> list[dict]:
    """Node sets masked only at MoE layers[:L+1] (mode "prefix") or only at
    layers[L] ("only"); every other layer routes over all experts (None)."""
    masked = set(layers[: L + 1] if mode == "prefix" else [layers[L]])
    return [{l: (s[l] if l in masked else None) for l in layers} for s in sets]


def best_budget(results: list[dict], ratio: float = 1.5) -> tuple[str, str]:
    """(config, placement) within `ratio` x a plain share with the lowest
    domain-balanced mean ppl ratio on the seen domains; the oracle is a bound,
    not a placement (and first-layer placement ties when layer 0 is whole)."""
    ok = [r for r in results if r["placement"] != "oracle" and r["mem_ratio"] <= ratio + 1e-9]
    best = min(ok, key=lambda r: r["summary"]["seen"]["ppl_ratio"]["mean"]["value"])
    return best["config"], best["placement"]


def prefix_all_config(m, stats, k: int, n_groups: int = 3, ratio: float = 1.5) -> q.Config:
    """Every expert of the first `k` MoE layers on every node (masking there
    costs the most, see the depth study); the rest of `ratio` x a plain share
    goes to a coactivation grouping + the biggest gate-mass overlay that fits."""
    E, layers = m.n_experts, m.moe_layers
    trunk, per = m.files["trunk.safetensors"]["size"], m.expert_bytes()
    slots = int((ratio * q.plain_bytes(m, n_groups, trunk, per) - trunk) // per)
    rest = (slots - k * E) // (len(layers) - k)
    n = max(x for x in range(E + 1) if -(-(E - x) // n_groups) + x <= rest)
    ov = gr.overlay(stats, n, "mass")
    g = gr.grouping("coactivation", n_groups, layers, E, stats, ov)
    full = set(layers[:k])
    sets = [{l: list(range(E)) if l in full else sorted(set(g["layers"][str(l)][i]) | set(ov[l])) for l in layers}
            for i in range(n_groups)]
    return q.Config(f"g{n_groups}/coactivation/mass{n}+L0-{k - 1}all", n_groups, "coactivation", "mass", n, sets)


def budget(m, stats) -> list[q.Config]:
    """The 1.5x layouts: quality_sweep's, and the first 2 or 3 layers whole."""
    return tool("quality_sweep").budget_configs(m, stats) + [prefix_all_config(m, stats, k) for k in (2, 3)]


# ------------------------------------------------------------------ setup

def machine(ms: float) -> str:
    import os

    blas = "OpenBLAS preloaded" if "openblas" in os.environ.get("LD_PRELOAD", "") else "mlx's bundled BLAS"
    return (f"{platform.system()} {platform.machine()}, 2 CPU cores (shared), mlx {mx.__version__} "
            f"({mx.default_device()}), {blas} (512x512 matmul {ms:.1f} ms)")


def bundle_of(name: str, cache: Path) -> Path:
    """deep family model -> dequantized (bf16 files) 3-group bundle, cached."""
    from mlx_lm import convert
    from mlxmoe.bundle.split import split

    flat, bundle = cache / f"{name}-f", cache / f"{name}-b3"
    if not (bundle / FILENAME).exists():
        if not flat.exists():
            convert(str(ASSETS / name), mlx_path=str(flat), dequantize=True)
        split(str(flat), str(bundle), 3, bits=None, trunk_bits=None, force=True)
    return bundle


def load(name, args, suites=SUITES):
    from mlxmoe.model.load import load_bundle, load_tokenizer
    from mlxmoe.quality.suites import load_suites

    bundle = bundle_of(name, Path(args.cache))
    loaded, tok = load_bundle(bundle), load_tokenizer(bundle)
    _, passages = load_suites(suites, "heldout")
    items = q.make_items(tok, passages, args.passages, 32)
    return bundle, loaded, tok, items


def calib_stats(loaded, tok, per_domain: int):
    from mlxmoe.quality.stats import collect
    from mlxmoe.quality.suites import load_suites, tokenize

    _, calib = load_suites([CALIB], "calibration")
    seen, keep = {}, []
    for p in calib:
        seen[p.domain] = seen.get(p.domain, 0) + 1
        if seen[p.domain] <= per_domain:
            keep.append(p)
    return collect(loaded, tokenize(tok, keep), outputs=False)


def ref_rows(items) -> list[dict]:
    return [{"domain": it.domain, "tokens": len(it.ids) - it.prompt, "nll": float(n)}
            for it, n in zip(items, ref_nll_of(items))]


def passage_rows(per_passage: list[dict]) -> list[dict]:
    return [{"domain": p["domain"], "tokens": p["tokens"], "nll": -p["logp"], "kl": p["kl"], "agree": p["agreement"]}
            for p in per_passage]


def header(args, name, ms, t0, items) -> dict:
    return {"date": DATE, "machine": machine(ms), "model": f"mlxmoe/assets/{name}",
            "bundle": "dequantized with mlx-lm (bf16 files, fp32 compute), 3 groups", "suites": SUITES,
            "calibration": f"{CALIB}, first {args.calib} passages per domain", "prompt_tokens": 32,
            "passages_per_domain": args.passages, "passages": len(items),
            "tokens": int(sum(len(it.ids) - it.prompt for it in items)), "seconds": round(time.time() - t0, 1)}


def write(stage: str, rep: dict):
    BENCH.mkdir(exist_ok=True)
    path = BENCH / f"quality-deep-{DATE}-{stage}.json"
    path.write_text(json.dumps(tool("quality_sweep").rounded(rep), separators=(",", ":")) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def matmul_ms():
    return tool("quality_sweep").matmul_ms()


def masked_results(rep: dict, ref: dict) -> list[dict]:
    for r in rep["results"]:
        r["summary"] = summarize_rows(passage_rows(r.pop("per_passage")), ref)
    return rep["results"]


# ------------------------------------------------------------------ stages

def premise(args):
    t0, ms = time.time(), matmul_ms()
    bundle, loaded, tok, items = load(args.model, args)
    stats = calib_stats(loaded, tok, args.calib)
    m = loaded.manifest
    cfgs = q.configs(m, stats, [3], ["contiguous"], [0], ["mass"]) + budget(m, stats)
    q.size_configs(m, cfgs)
    rep = q.evaluate(loaded, items, cfgs, q.PLACEMENTS)
    ref = dict(enumerate(ref_nll_of(items)))
    results = masked_results(rep, ref)
    trunk, per = m.files["trunk.safetensors"]["size"], m.expert_bytes()
    full_ratio = q.plain_bytes(m, 1, trunk, per) / q.plain_bytes(m, 3, trunk, per)
    rows = {"full": {"summary": summarize_rows(ref_rows(items), ref), "mem_ratio": full_ratio}}
    for mode in ("onehop", "split"):
        o = q.evaluate_onehop(bundle, loaded=loaded, items=items, split=mode == "split")
        rows[mode] = {"summary": summarize_rows(passage_rows(o["per_passage"]), ref), "mean": o["mean"],
                      "intervals": o["intervals"], "mem_ratio": 1.0}
    best = best_budget(results)
    out = header(args, args.model, ms, t0, items)
    out.update({"best": best, "rows": rows, "results": results, "reference": rep["reference"],
                "ids_hash": ids_hash(items), "configs": [{"name": c.name, "mem_ratio": c.mem_ratio,
                                                         "node_bytes": c.node_bytes} for c in cfgs]})
    write("premise", out)


def ids_hash(items) -> str:
    import hashlib

    return hashlib.sha256(json.dumps([it.ids for it in items]).encode()).hexdigest()[:16]


def file_bytes(name: str) -> dict:
    """Trunk and routed-expert bytes of a committed (4-bit) model's safetensors."""
    import struct

    with open(ASSETS / name / "model.safetensors", "rb") as f:
        head = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    head.pop("__metadata__", None)
    size = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in head.items()}
    experts = sum(v for k, v in size.items() if ".switch_mlp." in k)
    return {"trunk": sum(size.values()) - experts, "experts": experts}


def single(args):
    t0, ms = time.time(), matmul_ms()
    _, loaded, _, items = load(args.name, args)
    q.reference(loaded, items)
    out = header(args, args.name, ms, t0, items)
    steps = json.loads((ASSETS / args.name / "training_report.json").read_text())["training"]["steps"]
    own, big = file_bytes(args.name), file_bytes("deep-moe")
    out.update({"ids_hash": ids_hash(items), "steps": steps, "bytes_4bit": own, "deep_moe_bytes_4bit": big,
                "x_plain": (own["trunk"] + own["experts"]) / (big["trunk"] + big["experts"] / 3),
                "summary": summarize_rows(ref_rows(items), {})})
    write(f"single-{args.name}", out)


def sweep(args):
    t0, ms = time.time(), matmul_ms()
    _, loaded, tok, items = load(args.model, args, SUITES[:1])
    stats = calib_stats(loaded, tok, args.calib)
    m = loaded.manifest
    cfgs = q.configs(m, stats, [3], ["contiguous"], [0], ["mass"])
    if not args.budget_only:
        for s in ("contiguous", "mod", "coactivation", "domain"):
            cfgs += q.configs(m, stats, [3], [s], [0, 8, 16] if s != "contiguous" else [8, 16], ["mass"])
        cfgs += q.configs(m, stats, [3], ["coactivation"], [16], ["breadth"])
    cfgs += budget(m, stats)
    q.size_configs(m, cfgs)
    rep = q.evaluate(loaded, items, cfgs, q.PLACEMENTS)
    ref = dict(enumerate(ref_nll_of(items)))
    out = header(args, args.model, ms, t0, items)
    out.update({"results": masked_results(rep, ref), "reference": rep["reference"]})
    write("sweep" if args.model == "deep-moe" else f"sweep-{args.model}", out)


def paired(args):
    """Perplexity ratios on the same passages, paired per passage: the single-node
    models and the premise's best pinned layout against deep-moe, and against each other."""
    t0, ms = time.time(), matmul_ms()
    name, place = best_budget(read("premise")["results"])
    _, loaded, tok, items = load("deep-moe", args)
    m = loaded.manifest
    cfg = next(c for c in budget(m, calib_stats(loaded, tok, args.calib)) if c.name == name)
    q.size_configs(m, [cfg])
    rep = q.evaluate(loaded, items, [cfg], [place])
    nll = {"deep-moe": ref_nll_of(items), "pinned": np.array([-p["logp"] for p in rep["results"][0]["per_passage"]])}
    for single_name in ("single-64e", "single-shallow"):
        _, other, _, its = load(single_name, args)
        if ids_hash(its) != ids_hash(items):
            raise SystemExit(f"{single_name}: other token ids than deep-moe's")
        q.reference(other, its)
        nll[single_name] = ref_nll_of(its)
    rows = [{"domain": it.domain, "tokens": len(it.ids) - it.prompt} for it in items]
    pairs = [(a, b) for a in ("single-64e", "single-shallow", "pinned") for b in ("deep-moe", "pinned") if a != b]
    out = header(args, "deep-moe", ms, t0, items)
    out.update({"pinned": {"config": name, "placement": place, "mem_ratio": cfg.mem_ratio},
                "ratios": {f"{a} / {b}": paired_ratio(rows, nll[a] - nll[b]) for a, b in pairs}})
    write("paired", out)


def paired_ratio(rows: list[dict], diff) -> dict:
    """ppl(a)/ppl(b) per domain and balanced, seen and unseen apart, from per-passage NLL differences."""
    out = {}
    for part, keep in (("seen", lambda d: d not in UNSEEN), ("unseen", lambda d: d in UNSEEN)):
        idx = [i for i, r in enumerate(rows) if keep(r["domain"])]
        out[part] = balanced([rows[i]["domain"] for i in idx], [diff[i] for i in idx],
                             [rows[i]["tokens"] for i in idx], exp=True)
    return out


def run_placed(loaded, items, sets: list[dict], placed: np.ndarray) -> list[dict]:
    """Teacher-forced run of each passage on its placed node only."""
    rows = [None] * len(items)
    for g, s in enumerate(sets):
        loaded.set_eligible(s)
        for i in np.flatnonzero(placed == g):
            it = items[i]
            kl, agree, nll = token_metrics(it.ref_logp[:-1], logp_of(loaded, it.ids)[:-1], mx.array(it.ids[1:]))
            p = it.prompt - 1
            k, a, n = np.array(mx.stack([kl[p:].sum(), agree[p:].sum(), nll[p:].sum()])).tolist()
            t = len(it.ids) - it.prompt
            rows[i] = {"domain": it.domain, "tokens": t, "nll": n, "kl": k, "agree": a / t}
    loaded.set_eligible(None)
    return rows


def depth(args):
    t0, ms = time.time(), matmul_ms()
    _, loaded, tok, items = load(args.model, args, SUITES[:1])
    m = loaded.manifest
    base = q.configs(m, None, [3], ["contiguous"], [0], ["mass"])[0]
    q.reference(loaded, items)
    ref = dict(enumerate(ref_nll_of(items)))
    placed = np.array([int(np.argmax(q.placement_scores(m, it, base, "first", None, i))) for i, it in enumerate(items)])
    layers, results = m.moe_layers, []
    for mode in ("prefix", "only"):
        for L in range(len(layers)):
            rows = run_placed(loaded, items, depth_sets(base.sets, layers, L, mode), placed)
            results.append({"mode": mode, "L": L, "summary": summarize_rows(rows, ref)})
            print(f"{mode} L={L}: KL {results[-1]['summary']['seen']['kl']['mean']['value']:.3f}", file=sys.stderr)
    out = header(args, args.model, ms, t0, items)
    out.update({"layout": base.name, "placement": "first (fully masked layout's, kept for every L)",
                "results": results})
    write("depth", out)


def log_softmax(x):
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def dequant(args):
    """How far the dequantized copy is from the 4-bit model it came from:
    KL and greedy agreement of next-token distributions, fp32 compute."""
    from mlx_lm import load as lm_load
    from mlxmoe.quality.metrics import kl_per_token

    t0, ms = time.time(), matmul_ms()
    bundle_of(args.model, Path(args.cache))
    models = [lm_load(str(p))[0] for p in (ASSETS / args.model, Path(args.cache) / f"{args.model}-f")]
    for mdl in models:
        mdl.set_dtype(mx.float32)
    _, _, _, items = load(args.model, args)
    kl = agree = n = 0.0
    for it in items:
        qlp, flp = (log_softmax(mdl(mx.array([it.ids]))[0].astype(mx.float32)) for mdl in models)
        kl += kl_per_token(qlp, flp).sum().item()
        agree += (qlp.argmax(-1) == flp.argmax(-1)).sum().item()
        n += len(it.ids)
    out = header(args, args.model, ms, t0, items)
    out.update({"kl_per_token": kl / n, "argmax_agreement": agree / n, "positions": int(n),
                "compared": "mlx-lm 4-bit model vs its mlx-lm dequantized copy, both fp32 compute, every position"})
    write("dequant", out)


# ------------------------------------------------------------------ render

def cell(x, digits=2) -> str:
    """value [lo, hi] of a figure, or of a balanced() summary's mean."""
    x = x.get("mean", x)
    return f"{x['value']:.{digits}f} [{x['ci'][0]:.{digits}f}, {x['ci'][1]:.{digits}f}]"


def read(stage):
    p = BENCH / f"quality-deep-{DATE}-{stage}.json"
    return json.loads(p.read_text()) if p.exists() else None


def render_premise(pr: dict) -> list[str]:
    name, place = best_budget(pr["results"])
    best = next(r for r in pr["results"] if r["config"] == name and r["placement"] == place)
    cols = [("deep-moe, all experts", pr["rows"]["full"]["summary"]),
            (f"pinned {name}, {place} (x{best['mem_ratio']:.2f})", best["summary"]),
            ("onehop", pr["rows"]["onehop"]["summary"]), ("split", pr["rows"]["split"]["summary"])]
    for name in ("single-64e", "single-shallow"):
        s = read(f"single-{name}")
        if s:
            if s["ids_hash"] != pr["ids_hash"]:
                raise SystemExit(f"single-{name} was scored on other text than the premise run")
            cols.append((f"{name} ({s['steps']} steps, x{s['x_plain']:.2f})", s["summary"]))
    lines = [f"**Premise test: perplexity per domain** ({pr['passages']} passages, {pr['passages_per_domain']} per "
             f"domain, {pr['tokens']} scored tokens; [95% bootstrap intervals])", "",
             "| domain | " + " | ".join(c for c, _ in cols) + " |", "| --- |" + " ---: |" * len(cols)]
    for part in ("seen", "unseen"):
        doms = sorted(cols[0][1][part]["ppl"]["domains"])
        for d in doms:
            lines.append(f"| {d}{' (unseen)' if part == 'unseen' else ''} | "
                         + " | ".join(cell(s[part]["ppl"]["domains"][d]) for _, s in cols) + " |")
        lines.append(f"| **mean, {part}** | " + " | ".join(f"**{cell(s[part]['ppl']['mean'])}**" for _, s in cols) + " |")
    lines += ["", "**Masked rows against the full model** (domain-balanced means)", "",
              "| row | x plain | ppl x seen | ppl x unseen | KL seen | KL unseen | agreement seen | agreement unseen |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    masked = [(f"pinned {r['config']} ({r['placement']})", r["mem_ratio"], r["summary"])
              for r in pr["results"] if r["placement"] in ("first", "layers", "oracle")]
    masked += [(k, 1.0, pr["rows"][k]["summary"]) for k in ("onehop", "split")]
    for name, ratio, s in masked:
        lines.append(f"| {name} | {ratio:.2f} | " + " | ".join(
            cell(s[p][k], 3) for k in ("ppl_ratio", "kl", "agreement") for p in ("seen", "unseen")) + " |")
    return lines


def render_paired(pa: dict) -> list[str]:
    p = pa["pinned"]
    lines = [f"**Paired perplexity ratios** (the same {pa['passages']} passages; per domain, then domain-balanced; "
             f"pinned = {p['config']}, {p['placement']} placement, x{p['mem_ratio']:.2f})", "",
             "| ratio of perplexities | seen domains | unseen kinds |", "| --- | ---: | ---: |"]
    for k, v in pa["ratios"].items():
        lines.append(f"| {k} | {cell(v['seen'], 3)} | {cell(v['unseen'], 3)} |")
    return lines


def render_sweep(sw: dict, title: str) -> list[str]:
    by = {(r["config"], r["placement"]): r for r in sw["results"]}
    names = list(dict.fromkeys(r["config"] for r in sw["results"]))
    lines = [f"**{title}** ({sw['passages']} held-out passages, {sw['tokens']} scored tokens)", "",
             "| config | x plain | KL (first) | agreement (first) | ppl x: first | layers | race | oracle |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for n in names:
        f = by[(n, "first")]
        s = f["summary"]["seen"]
        lines.append(f"| {n} | {f['mem_ratio']:.2f} | {cell(s['kl'], 3)} | {cell(s['agreement'], 3)} | "
                     + " | ".join(cell(by[(n, p)]["summary"]["seen"]["ppl_ratio"]) for p in q.PLACEMENTS) + " |")
    return lines


def render_depth(dp: dict) -> list[str]:
    by = {(r["mode"], r["L"]): r["summary"]["seen"] for r in dp["results"]}
    Ls = sorted({r["L"] for r in dp["results"]})
    lines = [f"**Masking loss by depth** ({dp['layout']}, placement {dp['placement']}; {dp['passages']} held-out "
             f"passages): masked at MoE layers 0..L, or at layer L only", "",
             "KL in nats per token; ppl x: perplexity over the full model's.", "",
             "| L | KL, layers 0..L | ppl x, layers 0..L | KL, layer L only | ppl x, layer L only |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for L in Ls:
        a, b = by[("prefix", L)], by[("only", L)]
        lines.append(f"| {L} | {cell(a['kl'], 3)} | {cell(a['ppl_ratio'])} | {cell(b['kl'], 3)} | {cell(b['ppl_ratio'])} |")
    return lines


def render(args):
    parts = []
    pr, sw, sws, dp = read("premise"), read("sweep"), read("sweep-deep-moe-shared"), read("depth")
    pa = read("paired")
    if pr:
        parts += render_premise(pr) + [""]
    if pa:
        parts += render_paired(pa) + [""]
    if sw:
        parts += render_sweep(sw, "deep-moe, 3 groups: groupings x overlays x placement") + [""]
    if sws:
        parts += render_sweep(sws, "deep-moe-shared, 3 groups, the budget layouts") + [""]
    if dp:
        parts += render_depth(dp) + [""]
    dq = read("dequant")
    if dq:
        parts.append(f"The dequantized copy against the 4-bit model it came from ({dq['passages']} passages, "
                     f"{dq['positions']} positions, fp32 compute): KL {dq['kl_per_token']:.4f} nats/token, greedy "
                     f"agreement {dq['argmax_agreement']:.3f} (bf16 rounding of the dequantized weights).")
        parts.append("")
    src = [s for s in (pr, sw, sws, dp, dq, pa) if s]
    # the BLAS guess from one timed matmul misreads a loaded CPU; every run preloaded OpenBLAS (see the doc)
    parts.append("Machine: " + "; ".join(sorted({re.sub(r", [^,]*BLAS.*$", "", s["machine"]) for s in src})) + ". Files: "
                 + ", ".join(f"`benchmarks/quality-deep-{DATE}-{k}.json`" for k, s in
                             (("premise", pr), ("sweep", sw), ("sweep-deep-moe-shared", sws), ("depth", dp),
                              ("dequant", dq), ("paired", pa)) if s)
                 + "; `python3 tools/quality_deep.py render` re-makes these tables.")
    text = DOC.read_text()
    block = BEGIN + "\n" + "\n".join(parts) + "\n" + END
    if BEGIN in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOC.write_text(text)
    print("\n".join(parts))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stage", choices=["premise", "single", "paired", "sweep", "depth", "dequant", "render"])
    ap.add_argument("name", nargs="?", default="single-64e", help="single: the model to score")
    ap.add_argument("--model", default="deep-moe")
    ap.add_argument("--passages", type=int, default=3, help="held-out passages per domain")
    ap.add_argument("--calib", type=int, default=10, help="calibration passages per domain")
    ap.add_argument("--budget-only", action="store_true", help="sweep: only the 1.5x budget layouts")
    ap.add_argument("--cache", default="/tmp/mlxmoe-deep", help="dequantized models and bundles")
    args = ap.parse_args()
    {"premise": premise, "single": single, "sweep": sweep, "depth": depth, "dequant": dequant, "paired": paired,
     "render": render}[args.stage](args)


if __name__ == "__main__":
    main()
