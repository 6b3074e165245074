"""`mlxmoe eval`: how far masked routing is from the full model (DESIGN.md,
"Quality").

Every held-out passage is split into a prompt (the first `prompt_tokens`
tokens: what placement sees) and a continuation (what is scored). The full
model (every expert eligible) is the reference. A configuration is a list of
per-node eligible sets; it is evaluated virtually on the one loaded full model
with `set_eligible` (exactly what a node with that set computes), teacher-
forced, once per node, so every placement rule can be compared with the
oracle (the node whose masked run has the best mean log-prob).

Metrics per domain (continuation tokens only):
- capture:    S(best)/unmasked top-k mass, S over every MoE layer and token
- kl:         next-token KL(reference || placed node), nats/token
- agreement:  share of positions where the argmax token matches
- ppl_ratio:  perplexity placed node / reference
- regret:     share of passages placed on a node that is not the oracle's
- regret_nats: mean log-prob lost to the oracle, nats/token
- node_bytes: trunk + the node's experts (group ∪ overlay), from file sizes

One-hop routing (node/remote/, routing="onehop") is evaluated on the same
full model with a per-token dynamic mask: at every MoE layer and token, the
eligible set of the group holding the most top-k router mass (ties: the
placed group). `remote_share` is the share of (token, MoE layer) steps routed
to a group other than the placed one: remote calls per token / MoE layers.
Split routing (routing="split") is evaluated the same way with the placed
group's set united with the picked one; its remote_share counts the steps
whose top-k holds an expert the placed node lacks.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
import mlx.core as mx
import numpy as np

from mlxmoe.quality import grouping as gr
from mlxmoe.quality.calibrate import collect, kl_per_token, load_suites, logp_of, tokenize
from mlxmoe.errors import MlxMoeError
from mlxmoe.bundle.manifest import TRUNK_FILE, Manifest
from mlxmoe.model.placement import score_groups
from mlxmoe.model.moe import GateRecorder

PLACEMENTS = ("first", "layers", "race", "oracle")
METRICS = ("capture", "kl", "agreement", "ppl_ratio", "regret", "regret_nats")
ONEHOP_METRICS = ("kl", "agreement", "ppl_ratio", "remote_share")


@dataclass
class Config:
    """One way to distribute experts: per node, per MoE layer, eligible ids."""

    name: str
    n_groups: int
    strategy: str
    overlay_rule: str | None
    overlay: int  # experts per layer replicated on every node
    sets: list  # [ {layer: [ids]} per node ]
    node_bytes: int = 0
    mem_ratio: float = 0.0  # node_bytes / (trunk + experts / n_groups)


@dataclass
class Item:
    domain: str
    ids: list
    prompt: int  # prompt length P: positions P-1 .. T-2 are scored
    ref_logp: mx.array = None  # [T, V]
    gates: dict = None  # layer -> [T, E] reference router logits


@dataclass
class Runs:
    """Per item and node: sums over the continuation (and race log-prob)."""

    nll: np.ndarray  # [I, N]
    kl: np.ndarray  # [I, N]
    agree: np.ndarray  # [I, N]
    race: np.ndarray  # [I, N] mean log-prob of the last race tokens of the prompt


# ------------------------------------------------------------------ setup

def make_items(tokenizer, passages, per_domain: int | None = None, prompt_tokens: int = 32) -> list[Item]:
    """Tokenized passages (at most `per_domain` each, in suite order) long
    enough to leave a continuation of at least 8 tokens."""
    items, count = [], {}
    for dom, ids in tokenize(tokenizer, passages):
        if len(ids) < prompt_tokens + 8 or (per_domain and count.get(dom, 0) >= per_domain):
            continue
        count[dom] = count.get(dom, 0) + 1
        items.append(Item(dom, ids, prompt_tokens))
    if not items:
        raise MlxMoeError(f"no passage has more than {prompt_tokens + 8} tokens; use longer text or fewer --prompt-tokens")
    return items


def reference(loaded, items: list[Item], advance=lambda n: None):
    loaded.set_eligible(None)
    for it in items:
        with GateRecorder(loaded.gates) as rec:
            it.ref_logp = logp_of(loaded, it.ids)
            mx.eval(it.ref_logp)
        it.gates = {l: v[0] for l, v in rec.by_layer().items()}
        mx.eval(it.gates)
        advance(len(it.ids))


def node_bytes(m: Manifest, sets: dict, trunk: int, per_expert: float) -> int:
    return int(trunk + per_expert * sum(len(v) for v in sets.values()))


def plain_bytes(m: Manifest, n_groups: int, trunk: int, per_expert: float) -> float:
    return trunk + per_expert * m.n_experts * len(m.moe_layers) / n_groups


def configs(m: Manifest, stats: gr.Stats | None, groups, strategies, overlays, rules) -> list[Config]:
    """The sweep's partition configurations (grouping x overlay)."""
    out = []
    for n in groups:
        for s in strategies:
            for k in overlays:
                for rule in (rules if k else [None]):
                    if s == "bundle":
                        continue
                    ov = gr.overlay(stats, k, rule) if k else {}
                    g = gr.grouping(s, n, m.moe_layers, m.n_experts, stats, ov)
                    sets = [{l: sorted(set(g["layers"][str(l)][i]) | set(ov.get(l, []))) for l in m.moe_layers}
                            for i in range(n)]
                    name = f"g{n}/{s}/" + (f"{rule}{k}" if k else "none")
                    out.append(Config(name, n, s, rule, k, sets))
        if "bundle" in strategies and n == m.n_groups:
            sets = [{l: m.eligible(i, l) for l in m.moe_layers} for i in range(m.n_groups)]
            out.append(Config(f"g{n}/bundle", n, m.grouping.get("strategy", "bundle"), (m.overlay.get("source") or None),
                              max((len(m.overlay_experts(l)) for l in m.moe_layers), default=0), sets))
    return out


