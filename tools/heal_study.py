"""Healing before/after on one model and layout (docs/QUALITY.md, Healing):
split (unquantized) -> `calibrate --heal` -> `eval` of the healed bundle (its
plain and healed groups) on each suite; one JSON per suite and a summary.

    python tools/heal_study.py --model mlxmoe/assets/reference-moe \\
        --grouping mlxmoe/assets/groupings/reference-moe-g3-domain-sets29.json --out /tmp/study
    python tools/heal_study.py --model DEQUANTIZED_DEEP_MOE --grouping BUNDLE_WITH_ITS_GROUPING \\
        --name mlxmoe/assets/deep-moe --out /tmp/study
    python tools/heal_study.py --bundle BUNDLE_ALREADY_HEALED --out DIR --suite builtin \\
        --suite mlxmoe/assets/suites/unseen.jsonl

Runs on the CPU (here) and on an MLX CUDA / Metal GPU alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import mlx.core as mx

from mlxmoe.quality.eval import run_eval


def summary(rep: dict) -> dict:
    """Per configuration (plain / healed): mean and worst KL, agreement, ppl ratio,
    their intervals, the meter and its correlation with KL, memory."""
    out = {}
    for r in rep["results"]:
        out[r["config"]] = {k: r[k] for k in ("mean", "worst", "intervals", "meter", "meter_kl", "node_bytes",
                                              "mem_ratio", "heal_bytes")}
        out[r["config"]]["domains"] = {d: {k: round(v[k], 4) for k in ("kl", "agreement", "ppl_ratio", "meter")}
                                       for d, v in r["domains"].items()}
    return out


def grouping_of(path: str) -> dict:
    """A grouping JSON, or the grouping in a bundle's manifest (what `calibrate
    --grouping domain-sets --out BUNDLE` wrote)."""
    from mlxmoe.bundle.manifest import Manifest

    p = Path(path)
    return Manifest.load(p).grouping if p.is_dir() else json.loads(p.read_text())


def table(result: dict, layout: str) -> str:
    """Markdown rows (docs/QUALITY.md, Healing) of one summary.json: per suite,
    plain vs healed: KL, agreement and ppl ratio (mean / worst domain, 95% interval
    of the mean), the meter and its correlation with KL, memory."""
    rows = []
    for suite, cfgs in result["suites"].items():
        for name, c in cfgs.items():
            ci = c["intervals"]
            rows.append(f"| {layout} | {suite} | {'healed' if name.endswith('+heal') else 'plain'} "
                        f"| {c['mean']['kl']:.3f} [{ci['kl'][0]:.3f}, {ci['kl'][1]:.3f}] "
                        f"| {c['mean']['agreement']:.3f} / {c['worst']['agreement']:.3f} "
                        f"| {c['mean']['ppl_ratio']:.3f} [{ci['ppl_ratio'][0]:.3f}, {ci['ppl_ratio'][1]:.3f}] / {c['worst']['ppl_ratio']:.3f} "
                        f"| {c['meter']:.3f} ({c['meter_kl']['spearman']}) "
                        f"| {c['node_bytes'] / 1e6:.2f} (x{c['mem_ratio']:.2f}) |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table", nargs=2, metavar=("SUMMARY", "LAYOUT"), help="print the markdown rows of a summary.json")
    ap.add_argument("--model", help="checkpoint to split (unquantized)")
    ap.add_argument("--grouping", help="grouping JSON or a bundle whose grouping to use for split (default: contiguous)")
    ap.add_argument("--name", help="the model's name in the summary (default: --model)")
    ap.add_argument("--groups", type=int, default=3)
    ap.add_argument("--bundle", help="a bundle already healed (skips split and heal)")
    ap.add_argument("--out")
    ap.add_argument("--suite", action="append", help="eval suites (default: builtin heldout and the unseen suite)")
    ap.add_argument("--calib-suite", action="append", help="healing suite (default: builtin calibration)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--passages", type=int, default=8, help="eval passages per domain")
    a = ap.parse_args()
    if a.table:
        print(table(json.loads(Path(a.table[0]).read_text()), a.table[1]))
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    bundle = Path(a.bundle) if a.bundle else out / "healed"
    heal = None
    grouping = grouping_of(a.grouping) if a.grouping else None
    if not a.bundle:
        from mlxmoe.bundle.split import split
        from mlxmoe.quality.heal import HealConfig, heal_bundle

        split(a.model, str(out / "bundle"), a.groups, grouping=grouping, bits=None, trunk_bits=None, force=True)
        heal = heal_bundle(out / "bundle", a.calib_suite, HealConfig(max_steps=a.steps), out=bundle, progress_mode="json")
        (out / "heal.json").write_text(json.dumps(heal, indent=1))
    suites = a.suite or ["builtin", str(Path(__file__).parents[1] / "mlxmoe/assets/suites/unseen.jsonl")]
    result = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "bundle": str(bundle),
              "machine": f"{platform.system()} {platform.machine()}, mlx {mx.__version__} ({mx.default_device()})",
              "model": a.name or a.model or a.bundle,
              "settings": {"passages_per_domain": a.passages} | ({} if a.bundle else {  # else: the bundle's "heal"
                  "groups": a.groups, "grouping": (grouping or {}).get("strategy", "contiguous"), "steps": a.steps,
                  "calib_suites": a.calib_suite or ["builtin"]}),
              "suites": {}}
    for s in suites:
        rep = run_eval(bundle, [s], placements=("first",), per_domain=a.passages, progress_mode="json")
        name = Path(s).stem if s != "builtin" else "heldout"
        (out / f"eval-{name}.json").write_text(json.dumps(rep))
        result["suites"][name] = summary(rep)
        result["heal"] = rep.get("heal")
    result["seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: {c: {"worst_ppl": v["worst"]["ppl_ratio"], "worst_agreement": v["worst"]["agreement"],
                               "kl": v["mean"]["kl"]} for c, v in r.items()} for k, r in result["suites"].items()}))


if __name__ == "__main__":
    main()
