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
        """`logits` [B, L, E] over every expert; `keep` [E] bool (None: all eligible)."""
        p = router_probs(logits, self.scoring)
        k = min(self.top_k, p.shape[-1])
        full = mx.topk(p, k, axis=-1).sum(-1)
        kept = full if keep is None else mx.topk(mx.where(keep, p, 0.0), k, axis=-1).sum(-1)
        self.shares.append(kept / mx.maximum(full, 1e-12))  # [B, L]

    def rows(self) -> mx.array | None:
        """[B, L]: mean over MoE layers of ONE forward's shares since the last reset."""
        return mx.stack(self.shares).mean(0) if self.shares else None

    def per_token(self) -> mx.array | None:
        """[L] (one sequence): mean over MoE layers, per position."""
        r = self.rows()
        return None if r is None else r.reshape(-1)

    def mean(self) -> float | None:
        """Mean over every (token, MoE layer) since the last reset (forwards of any length)."""
        return mx.concatenate([x.reshape(-1) for x in self.shares]).mean().item() if self.shares else None

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


def _meter_of(loaded) -> QualityMeter | None:
    return next(iter(loaded.blocks.values()))._moe.meter if loaded.blocks else None


def read(loaded) -> float | None:
    """The meter's mean share since the last read (None: no meter or nothing
    decoded), and reset it. The engine's one call per step."""
    q = _meter_of(loaded)
    if q is None:
        return None
    v = q.mean()
    q.reset()
    return v


def take_rows(loaded, n: int | None = None) -> mx.array | None:
    """A batched step's per-row shares ([n]: mean over its tokens and the MoE
    layers) as an array being computed (no wait), and reset. The batch reads it
    one step later (node/batch.py)."""
    q = _meter_of(loaded)
    r = q.rows() if q is not None else None
    if r is None:
        return None
    q.reset()
    r = r.reshape(n or r.shape[0], -1).mean(-1)  # a one-token step's gates may see [1, H] (no sequence axis)
    mx.async_eval(r)
    return r


def read_rows(loaded) -> list[float] | None:
    """take_rows, waited for: per row the mean share, and reset."""
    r = take_rows(loaded)
    return None if r is None else r.tolist()


class SessionMeter:
    """A session's meter as its node reports it (info()["session_stats"][id]):
    the mean over the last finished turn's decoded tokens, and turns metered."""

    def __init__(self):
        self.sum, self.n, self.last, self.turns = 0.0, 0, None, 0

    def add(self, value: float | None, tokens: int = 1) -> None:
        if value is not None:
            self.sum, self.n = self.sum + value * tokens, self.n + tokens

    def end_turn(self) -> None:
        if self.n:
            self.last, self.turns = self.sum / self.n, self.turns + 1
        self.sum, self.n = 0.0, 0

    def stats(self) -> dict:
        return {"quality_meter": None if self.last is None else round(self.last, 4), "quality_meter_turns": self.turns}
