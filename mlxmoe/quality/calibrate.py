"""Calibration behind `mlxmoe calibrate`: gate statistics on a prompt suite
-> overlay (and optionally grouping) written into the bundle, with provenance.

The suite runs teacher-forced through the full model (every group loaded);
per MoE layer we count top-k selections, the router probability of selected
experts, per-domain usage and co-selection, and each expert's largest output
magnitude (super experts are the extreme outliers there; a removal test
confirms them). The bundle is then rewritten from its own files (no
requantisation; the source checkpoint is not needed) or re-split from
--source, either way through bundle/writer.py."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxmoe.bundle.manifest import OVERLAY_FILE, TRUNK_FILE, Manifest, first_rows, group_file
from mlxmoe.bundle.writer import write_bundle
from mlxmoe.errors import MlxMoeError
from mlxmoe.quality import autolayout
from mlxmoe.quality import grouping as gr
from mlxmoe.quality.metrics import kl_per_token, logp_of
from mlxmoe.quality.stats import collect
from mlxmoe.quality.suites import load_suites, tokenize

def find_super_experts(loaded, stats: gr.Stats, items, ratio: float = 8.0, candidates: int = 2,
                       kl_factor: float = 5.0, sample_tokens: int = 1500) -> dict:
    """Super experts: an output outlier (max |output| >= `ratio` x the layer's
    median expert) whose removal alone (masked out at its layer) costs at
    least `kl_factor` x the KL of removing the layer's most-used expert.
    Returns {"experts": {layer: [ids]}, "checked": [...]} (what was measured)."""
    sample, n = [], 0
    for dom in stats.domains:  # a few tokens of every domain
        for d, ids in items:
            if d == dom:
                sample.append(ids)
                n += len(ids)
                break
    while n < sample_tokens and len(sample) < len(items):
        ids = items[len(sample)][1]
        sample.append(ids)
        n += len(ids)
    ref = [logp_of(loaded, ids) for ids in sample]
    mx.eval(ref)

    def removal_kl(i, e):
        l = stats.layers[i]
        loaded.set_eligible({x: [y for y in range(stats.n_experts) if not (x == l and y == e)] for x in stats.layers})
        kl = float(np.mean([kl_per_token(r, logp_of(loaded, ids)).mean().item() for r, ids in zip(ref, sample)]))
        loaded.set_eligible(None)
        return kl

    found, checked = {}, []
    load = stats.balanced("sel")
    for i, l in enumerate(stats.layers):
        om = stats.out_max[i] if stats.out_max is not None else np.zeros(stats.n_experts)
        med = float(np.median(om)) or 1.0
        outl = [int(e) for e in np.argsort(-om)[:candidates] if om[e] >= ratio * med]
        if not outl:
            continue
        base = removal_kl(i, int(np.argmax(load[i])))
        for e in outl:
            kl = removal_kl(i, e)
            checked.append({"layer": l, "expert": e, "out_max_ratio": round(float(om[e] / med), 1),
                            "removal_kl": round(kl, 5), "busiest_removal_kl": round(base, 5)})
            if kl >= kl_factor * max(base, 1e-6):
                found.setdefault(l, []).append(e)
    return {"experts": found, "checked": checked}


# --------------------------------------------------------- rewriting bundles

def rebundle(bundle: Path, out: Path, grouping: dict, overlay: dict, calibration: dict) -> Manifest:
    """Write a bundle with a new grouping/overlay from `bundle`'s own files:
    the trunk is copied, expert rows are regathered (bit for bit, no
    requantisation)."""
    m = Manifest.load(bundle)
    n_groups = len(next(iter(grouping["layers"].values())))

    def fill(tmp: Path) -> dict:
        full = _all_experts(bundle, m)  # name -> (layer, [E, ...] lazily gathered in global order)
        files = {TRUNK_FILE: {"role": "trunk"}}
        shutil.copy2(bundle / TRUNK_FILE, tmp / TRUNK_FILE)
        for g in range(n_groups):
            _save_rows(tmp / group_file(g), full, lambda l: grouping["layers"][str(l)][g])
            files[group_file(g)] = {"role": "group", "group": g}
        if any(overlay["layers"].values()):
            _save_rows(tmp / OVERLAY_FILE, full, lambda l: overlay["layers"].get(str(l), []))
            files[OVERLAY_FILE] = {"role": "overlay"}
        for name, meta in m.files.items():
            if meta["role"] == "meta":
                shutil.copy2(bundle / name, tmp / name)
                files[name] = {"role": "meta"}
        return files

    def manifest(files: dict) -> Manifest:
        return Manifest(model=m.model, moe=m.moe, n_groups=n_groups, grouping=grouping, overlay=overlay,
                        quantization=m.quantization, files=files, calibration=calibration,
                        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    return write_bundle(out, fill, manifest)


def _all_experts(bundle: Path, m: Manifest) -> dict:
    """name -> (layer, [E, ...] rows in global order) from the group files and the overlay (a
    layout keeps the experts every node holds there alone)."""
    parts = [(mx.load(str(bundle / group_file(g))), lambda l, g=g: m.group_experts(l, g)) for g in range(m.n_groups)]
    if OVERLAY_FILE in m.files:
        parts.append((mx.load(str(bundle / OVERLAY_FILE)), m.overlay_experts))
    out = {}
    for name in sorted({n for w, _ in parts for n in w}):
        l = int(name.split(".")[2])
        have = [(w, ids(l)) for w, ids in parts if name in w]
        ids = [e for _, i in have for e in i]
        if len(set(ids)) < m.n_experts:
            raise MlxMoeError(f"{bundle}: layer {l} holds {len(set(ids))} of {m.n_experts} experts (a layout that "
                              "left some out): calibrate from the full bundle, or give --source")
        stacked = mx.concatenate([w[name] for w, _ in have], axis=0)
        out[name] = (l, stacked[mx.array(first_rows(ids))])  # row e = global expert e
    return out


def _save_rows(path: Path, full: dict, rows_for):
    tensors = {}
    for name, (l, a) in full.items():
        rows = rows_for(l)
        if rows:
            tensors[name] = a[mx.array(sorted(rows))]
    mx.save_safetensors(str(path), tensors, metadata={"format": "mlxmoe.experts"})


# ------------------------------------------------------------------ driver

def calibrate(bundle, suites=None, overlay_per_layer: int | None = None, overlay_bytes: int | None = None,
              rule: str = "mass", strategy: str | None = None, source: str | None = None, out=None,
              n_groups: int | None = None, super_check: bool = True, progress_mode: str = "quiet",
              set_size: int | None = None, set_budget: tuple | None = None, budgets: list | None = None,
              kv_bytes: float = 0.0) -> dict:
    """`set_budget`: ("bytes", n) or ("ratio", r) per node, for domain-sets
    instead of `set_size` (grouping.set_size_for_budget). `budgets`: one per node
    (layout.parse_budgets): the automatic layout (autolayout.py) instead of a
    grouping; `kv_bytes` is what a node keeps for its KV cache when a budget is bytes."""
    from mlxmoe.model.load import load_bundle, load_tokenizer
    from mlxmoe.progress import progress

    bundle = Path(bundle)
    out = Path(out) if out else bundle
    if rule not in gr.OVERLAY_RULES:
        raise MlxMoeError(f"--overlay-rule {rule!r}: choose from {', '.join(gr.OVERLAY_RULES)}")
    if strategy is not None and strategy not in gr.STRATEGIES + gr.SET_STRATEGIES:
        raise MlxMoeError(f"--grouping {strategy!r}: choose from {', '.join(gr.STRATEGIES + gr.SET_STRATEGIES)}")
    names, passages = load_suites(suites, "calibration")
    m = Manifest.load(bundle)
    if budgets is not None and (strategy or set_size or set_budget or overlay_per_layer or overlay_bytes):
        raise MlxMoeError("--budgets finds the grouping and overlay itself: leave out --grouping, --set-size, "
                          "--set-budget and the overlay options")
    groups = len(budgets) if budgets is not None else n_groups or m.n_groups
    if strategy in gr.SET_STRATEGIES:  # fail before the statistics pass, not after
        gr.check_set_domains([p.domain for p in passages], groups)
        known_ov = m.expert_bytes() * len(m.moe_layers) * (overlay_per_layer or 0) if overlay_bytes is None else overlay_bytes
        dims = (m.n_experts, groups, m.expert_bytes(), len(m.moe_layers), m.files[TRUNK_FILE]["size"])
        if set_budget is not None:
            gr.set_size_for_budget(set_budget, *dims, int(known_ov))
        elif set_size is not None:
            gr.check_set_size(set_size, groups, m.n_experts, m.top_k)
    elif set_size is not None or set_budget is not None:
        raise MlxMoeError("--set-size / --set-budget size domain-sets: give them with --grouping domain-sets")
    loaded = load_bundle(bundle)
    items = tokenize(load_tokenizer(bundle), passages)
    held = []
    if budgets is not None:  # the report is on passages the layout never saw
        items, held = autolayout.split_held_out(items)
    with progress(sum(len(i) for _, i in items), "calibrate", progress_mode, unit="items") as p:
        stats = collect(loaded, items, p.advance)
    if budgets is not None:
        return _layout(bundle, out, m, loaded, stats, items, held, budgets, kv_bytes, names, source, progress_mode)
    sup = find_super_experts(loaded, stats, items) if super_check else {"experts": {}, "checked": []}
    stats.super_experts = sup["experts"]
    per_expert = m.expert_bytes()
    if overlay_bytes is not None:
        overlay_per_layer = gr.overlay_for_bytes(overlay_bytes, int(per_expert), len(m.moe_layers))
    if overlay_per_layer is None:
        overlay_per_layer = max(len(v) for v in sup["experts"].values()) if sup["experts"] else 0
    ov = gr.overlay(stats, overlay_per_layer, rule)
    ov_bytes = int(round(per_expert * sum(len(v) for v in ov.values())))
    sets_info = {}
    if strategy in gr.SET_STRATEGIES:
        dims = (m.n_experts, groups, per_expert, len(m.moe_layers), m.files[TRUNK_FILE]["size"])
        if set_budget is not None:
            set_size = gr.set_size_for_budget(set_budget, *dims, ov_bytes)
        set_size = set_size or gr.default_set_size(m.n_experts, groups)
        gmap = gr.set_grouping(stats, groups, set_size)
        sets_info = {"set_size": set_size, "set_budget": gr.budget_text(set_budget) if set_budget else None,
                     "mem_ratio": round(gr.set_mem_ratio(set_size, *dims, ov_bytes), 4)}
    elif strategy:
        gmap = gr.grouping(strategy, groups, m.moe_layers, m.n_experts, stats, ov)
    else:
        gmap = _keep_grouping(m, groups, ov)
    share = stats.balanced("mass") / np.maximum(stats.balanced("topk_mass")[:, None], 1e-12)
    calib = {
        "suites": names, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tokens": dict(stats.tokens), "passages": len(items),
        "overlay_rule": rule, "overlay_per_layer": overlay_per_layer,
        "overlay_bytes_per_node": ov_bytes,
        "grouping": gmap["strategy"], **sets_info,
        "super_experts": {str(l): v for l, v in sup["experts"].items()}, "super_expert_checks": sup["checked"],
        "overlay_mass_share": {str(l): round(float(share[i, ov[l]].sum()), 4) for i, l in enumerate(m.moe_layers)},
        "stats": stats.summary(),
    }
    overlay = {"source": f"calibrate:{rule}", "layers": {str(l): v for l, v in ov.items() if v}}
    del loaded
    return {"out": str(out), "manifest_hash": _write(bundle, out, m, source, gmap, overlay, calib).hash,
            "calibration": calib}


def _layout(bundle, out, m, loaded, stats, fit, held, budgets, kv_bytes, names, source, progress_mode) -> dict:
    from mlxmoe.progress import progress

    with progress(autolayout.work(stats, fit, held, len(budgets)), "layout", progress_mode, unit="passes") as p:
        gmap, overlay, report = autolayout.build(loaded, m, stats, fit, held, budgets, kv_bytes, advance=p.advance)
    calib = {"suites": names, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "tokens": dict(stats.tokens), "passages": len(fit), "grouping": "layout", "layout": report,
             "stats": stats.summary()}
    del loaded
    return {"out": str(out), "manifest_hash": _write(bundle, out, m, source, gmap, overlay, calib).hash,
            "calibration": calib}


def _write(bundle, out, m: Manifest, source, gmap: dict, overlay: dict, calib: dict) -> Manifest:
    """The calibrated bundle: re-split from `source`, or rewritten from the bundle's own files."""
    if not source:
        return rebundle(bundle, out, gmap, overlay, calib)
    from mlxmoe.bundle.split import split

    q = m.quantization
    e, t = q.get("experts") or {}, q.get("trunk") or {}
    return split(source, str(out), len(next(iter(gmap["layers"].values()))), overlay, gmap, e.get("bits"),
                 e.get("group_size", 64), t.get("bits"), q.get("kv_bits"), force=True, calibration=calib)


def _keep_grouping(m: Manifest, n_groups: int, ov: dict) -> dict:
    if n_groups == m.n_groups:
        return m.grouping
    return gr.grouping("contiguous", n_groups, m.moe_layers, m.n_experts, None, ov)
