"""Which experts go together: groupings (per-layer balanced partitions) and
overlays (per-layer replicated sets), computed from calibration statistics.

Everything here is plain numpy on `Stats` (collected by stats.collect):
no model is needed, so eval can try many strategies on one loaded model.

Strategies (per layer, N balanced groups):
- contiguous:   expert ids in ranges (the split default; the baseline)
- mod:          expert_id mod N
- coactivation: maximise, within groups, how often experts are chosen together
                for the same token (domain-balanced co-selection counts)
- domain:       maximise, within groups, the similarity of experts' per-domain
                usage profiles (groups specialise by domain)
- domain-sets:  overlapping per-node sets ("overlap": true in the manifest):
                the suite's domains are clustered into N clusters by expert
                usage; node c holds the experts its cluster uses most
Overlays (per layer, n experts): by gate mass, or by cross-domain breadth
(experts every domain uses), super experts always first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mlxmoe.errors import MlxMoeError
from mlxmoe.bundle.manifest import contiguous

STRATEGIES = ("contiguous", "mod", "coactivation", "domain")
SET_STRATEGIES = ("domain-sets",)  # overlapping groups
OVERLAY_RULES = ("mass", "breadth")


@dataclass
class Stats:
    """Gate statistics over a prompt suite, per MoE layer (index i = i-th MoE
    layer in `layers`). Arrays are sums over tokens; per-domain arrays let
    callers weight domains equally whatever their token counts."""

    layers: list[int]
    n_experts: int
    top_k: int
    domains: list[str]
    tokens: dict[str, int]  # domain -> tokens
    sel: np.ndarray  # [D, L, E] times selected in top-k
    mass: np.ndarray  # [D, L, E] router probability where selected
    coact: np.ndarray  # [D, L, E, E] times selected together for one token
    topk_mass: np.ndarray  # [D, L] sum over tokens of the top-k probability mass
    out_max: np.ndarray = field(default=None)  # [L, E] max |expert output| over routed tokens
    super_experts: dict = field(default_factory=dict)  # layer -> [ids]

    def _per_token(self, a: np.ndarray) -> np.ndarray:
        t = np.array([max(self.tokens[d], 1) for d in self.domains], dtype=np.float64)
        return a / t.reshape((-1,) + (1,) * (a.ndim - 1))

    def balanced(self, name: str) -> np.ndarray:
        """Mean over domains of the per-token statistic (domains weigh equally)."""
        return self._per_token(getattr(self, name)).mean(axis=0)

    def share(self) -> np.ndarray:
        """[D, L, E]: each domain's share of its top-k selections per expert."""
        return self._per_token(self.sel) / self.top_k

    def summary(self) -> dict:
        """Small, JSON-ready summary for the manifest's calibration field."""
        load = self.balanced("sel") / self.top_k
        return {"layers": {str(l): {"topk_mass": round(float(self.balanced("topk_mass")[i]), 4),
                                    "load_min": round(float(load[i].min()), 5),
                                    "load_max": round(float(load[i].max()), 5),
                                    "load_cv": round(float(load[i].std() / load[i].mean()), 3)}
                           for i, l in enumerate(self.layers)}}


# ---------------------------------------------------------------- partitions

def sizes(n: int, k: int) -> list[int]:
    return [len(g) for g in contiguous(n, k)]


def balanced_partition(w: np.ndarray, group_sizes: list[int], restarts: int = 6, seed: int = 0,
                       max_swaps: int = 2000) -> list[int]:
    """Assign items to groups of the given sizes, maximising the sum of w[i, j]
    over pairs in the same group. Kernighan-Lin style best pair swaps from a
    few starts (one contiguous, the rest random); sizes never change."""
    n = w.shape[0]
    w = (w + w.T) / 2.0
    np.fill_diagonal(w, 0.0)
    base = np.repeat(np.arange(len(group_sizes)), group_sizes)
    rng = np.random.default_rng(seed)
    best, best_score = None, -np.inf
    for r in range(restarts):
        assign = base.copy() if r == 0 else rng.permutation(base)
        for _ in range(max_swaps):
            onehot = np.eye(len(group_sizes))[assign]
            m = w @ onehot  # [n, G]: affinity of each item to each group
            own = m[np.arange(n), assign]
            cross = m[:, assign]  # cross[i, j] = affinity of i to j's group
            gain = (cross - own[:, None]) + (cross.T - own[None, :]) - 2 * w
            gain[assign[:, None] == assign[None, :]] = -np.inf
            i, j = np.unravel_index(np.argmax(gain), gain.shape)
            if gain[i, j] <= 1e-12 * max(1.0, abs(w).max()):
                break
            assign[i], assign[j] = assign[j], assign[i]
        score = float((w * (assign[:, None] == assign[None, :])).sum())
        if score > best_score:
            best, best_score = assign.copy(), score
    return best.tolist()


