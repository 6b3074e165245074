"""Layouts for the Macs you have: one eligible set per node, each sized to that
node's memory, placed where masking costs the most (docs/QUALITY.md, "Layouts").

Pure functions over plain numbers (calibrate.py measures and writes):
- `node_slots`: a node's budget (a multiple of a plain share, or bytes) as the
  number of (MoE layer, expert) pairs it can hold beside the trunk and its KV;
- `allocate`: how many experts each MoE layer gets on one node, from the
  measured cost of masking that layer alone, with the costliest layers whole
  (how many: `whole_candidates`, each tried and measured by autolayout.py);
- `node_sets`: which experts, per node and layer (the ones the node's domain
  cluster uses most), with every expert on some node while the nodes together
  hold enough (else the least used are left out: coverage below 1);
- `layout_grouping`: the manifest's grouping and overlay for those sets, and the
  placement rule the layout needs (the first MoE layer whose sets differ).
"""

from __future__ import annotations

import heapq
import re

import numpy as np

from mlxmoe.errors import MlxMoeError
from mlxmoe.units import parse_size


def parse_budgets(spec: str) -> list[tuple[str, float]]:
    """'1x,1.5x,3x' (multiples of a plain share) or '24GB,64GB,192GB' (a Mac's memory)."""
    out = []
    for part in [p.strip() for p in str(spec).split(",") if p.strip()]:
        m = re.fullmatch(r"(\d+(?:\.\d+)?)x", part, re.I)
        if m:
            out.append(("ratio", float(m.group(1))))
            continue
        try:
            out.append(("bytes", float(parse_size(part, "--budgets"))))
        except (MlxMoeError, ValueError):
            raise MlxMoeError(f"--budgets {spec!r}: {part!r} is neither a multiple of a plain share (1.5x) "
                              "nor a size (24GB)") from None
    if not out:
        raise MlxMoeError(f"--budgets {spec!r}: expected e.g. 1x,1.5x,3x or 24GB,64GB,192GB")
    return out


