"""Masked routing, one implementation for every supported architecture.

Instead of copying each model's MoE block, the block's own router and expert
modules are given a subclass (same parameters, same paths):

- the router's logits of non-eligible experts become -inf *before* the block's
  own selection rule (softmax or softmax-after-top-k, norm_topk_prob, shared
  experts untouched). DeepSeek's sigmoid gate selects inside the gate with a
  bias correction, so its masked twin applies the mask to the selection scores.
- the SwitchGLU holds only the local experts; global expert ids chosen by the
  router are mapped to local rows by a lookup table.

For Linear routers on a node (a strict subset of experts), the same result
costs nothing: softmax over logits with -inf for non-eligible experts equals
softmax over the eligible logits alone, so the router keeps only the local
rows (in local order) and the block's own top-k yields local indices directly.
No mask add and no id remap run per token; the full router is kept aside for
recording logits (placement scores).

With every expert eligible no mask is installed: the model is mlx-lm's own.
The gates can also record their raw logits (placement, calibration, eval).
"""

from __future__ import annotations

from contextlib import contextmanager

import mlx.core as mx
import numpy as np

_CLASS_CACHE: dict = {}


def _set(module, name, value):
    # Plain attributes, kept out of the nn.Module tree: never parameters, never saved.
    object.__setattr__(module, name, value)


@contextmanager
def replaced_child(module, name: str, fn):
    """Within the block, `module.<name>` is `fn` instead of its child module:
    an instance attribute shadows an nn.Module's child of that name
    (Module.__getattr__ runs only as a fallback)."""
    object.__setattr__(module, name, fn)
    try:
        yield
    finally:
        object.__delattr__(module, name)


class StopForward(Exception):
    """Raised by a recording gate to end a forward pass early (trunk-only scoring)."""


def with_mixin(module, mixin) -> None:
    """Give `module` the class (mixin, its class): same parameters and paths,
    the mixin's __call__ first (one class per pair, cached)."""
    if isinstance(module, mixin):
        return
    key = (type(module), mixin)
    if key not in _CLASS_CACHE:
        _CLASS_CACHE[key] = type(f"{mixin.__name__}{key[0].__name__}", (mixin, key[0]), {})
    module.__class__ = _CLASS_CACHE[key]


class _Recorder:
    """Shared by gate mixins: keep raw logits when recording is on; the mask
    is a fixed eligible set, or per token (`_dynamic(layer, logits)`, e.g. the
    one-hop oracle in remote.py) on a full model."""

    def _mask_for(self, logits):
        dyn = getattr(self, "_dynamic", None)
        return getattr(self, "_mask", None) if dyn is None else dyn(self._layer, logits)

    def _record_logits(self, logits):
        rec = getattr(self, "_rec", None)
        if rec is not None:
            rec.append((self._layer, logits))
            if self._layer == getattr(self, "_stop_at", None):
                raise StopForward


class MaskedLinearGate(_Recorder):
    """Router that is a Linear (qwen*, mixtral, olmoe, gpt_oss): logits + mask."""

    def __call__(self, x):
        logits = super().__call__(x)
        self._record_logits(logits)
        mask = self._mask_for(logits)
        return logits if mask is None else logits + mask


class MaskedSigmoidGate(_Recorder):
    """DeepSeek-V3 / Kimi-K2 gate: sigmoid scores, e_score_correction_bias,
    group-limited selection; non-eligible experts can never be selected."""

    def __call__(self, x):
        logits = x @ self.weight.T
        self._record_logits(logits)
        return sigmoid_group_select(logits, self.e_score_correction_bias, self._mask_for(logits),
                                    self.top_k, self.n_group, self.topk_group,
                                    self.routed_scaling_factor, self.norm_topk_prob)