def _affinity(stats: Stats, strategy: str, i: int) -> np.ndarray:
    if strategy == "coactivation":
        return stats.balanced("coact")[i]
    share = stats.share()[:, i, :]  # [D, E]
    share = share / np.maximum(share.sum(axis=1, keepdims=True), 1e-12)  # every domain weighs 1
    prof = share / np.maximum(np.linalg.norm(share, axis=0, keepdims=True), 1e-12)  # expert profile over domains
    return prof.T @ prof  # cosine similarity of usage profiles


def partition(strategy: str, n_experts: int, n_groups: int, stats: Stats | None = None, layer_index: int = 0,
              exclude=()) -> list[list[int]]:
    """Balanced groups of the experts not in `exclude` (the overlay: it is on
    every node anyway, so it must not unbalance the groups)."""
    if strategy not in STRATEGIES:
        raise MlxMoeError(f"unknown grouping strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    ids = [e for e in range(n_experts) if e not in set(exclude)]
    if n_groups < 1 or n_groups > len(ids):
        raise MlxMoeError(f"cannot make {n_groups} groups of {len(ids)} experts")
    if strategy == "contiguous":
        return [[ids[i] for i in g] for g in contiguous(len(ids), n_groups)]
    if strategy == "mod":
        return [ids[g::n_groups] for g in range(n_groups)]  # = id mod N when nothing is excluded
    if stats is None:
        raise MlxMoeError(f"grouping strategy {strategy!r} needs calibration statistics")
    w = _affinity(stats, strategy, layer_index)[np.ix_(ids, ids)]
    assign = balanced_partition(w, sizes(len(ids), n_groups))
    return [[ids[i] for i in range(len(ids)) if assign[i] == g] for g in range(n_groups)]


def grouping(strategy: str, n_groups: int, layers: list[int], n_experts: int, stats: Stats | None = None,
             overlay: dict | None = None) -> dict:
    """Manifest grouping {"strategy", "layers": {layer: [[ids], ...]}}: a full
    partition. Overlay experts are dealt round-robin to the groups (they sit in
    every eligible set, so where they live only matters for file layout)."""
    out = {}
    for i, l in enumerate(layers):
        ov = sorted((overlay or {}).get(l, []))
        groups = partition(strategy, n_experts, n_groups, stats, i, exclude=ov)
        for j, e in enumerate(ov):
            groups[min(range(n_groups), key=lambda g: (len(groups[g]), (g - j) % n_groups))].append(e)
        out[str(l)] = [sorted(g) for g in groups]
    return {"strategy": strategy, "layers": out}


# ------------------------------------------------------------------ overlays

def expert_scores(stats: Stats, rule: str) -> np.ndarray:
    """[L, E]: how much every node would want each expert, by rule."""
    if rule == "mass":
        return stats.balanced("mass")
    if rule == "breadth":  # the domain that uses it least still uses it this much
        return stats.share().min(axis=0)
    raise MlxMoeError(f"unknown overlay rule {rule!r} (choose from {', '.join(OVERLAY_RULES)})")


def overlay(stats: Stats, n_per_layer: int, rule: str = "mass", include_super: bool = True) -> dict:
    """{layer: [ids]}: n experts per layer, super experts first (if n > 0)."""
    if n_per_layer < 0 or n_per_layer > stats.n_experts:
        raise MlxMoeError(f"overlay of {n_per_layer} experts per layer: must be between 0 and {stats.n_experts}")
    score = expert_scores(stats, rule)
    out = {}
    for i, l in enumerate(stats.layers):
        first = list(stats.super_experts.get(l, [])) if include_super else []
        rest = [int(e) for e in np.argsort(-score[i], kind="stable") if int(e) not in first]
        out[l] = sorted((first + rest)[:n_per_layer])
    return out


def overlay_for_bytes(budget: int, expert_bytes: int, n_layers: int) -> int:
    """Experts per layer that fit `budget` bytes of overlay on every node."""
    if expert_bytes <= 0:
        raise MlxMoeError("cannot size an overlay: expert byte size unknown")
    return int(budget // (expert_bytes * n_layers))


# --------------------------------------------------------- extra eligible sets

def domain_sets(stats: Stats, clusters: list[list[str]], size) -> list[dict]:
    """Overlapping per-node sets (not a partition): node c holds, per layer, the
    `size` (an int, or {layer: int}) experts its domain cluster uses most; every expert lands somewhere
    (an expert no node took replaces the node's least-used one)."""
    share = stats.share()
    dom = {d: i for i, d in enumerate(stats.domains)}
    sets = [dict() for _ in clusters]
    for li, l in enumerate(stats.layers):
        want = [share[[dom[d] for d in c], li, :].mean(axis=0) for c in clusters]
        n = size[l] if isinstance(size, dict) else size
        chosen = [list(np.argsort(-w, kind="stable")[:n]) for w in want]
        for e in range(stats.n_experts):
            if not any(e in s for s in chosen):
                c = int(np.argmax([w[e] for w in want]))
                # give the slot of that node's least-wanted expert held elsewhere too
                held = [x for x in chosen[c] if sum(x in s for s in chosen) > 1] or chosen[c]
                chosen[c].remove(min(held, key=lambda x: want[c][x]))
                chosen[c].append(e)
        for c, s in enumerate(chosen):
            sets[c][l] = sorted(int(x) for x in s)
    return sets


def set_grouping(stats: Stats, n_groups: int, size: int) -> dict:
    """Manifest grouping of overlapping domain sets of `size` experts per layer."""
    if len(stats.domains) < n_groups:
        raise MlxMoeError(f"domain-sets: {n_groups} groups need at least {n_groups} domains in the suite, "
                          f"got {len(stats.domains)} ({', '.join(stats.domains)})")
    check_set_size(size, n_groups, stats.n_experts, stats.top_k)
    clusters = cluster_domains(stats, n_groups)
    sets = domain_sets(stats, clusters, size)
    return {"strategy": "domain-sets", "overlap": True, "domains": clusters,
            "layers": {str(l): [s[l] for s in sets] for l in stats.layers}}


def check_set_size(size: int, n_groups: int, n_experts: int, top_k: int) -> None:
    if not top_k <= size <= n_experts:
        raise MlxMoeError(f"--set-size {size}: must be between top_k={top_k} and {n_experts}")
    if size * n_groups < n_experts:
        raise MlxMoeError(f"--set-size {size}: {n_groups} sets of {size} cannot hold all {n_experts} experts")


def default_set_size(n_experts: int, n_groups: int) -> int:
    """1.5x a plain 1/N share of the experts (the budget docs/QUALITY.md measures)."""
    return min(n_experts, -(-3 * n_experts // (2 * n_groups)))


def set_size_for_budget(budget: tuple, n_experts: int, n_groups: int, expert_bytes: float, n_layers: int,
                        trunk_bytes: int, overlay_bytes: int = 0) -> int:
    """domain-sets: experts per node per layer that fit a memory budget per
    node. `budget` is ("bytes", n): the node's weights (trunk + overlay + its
    set), or ("ratio", r): r x a plain node (trunk + n_experts / n_groups
    experts per layer). Raises if the budget cannot hold sets covering
    every expert."""
    kind, value = budget
    per_layer = expert_bytes * n_layers  # one more expert in every MoE layer
    plain = trunk_bytes + per_layer * n_experts / n_groups
    total = value * plain if kind == "ratio" else value
    size = min(n_experts, int((total - trunk_bytes - overlay_bytes) // per_layer))
    need = -(-n_experts // n_groups)  # the sets must cover every expert
    if size < need:
        least = (trunk_bytes + overlay_bytes + need * per_layer)
        raise MlxMoeError(f"--set-budget {budget_text(budget)}: fits {max(size, 0)} experts per layer, fewer than the "
                          f"{need} that {n_groups} sets need to hold all {n_experts}; give at least "
                          f"{budget_text(('bytes', least))} or {least / plain:.2f}x")
    return size


def set_mem_ratio(size: int, n_experts: int, n_groups: int, expert_bytes: float, n_layers: int, trunk_bytes: int,
                  overlay_bytes: int = 0) -> float:
    """Node memory with sets of `size` (plus overlay) / a plain node's."""
    per_layer = expert_bytes * n_layers
    return (trunk_bytes + overlay_bytes + size * per_layer) / (trunk_bytes + per_layer * n_experts / n_groups)


def budget_text(budget: tuple) -> str:
    kind, value = budget
    if kind == "ratio":
        return f"{value:g}x"
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("B", 1)):
        if value >= f or unit == "B":
            return f"{value / f:.3g}{unit}"


def check_set_domains(domains, n_groups: int) -> None:
    """domain-sets clusters the suite's domains into one set per group: say so
    before any statistics are collected when there are too few."""
    domains = sorted(set(domains))
    if len(domains) < n_groups:
        raise MlxMoeError(f"--grouping domain-sets: {n_groups} groups need at least {n_groups} domains in the suite, "
                          f"it has {len(domains)} ({', '.join(domains)}); use a suite with more domains "
                          f"(the \"domain\" field of a .jsonl, one .txt file per domain) or --groups {len(domains)}")


def cluster_domains(stats: Stats, n: int) -> list[list[str]]:
    """Split the suite's domains into n clusters by usage similarity (average
    over layers of cosine similarity of their expert shares), greedily."""
    share = stats.share()  # [D, L, E]
    prof = share.reshape(len(stats.domains), -1)
    prof = prof / np.maximum(np.linalg.norm(prof, axis=1, keepdims=True), 1e-12)
    sim = prof @ prof.T
    assign = balanced_partition(sim, sizes(len(stats.domains), n), restarts=20)
    return [[d for d, a in zip(stats.domains, assign) if a == c] for c in range(n)]
