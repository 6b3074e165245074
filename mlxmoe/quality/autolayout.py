"""`mlxmoe calibrate --budgets`: the layout found by measurement (docs/QUALITY.md, "Layouts").

On the calibration suite, with the full model loaded:
1. gate statistics (stats.py) and the suite's domains in one cluster per node;
2. the cost of masking each MoE layer alone: KL (nats/token) to the full model
   when only that layer is masked to a plain share of the experts its
   passages' cluster uses most (`layer_costs`);
3. per node, its budget in experts (layout.node_slots), spread over the layers
   where the measured cost says they buy the most (layout.allocate), filled
   with the experts its cluster uses most, every expert on some node while they
   fit (layout.node_sets); with 0, 1, ... of the costliest layers whole on every
   node (layout.whole_candidates), each candidate measured as the router will
   place it (`placed_kl`: KL of the node the router picks, scored at the first
   layer where the nodes differ, on a validation slice of the suite) and the
   best kept;
4. each node's quality, pinned: KL, greedy agreement and perplexity ratio to the
   full model on held-out passages of the suite (every fifth passage of each
   domain, never fitted on), per domain and overall (`node_quality`).
The result is the manifest's grouping and overlay, and the report under
`calibration.layout`.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from mlxmoe.bundle.manifest import TRUNK_FILE, Manifest
from mlxmoe.errors import MlxMoeError
from mlxmoe.quality import grouping as gr
from mlxmoe.quality import layout as lo
from mlxmoe.quality.metrics import logp_of, token_metrics

HOLD_OUT_EVERY = 5  # every fifth passage of a domain is held out of fitting (the report's)
VALIDATE_EVERY = 4  # every fourth remaining passage chooses between candidate layouts
PROMPT_TOKENS = 32  # what placement sees of a validation passage (as eval scores placement)
TIE_MARGIN = 0.02  # the router's (cluster/router/ranking.py): groups this close tie, the larger set first
COST_PASSAGES = 4  # per domain of a cluster, for the per-layer costs ...
COST_TOKENS = 256  # ... each cut to this many tokens (costs rank layers; they need not be precise)


def split_held_out(items: list[tuple[str, list[int]]]) -> tuple[list, list]:
    """(fit, held out): every HOLD_OUT_EVERY-th passage of each domain is held out."""
    seen: dict[str, int] = {}
    fit, held = [], []
    for d, ids in items:
        seen[d] = seen.get(d, 0) + 1
        (held if seen[d] % HOLD_OUT_EVERY == 0 else fit).append((d, ids))
    return fit, held


def wants(stats: gr.Stats, clusters: list[list[str]]) -> list[np.ndarray]:
    """[L, E] usage share of each cluster's domains (equal weight per domain)."""
    share = stats.share()
    dom = {d: i for i, d in enumerate(stats.domains)}
    return [share[[dom[d] for d in c]].mean(axis=0) for c in clusters]


def _kl(loaded, ref: mx.array, ids: list[int]) -> tuple[float, int]:
    kl, _, _ = token_metrics(ref[:-1], logp_of(loaded, ids)[:-1], mx.array(ids[1:]))
    return float(kl.sum().item()), len(ids) - 1


def layer_costs(loaded, items, stats: gr.Stats, clusters: list[list[str]], share: int, advance=lambda n: None) -> dict:
    """MoE layer -> KL (nats/token) of masking that layer alone, each passage to its cluster's
    `share` most used experts there."""
    w = wants(stats, clusters)
    by_cluster = [[(d, ids[:COST_TOKENS]) for dom in c for d, ids in [x for x in items if x[0] == dom][:COST_PASSAGES]]
                  for c in clusters]
    refs = [[logp_of(loaded, ids) for _, ids in part] for part in by_cluster]
    costs = {}
    for li, l in enumerate(stats.layers):
        tot = n = 0
        for c, part in enumerate(by_cluster):
            loaded.set_eligible({x: (sorted(np.argsort(-w[c][li], kind="stable")[:share].tolist()) if x == l else None)
                                 for x in stats.layers})
            for (d, ids), ref in zip(part, refs[c]):
                k, t = _kl(loaded, ref, ids)
                tot, n = tot + k, n + t
            advance(len(part))
        costs[l] = tot / max(n, 1)
    loaded.set_eligible(None)
    return costs


