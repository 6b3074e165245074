"""Placement scores: which group fits a prompt (docs/ARCHITECTURE.md, "placement score").

S(g) = mean over scored (layer, token) of the sum of the top-k router
probabilities within eligible(g). Probabilities are over all experts: softmax
of the logits, or for sigmoid-scored models (DeepSeek) the sigmoid scores
normalised to sum to one."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from mlxmoe.bundle.manifest import Manifest



@dataclass
class PlacementScores:
    """S(g) per group (docs/ARCHITECTURE.md: mean over scored layers and prompt tokens of
    the top-k probability mass inside eligible(g))."""

    scores: dict[int, float]
    layers: list[int]
    n_tokens: int
    elapsed_ms: float = 0.0

    @property
    def ranked(self) -> list[int]:
        return sorted(self.scores, key=lambda g: (-self.scores[g], g))

    @property
    def best(self) -> int:
        return self.ranked[0]

    @property
    def margin(self) -> float:
        r = self.ranked
        return self.scores[r[0]] - (self.scores[r[1]] if len(r) > 1 else 0.0)

    def to_dict(self) -> dict:
        return {"scores": {str(g): s for g, s in self.scores.items()},
                "layers": self.layers, "n_tokens": self.n_tokens,
                "best": self.best, "margin": self.margin, "elapsed_ms": self.elapsed_ms}


def router_probs(logits: mx.array, scoring: str) -> mx.array:
    logits = logits.astype(mx.float32)
    if scoring == "sigmoid_group":
        s = mx.sigmoid(logits)
        return s / s.sum(axis=-1, keepdims=True)
    return mx.softmax(logits, axis=-1)


def topk_mass(probs: mx.array, eligible: list[int] | None, k: int) -> mx.array:
    """Per token: sum of the k largest probabilities among `eligible` (None: all)."""
    if eligible is not None:
        probs = probs[..., mx.array(sorted(eligible))]
    k = min(k, probs.shape[-1])
    return mx.topk(probs, k, axis=-1).sum(axis=-1)


def eligible_sets(m: Manifest) -> dict[int, dict[int, list[int]]]:
    """group -> layer -> eligible ids."""
    return {g: {l: m.eligible(g, l) for l in m.moe_layers} for g in range(m.n_groups)}


def score_groups(m: Manifest, logits_by_layer: dict, sets: dict | None = None) -> PlacementScores:
    """Score every group (or the given {name: {layer: ids}} sets) from one set
    of router logits: {layer: [..., tokens, n_experts]}."""
    sets = sets if sets is not None else eligible_sets(m)
    layers = sorted(logits_by_layer)
    probs = {l: router_probs(logits_by_layer[l], m.moe["scoring"]).reshape(-1, m.n_experts) for l in layers}
    scores = {}
    for g, per_layer in sets.items():
        masses = [topk_mass(probs[l], per_layer[l], m.top_k).mean() for l in layers]
        scores[g] = mx.stack(masses).mean().item()
    n_tokens = next(iter(probs.values())).shape[0] if probs else 0
    return PlacementScores(scores, layers, n_tokens)