def size_configs(m: Manifest, cfgs: list[Config]):
    trunk = m.files[TRUNK_FILE]["size"]
    per = m.expert_bytes()
    for c in cfgs:
        c.node_bytes = max(node_bytes(m, s, trunk, per) for s in c.sets)
        c.mem_ratio = c.node_bytes / plain_bytes(m, c.n_groups, trunk, per)


# ------------------------------------------------------------- measuring

def token_metrics(ref_logp: mx.array, logp: mx.array, targets: mx.array) -> tuple:
    """Per position: KL(ref || other), argmax agreement (0/1), and the other
    model's negative log-likelihood of the target. Inputs [T, V], [T, V], [T]."""
    kl = kl_per_token(ref_logp, logp)
    agree = (mx.argmax(ref_logp, axis=-1) == mx.argmax(logp, axis=-1)).astype(mx.float32)
    nll = -mx.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
    return kl, agree, nll


def run_config(loaded, items: list[Item], cfg: Config, race_tokens: int, advance=lambda n: None) -> Runs:
    I, N = len(items), len(cfg.sets)
    r = Runs(np.zeros((I, N)), np.zeros((I, N)), np.zeros((I, N)), np.zeros((I, N)))
    for g, sets in enumerate(cfg.sets):
        loaded.set_eligible(sets)
        for i, it in enumerate(items):
            lp = logp_of(loaded, it.ids)[:-1]
            kl, agree, nll = token_metrics(it.ref_logp[:-1], lp, mx.array(it.ids[1:]))
            p = it.prompt - 1  # position p predicts the first continuation token
            sums = mx.stack([kl[p:].sum(), agree[p:].sum(), nll[p:].sum(), -nll[max(0, p - race_tokens):p].mean()])
            r.kl[i, g], r.agree[i, g], r.nll[i, g], r.race[i, g] = np.array(sums).tolist()
            advance(len(it.ids))
    loaded.set_eligible(None)
    return r


