"""The evaluation sweep behind `mlxmoe eval`: how far masked routing is from
the full model (results in docs/QUALITY.md). Metrics live in metrics.py,
tables and plots in report.py.

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

`nodes` (the bundle's own configuration): each node's quality when every
chat is pinned to it (the same runs, every passage on that node), with its
bytes and memory ratio (a layout's `grouping.nodes`, else from file sizes).

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

import math
import platform
from contextlib import nullcontext
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxmoe.quality import grouping as gr
from mlxmoe.quality.stats import collect
from mlxmoe.quality import intervals as ci
from mlxmoe.quality.metrics import ONEHOP_METRICS, aggregate, capture, logp_of, ref_nll_of, token_metrics
from mlxmoe.quality.suites import load_suites, tokenize
from mlxmoe.errors import MlxMoeError
from mlx.utils import tree_flatten

from mlxmoe.bundle.manifest import TRUNK_FILE, Manifest, heal_file
from mlxmoe.model import heal as mh, meter
from mlxmoe.model.placement import score_groups
from mlxmoe.model.moe import GateRecorder

TIE_MARGIN = 0.02  # the router's default (mlxmoe.cluster.router.ranking: groups this close tie)

PLACEMENTS = ("first", "router", "layers", "race", "oracle")


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
    heal: list | None = None  # per node: its healed parameters (model/heal.py) or None
    heal_bytes: int = 0  # the largest node's healed-parameter file (counted in node_bytes)


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
    meter: np.ndarray | None = None  # [I, N] mean quality meter over the continuation (model/meter.py)


# ------------------------------------------------------------------ setup

MIN_CONTINUATION = 8  # scored tokens a passage keeps at the full prompt length
MIN_TOKENS = 4  # below this a passage has no prompt of 2 and continuation of 2


def prompt_split(n_tokens: int, prompt_tokens: int) -> int | None:
    """Prompt length for a passage of `n_tokens`: `prompt_tokens` when that
    leaves MIN_CONTINUATION tokens to score, else half the passage (at least
    2, so the race has a prompt token to score); None when too short."""
    if n_tokens >= prompt_tokens + MIN_CONTINUATION:
        return prompt_tokens
    if n_tokens < MIN_TOKENS:
        return None
    return max(2, min(prompt_tokens, n_tokens // 2))


def select_items(tokenizer, passages, per_domain: int | None = None, prompt_tokens: int = 32) -> tuple[list, dict]:
    """Tokenized passages (at most `per_domain` each, in suite order) and what
    happened to every passage: {"given", "used", "short_prompt" (scored with a
    shorter prompt split), "skipped": {reason: count}}."""
    items, count, info = [], {}, {"given": len(passages), "used": 0, "short_prompt": 0, "skipped": {}}
    skip = info["skipped"]
    toks = tokenize(tokenizer, passages)
    if len(toks) < len(passages):
        skip["fewer than 2 tokens"] = len(passages) - len(toks)
    for dom, ids in toks:
        p = prompt_split(len(ids), prompt_tokens)
        if p is None:
            skip[f"fewer than {MIN_TOKENS} tokens"] = skip.get(f"fewer than {MIN_TOKENS} tokens", 0) + 1
            continue
        if per_domain and count.get(dom, 0) >= per_domain:
            skip["over --passages per domain"] = skip.get("over --passages per domain", 0) + 1
            continue
        count[dom] = count.get(dom, 0) + 1
        info["short_prompt"] += p < prompt_tokens
        items.append(Item(dom, ids, p))
    info["used"] = len(items)
    if not items:
        raise MlxMoeError(f"no passage has {MIN_TOKENS} tokens or more; use longer text")
    return items, info


def make_items(tokenizer, passages, per_domain: int | None = None, prompt_tokens: int = 32) -> list[Item]:
    """select_items without the account."""
    return select_items(tokenizer, passages, per_domain, prompt_tokens)[0]


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


def healed_config(bundle: Path, m: Manifest, plain: Config) -> Config | None:
    """The bundle's own groups with their healed parameters (None: not healed)."""
    if not m.heal_bytes():
        return None
    heal = [dict(mx.load(str(bundle / heal_file(g)))) if heal_file(g) in m.files else None for g in range(m.n_groups)]
    return replace(plain, name=f"{plain.name}+heal", heal=heal, heal_bytes=m.heal_bytes())


