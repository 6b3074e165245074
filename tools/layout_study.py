"""Layouts found by `calibrate --budgets`, measured (docs/QUALITY.md, "Layouts").

For each budget list (one budget per node), the automatic layout is built as
`calibrate --budgets` builds it (quality/autolayout.py), its node sets sized
by the bytes of the bundle nodes would serve (`--sizes`, e.g. the demo's 8-bit
split) but measured on an unquantized copy of the same model (on a CPU MLX
runs quantized experts ~10x slower), then evaluated on held-out and unseen
passages (never fitted on) beside the hand-made layout it must beat: every
node pinned (each node's own quality), and placed as the router places
(`router`: scores at the first MoE layer where the nodes' sets differ), by
race, and by the oracle (a bound). Writes benchmarks/layouts-<date>.json and,
with --save, the first budget list's layout as a demo asset
({"grouping", "overlay"}).

    LD_PRELOAD=.../libopenblas.so.0 python3 tools/layout_study.py \\
        --budgets 1.47x,1.47x,1.47x --budgets 1x,1.5x,3x --passages 8
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from mlxmoe.bundle.manifest import Manifest  # noqa: E402
from mlxmoe.bundle.split import split  # noqa: E402
from mlxmoe.model.load import load_bundle, load_tokenizer  # noqa: E402
from mlxmoe.quality import autolayout  # noqa: E402
from mlxmoe.quality import eval as q  # noqa: E402
from mlxmoe.quality.layout import parse_budgets  # noqa: E402
from mlxmoe.quality.metrics import aggregate  # noqa: E402
from mlxmoe.quality.stats import collect  # noqa: E402
from mlxmoe.quality.suites import load_suite, tokenize  # noqa: E402

ASSETS = REPO / "mlxmoe" / "assets"
PLACEMENTS = ("router", "race", "oracle")


def node_sets(grouping: dict, overlay: dict, layers: list[int]) -> list[dict]:
    """Each node's eligible set per layer: its group ∪ the overlay."""
    n = len(grouping["layers"][str(layers[0])])
    ov = overlay.get("layers", {})
    return [{l: sorted(set(grouping["layers"][str(l)][g]) | set(ov.get(str(l), []))) for l in layers}
            for g in range(n)]


def config(name: str, sets: list[dict], m: Manifest, sizes: Manifest) -> q.Config:
    cfg = q.Config(name, len(sets), name.split("/")[0], None, 0, sets)
    trunk, per = sizes.files["trunk.safetensors"]["size"], sizes.expert_bytes()
    cfg.node_bytes = max(q.node_bytes(m, s, trunk, per) for s in sets)
    cfg.mem_ratio = cfg.node_bytes / q.plain_bytes(m, len(sets), trunk, per)
    return cfg


def items_of(tok, spec: str, kind: str, per_domain: int, prompt_tokens: int) -> list:
    _, passages = load_suite(spec, kind)
    return q.make_items(tok, passages, per_domain, prompt_tokens)


