"""The live quality meter: per decoded token, the share of the full model's
top-k router mass that falls on the node's eligible experts, averaged over MoE
layers (1.0: the node routes exactly as the full model would; docs/QUALITY.md,
"Quality meter", for how it relates to the measured KL).

The router logits are over every expert: a node's Linear router keeps the full
rows for this (`MoeState.full`, one extra router matmul per MoE layer while the
meter is on), a full model masked for eval has them already. While a meter is
attached (`start`), each gate adds its layer's share per token and the one-token
decoder-layer step gives way to the block's (the gate must run); `read` returns
the mean since the last read and resets, so an engine calls it once per step.

    meter.start(loaded)            # once (or on the steps it samples)
    ... one decode step ...
    value = meter.read(loaded)     # float in [0, 1], or None: nothing decoded
"""

from __future__ import annotations

import mlx.core as mx

from mlxmoe.model.placement import router_probs


class QualityMeter:
    """Per-token eligible share of the full top-k router mass, per MoE layer."""

    def __init__(self, top_k: int, scoring: str):
        self.top_k, self.scoring, self.shares = top_k, scoring, []

    def add(self, logits: mx.array, keep: mx.array | None) -> None:
        """`logits` [..., E] over every expert; `keep` [E] bool (None: all eligible)."""
        p = router_probs(logits, self.scoring)
        k = min(self.top_k, p.shape[-1])
        full = mx.topk(p, k, axis=-1).sum(-1)
        kept = full if keep is None else mx.topk(mx.where(keep, p, 0.0), k, axis=-1).sum(-1)
        self.shares.append((kept / mx.maximum(full, 1e-12)).reshape(-1))

    def per_token(self) -> mx.array | None:
        """[tokens] mean over MoE layers of ONE forward's shares since the last reset."""
        return mx.stack(self.shares).mean(0) if self.shares else None

    def mean(self) -> float | None:
        """Mean over every (token, MoE layer) since the last reset (steps of any length)."""
        return mx.concatenate(self.shares).mean().item() if self.shares else None

    def reset(self) -> None:
        self.shares = []


def start(loaded) -> QualityMeter:
    m = loaded.manifest
    q = QualityMeter(m.top_k, m.moe["scoring"])
    for b in loaded.blocks.values():
        b._moe.meter = q
    return q


def stop(loaded) -> None:
    for b in loaded.blocks.values():
        b._moe.meter = None


def read(loaded) -> float | None:
    """The meter's mean share since the last read (None: no meter or nothing
    decoded), and reset it. The engine's one call per step."""
    q = next(iter(loaded.blocks.values()))._moe.meter if loaded.blocks else None
    if q is None:
        return None
    v = q.mean()
    q.reset()
    return v
