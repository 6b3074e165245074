"""Quality metrics of a masked run against the full model (the reference),
per token or summed over a passage's continuation: KL, log-probabilities,
greedy agreement, perplexity ratio, top-k mass capture; and the
domain-balanced aggregates (mean and worst domain) reports show."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlxmoe.bundle.manifest import Manifest
from mlxmoe.model.placement import score_groups

METRICS = ("capture", "kl", "agreement", "ppl_ratio", "regret", "regret_nats")
ONEHOP_METRICS = ("kl", "agreement", "ppl_ratio", "remote_share")


def logp_of(loaded, ids) -> mx.array:
    """[T, V] next-token log-probabilities of `loaded` on `ids`, float32."""
    out = loaded.model(mx.array([ids]))[0].astype(mx.float32)
    return out - mx.logsumexp(out, axis=-1, keepdims=True)


def kl_per_token(ref_logp: mx.array, logp: mx.array) -> mx.array:
    """KL(ref || other) at every position, nats."""
    return mx.sum(mx.exp(ref_logp) * (ref_logp - logp), axis=-1)


def token_metrics(ref_logp: mx.array, logp: mx.array, targets: mx.array) -> tuple:
    """Per position: KL(ref || other), argmax agreement (0/1), and the other
    model's negative log-likelihood of the target. Inputs [T, V], [T, V], [T]."""
    kl = kl_per_token(ref_logp, logp)
    agree = (mx.argmax(ref_logp, axis=-1) == mx.argmax(logp, axis=-1)).astype(mx.float32)
    nll = -mx.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
    return kl, agree, nll


def capture(m: Manifest, gates: dict, node_sets: list) -> float:
    """Top-k router mass the best node's eligible sets keep, over the
    unmasked top-k mass (`gates`: layer -> [T, E] router logits)."""
    sets = dict(enumerate(node_sets))
    sets["all"] = {l: None for l in m.moe_layers}
    s = score_groups(m, gates, sets).scores
    return max(s[g] for g in range(len(node_sets))) / s["all"]


def ref_nll_of(items: list) -> np.ndarray:
    """Reference negative log-likelihood of each eval item's continuation."""
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