def node_quality(loaded, items, sets: list[dict], advance=lambda n: None) -> list[dict]:
    """Each node pinned on `items`: per domain and domain-balanced mean and worst of KL, greedy
    agreement and perplexity ratio to the full model (continuation = every position)."""
    refs = [logp_of(loaded, ids) for _, ids in items]
    ref_nll = [-float(mx.take_along_axis(r[:-1], mx.array(ids[1:])[:, None], axis=-1).sum().item())
               for r, (_, ids) in zip(refs, items)]
    out = []
    for s in sets:
        loaded.set_eligible(s)
        per: dict[str, list] = {}
        for (d, ids), ref, rn in zip(items, refs, ref_nll):
            kl, agree, nll = token_metrics(ref[:-1], logp_of(loaded, ids)[:-1], mx.array(ids[1:]))
            acc = per.setdefault(d, [0.0, 0.0, 0.0, 0.0, 0])
            acc[0] += kl.sum().item()
            acc[1] += agree.sum().item()
            acc[2] += nll.sum().item()
            acc[3] += rn
            acc[4] += len(ids) - 1
        advance(len(items))
        domains = {d: {"kl": round(a[0] / a[4], 5), "agreement": round(a[1] / a[4], 4),
                       "ppl_ratio": round(math.exp((a[2] - a[3]) / a[4]), 4)} for d, a in per.items()}
        mean = {k: round(float(np.mean([v[k] for v in domains.values()])), 5) for k in ("kl", "agreement", "ppl_ratio")}
        worst = {"kl": max(v["kl"] for v in domains.values()), "agreement": min(v["agreement"] for v in domains.values()),
                 "ppl_ratio": max(v["ppl_ratio"] for v in domains.values())}
        out.append({"mean": mean, "worst": worst, "domains": domains, "passages": len(items)})
    loaded.set_eligible(None)
    return out


def placed_kl(loaded, refs: list, sets: list[dict], layers: list[int]) -> float:
    """Domain-balanced mean KL (nats/token) of the node the router picks for each validation
    passage: scored on its first PROMPT_TOKENS at the first MoE layer where the sets differ
    (ties within TIE_MARGIN to the larger set, then the score), measured on the rest."""
    from mlxmoe.model.placement import score_groups

    at = next((l for l in layers if any(s[l] != sets[0][l] for s in sets)), layers[0])
    held = [sum(len(v) for v in s.values()) for s in sets]
    per: dict[str, list] = {}
    for d, ids, ref, gates in refs:
        sc = score_groups(loaded.manifest, {at: gates[at][:PROMPT_TOKENS]}, dict(enumerate(sets))).scores
        best = max(sc.values())
        g = max(sc, key=lambda x: (sc[x] >= best - TIE_MARGIN, held[x], sc[x]))
        loaded.set_eligible(sets[g])
        kl, _, _ = token_metrics(ref[:-1], logp_of(loaded, ids)[:-1], mx.array(ids[1:]))
        acc = per.setdefault(d, [0.0, 0])
        acc[0] += float(kl[PROMPT_TOKENS - 1:].sum().item())
        acc[1] += len(ids) - PROMPT_TOKENS
    loaded.set_eligible(None)
    return float(np.mean([a / max(n, 1) for a, n in per.values()])) if per else 0.0  # (no passage long enough)


