"""The MoE-block protocol: what can change a MoE layer's forward, in one file.

mlx-lm's model classes and parameter paths stay as they are; at load
`install` gives a MoE layer's modules a subclass (one per pair, cached:
`with_mixin`) whose __call__ reads ONE `MoeState`, shared by the block, its
router (gate), its experts (SwitchGLU) and, where a one-token step takes it
over, its decoder layer. Other modules change behaviour only through that
object's fields (`state_of(module)`) and the named functions below, never
through attributes of their own on mlx-lm's modules.

Wrappers (all here):
  MoeBlock          the block: `hook` replaces its forward; else one token takes
                    `step`; else mlx-lm's code
  MaskedLinearGate  Linear router (qwen*, mixtral, olmoe, gpt_oss): records, then
                    adds `mask` or `dynamic(layer, logits)`
  MaskedSigmoidGate DeepSeek-V3 / Kimi-K2 gate: the same on its selection scores
  LocalLinearGate   Linear router of a node, holding only the local rows (below);
                    records the logits of `full`
  MoeExperts        SwitchGLU: global ids -> local rows by `g2l`; `outputs` sees
                    each call's (layer, ids, y)
  MoeLayer          decoder layer: one token with plain routing takes `layer_step`

MoeState fields, and what sets each:
  layer             install
  mask              set_eligible (full model: -inf for non-eligible experts)
  dynamic           dynamic_mask() (per-token mask, the one-hop oracle: node/remote/choose.py)
  records, stop_at  GateRecorder (placement, calibration, eval)
  full              install (a node's Linear router: the full router, for recording)
  g2l               install (global id -> local row; None: ids are rows)
  step, step_args   fused.install (the one-token MoE step and its cached arguments)
  layer_step, layer_args  set_layer_step, from fused_layer.set_layer_steps
  hook              hooked() (remote routing: node/remote/route.py); own_code() turns
                    `step` off within a hook that replaces a child module
  outputs           quality/stats.ExpertOutputs (largest expert outputs)
  meter, keep       meter.start (the live quality meter, model/meter.py); install
                    (`keep`: a node's eligible experts over all E, for the meter)

Spans restore each field on exit. `unhooked(block, x)` is the block's forward
without its hook (what a hook computes locally); `replaced_child` shadows a
child module for a span (remote split, the layer step's attention). A new
routing mode adds a field here and reads it in the wrapper it changes.

Masked routing, one implementation for every supported architecture: the
router's logits of non-eligible experts become -inf *before* the block's own
selection rule (softmax or softmax-after-top-k, norm_topk_prob, shared experts
untouched). DeepSeek's sigmoid gate selects inside the gate with a bias
correction, so its masked twin applies the mask to the selection scores.
For Linear routers on a node (a strict subset of experts), the same result
costs nothing: softmax over logits with -inf for non-eligible experts equals
softmax over the eligible logits alone, so the router keeps only the local
rows (in local order) and the block's own top-k yields local indices directly.
No mask add and no id remap run per token. With every expert eligible no mask
is set: the forward is mlx-lm's own.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np

_CLASS_CACHE: dict = {}


@dataclass(eq=False)
class MoeState:
    """Everything that can change one MoE layer's forward (module doc)."""
    layer: int
    mask: mx.array | None = None
    dynamic: Callable | None = None  # (layer, logits) -> mask
    records: list | None = None  # (layer, logits) appended while recording
    stop_at: int | None = None
    full: Callable | None = None
    g2l: mx.array | None = None
    step: Callable | None = None  # (block, x, step_args) -> y for one token
    step_args: tuple | None = None
    layer_step: Callable | None = None  # (decoder layer, x, mask, cache, state) -> y
    layer_args: tuple | None = None
    hook: Callable | None = None  # (block, x) -> y
    outputs: Callable | None = None  # (layer, indices, y)
    meter: object | None = None  # model/meter.QualityMeter
    keep: mx.array | None = None  # [E] bool: this node's experts (a LocalLinearGate's meter)


def state_of(module) -> MoeState:
    """The MoeState of an installed block, gate, experts or decoder layer."""
    return module._moe


def _attach(module, state: MoeState) -> None:
    # A plain attribute, kept out of the nn.Module tree: never a parameter, never saved.
    object.__setattr__(module, "_moe", state)


class _Spans(threading.local):
    """The spans in force on this thread (an engine's; tests run several nodes in one process),
    innermost last: (module, child name, stand-in) and (state, field, value, old value). `pristine`
    lifts them all for a while (a peer's request served while this node's own step waits on a peer)."""

    def __init__(self):
        self.children: list[tuple] = []
        self.fields: list[tuple] = []


_SPANS = _Spans()