def size_configs(m: Manifest, cfgs: list[Config]):
    trunk = m.files[TRUNK_FILE]["size"]
    per = m.expert_bytes()
    for c in cfgs:
        c.node_bytes = max(node_bytes(m, s, trunk, per) for s in c.sets) + c.heal_bytes
        c.mem_ratio = c.node_bytes / plain_bytes(m, c.n_groups, trunk, per)


# ------------------------------------------------------------- measuring



def run_config(loaded, items: list[Item], cfg: Config, race_tokens: int, advance=lambda n: None) -> Runs:
    I, N = len(items), len(cfg.sets)
    r = Runs(*(np.zeros((I, N)) for _ in range(5)))
    base = dict(tree_flatten(loaded.model.parameters())) if cfg.heal else {}
    for g, sets in enumerate(cfg.sets):
        loaded.set_eligible(sets)
        with healed_params(loaded, base, cfg.heal[g] if cfg.heal else None, sets):
            run_node(loaded, items, g, r, race_tokens, advance)
    loaded.set_eligible(None)
    return r


def healed_params(loaded, base: dict, healed: dict | None, sets: dict):
    return mh.applied(loaded, base, healed, sets) if healed else nullcontext()


def run_node(loaded, items: list[Item], g: int, r: Runs, race_tokens: int, advance):
    """Node g's column of `r`, the model already masked (and healed) as node g."""
    q = meter.start(loaded)
    try:
        for i, it in enumerate(items):
            q.reset()
            lp = logp_of(loaded, it.ids)[:-1]
            kl, agree, nll = token_metrics(it.ref_logp[:-1], lp, mx.array(it.ids[1:]))
            p = it.prompt - 1  # position p predicts the first continuation token
            sums = mx.stack([kl[p:].sum(), agree[p:].sum(), nll[p:].sum(), -nll[max(0, p - race_tokens):p].mean(),
                             q.per_token()[p:-1].mean()])
            r.kl[i, g], r.agree[i, g], r.nll[i, g], r.race[i, g], r.meter[i, g] = np.array(sums).tolist()
            advance(len(it.ids))
    finally:
        meter.stop(loaded)




def placement_scores(m: Manifest, it: Item, cfg: Config, mode: str, runs: Runs, i: int) -> np.ndarray:
    """Higher is better, one score per node."""
    if mode == "race":
        return runs.race[i]
    if mode == "oracle":
        return -runs.nll[i]
    if mode == "router":  # what the router scores: the first MoE layer where the nodes' sets differ (layouts)
        layers = [next((l for l in m.moe_layers if any(s[l] != cfg.sets[0][l] for s in cfg.sets)), m.moe_layers[0])]
    else:
        layers = m.moe_layers[:1] if mode == "first" else m.moe_layers
    logits = {l: it.gates[l][: it.prompt] for l in layers}
    s = score_groups(m, logits, dict(enumerate(cfg.sets)))
    scores = np.array([s.scores[g] for g in range(len(cfg.sets))])
    if mode == "router":  # as the router breaks ties (placement.rank_candidates): the larger set, then the score
        held = np.array([sum(len(v) for v in sets.values()) for sets in cfg.sets], dtype=np.float64)
        tied = scores >= scores.max() - TIE_MARGIN
        return np.where(tied, 1.0 + held / held.max() + scores * 1e-3, scores)
    return scores