def validation_refs(loaded, items) -> list:
    """(domain, ids, reference log-probs, router logits per layer) of the validation passages."""
    from mlxmoe.model.moe import GateRecorder

    loaded.set_eligible(None)
    out = []
    for d, ids in items:
        ids = ids[:COST_TOKENS]
        if len(ids) <= PROMPT_TOKENS + 1:
            continue
        with GateRecorder(loaded.gates) as rec:
            ref = logp_of(loaded, ids)
        gates = {l: v[0] for l, v in rec.by_layer().items()}
        mx.eval(ref, gates)
        out.append((d, ids, ref, gates))
    return out


def build(loaded, m: Manifest, stats: gr.Stats, fit, held, budgets: list[tuple[str, float]], kv_bytes: float = 0.0,
          headroom: float = 0.75, advance=lambda n: None) -> tuple[dict, dict, dict]:
    """(grouping, overlay, report) of the layout for `budgets`, one node each."""
    n = len(budgets)
    if len(stats.domains) < n:
        raise MlxMoeError(f"--budgets: {n} nodes need at least {n} domains in the suite to tell their traffic apart, "
                          f"got {len(stats.domains)} ({', '.join(stats.domains)})")
    layers, E, k = m.moe_layers, m.n_experts, m.top_k
    per, trunk = m.expert_bytes(), m.files[TRUNK_FILE]["size"]
    slots = lo.node_slots(budgets, E, len(layers), per, trunk, kv_bytes, headroom, k)
    clusters = gr.cluster_domains(stats, n)
    plain_share = -(-E // n)
    costs = layer_costs(loaded, fit, stats, clusters, plain_share, advance)
    val = validation_refs(loaded, fit[VALIDATE_EVERY - 1::VALIDATE_EVERY])
    tried = []
    for whole in lo.whole_candidates(slots, costs, E, k):
        sizes = [lo.allocate(s, costs, E, k, whole) for s in slots]
        sets, left_out = lo.node_sets(sizes, wants(stats, clusters), stats.balanced("mass"), layers)
        tried.append((placed_kl(loaded, val, sets, layers) if len(slots) > 1 else 0.0, whole, sizes, sets, left_out))
        advance(len(val))
    kl, whole, sizes, sets, left_out = min(tried, key=lambda t: (t[0], t[1]))
    plain = trunk + per * len(layers) * E / n
    nodes = []
    for (kind, v), s, size in zip(budgets, slots, sizes):
        held_experts = sum(size.values())
        nbytes = int(trunk + per * held_experts)
        nodes.append({"budget": f"{v:g}x" if kind == "ratio" else f"{v / 1e9:.3g}GB", "experts": held_experts,
                      "bytes": nbytes, "mem_ratio": round(nbytes / plain, 4),
                      "whole_layers": [l for l in layers if size[l] == E], "full_model": held_experts == E * len(layers)})
    grouping, overlay = lo.layout_grouping(sets, layers, E, nodes, left_out)
    quality = node_quality(loaded, held, sets, advance) if held else [None] * n
    report = {"budgets": [nd["budget"] for nd in nodes], "clusters": clusters,
              "layer_costs": {str(l): round(c, 5) for l, c in costs.items()},
              "candidates": [{"whole_layers": w, "validation_kl": round(v, 5)} for v, w, *_ in tried],
              "whole_layers": whole, "validation_passages": len(val),
              "nodes": [{**nd, "held_out": q} for nd, q in zip(nodes, quality)],
              "coverage": round(1 - sum(len(v) for v in left_out.values()) / (E * len(layers)), 4),
              "left_out": {str(l): v for l, v in left_out.items()}, "placement": grouping["placement"],
              "fit_passages": len(fit), "held_out_passages": len(held)}
    return grouping, overlay, report


def work(stats: gr.Stats, fit, held, n_nodes: int) -> int:
    """Progress units of build(): per-layer cost passes, then held-out passes per node."""
    per_domain = {d: min(COST_PASSAGES, sum(x[0] == d for x in fit)) for d in stats.domains}
    candidates = len(stats.layers) // 2 + 1
    return (len(stats.layers) * sum(per_domain.values()) + candidates * len(fit) // VALIDATE_EVERY
            + len(held) * n_nodes)