def placement_scores(m: Manifest, it: Item, cfg: Config, mode: str, runs: Runs, i: int) -> np.ndarray:
    """Higher is better, one score per node."""
    if mode == "race":
        return runs.race[i]
    if mode == "oracle":
        return -runs.nll[i]
    layers = m.moe_layers[:1] if mode == "first" else m.moe_layers
    logits = {l: it.gates[l][: it.prompt] for l in layers}
    s = score_groups(m, logits, dict(enumerate(cfg.sets)))
    return np.array([s.scores[g] for g in range(len(cfg.sets))])


def capture(m: Manifest, it: Item, cfg: Config) -> float:
    sets = dict(enumerate(cfg.sets))
    sets["all"] = {l: None for l in m.moe_layers}
    s = score_groups(m, it.gates, sets).scores
    return max(s[g] for g in range(len(cfg.sets))) / s["all"]


def summarize(m: Manifest, items: list[Item], cfg: Config, runs: Runs, mode: str, ref_nll: np.ndarray) -> dict:
    """Per-domain metrics of `cfg` placed by `mode`."""
    n_tok = np.array([len(it.ids) - it.prompt for it in items], dtype=np.float64)
    placed = np.array([int(np.argmax(placement_scores(m, it, cfg, mode, runs, i))) for i, it in enumerate(items)])
    oracle = np.argmin(runs.nll, axis=1)
    rows = np.arange(len(items))
    caps = np.array([capture(m, it, cfg) for it in items])
    out = {}
    for dom in sorted({it.domain for it in items}):
        sel = np.array([it.domain == dom for it in items])
        t = n_tok[sel].sum()
        nll = runs.nll[rows, placed][sel].sum()
        out[dom] = {
            "capture": float(caps[sel].mean()),
            "kl": float(runs.kl[rows, placed][sel].sum() / t),
            "agreement": float(runs.agree[rows, placed][sel].sum() / t),
            "ppl_ratio": float(math.exp((nll - ref_nll[sel].sum()) / t)),
            "regret": float((placed != oracle)[sel].mean()),
            "regret_nats": float(((runs.nll[rows, placed] - runs.nll[rows, oracle]) / n_tok)[sel].mean()),
            "tokens": int(t), "passages": int(sel.sum()),
        }
    return out


def ref_nll_of(items: list[Item]) -> np.ndarray:
    out = []
    for it in items:
        tgt = mx.array(it.ids[it.prompt:])
        lp = it.ref_logp[it.prompt - 1:-1]
        out.append(-mx.take_along_axis(lp, tgt[:, None], axis=-1).sum().item())
    return np.array(out)


def aggregate(domains: dict, keys=METRICS) -> tuple[dict, dict]:
    """Domain-balanced mean and the worst domain of every metric."""
    mean = {k: float(np.mean([d[k] for d in domains.values()])) for k in keys}
    worse_high = {"kl", "ppl_ratio", "regret", "regret_nats", "remote_share"}
    worst = {k: float((max if k in worse_high else min)(d[k] for d in domains.values())) for k in keys}
    return mean, worst


# ------------------------------------------------------------- one-hop routing

def placed_group(m: Manifest, it: Item) -> int:
    """The bundle group the router places `it` on (first MoE layer, prompt tokens)."""
    l = m.moe_layers[0]
    return score_groups(m, {l: it.gates[l][: it.prompt]}).best