@contextmanager
def replaced_child(module, name: str, fn):
    """Within the block, `module.<name>` is `fn` instead of its child module:
    an instance attribute shadows an nn.Module's child of that name
    (Module.__getattr__ runs only as a fallback)."""
    object.__setattr__(module, name, fn)
    entry = (module, name, fn)
    _SPANS.children.append(entry)
    try:
        yield
    finally:
        _drop(_SPANS.children, entry)
        object.__delattr__(module, name)


def _drop(spans: list, entry: tuple) -> None:
    """Remove `entry` itself (modules and states compare by content, not identity)."""
    del spans[next(i for i, e in enumerate(spans) if e is entry)]


@contextmanager
def pristine(states=()):
    """Within the block, every block computes as installed: the spans in force
    (replaced children, hooks, steps turned off, masks) are lifted, and the
    quality meter of `states` is off; all come back after. A node serving a
    peer's `experts` request while its own routed step waits on a peer (each
    node may be inside a step that replaced this very layer's experts) runs
    its own masked blocks, not the waiting step's stand-ins."""
    children, fields = list(_SPANS.children), list(_SPANS.fields)
    meters = [(st, st.meter) for st in states]
    for module, name, _ in reversed(children):
        object.__delattr__(module, name)
    for st, name, _, old in reversed(fields):
        setattr(st, name, old)
    for st, _ in meters:
        st.meter = None
    try:
        yield
    finally:
        for st, m in meters:
            st.meter = m
        for st, name, value, _ in fields:
            setattr(st, name, value)
        for module, name, fn in children:
            object.__setattr__(module, name, fn)


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


# ------------------------------------------------------------------ wrappers

class MoeBlock:
    """The block: `hook` replaces its forward; one token takes `step`."""

    def __call__(self, x):
        s = self._moe
        if s.hook is not None:
            return s.hook(self, x)
        if s.step is None or x.size != x.shape[-1]:
            return super().__call__(x)
        return s.step(self, x, s.step_args)


def unhooked(block, x):
    """The block's forward without its hook (what a hook computes locally)."""
    s = block._moe
    if s.step is None or x.size != x.shape[-1]:
        return super(MoeBlock, block).__call__(x)
    return s.step(block, x, s.step_args)


def _record(s: MoeState, logits) -> None:
    s.records.append((s.layer, logits))
    if s.layer == s.stop_at:
        raise StopForward


class MaskedLinearGate:
    """Router that is a Linear: records, then adds the fixed or per-token mask."""

    def __call__(self, x):
        logits = super().__call__(x)
        s = self._moe
        if s.records is not None:
            _record(s, logits)
        mask = s.mask if s.dynamic is None else s.dynamic(s.layer, logits)
        if s.meter is not None:
            s.meter.add(logits, None if mask is None else mask == 0)
        return logits if mask is None else logits + mask


class MaskedSigmoidGate:
    """DeepSeek-V3 / Kimi-K2 gate: sigmoid scores, e_score_correction_bias,
    group-limited selection; non-eligible experts can never be selected."""

    def __call__(self, x):
        logits = x @ self.weight.T
        s = self._moe
        if s.records is not None:
            _record(s, logits)
        mask = s.mask if s.dynamic is None else s.dynamic(s.layer, logits)
        if s.meter is not None:
            s.meter.add(logits, None if mask is None else mask == 0)
        return sigmoid_group_select(logits, self.e_score_correction_bias, mask, self.top_k, self.n_group,
                                    self.topk_group, self.routed_scaling_factor, self.norm_topk_prob)


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


class LocalLinearGate:
    """Linear router holding only the local experts' rows (module doc)."""

    def __call__(self, x):
        s = self._moe
        if s.records is not None or s.meter is not None:
            full = s.full(x)
            if s.records is not None:
                _record(s, full)
            if s.meter is not None:
                s.meter.add(full, s.keep)
        return super().__call__(x)


class MoeExperts:
    """SwitchGLU: global ids -> local rows (`g2l`); `outputs` sees each call.
    The one-token steps read the experts' arrays directly, past this."""

    def __call__(self, x, indices):
        s = self._moe
        y = super().__call__(x, indices if s.g2l is None else s.g2l[indices])
        if s.outputs is not None:
            s.outputs(s.layer, indices, y)
        return y


class MoeLayer:
    """Decoder layer: one token takes `layer_step` while routing is plain (no
    hook, recording or mask: the step computes the router logits itself)."""

    def __call__(self, x, mask=None, cache=None):
        s = self._moe
        if (s.layer_step is None or x.size != x.shape[-1] or s.hook is not None or s.records is not None
                or s.mask is not None or s.dynamic is not None or s.meter is not None):
            return super().__call__(x, mask, cache)
        return s.layer_step(self, x, mask, cache, s)


# ------------------------------------------------------------------ installing