def sigmoid_group_select(logits, bias, mask, top_k, n_group, topk_group, scaling, norm_topk_prob):
    """mlx-lm's deepseek_v3 group_expert_select with an eligibility mask. With
    mask=None it computes exactly what mlx-lm computes."""
    scores = mx.sigmoid(logits.astype(mx.float32))
    orig = scores
    scores = scores + bias
    if mask is not None:
        scores = scores + mask  # -inf for non-eligible: never a group's best, never selected
    if n_group > 1:
        scores = mx.unflatten(scores, axis=-1, shape=(n_group, -1))
        group_scores = mx.topk(scores, 2, axis=-1).sum(axis=-1, keepdims=True)
        k = n_group - topk_group
        group_idx = mx.argpartition(group_scores, kth=k - 1, axis=-2)[..., :k, :]
        scores = mx.put_along_axis(scores, mx.stop_gradient(group_idx), mx.array(0.0), axis=-2)
        scores = mx.flatten(scores, -2, -1)
        if mask is not None:
            scores = scores + mask  # dropped groups were zeroed; keep their masked experts out
    inds = mx.stop_gradient(mx.argpartition(-scores, kth=top_k - 1, axis=-1)[..., :top_k])
    w = mx.take_along_axis(orig, inds, axis=-1)
    if top_k > 1 and norm_topk_prob:
        w = w / w.sum(axis=-1, keepdims=True)
    return inds, w * scaling


class LocalLinearGate(_Recorder):
    """Linear router holding only the local experts' rows (see module doc)."""

    def __call__(self, x):
        if getattr(self, "_rec", None) is not None:
            self._record_logits(self._full(x))
        return super().__call__(x)


class LocalExperts:
    """SwitchGLU holding only local experts: global ids -> local rows."""

    def __call__(self, x, indices):
        g2l = getattr(self, "_g2l", None)
        return super().__call__(x, indices if g2l is None else g2l[indices])


def install(block, gate_attr: str, experts_attr: str, layer: int, scoring: str,
            n_experts: int, local_ids: list[int] | None):
    """Make `block` route only to `local_ids` (global ids, in local row order).
    local_ids=None: every expert is local and eligible (no mask, no remap)."""
    import copy

    gate = getattr(block, gate_attr)
    experts = getattr(block, experts_attr)
    local_ids = list(range(n_experts)) if local_ids is None else list(local_ids)
    if scoring != "sigmoid_group" and local_ids != list(range(n_experts)):
        full = copy.copy(gate)  # same arrays, original class: records full logits
        rows = mx.array(local_ids)
        for name in ("weight", "scales", "biases", "bias"):
            if name in gate:
                setattr(gate, name, gate[name][rows])
        with_mixin(gate, LocalLinearGate)
        _set(gate, "_full", full)
        _set(gate, "_layer", layer)
        return
    mixin = MaskedSigmoidGate if scoring == "sigmoid_group" else MaskedLinearGate
    with_mixin(gate, mixin)
    _set(gate, "_layer", layer)
    with_mixin(experts, LocalExperts)
    set_eligible(block, gate_attr, n_experts, None if len(set(local_ids)) == n_experts else local_ids)
    g2l = None
    if local_ids != list(range(n_experts)):  # non-eligible ids are never selected; 0 keeps the gather in range
        g2l = mx.array(np.maximum(row_table(local_ids, n_experts), 0), dtype=mx.int32)
    _set(experts, "_g2l", g2l)


def row_table(local_ids: list[int], n_experts: int) -> np.ndarray:
    """global expert id -> row in a node's experts (-1: not held there)."""
    t = np.full(n_experts, -1, np.int64)
    t[np.array(local_ids, dtype=np.int64)] = np.arange(len(local_ids))
    return t


def set_eligible(block, gate_attr: str, n_experts: int, eligible: list[int] | None):
    """Change only the mask (experts stay loaded): used to evaluate many
    configurations on one full model."""
    gate = getattr(block, gate_attr)
    m = None
    if eligible is not None:
        m = mx.full((n_experts,), -mx.inf, dtype=mx.float32)
        m[mx.array(sorted(eligible))] = 0.0
    _set(gate, "_mask", m)


class GateRecorder:
    """Context manager: collect (layer, logits) from every MoE gate of a model
    during forward passes; `stop_at=layer` ends the pass right after that gate."""

    def __init__(self, gates: list, stop_at: int | None = None):
        self.gates, self.stop_at, self.records = gates, stop_at, []

    def __enter__(self):
        for g in self.gates:
            _set(g, "_rec", self.records)
            _set(g, "_stop_at", self.stop_at)
        return self

    def __exit__(self, *exc):
        for g in self.gates:
            _set(g, "_rec", None)
            _set(g, "_stop_at", None)
        return exc[0] is StopForward

    def by_layer(self) -> dict:
        out: dict = {}
        for layer, logits in self.records:
            out.setdefault(layer, []).append(logits)
        return {l: mx.concatenate(v, axis=-2) if len(v) > 1 else v[0] for l, v in out.items()}