def run_onehop(loaded, items: list[Item], advance=lambda n: None, split: bool = False) -> tuple[Runs, np.ndarray]:
    """Teacher-forced one-hop runs of the bundle's groups, each passage homed on
    its placed group: sums over the continuation, and the remote share per passage."""
    from mlxmoe.node.remote.choose import dynamic_onehop

    m = loaded.manifest
    I = len(items)
    r, share = Runs(np.zeros((I, 1)), np.zeros((I, 1)), np.zeros((I, 1)), np.zeros((I, 1))), np.zeros(I)
    loaded.set_eligible(None)
    for i, it in enumerate(items):
        home, picks = placed_group(m, it), []
        with dynamic_onehop(loaded, home, on_pick=lambda l, p: picks.append(p.reshape(-1)), split=split):
            lp = logp_of(loaded, it.ids)[:-1]
            kl, agree, nll = token_metrics(it.ref_logp[:-1], lp, mx.array(it.ids[1:]))
            p = it.prompt - 1
            sums = mx.stack([kl[p:].sum(), agree[p:].sum(), nll[p:].sum()])
            away = (mx.stack(picks)[:, p:-1] != home).astype(mx.float32).mean()
            (r.kl[i, 0], r.agree[i, 0], r.nll[i, 0]), share[i] = np.array(sums).tolist(), away.item()
        advance(len(it.ids))
    return r, share


def onehop_summary(items: list[Item], runs: Runs, share: np.ndarray, ref_nll: np.ndarray) -> dict:
    n_tok = np.array([len(it.ids) - it.prompt for it in items], dtype=np.float64)
    out = {}
    for dom in sorted({it.domain for it in items}):
        sel = np.array([it.domain == dom for it in items])
        t = n_tok[sel].sum()
        out[dom] = {"kl": float(runs.kl[sel, 0].sum() / t), "agreement": float(runs.agree[sel, 0].sum() / t),
                    "ppl_ratio": float(math.exp((runs.nll[sel, 0].sum() - ref_nll[sel].sum()) / t)),
                    "remote_share": float((share[sel] * n_tok[sel]).sum() / t),
                    "tokens": int(t), "passages": int(sel.sum())}
    return out


def evaluate_onehop(bundle, suites=("builtin",), per_domain=None, prompt_tokens=32, loaded=None, items=None,
                    progress_mode="quiet", split: bool = False) -> dict:
    """Quality of routing="onehop" against the full model: {"mean", "worst",
    "domains"} with kl, agreement, ppl_ratio, remote_share (see module doc).
    Pass `loaded` (full model) and `items` to reuse a loaded eval."""
    from mlxmoe.model.load import load_bundle, load_tokenizer
    from mlxmoe.progress import progress

    if items is None:
        _, passages = load_suites(suites, "heldout")
        items = make_items(load_tokenizer(bundle), passages, per_domain, prompt_tokens)
    loaded = loaded or load_bundle(bundle)
    with progress(sum(len(it.ids) for it in items) * 2, "one-hop eval (tokens forwarded)", progress_mode,
                  unit="items") as p:
        if not all(it.ref_logp is not None for it in items):
            reference(loaded, items, p.advance)
        runs, share = run_onehop(loaded, items, p.advance, split)
    doms = onehop_summary(items, runs, share, ref_nll_of(items))
    mean, worst = aggregate(doms, ONEHOP_METRICS)
    return {"mode": "split" if split else "onehop", "n_groups": loaded.manifest.n_groups, "passages": len(items),
            "mean": mean, "worst": worst, "domains": doms}


def evaluate(loaded, items: list[Item], cfgs: list[Config], placements=PLACEMENTS, race_tokens: int = 16,
             advance=lambda n: None) -> dict:
    m = loaded.manifest
    if not all(it.ref_logp is not None for it in items):
        reference(loaded, items, advance)
    ref_nll = ref_nll_of(items)
    results = []
    for cfg in cfgs:
        runs = run_config(loaded, items, cfg, race_tokens, advance)
        for mode in placements:
            doms = summarize(m, items, cfg, runs, mode, ref_nll)
            mean, worst = aggregate(doms)
            results.append({"config": cfg.name, "n_groups": cfg.n_groups, "strategy": cfg.strategy,
                            "overlay_rule": cfg.overlay_rule, "overlay": cfg.overlay, "placement": mode,
                            "node_bytes": cfg.node_bytes, "mem_ratio": round(cfg.mem_ratio, 4),
                            "mean": mean, "worst": worst, "domains": doms})
    n_tok = {}
    for it in items:
        n_tok[it.domain] = n_tok.get(it.domain, 0) + len(it.ids) - it.prompt
    ref = {d: {"ppl": float(math.exp(sum(r for r, it in zip(ref_nll, items) if it.domain == d) / n_tok[d]))}
           for d in sorted(n_tok)}
    return {"tokens": n_tok, "passages": len(items), "reference": ref, "results": results}