def node_slots(budgets: list[tuple[str, float]], n_experts: int, n_layers: int, expert_bytes: float,
               trunk_bytes: float, kv_bytes: float = 0.0, headroom: float = 0.75, top_k: int = 1) -> list[int]:
    """(layer, expert) pairs each node holds. A ratio r is r x a plain share (trunk + 1/N of the
    experts, N = the number of nodes); bytes are a Mac's memory, of which `headroom` is usable,
    less the KV cache and the trunk (as `plan` counts). At most every expert; at least top_k per layer."""
    n = len(budgets)
    plain = trunk_bytes + expert_bytes * n_layers * n_experts / n
    out = []
    for i, (kind, v) in enumerate(budgets):
        room = v * plain - trunk_bytes if kind == "ratio" else v * headroom - kv_bytes - trunk_bytes
        slots = min(n_experts * n_layers, int(room // expert_bytes))
        if slots < top_k * n_layers:
            need = trunk_bytes + kv_bytes + top_k * n_layers * expert_bytes
            what = f"{v:g}x" if kind == "ratio" else f"{v / 1e9:.3g} GB"
            raise MlxMoeError(f"budget of node {i} ({what}): room for {max(slots, 0)} experts over {n_layers} MoE "
                              f"layers, fewer than top_k={top_k} per layer; it needs at least "
                              f"{need / plain:.2f}x ({need / 1e9:.3g} GB usable)")
        out.append(slots)
    return out


def _loss(cost: float, n: int, n_experts: int) -> float:
    """Modelled loss of a layer masked to n of its experts: its measured cost at a plain share,
    scaled by the squared share of experts left out (0 when whole)."""
    return cost * (1.0 - n / n_experts) ** 2


def allocate(slots: int, costs: dict[int, float], n_experts: int, top_k: int, whole: int = 0) -> dict[int, int]:
    """Experts per MoE layer for a node of `slots`: the `whole` costliest layers get every expert
    (as many of them as leave top_k for each other layer), every other layer at least top_k, then
    one slot at a time where the modelled loss falls most (a layer whose masking costs the most
    fills first)."""
    layers = sorted(costs)
    if slots >= n_experts * len(layers):
        return {l: n_experts for l in layers}
    size = {l: top_k for l in layers}
    left = slots - top_k * len(layers)
    for l in sorted(layers, key=lambda x: -costs[x])[:whole]:
        if left >= n_experts - top_k:
            size[l], left = n_experts, left - (n_experts - top_k)
    gain = lambda l: _loss(costs[l], size[l], n_experts) - _loss(costs[l], size[l] + 1, n_experts)
    heap = [(-gain(l), l) for l in layers if size[l] < n_experts]
    heapq.heapify(heap)
    while left > 0 and heap:
        _, l = heapq.heappop(heap)
        size[l] += 1
        left -= 1
        if size[l] < n_experts:
            heapq.heappush(heap, (-gain(l), l))
    return size


def whole_candidates(slots: list[int], costs: dict[int, float], n_experts: int, top_k: int) -> list[int]:
    """How many whole layers are worth trying: 0, and up to as many as the smallest node holds
    beside top_k everywhere else (at most half the layers: beyond, the rest starve)."""
    fit = (min(slots) - top_k * len(costs)) // max(1, n_experts - top_k)
    return list(range(0, int(min(fit, len(costs) // 2)) + 1))


def grow(sets: list[dict[int, list[int]]], slots: int, layers: list[int], n_experts: int,
         top_k: int) -> dict[int, list[int]]:
    """The set of a Mac joining nodes that hold `sets` (they keep them: `mlxmoe up` without a
    re-plan): `slots` spread evenly over the layers, at each layer the experts the fewest nodes
    hold first (coverage grows), then in id order (contiguous ranges while nothing is calibrated)."""
    sizes = allocate(slots, {l: 1.0 for l in layers}, n_experts, top_k)
    out = {}
    for l in layers:
        held = np.zeros(n_experts, dtype=np.int64)
        for s in sets:
            held[s[l]] += 1
        out[l] = sorted(np.lexsort((np.arange(n_experts), held))[:sizes[l]].tolist())
    return out


def left_out(sets: list[dict[int, list[int]]], layers: list[int], n_experts: int) -> dict[int, list[int]]:
    """Per layer, the experts no node holds (while the Macs together hold less than the model)."""
    out = {l: sorted(set(range(n_experts)) - {e for s in sets for e in s[l]}) for l in layers}
    return {l: v for l, v in out.items() if v}


def node_sets(sizes: list[dict[int, int]], wants: list[np.ndarray], mass: np.ndarray,
              layers: list[int]) -> tuple[list[dict[int, list[int]]], dict[int, list[int]]]:
    """Per node and layer, the `sizes[g][l]` experts node g's traffic uses most (`wants[g]`:
    [L, E] usage share of its domain cluster). While the nodes together hold at least every
    expert of a layer, each expert is on some node (one no node took replaces the least-wanted
    expert of the node that wants it most among those held elsewhere); otherwise the least used
    (`mass`: [L, E] overall router mass) are left out. Returns (sets, left_out per layer)."""
    n_experts = mass.shape[1]
    sets = [dict() for _ in sizes]
    left_out = {}
    for li, l in enumerate(layers):
        chosen = [list(np.argsort(-w[li], kind="stable")[:s[l]]) for w, s in zip(wants, sizes)]
        missing = [e for e in np.argsort(-mass[li], kind="stable") if not any(e in c for c in chosen)]
        for e in missing:
            takers = [g for g in range(len(sizes)) if sizes[g][l] < n_experts]
            spare = {g: [x for x in chosen[g] if sum(x in c for c in chosen) > 1] for g in takers}
            takers = [g for g in takers if spare[g]]
            if not takers:
                continue
            g = max(takers, key=lambda t: wants[t][li][e])
            chosen[g].remove(min(spare[g], key=lambda x: wants[g][li][x]))
            chosen[g].append(e)
        out = sorted(set(range(n_experts)) - {int(x) for c in chosen for x in c})
        if out:
            left_out[l] = out
        for g, c in enumerate(chosen):
            sets[g][l] = sorted(int(x) for x in c)
    return sets, left_out


def layout_grouping(sets: list[dict[int, list[int]]], layers: list[int], n_experts: int, nodes: list[dict],
                    left_out: dict[int, list[int]]) -> tuple[dict, dict]:
    """The manifest's (grouping, overlay): experts every node holds go to the overlay (stored
    once, loaded by the router's front end where a layer is whole everywhere), the rest to each
    node's group. Placement scores at the first MoE layer whose node sets differ: before it every
    node computes the same (whole layers), so scores there cannot tell nodes apart."""
    common = {l: sorted(set.intersection(*(set(s[l]) for s in sets))) for l in layers}
    groups = {str(l): [sorted(set(s[l]) - set(common[l])) for s in sets] for l in layers}
    differ = [l for l in layers if any(groups[str(l)])]
    grouping = {"strategy": "layout", "overlap": True, "layers": groups, "nodes": nodes,
                "placement": {"layers": differ[:1] or layers[:1],
                              "whole": [l for l in layers if len(common[l]) == n_experts]}}
    if left_out:
        grouping["left_out"] = {str(l): v for l, v in left_out.items()}
    overlay = {"source": "layout", "layers": {str(l): v for l, v in common.items() if v}}
    return grouping, overlay
