"""Which group computes a token's routed experts at one MoE layer (onehop,
split): pure functions over router logits and the manifest's eligible sets,
and the in-process oracle that masks a full model the same way."""

from __future__ import annotations

from contextlib import contextmanager

import mlx.core as mx
import numpy as np

from mlxmoe.model.moe import dynamic_mask
from mlxmoe.model.placement import router_probs, topk_mass


def onehop_pick(logits: mx.array, scoring: str, sets: list, top_k: int) -> mx.array:
    """Per token: index into `sets` (eligible ids, first = home) of the set
    holding the most top-k router mass; the first wins ties."""
    probs = router_probs(logits, scoring)
    mass = mx.stack([topk_mass(probs, s, top_k) for s in sets], axis=-1)
    return mx.argmax(mass, axis=-1)


def group_order(home: int, groups) -> list[int]:
    return [home] + sorted(g for g in set(groups) if g != home)


def candidate_sets(m, home: int, order: list[int], layer: int, split: bool) -> list[list[int]]:
    """Per candidate group (order[0] = home): the experts a layer step may use,
    its eligible set ("onehop") or that united with home's ("split")."""
    own = set(m.eligible(home, layer))
    return [sorted(own | set(m.eligible(g, layer))) if split else m.eligible(g, layer) for g in order]


def set_masks(sets: list[list[int]], n_experts: int) -> mx.array:
    rows = np.full((len(sets), n_experts), -np.inf, np.float32)
    for i, ids in enumerate(sets):
        rows[i, ids] = 0.0
    return mx.array(rows)


@contextmanager
def dynamic_onehop(loaded, home: int, groups=None, on_pick=None, split: bool = False):
    """On a full model (every expert loaded): mask each MoE gate, per token, to
    the set one-hop routing would pick (the oracle of "onehop", or of "split"
    with split=True). `on_pick(layer, picks)` sees the chosen group ids."""
    m = loaded.manifest
    order = group_order(home, range(m.n_groups) if groups is None else groups)
    sets = {l: candidate_sets(m, home, order, l, split) for l in m.moe_layers}
    masks = {l: set_masks(sets[l], m.n_experts) for l in m.moe_layers}
    ids = mx.array(order)
    away = {l: mx.array(~np.isin(np.arange(m.n_experts), m.eligible(home, l))) for l in m.moe_layers} if split else {}

    def mask(layer, logits):
        pick = onehop_pick(logits, m.moe["scoring"], sets[layer], m.top_k)
        chosen = ids[pick]
        if split and on_pick is not None:  # a split step calls the picked node only for experts not held at home
            top = mx.argpartition(-(logits.astype(mx.float32) + masks[layer][pick]), kth=m.top_k - 1, axis=-1)
            chosen = mx.where(away[layer][top[..., :m.top_k]].any(axis=-1), chosen, home)
        if on_pick is not None:
            on_pick(layer, chosen)
        return masks[layer][pick]

    with dynamic_mask(loaded.gates, mask):
        yield