def install(block, gate_attr: str, experts_attr: str, layer: int, scoring: str,
            n_experts: int, local_ids: list[int] | None) -> MoeState:
    """Give `block`, its gate and its experts one MoeState, routing only to
    `local_ids` (global ids, in local row order). local_ids=None: every
    expert is local and eligible (no mask, no remap)."""
    import copy

    gate = getattr(block, gate_attr)
    experts = getattr(block, experts_attr)
    s = MoeState(layer)
    local_ids = list(range(n_experts)) if local_ids is None else list(local_ids)
    if scoring != "sigmoid_group" and local_ids != list(range(n_experts)):
        s.full = copy.copy(gate)  # same arrays, original class: records full logits
        s.keep = eligible_mask(local_ids, n_experts) == 0
        rows = mx.array(local_ids)
        for name in ("weight", "scales", "biases", "bias"):
            if name in gate:
                setattr(gate, name, gate[name][rows])
        with_mixin(gate, LocalLinearGate)
    else:
        with_mixin(gate, MaskedSigmoidGate if scoring == "sigmoid_group" else MaskedLinearGate)
        if len(set(local_ids)) != n_experts:
            s.mask = eligible_mask(local_ids, n_experts)
        if local_ids != list(range(n_experts)):  # non-eligible ids are never selected; 0 keeps the gather in range
            s.g2l = mx.array(np.maximum(row_table(local_ids, n_experts), 0), dtype=mx.int32)
    with_mixin(block, MoeBlock)
    with_mixin(experts, MoeExperts)
    for m in (block, gate, experts):
        _attach(m, s)
    return s


def set_layer_step(decoder_layer, block, step, args) -> None:
    """The decoder layer shares its block's state; with a `step`, one token
    takes it (fused_layer.py), else the layer stays mlx-lm's class."""
    s = block._moe
    _attach(decoder_layer, s)
    if step is not None:
        with_mixin(decoder_layer, MoeLayer)
    s.layer_step, s.layer_args = step, args


def row_table(local_ids: list[int], n_experts: int) -> np.ndarray:
    """global expert id -> row in a node's experts (-1: not held there)."""
    t = np.full(n_experts, -1, np.int64)
    t[np.array(local_ids, dtype=np.int64)] = np.arange(len(local_ids))
    return t


def eligible_mask(eligible, n_experts: int) -> mx.array:
    m = mx.full((n_experts,), -mx.inf, dtype=mx.float32)
    m[mx.array(sorted(eligible))] = 0.0
    return m


def set_eligible(block, n_experts: int, eligible: list[int] | None) -> None:
    """Change only the mask (experts stay loaded): used to evaluate many
    configurations on one full model."""
    block._moe.mask = None if eligible is None else eligible_mask(eligible, n_experts)


# ------------------------------------------------------------------ spans

@contextmanager
def _setting(modules, name: str, values):
    """Within the block, field `name` of each module's state is values[i]."""
    states = [m._moe for m in modules]
    entries = [(s, name, v, getattr(s, name)) for s, v in zip(states, values)]
    for s, _, v, _ in entries:
        setattr(s, name, v)
    _SPANS.fields.extend(entries)
    try:
        yield
    finally:
        for e in entries:
            _drop(_SPANS.fields, e)
        for s, _, _, old in entries:
            setattr(s, name, old)


def dynamic_mask(modules, fn):
    """Within the block, every gate masks per token: `fn(layer, logits)` -> mask."""
    modules = list(modules)
    return _setting(modules, "dynamic", [fn] * len(modules))


def hooked(modules, hooks):
    """Within the block, modules[i]'s block forward is hooks[i](block, x)."""
    return _setting(modules, "hook", hooks)


def own_code(block):
    """Within the block, `block` runs mlx-lm's code for one token too: the
    one-token step reads the experts' arrays directly and would bypass a
    replaced experts module."""
    return _setting([block], "step", [None])


class GateRecorder:
    """Context manager: collect (layer, logits) from every MoE gate of a model
    during forward passes; `stop_at=layer` ends the pass right after that gate."""

    def __init__(self, gates: list, stop_at: int | None = None):
        self.gates, self.stop_at, self.records = gates, stop_at, []

    def __enter__(self):
        self.old = [(g._moe.records, g._moe.stop_at) for g in self.gates]
        for g in self.gates:
            g._moe.records, g._moe.stop_at = self.records, self.stop_at
        return self

    def __exit__(self, *exc):
        for g, old in zip(self.gates, self.old):
            g._moe.records, g._moe.stop_at = old
        return exc[0] is StopForward

    def by_layer(self) -> dict:
        out: dict = {}
        for layer, logits in self.records:
            out.setdefault(layer, []).append(logits)
        return {l: mx.concatenate(v, axis=-2) if len(v) > 1 else v[0] for l, v in out.items()}