def summarize(m: Manifest, items: list[Item], cfg: Config, runs: Runs, mode: str, ref_nll: np.ndarray,
              detail: dict | None = None) -> dict:
    """Per-domain metrics of `cfg` placed by `mode`. With `detail` (a dict),
    also fills its "passages" (per-passage results) and "intervals"
    (bootstrap 95% intervals of the domain-balanced means)."""
    n_tok = np.array([len(it.ids) - it.prompt for it in items], dtype=np.float64)
    placed = np.array([int(np.argmax(placement_scores(m, it, cfg, mode, runs, i))) for i, it in enumerate(items)])
    oracle = np.argmin(runs.nll, axis=1)
    rows = np.arange(len(items))
    caps = np.array([capture(m, it.gates, cfg.sets) for it in items])
    kl, agree, nll, meter_ = runs.kl[rows, placed], runs.agree[rows, placed], runs.nll[rows, placed], runs.meter[rows, placed]
    regret, regret_nats = (placed != oracle).astype(np.float64), (nll - runs.nll[rows, oracle]) / n_tok
    out = {}
    for dom in sorted({it.domain for it in items}):
        sel = np.array([it.domain == dom for it in items])
        t = n_tok[sel].sum()
        out[dom] = {
            "capture": float(caps[sel].mean()),
            "kl": float(kl[sel].sum() / t),
            "agreement": float(agree[sel].sum() / t),
            "ppl_ratio": float(math.exp((nll[sel].sum() - ref_nll[sel].sum()) / t)),
            "regret": float(regret[sel].mean()),
            "regret_nats": float(regret_nats[sel].mean()),
            "meter": float((meter_[sel] * n_tok[sel]).sum() / t),
            "tokens": int(t), "passages": int(sel.sum()),
        }
    if detail is not None:
        doms = [it.domain for it in items]
        detail["intervals"] = mean_intervals(doms, n_tok, {"capture": caps, "kl": kl, "agreement": agree,
                                                           "regret": regret, "regret_nats": regret_nats},
                                             nll, ref_nll)
        detail["passages"] = per_passage(items, n_tok, placed, kl, agree, nll, ref_nll)
        detail["meter_kl"] = meter_correlation(meter_, kl / n_tok)
    return out


NODE_METRICS = ("capture", "kl", "agreement", "ppl_ratio")


def node_sizes(m: Manifest, cfg: Config) -> list[dict]:
    """Per node of `cfg`: bytes and mem_ratio, from a layout's `grouping.nodes` when `cfg` holds the
    bundle's own sets (with the node's budget, experts, whole layers, full_model), else from file sizes."""
    trunk, per = m.files[TRUNK_FILE]["size"], m.expert_bytes()
    plain = plain_bytes(m, cfg.n_groups, trunk, per)
    lay = m.grouping.get("nodes") if m.grouping.get("strategy") == "layout" else None
    out = []
    for g, sets in enumerate(cfg.sets):
        if lay and len(lay) == len(cfg.sets):
            nd = lay[g]
            out.append({"bytes": int(nd["bytes"]), "mem_ratio": round(float(nd["mem_ratio"]), 4),
                        **{k: nd[k] for k in ("budget", "experts", "whole_layers", "full_model") if k in nd}})
            continue
        held = sum(len(v) for v in sets.values())
        b = node_bytes(m, sets, trunk, per)
        out.append({"bytes": b, "mem_ratio": round(b / plain, 4), "experts": held,
                    "full_model": held == m.n_experts * len(m.moe_layers)})
    return out


def node_summaries(m: Manifest, items: list[Item], cfg: Config, runs: Runs, ref_nll: np.ndarray) -> list[dict]:
    """Each node of `cfg` with every passage pinned to it: per domain, domain-balanced mean (with
    bootstrap 95% intervals) and worst of capture (its own set's), KL, agreement and ppl_ratio."""
    n_tok = np.array([len(it.ids) - it.prompt for it in items], dtype=np.float64)
    doms_of = [it.domain for it in items]
    out = []
    for g, (sets, size) in enumerate(zip(cfg.sets, node_sizes(m, cfg))):
        caps = np.array([capture(m, it.gates, [sets]) for it in items])
        kl, agree, nll = runs.kl[:, g], runs.agree[:, g], runs.nll[:, g]
        doms = {}
        for dom in sorted(set(doms_of)):
            sel = np.array([d == dom for d in doms_of])
            t = n_tok[sel].sum()
            doms[dom] = {"capture": float(caps[sel].mean()), "kl": float(kl[sel].sum() / t),
                         "agreement": float(agree[sel].sum() / t),
                         "ppl_ratio": float(math.exp((nll[sel].sum() - ref_nll[sel].sum()) / t)),
                         "tokens": int(t), "passages": int(sel.sum())}
        mean, worst = aggregate(doms, NODE_METRICS)
        cis = mean_intervals(doms_of, n_tok, {"capture": caps, "kl": kl, "agreement": agree}, nll, ref_nll)
        out.append({"group": g, **size, "mean": mean, "intervals": cis, "worst": worst, "domains": doms})
    return out