def work_units(items, cfgs) -> int:
    per = sum(len(it.ids) for it in items)
    return per * (1 + sum(len(c.sets) for c in cfgs))


# ------------------------------------------------------------------ output

def table(report: dict, title: str = "masked routing vs full model"):
    from rich.table import Table

    t = Table(title=title)
    for col in ("config", "placement", "MB/node", "x plain", "capture", "KL", "agree", "ppl x", "worst ppl x",
                "worst agree", "regret"):
        t.add_column(col, justify="left" if col in ("config", "placement") else "right")
    for r in report["results"]:
        mean, worst = r["mean"], r["worst"]
        t.add_row(r["config"], r["placement"], f"{r['node_bytes'] / 1e6:.2f}", f"{r['mem_ratio']:.2f}",
                  f"{mean['capture']:.3f}", f"{mean['kl']:.3f}", f"{mean['agreement']:.3f}",
                  f"{mean['ppl_ratio']:.3f}", f"{worst['ppl_ratio']:.3f}", f"{worst['agreement']:.3f}",
                  f"{mean['regret']:.2f}")
    return t


def onehop_table(r: dict):
    from rich.table import Table

    t = Table(title=f"{r['mode']} routing over the bundle's {r['n_groups']} groups vs full model")
    for col in ("domain", "KL", "agree", "ppl x", "remote share"):
        t.add_column(col, justify="left" if col == "domain" else "right")
    for name, d in [*r["domains"].items(), ("mean", r["mean"]), ("worst", r["worst"])]:
        t.add_row(name, f"{d['kl']:.3f}", f"{d['agreement']:.3f}", f"{d['ppl_ratio']:.3f}", f"{d['remote_share']:.2f}")
    return t


