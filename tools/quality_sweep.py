"""Quality sweep on the committed reference MoE (issue 4).

Splits mlxmoe/assets/reference-moe unquantized (quality is measured against
the full model of the same bundle; on a CPU MLX runs quantized experts ~60x
slower), then evaluates virtually on the one full model:
  2, 3, 4 groups x {contiguous, mod, coactivation, domain}
    x overlay {0, 1, 2, 4, 8} by gate mass, {4, 8} by cross-domain breadth
    x placement {first, layers, race, oracle}
plus 3-group configurations at ~1.5x the memory of a plain third (the goal's
budget): big mass overlays, overlapping domain-calibrated sets, and the same
budget spent unevenly (all of layer 0, the most sensitive layer, eligible),
and a sensitivity probe (a third at one MoE layer only, all experts at the rest).
The best 3-group configurations are then re-measured on the whole held-out
suite. Writes benchmarks/quality-<date>.json and .png and prints markdown.

    python3 tools/quality_sweep.py                # ~8-10 min on 2 CPU cores with OpenBLAS
    python3 tools/quality_sweep.py --passages 2   # quicker, fewer tokens

On Linux the mlx[cpu] wheel links the reference BLAS, ~30x slower at matmul
than OpenBLAS; preload an OpenBLAS libblas.so.3 (LD_PRELOAD) to run this in
minutes. The tool says which one it got.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mlxmoe.quality import grouping as gr  # noqa: E402
from mlxmoe.quality import eval as q  # noqa: E402
from mlxmoe.quality.stats import collect  # noqa: E402
from mlxmoe.quality.report import write_plot  # noqa: E402
from mlxmoe.quality.suites import load_suites, tokenize  # noqa: E402
from mlxmoe.model.load import load_bundle, load_tokenizer  # noqa: E402
from mlxmoe.bundle.split import split  # noqa: E402

MODEL = REPO / "mlxmoe" / "assets" / "reference-moe"
GOAL = {"mem_ratio": 1.5, "ppl_ratio": 1.10, "agreement": 0.90}


def matmul_ms() -> float:
    a = mx.random.normal((512, 512))
    mx.eval(a)
    t = time.perf_counter()
    mx.eval(a @ a)
    return (time.perf_counter() - t) * 1e3


def budget_configs(m, stats, n_groups=3, ratio=1.5) -> list[q.Config]:
    """3-group configurations using (about) `ratio` x a plain third per node."""
    E, layers = m.n_experts, m.moe_layers
    trunk, per = m.files["trunk.safetensors"]["size"], m.expert_bytes()
    slots = int((ratio * q.plain_bytes(m, n_groups, trunk, per) - trunk) // per)  # expert-layers per node
    per_layer = slots // len(layers)
    # overlay size n with ceil((E - n) / G) + n <= per_layer
    n = max(k for k in range(E + 1) if -(-(E - k) // n_groups) + k <= per_layer)
    out = []
    for s in ("contiguous", "coactivation", "domain"):
        out += q.configs(m, stats, [n_groups], [s], [n], ["mass"])
    clusters = gr.cluster_domains(stats, n_groups)
    out.append(q.Config(f"g{n_groups}/domain-sets{per_layer}", n_groups, "domain-sets", None, 0,
                        gr.domain_sets(stats, clusters, per_layer)))
    # same slots, but every expert of the first MoE layer on every node
    rest = (slots - E) // (len(layers) - 1)
    sizes = {l: (E if i == 0 else rest) for i, l in enumerate(layers)}
    out.append(q.Config(f"g{n_groups}/domain-sets{rest}+L0all", n_groups, "domain-sets", None, 0,
                        gr.domain_sets(stats, clusters, sizes)))
    n2 = max(k for k in range(E + 1) if -(-(E - k) // n_groups) + k <= rest)
    ov = gr.overlay(stats, n2, "mass")
    ov[layers[0]] = list(range(E))
    g = gr.grouping("coactivation", n_groups, layers, E, stats, {l: v for l, v in ov.items() if l != layers[0]})
    sets = [{l: sorted(set(g["layers"][str(l)][i]) | set(ov[l])) for l in layers} for i in range(n_groups)]
    out.append(q.Config(f"g{n_groups}/coactivation/mass{n2}+L0all", n_groups, "coactivation", "mass", n2, sets))
    return out


def layer_configs(m, n_groups=3) -> list[q.Config]:
    """Sensitivity: a plain contiguous third at ONE MoE layer, every expert
    eligible at the others (not a deployable layout; shows where loss starts)."""
    full, out = list(range(m.n_experts)), []
    for l in m.moe_layers:
        sets = [{x: (g if x == l else full) for x in m.moe_layers} for g in gr.partition("contiguous", m.n_experts, n_groups)]
        out.append(q.Config(f"g{n_groups}/only-layer{l}-masked", n_groups, "one-layer", None, 0, sets))
    return out


def eligible_per_layer(cfg: q.Config) -> float:
    return max(sum(len(v) for v in s.values()) / len(s) for s in cfg.sets)


def meets(r) -> bool:
    return (r["mem_ratio"] <= GOAL["mem_ratio"] + 1e-9 and r["worst"]["ppl_ratio"] <= GOAL["ppl_ratio"]
            and r["worst"]["agreement"] >= GOAL["agreement"])


def gap(r) -> str:
    return (f"worst ppl ratio {r['worst']['ppl_ratio']:.3f} (goal <= {GOAL['ppl_ratio']}), "
            f"worst agreement {r['worst']['agreement']:.3f} (goal >= {GOAL['agreement']})")


def markdown(report, rows, title) -> str:
    by = {(r["config"], r["placement"]): r for r in report["results"]}
    elig = {c["name"]: c.get("eligible", 0) for c in report["configs"]}
    lines = [f"**{title}**", "",
             "| config | MB/node | x plain | eligible/layer | capture | KL (first) | agree mean / worst (first) "
             "| ppl x mean (first) | ppl x worst: first / layers / race / oracle | regret (first) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in rows:
        f = by.get((name, "first"))
        if f is None:
            continue
        worst = " / ".join(f"{by[(name, p)]['worst']['ppl_ratio']:.2f}" if (name, p) in by else "-"
                           for p in q.PLACEMENTS)
        lines.append(f"| {name} | {f['node_bytes'] / 1e6:.2f} | {f['mem_ratio']:.2f} | {elig.get(name, 0):.1f} "
                     f"| {f['mean']['capture']:.3f} | {f['mean']['kl']:.3f} "
                     f"| {f['mean']['agreement']:.3f} / {f['worst']['agreement']:.3f} | {f['mean']['ppl_ratio']:.3f} "
                     f"| {worst} | {f['mean']['regret']:.2f} |")
    return "\n".join(lines)


def best_rows(report, n_groups, max_ratio=None):
    """Config names of n_groups ranked by worst-domain ppl ratio under first-layer placement."""
    rs = [r for r in report["results"] if r["n_groups"] == n_groups and r["placement"] == "first"
          and (max_ratio is None or r["mem_ratio"] <= max_ratio + 1e-9)]
    return [r["config"] for r in sorted(rs, key=lambda r: r["worst"]["ppl_ratio"])]


def rounded(x, digits=5):
    if isinstance(x, float):
        return round(x, digits)
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    if isinstance(x, list):
        return [rounded(v, digits) for v in x]
    return x


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--passages", type=int, default=4, help="held-out passages per domain in the sweep (default 4)")
    ap.add_argument("--confirm", type=int, default=3, help="re-measure this many best 3-group configs on every passage")
    ap.add_argument("--out", default=str(REPO / "benchmarks"))
    ap.add_argument("--groups", default="2,3,4")
    args = ap.parse_args()
    t0 = time.time()
    ms = matmul_ms()
    blas = "fast BLAS" if ms < 20 else "reference BLAS (slow: preload OpenBLAS, see the module doc)"
    print(f"512x512 matmul: {ms:.1f} ms -> {blas}", file=sys.stderr)

    tmp = Path(tempfile.mkdtemp(prefix="mlxmoe-sweep-"))
    split(str(MODEL), str(tmp / "ref"), 3, bits=None, trunk_bits=None)
    bundle = tmp / "ref"
    loaded, tok = load_bundle(bundle), load_tokenizer(bundle)
    m = loaded.manifest
    calib_names, calib = load_suites(["builtin"], "calibration")
    stats = collect(loaded, tokenize(tok, calib), outputs=False)
    held_names, held = load_suites(["builtin"], "heldout")

    groups = [int(x) for x in args.groups.split(",")]
    cfgs = []
    for n in groups:
        for s in gr.STRATEGIES:
            cfgs += q.configs(m, stats, [n], [s], [0, 1, 2, 4, 8], ["mass"])
            cfgs += q.configs(m, stats, [n], [s], [4, 8], ["breadth"])
    if 3 in groups:
        cfgs += budget_configs(m, stats) + layer_configs(m)
    q.size_configs(m, cfgs)
    items = q.make_items(tok, held, args.passages, 32)
    print(f"{len(cfgs)} configurations, {len(items)} passages, "
          f"{q.work_units(items, cfgs)} tokens to forward", file=sys.stderr)
    rep = q.evaluate(loaded, items, cfgs)
    t_sweep = time.time() - t0

    # confirm the best 3-group configurations within the goal's memory on every held-out passage
    confirm = {}
    if 3 in groups and args.confirm:
        names = ["g3/contiguous/none"] + [n for n in best_rows(rep, 3, GOAL["mem_ratio"])
                                          if "only-layer" not in n][: args.confirm]
        cc = [c for c in cfgs if c.name in dict.fromkeys(names)]
        all_items = q.make_items(tok, held, None, 32)
        confirm = q.evaluate(loaded, all_items, cc)
        confirm["configs"] = [{"name": c.name, "eligible": eligible_per_layer(c), "mem_ratio": c.mem_ratio} for c in cc]

    date = time.strftime("%Y-%m-%d", time.gmtime())
    import platform

    machine = (f"{platform.system()} {platform.machine()}, {__import__('os').cpu_count()} CPU cores, "
               f"mlx {mx.__version__} ({mx.default_device()}), {blas}")
    rep.update({"date": date, "machine": machine, "model": "mlxmoe/assets/reference-moe (qwen3_moe, 48 experts, top-6)",
                "bundle": "unquantized (bf16 files, fp32 compute)", "suites": held_names,
                "calibration_suites": calib_names, "prompt_tokens": 32, "race_tokens": 16,
                "passages_per_domain": args.passages, "seconds_sweep": round(t_sweep, 1),
                "seconds_total": round(time.time() - t0, 1), "goal": GOAL,
                "trunk_bytes": m.files["trunk.safetensors"]["size"],
                "configs": [{"name": c.name, "n_groups": c.n_groups, "strategy": c.strategy,
                             "overlay_rule": c.overlay_rule, "overlay": c.overlay, "node_bytes": c.node_bytes,
                             "mem_ratio": c.mem_ratio, "eligible": eligible_per_layer(c)} for c in cfgs],
                "confirm": confirm})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"quality-{date}.json").write_text(json.dumps(rounded(rep), separators=(",", ":")) + "\n")
    try:
        write_plot(rep, str(out / f"quality-{date}.png"),
                     f"reference MoE: masked routing vs full model ({sum(rep['tokens'].values())} scored tokens)")
    except Exception as e:  # noqa: BLE001 - the JSON is the result; the plot is a convenience
        print(f"no plot: {e}", file=sys.stderr)

    scored = sum(rep["tokens"].values())
    print(f"# quality sweep {date}\n\n{machine}; {len(items)} held-out passages ({args.passages}/domain), "
          f"{scored} scored tokens (+32 prompt tokens each); sweep {t_sweep:.0f} s, total {time.time() - t0:.0f} s\n")
    for n in groups:
        names = [c.name for c in cfgs if c.n_groups == n]
        print(markdown(rep, names, f"{n} groups") + "\n")
    if confirm:
        print(markdown(confirm, [c["name"] for c in confirm["configs"]],
                       f"best 3-group configurations within {GOAL['mem_ratio']}x, all held-out passages "
                       f"({sum(confirm['tokens'].values())} scored tokens)") + "\n")
        fin = [r for r in confirm["results"] if r["mem_ratio"] <= GOAL["mem_ratio"] + 1e-9
               and r["placement"] != "oracle"]
        best = min(fin, key=lambda r: r["worst"]["ppl_ratio"])
        print(f"best 3-group configuration within {GOAL['mem_ratio']}x a plain third: {best['config']} "
              f"(placement {best['placement']}, x{best['mem_ratio']:.2f}): {gap(best)} -> "
              f"{'MEETS the goal' if meets(best) else 'misses the goal'}")


if __name__ == "__main__":
    main()