def meter_correlation(meter_: np.ndarray, kl: np.ndarray) -> dict:
    """How well the live meter predicts the loss: Pearson and Spearman (rank)
    correlation over passages of the mean meter with the KL per token."""
    if len(kl) < 3 or np.std(meter_) == 0 or np.std(kl) == 0:
        return {"pearson": None, "spearman": None, "passages": len(kl)}
    rank = lambda v: np.argsort(np.argsort(v))
    return {"pearson": round(float(np.corrcoef(meter_, kl)[0, 1]), 4),
            "spearman": round(float(np.corrcoef(rank(meter_), rank(kl))[0, 1]), 4), "passages": len(kl)}


# per-token metrics (sum over a domain's passages / its tokens) vs per-passage ones (mean over passages)
TOKEN_MEANS = ("kl", "agreement", "remote_share")


def mean_intervals(domains, n_tok, sums: dict, nll=None, ref_nll=None) -> dict:
    """Bootstrap 95% interval of every domain-balanced mean: `sums` holds per
    passage sums (TOKEN_MEANS, over tokens) or values (the rest); ppl_ratio
    from the masked and reference NLL sums."""
    draws = ci.resample_indices(domains)
    ones = np.ones(len(n_tok))
    out = {k: ci.interval(ci.ratio_of_sums(v, n_tok if k in TOKEN_MEANS else ones, draws).mean(1))
           for k, v in sums.items()}
    if nll is not None:
        out["ppl_ratio"] = ci.interval(np.exp(ci.ratio_of_sums(nll - ref_nll, n_tok, draws)).mean(1))
    return out


def per_passage(items, n_tok, node, kl, agree, nll, ref_nll) -> list[dict]:
    """One JSON-ready row per passage: the sums it contributed."""
    return [{"domain": it.domain, "tokens": int(n_tok[i]), "prompt": it.prompt, "node": int(node[i]),
             "kl": round(float(kl[i]), 6), "agreement": round(float(agree[i] / n_tok[i]), 6),
             "logp_ref": round(float(-ref_nll[i]), 6), "logp": round(float(-nll[i]), 6)}
            for i, it in enumerate(items)]


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
    ref_nll = ref_nll_of(items)
    doms = onehop_summary(items, runs, share, ref_nll)
    mean, worst = aggregate(doms, ONEHOP_METRICS)
    n_tok = np.array([len(it.ids) - it.prompt for it in items], dtype=np.float64)
    cis = mean_intervals([it.domain for it in items], n_tok, {"kl": runs.kl[:, 0], "agreement": runs.agree[:, 0],
                                                              "remote_share": share * n_tok}, runs.nll[:, 0], ref_nll)
    return {"mode": "split" if split else "onehop", "n_groups": loaded.manifest.n_groups, "passages": len(items),
            "mean": mean, "worst": worst, "intervals": cis, "domains": doms,
            "per_passage": per_passage(items, n_tok, np.zeros(len(items)), runs.kl[:, 0], runs.agree[:, 0],
                                       runs.nll[:, 0], ref_nll)}