def write_plot(report: dict, path: str, title: str = "", placement: str = "first"):
    """Quality (worst-domain perplexity ratio) vs memory per node."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MlxMoeError("--plot needs matplotlib, which is not installed: pip install matplotlib") from None
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    placement = placement if any(r["placement"] == placement for r in report["results"]) else report["results"][0]["placement"]
    rows = [r for r in report["results"] if r["placement"] == placement]
    marks = {2: "o", 3: "s", 4: "^"}
    kinds = list(gr.STRATEGIES) + ["other"]
    for r in rows:
        color = f"C{kinds.index(r['strategy']) if r['strategy'] in kinds else len(kinds) - 1}"
        for ax, key in ((axes[0], "ppl_ratio"), (axes[1], "agreement")):
            ax.scatter(r["node_bytes"] / 1e6, r["worst"][key], marker=marks.get(r["n_groups"], "x"), color=color,
                       alpha=0.7, s=28)
    axes[0].set_yscale("log")
    axes[0].axhline(1.10, ls="--", c="k", lw=0.8)
    axes[1].axhline(0.90, ls="--", c="k", lw=0.8)
    axes[0].set_ylabel("worst-domain perplexity ratio (masked / full)")
    axes[1].set_ylabel("worst-domain greedy agreement")
    for ax in axes:
        ax.set_xlabel("memory per node (MB)")
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker="o", color=f"C{i}", label=s) for i, s in enumerate(kinds)]
    handles += [Line2D([], [], ls="", marker=mk, color="gray", label=f"{n} groups") for n, mk in marks.items()]
    axes[1].legend(handles=handles, fontsize=8, loc="lower right")
    fig.suptitle(title or f"masked routing quality vs memory per node (placement: {placement})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ command

def parse_ints(s: str, what: str, lo: int = 0) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{s!r}: {what} must be comma-separated integers, e.g. 2,3,4") from None
    if not out or any(x < lo for x in out):
        raise click.BadParameter(f"{s!r}: {what} must be integers >= {lo}")
    return out


def parse_names(s: str, allowed, what: str) -> list[str]:
    out = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in out if x not in allowed]
    if bad or not out:
        raise click.BadParameter(f"unknown {what} {bad or s!r}; choose from {', '.join(allowed)}")
    return out


def run_eval(bundle, suites=("builtin",), groups=None, strategies=("bundle",), overlays=(0,), rules=("mass",),
             placements=PLACEMENTS, per_domain=None, prompt_tokens=32, race_tokens=16, calib_suites=("builtin",),
             progress_mode="quiet", extra_configs=None, onehop=False, split=False) -> dict:
    from mlxmoe.model.load import load_bundle, load_tokenizer
    from mlxmoe.progress import progress

    bundle = Path(bundle)
    t0 = time.time()
    names, passages = load_suites(suites, "heldout")
    loaded = load_bundle(bundle)
    m = loaded.manifest
    groups = groups or [m.n_groups]
    for n in groups:
        if not 1 <= n <= m.n_experts:
            raise MlxMoeError(f"--groups {n}: must be between 1 and the number of experts ({m.n_experts})")
        if m.n_experts // n + min(overlays) < m.top_k:
            raise MlxMoeError(f"--groups {n}: a node would hold {m.n_experts // n + min(overlays)} eligible experts, "
                              f"fewer than top_k={m.top_k}; use fewer groups or an overlay")
    if "bundle" in strategies and m.n_groups not in groups:
        raise MlxMoeError(f"strategy 'bundle' evaluates the bundle's own {m.n_groups} groups; include {m.n_groups} in --groups")
    tok = load_tokenizer(bundle)
    items = make_items(tok, passages, per_domain, prompt_tokens)
    stats, calib_names = None, []
    needs_stats = any(s in ("coactivation", "domain") for s in strategies) or any(overlays) or extra_configs
    if needs_stats:
        calib_names, calib = load_suites(calib_suites, "calibration")
        calib_items = tokenize(tok, calib)
        with progress(sum(len(i) for _, i in calib_items), "calibration statistics", progress_mode, unit="items") as p:
            stats = collect(loaded, calib_items, p.advance, outputs=False)
    cfgs = configs(m, stats, groups, strategies, overlays, rules)
    if extra_configs:
        cfgs += extra_configs(m, stats)
    size_configs(m, cfgs)
    with progress(work_units(items, cfgs), "eval (tokens forwarded)", progress_mode, unit="items") as p:
        report = evaluate(loaded, items, cfgs, placements, race_tokens, p.advance)
    if onehop:
        report["onehop"] = evaluate_onehop(bundle, loaded=loaded, items=items, progress_mode=progress_mode)
    if split:
        report["split"] = evaluate_onehop(bundle, loaded=loaded, items=items, progress_mode=progress_mode, split=True)
    report.update({"bundle": str(bundle), "manifest_hash": m.hash, "model": m.model_id, "suites": names,
                   "calibration_suites": calib_names, "prompt_tokens": prompt_tokens, "race_tokens": race_tokens,
                   "date": time.strftime("%Y-%m-%d", time.gmtime()), "seconds": round(time.time() - t0, 1),
                   "machine": f"{platform.system()} {platform.machine()}, {platform.processor() or 'cpu'}, mlx {mx.__version__} ({mx.default_device()})",
                   "trunk_bytes": m.files[TRUNK_FILE]["size"], "expert_bytes": m.expert_bytes(),
                   "configs": [{k: v for k, v in asdict(c).items() if k != "sets"} for c in cfgs]})
    return report


@click.command("eval")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--suite", "suites", multiple=True, default=["builtin"], show_default=True,
              help="Held-out text: 'builtin' (shipped heldout.jsonl), a .jsonl of {domain, text} lines, or a .txt file.")
@click.option("--groups", default=None, help="Group counts to try, e.g. 2,3,4 (default: the bundle's).")
@click.option("--strategies", default="bundle", show_default=True,
              help=f"Comma list of: bundle (the bundle's own grouping + overlay), {', '.join(gr.STRATEGIES)}.")
@click.option("--overlay", "overlays", default="0", show_default=True, help="Overlay sizes (experts per layer), e.g. 0,1,2,4,8.")
@click.option("--overlay-rules", default="mass", show_default=True, help=f"Comma list of: {', '.join(gr.OVERLAY_RULES)}.")
@click.option("--placement", "placements", default=",".join(PLACEMENTS), show_default=True,
              help="Comma list: first (first MoE layer's router on the prompt), layers (every MoE layer), "
                   "race (best prompt log-prob per node), oracle (best continuation log-prob: the upper bound).")
@click.option("--passages", "per_domain", type=int, help="At most this many passages per domain.")
@click.option("--prompt-tokens", type=int, default=32, show_default=True, help="Prompt length placement sees; the rest is scored.")
@click.option("--race-tokens", type=int, default=16, show_default=True, help="Prompt tokens whose log-prob the race compares.")
@click.option("--calib-suite", "calib_suites", multiple=True, default=["builtin"], show_default=True,
              help="Suite for the statistics that coactivation/domain groupings and overlays need.")
@click.option("--onehop", is_flag=True, help="Also evaluate one-hop routing (per MoE layer and token, the group with "
              "the most top-k mass: local or one remote node) on the bundle's groups.")
@click.option("--split", is_flag=True, help="Also evaluate split routing (top-k over the node's experts and ONE other "
              "group's; the chosen experts run where they are held).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG of quality vs memory per node (needs matplotlib).")
@click.option("--progress", "progress_mode", type=click.Choice(["bar", "quiet", "json"]), default="bar", show_default=True)
def eval_cmd(bundle, suites, groups, strategies, overlays, overlay_rules, placements, per_domain, prompt_tokens,
             race_tokens, calib_suites, onehop, split, as_json, plot, progress_mode):
    """Measure how far masked routing is from the full model on held-out text.

    Example: mlxmoe eval bundles/ref --groups 2,3,4 --strategies contiguous,coactivation --overlay 0,4,8
    """
    groups_ = parse_ints(groups, "--groups", lo=1) if groups else None
    strategies_ = parse_names(strategies, ("bundle",) + gr.STRATEGIES, "strategy")
    overlays_ = parse_ints(overlays, "--overlay")
    rules_ = parse_names(overlay_rules, gr.OVERLAY_RULES, "overlay rule")
    placements_ = parse_names(placements, PLACEMENTS, "placement")
    if prompt_tokens < 2 or race_tokens < 1:
        raise click.BadParameter("--prompt-tokens must be >= 2 and --race-tokens >= 1")
    if plot:  # fail before the long run, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise click.ClickException("--plot needs matplotlib, which is not installed: pip install matplotlib")
    try:
        report = run_eval(bundle, suites, groups_, strategies_, overlays_, rules_, placements_, per_domain,
                          prompt_tokens, race_tokens, calib_suites, "quiet" if as_json else progress_mode,
                          onehop=onehop, split=split)
        if plot:
            write_plot(report, plot)
    except MlxMoeError as e:
        raise click.ClickException(str(e))
    if as_json:
        click.echo(json.dumps(report))
        return
    import sys

    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table(report, f"{report['model']}: {sum(report['tokens'].values())} scored tokens, "
                                f"{report['passages']} passages"))
    for mode in ("onehop", "split"):
        if mode in report:
            console.print(onehop_table(report[mode]))