def summaries(loaded, items, cfgs) -> dict:
    """Per config: placed results (PLACEMENTS) and every node pinned."""
    m = loaded.manifest
    if any(it.ref_logp is None for it in items):
        q.reference(loaded, items)
    ref_nll = q.ref_nll_of(items)
    out = {}
    for c in cfgs:
        runs = q.run_config(loaded, items, c, 16)
        placed = {}
        for mode in PLACEMENTS:
            detail = {}
            doms = q.summarize(m, items, c, runs, mode, ref_nll, detail)
            mean, worst = aggregate(doms)
            placed[mode] = {"mean": mean, "worst": worst, "intervals": detail["intervals"]}
        out[c.name] = {"mem_ratio": round(c.mem_ratio, 4), "placed": placed,
                       "nodes": q.node_summaries(m, items, c, runs, ref_nll)}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ASSETS / "reference-moe"))
    ap.add_argument("--budgets", action="append", required=True, help="one budget per node; repeatable")
    ap.add_argument("--calibration", default="builtin")
    ap.add_argument("--heldout", default="builtin")
    ap.add_argument("--unseen", default=str(ASSETS / "suites" / "unseen.jsonl"))
    ap.add_argument("--compare", default=str(ASSETS / "groupings" / "reference-moe-g3-domain-sets29.json"),
                    help="the hand-made grouping to compare with (3 nodes)")
    ap.add_argument("--passages", type=int, default=8, help="held-out passages per domain")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(REPO / "benchmarks"))
    ap.add_argument("--save", help="write the first budget list's layout here (the demo's asset)")
    ap.add_argument("--hand-prefix", type=int, action="append", default=[],
                    help="also compare the hand-made 1.5x layout with the first K MoE layers whole "
                         "(tools/quality_deep.py prefix_all_config); repeatable")
    a = ap.parse_args()

    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="layout-study-"))
    measured, sized = work / "f32", work / "q8"
    split(a.model, measured, 3, bits=None, trunk_bits=None)
    split(a.model, sized, 3, bits=8, group_size=64, trunk_bits=8)  # the demo's bundle: what nodes serve
    m, sizes = Manifest.load(measured), Manifest.load(sized)
    loaded, tok = load_bundle(measured, None), load_tokenizer(measured)
    _, calib = load_suite(a.calibration, "calibration")
    fit = tokenize(tok, calib)
    stats = collect(loaded, fit)
    held = items_of(tok, a.heldout, "heldout", a.passages, a.prompt_tokens)
    unseen = items_of(tok, a.unseen, "unseen", a.passages, a.prompt_tokens) if a.unseen else []
    hand = json.loads(Path(a.compare).read_text()) if a.compare else None
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} CPU x{__import__('os').cpu_count()}",
              "model": a.model, "sizes": "8-bit experts and trunk (the demo's split)", "calibration": a.calibration,
              "held_out_passages": len(held), "unseen_passages": len(unseen), "layouts": []}
    first = None
    for spec in a.budgets:
        budgets = parse_budgets(spec)
        grouping, overlay, lay = autolayout.build(loaded, sizes, stats, fit, [], budgets)
        sets = node_sets(grouping, overlay, m.moe_layers)
        cfgs = [config(f"layout/{spec}", sets, m, sizes)]
        if hand and len(budgets) == len(hand["layers"][str(m.moe_layers[0])]):
            cfgs.append(config("hand-made/" + Path(a.compare).stem, node_sets(hand, {}, m.moe_layers), m, sizes))
        if len(budgets) == 3:
            for k in a.hand_prefix:
                from quality_deep import prefix_all_config
                pre = prefix_all_config(sizes, stats, k)
                cfgs.append(config(f"hand-made/{pre.name}", pre.sets, m, sizes))
        entry = {"budgets": spec, "layout": lay, "held_out": summaries(loaded, held, cfgs)}
        if unseen:
            entry["unseen"] = summaries(loaded, unseen, cfgs)
        report["layouts"].append(entry)
        first = first or {"grouping": {**grouping, "source": f"tools/layout_study.py --budgets {spec} "
                                       f"({a.calibration}, {time.strftime('%Y-%m-%d')})"}, "overlay": overlay}
        print(render(entry), flush=True)
    report["seconds"] = round(time.time() - t0)
    out = Path(a.out) / f"layouts-{report['date']}.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    if a.save:
        Path(a.save).write_text(json.dumps(first, indent=1))
        print(f"wrote {a.save}")


def render(entry: dict) -> str:
    lay = entry["layout"]
    lines = [f"## budgets {entry['budgets']}  (layer costs {lay['layer_costs']}; whole layers tried "
             f"{lay['candidates']}, kept {lay['whole_layers']})"]
    for part in ("held_out", "unseen"):
        for name, r in entry.get(part, {}).items():
            for mode, p in r["placed"].items():
                lines.append(f"{part:8s} {name:40s} x{r['mem_ratio']:.2f} {mode:7s} ppl x{p['mean']['ppl_ratio']:.3f} "
                             f"/ worst x{p['worst']['ppl_ratio']:.3f}  agreement {p['mean']['agreement']:.3f} "
                             f"/ {p['worst']['agreement']:.3f}")
            for nd in r["nodes"]:
                lines.append(f"{part:8s} {name:40s}   node {nd['group']} pinned: ppl x{nd['mean']['ppl_ratio']:.3f} / "
                             f"worst x{nd['worst']['ppl_ratio']:.3f}  agreement {nd['mean']['agreement']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