def evaluate(loaded, items: list[Item], cfgs: list[Config], placements=PLACEMENTS, race_tokens: int = 16,
             advance=lambda n: None) -> dict:
    m = loaded.manifest
    if not all(it.ref_logp is not None for it in items):
        reference(loaded, items, advance)
    ref_nll = ref_nll_of(items)
    results, nodes, healed = [], None, None
    for cfg in cfgs:
        runs = run_config(loaded, items, cfg, race_tokens, advance)
        if cfg.name == f"g{m.n_groups}/bundle":  # the bundle's own nodes, each with every chat pinned to it
            nodes = node_summaries(m, items, cfg, runs, ref_nll)
        elif cfg.name == f"g{m.n_groups}/bundle+heal":
            healed = node_summaries(m, items, cfg, runs, ref_nll)
        for mode in placements:
            detail = {}
            doms = summarize(m, items, cfg, runs, mode, ref_nll, detail)
            mean, worst = aggregate(doms)
            results.append({"config": cfg.name, "n_groups": cfg.n_groups, "strategy": cfg.strategy,
                            "overlay_rule": cfg.overlay_rule, "overlay": cfg.overlay, "placement": mode,
                            "node_bytes": cfg.node_bytes, "mem_ratio": round(cfg.mem_ratio, 4), "heal_bytes": cfg.heal_bytes,
                            "mean": mean, "intervals": detail["intervals"], "worst": worst, "domains": doms,
                            "meter": float(np.mean([d["meter"] for d in doms.values()])), "meter_kl": detail["meter_kl"],
                            "per_passage": detail["passages"]})
    n_tok = {}
    for it in items:
        n_tok[it.domain] = n_tok.get(it.domain, 0) + len(it.ids) - it.prompt
    ref = {d: {"ppl": float(math.exp(sum(r for r, it in zip(ref_nll, items) if it.domain == d) / n_tok[d]))}
           for d in sorted(n_tok)}
    out = {"tokens": n_tok, "passages": len(items), "reference": ref, "results": results}
    if nodes is not None:
        for nd, h in zip(nodes, healed or []):  # as the node serves it: its healed parameters loaded
            nd["heal"] = {k: h[k] for k in ("mean", "intervals", "worst", "domains")}
        out["nodes"] = nodes
    return out


def work_units(items, cfgs) -> int:
    per = sum(len(it.ids) for it in items)
    return per * (1 + sum(len(c.sets) for c in cfgs))


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
    items, used = select_items(tok, passages, per_domain, prompt_tokens)
    stats, calib_names = None, []
    needs_stats = any(s in ("coactivation", "domain") for s in strategies) or any(overlays) or extra_configs
    if needs_stats:
        calib_names, calib = load_suites(calib_suites, "calibration")
        calib_items = tokenize(tok, calib)
        with progress(sum(len(i) for _, i in calib_items), "calibration statistics", progress_mode, unit="items") as p:
            stats = collect(loaded, calib_items, p.advance, outputs=False)
    cfgs = configs(m, stats, groups, strategies, overlays, rules)
    plain = next((c for c in cfgs if c.name == f"g{m.n_groups}/bundle"), None)
    healed = healed_config(bundle, m, plain) if plain else None
    cfgs += [healed] if healed else []
    if extra_configs:
        cfgs += extra_configs(m, stats)
    size_configs(m, cfgs)
    with progress(work_units(items, cfgs), "eval (tokens forwarded)", progress_mode, unit="items") as p:
        report = evaluate(loaded, items, cfgs, placements, race_tokens, p.advance)
    if onehop:
        report["onehop"] = evaluate_onehop(bundle, loaded=loaded, items=items, progress_mode=progress_mode)
    if split:
        report["split"] = evaluate_onehop(bundle, loaded=loaded, items=items, progress_mode=progress_mode, split=True)
    report.update({"passage_use": used, "bundle": str(bundle), "manifest_hash": m.hash, "model": m.model_id, "suites": names,
                   "calibration_suites": calib_names, "prompt_tokens": prompt_tokens, "race_tokens": race_tokens,
                   "date": time.strftime("%Y-%m-%d", time.gmtime()), "seconds": round(time.time() - t0, 1),
                   "machine": f"{platform.system()} {platform.machine()}, {platform.processor() or 'cpu'}, mlx {mx.__version__} ({mx.default_device()})",
                   "trunk_bytes": m.files[TRUNK_FILE]["size"], "expert_bytes": m.expert_bytes(),
                   "heal": (m.calibration or {}).get("heal"),
                   "configs": [{k: v for k, v in asdict(c).items() if k not in ("sets", "heal")} for c in cfgs]})
    return report
