"""Healed parameters of a node set: what they are and how they enter a model.

`mlxmoe calibrate --heal` (quality/heal.py) trains, per group, a few of the
masked model's parameters; they are saved as plain name -> array dicts
(one safetensors file per group) in three kinds, by name:
  <gate>.weight            router rows of the eligible experts, in global id order
  <norm>.weight            an RMSNorm weight, whole
  <linear>.lora_a / lora_b a LoRA pair of an attention projection, merged into
                           its weight (W + (A @ B)^T): no extra work per token
`weights_of` turns them into the model's own parameters, for the full model
masked to the set (training, eval) or for a node's model (its router holds
only the local rows, in local order): both by one `take` over the base rows
and the healed rows, so the same code is differentiable in training. A node
applies them at load, before the fused paths read the weights (model/load.py);
a node whose every expert is eligible never does (`applies`)."""

from __future__ import annotations

from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

LORA_A, LORA_B = ".lora_a", ".lora_b"


def applies(local_ids: dict, n_experts: int) -> bool:
    """Healed parameters apply only on the masked path: some MoE layer lacks an expert."""
    return any(len(set(ids)) < n_experts for ids in local_ids.values())


def gate_name(loaded, layer: int) -> str:
    return f"model.layers.{layer}.{loaded.arch.block}.{loaded.arch.gate}.weight"


def _eligible_of(loaded, eligible: dict | None) -> dict:
    return eligible if eligible is not None else {l: sorted(set(v)) for l, v in loaded.local_ids.items()}


def initial(loaded, trainable, rank: int = 8, seed: int = 0, eligible: dict | None = None) -> dict:
    """Training start: the base values (router rows, norms; float32, so that a
    bf16 model on a GPU trains at full precision) and a LoRA pair with B = 0, so
    step 0 is the unhealed masked model exactly."""
    base = dict(tree_flatten(loaded.model.parameters()))
    elig = _eligible_of(loaded, eligible)
    out = {}
    if "router" in trainable:
        for l, ids in elig.items():
            out[gate_name(loaded, l)] = base[gate_name(loaded, l)][mx.array(sorted(ids))].astype(mx.float32)
    key = mx.random.key(seed)
    for path, m in loaded.model.named_modules():
        if "norms" in trainable and isinstance(m, nn.RMSNorm):
            out[f"{path}.weight"] = base[f"{path}.weight"].astype(mx.float32)
        if "lora" in trainable and type(m) is nn.Linear and ".self_attn." in f".{path}.":
            key, k = mx.random.split(key)
            n_out, n_in = m.weight.shape
            out[path + LORA_A] = mx.random.normal((n_in, rank), key=k) * (n_in ** -0.5)
            out[path + LORA_B] = mx.zeros((rank, n_out))
    return out


def kind_of(loaded, name: str, eligible: dict | None = None) -> str:
    """"router", "norms" or "lora": which trainable set a healed parameter is of."""
    if name.endswith((LORA_A, LORA_B)):
        return "lora"
    return "router" if name in {gate_name(loaded, l) for l in _eligible_of(loaded, eligible)} else "norms"


def weights_of(loaded, base: dict, healed: dict, eligible: dict | None = None) -> dict:
    """The model parameters (name -> array) that `healed` replaces, computed
    from `base` (the model's own parameters). `eligible` (layer -> ids) for the
    full model masked to a set; None for a node (its local_ids)."""
    elig = _eligible_of(loaded, eligible)
    gates = {gate_name(loaded, l): l for l in elig}
    out = {}
    for name, v in healed.items():
        if name.endswith(LORA_B):
            continue
        if name.endswith(LORA_A):
            w = name[: -len(LORA_A)] + ".weight"
            b = healed[name[: -len(LORA_A)] + LORA_B]
            out[w] = (base[w].astype(mx.float32) + (v @ b).T).astype(base[w].dtype)
        elif name in gates:
            out[name] = _router_rows(loaded, base[name], v, gates[name], eligible)
        else:
            out[name] = v.astype(base[name].dtype)
    return out


def _router_rows(loaded, base_w, rows, layer: int, eligible):
    """Router weight with the eligible experts' rows from `rows` (global id
    order): the full model's rows by global id, or a node's in local order."""
    ids = sorted(_eligible_of(loaded, eligible)[layer])
    rank = {e: i for i, e in enumerate(ids)}
    n = base_w.shape[0]
    order = (range(n) if eligible is not None else loaded.local_ids[layer])
    idx = [n + rank[e] if e in rank else j for j, e in enumerate(order)]
    return mx.take(mx.concatenate([base_w, rows.astype(base_w.dtype)]), mx.array(idx), axis=0)


def update(model, weights: dict) -> None:
    model.update(tree_unflatten(list(weights.items())))


@contextmanager
def applied(loaded, base: dict, healed: dict, eligible: dict | None = None):
    """Within the block the model carries `healed`; its base values come back on exit."""
    w = weights_of(loaded, base, healed, eligible)
    update(loaded.model, w)
    try:
        yield
    finally:
        update(loaded.model, {k: base[k] for k in w})


def apply_to_node(loaded, healed: dict) -> bool:
    """Apply a group's healed parameters to its node's model (model/load.py)
    when its set is masked; False when not applied."""
    if not healed or not applies(loaded.local_ids, loaded.manifest.n_experts):
        return False
    base = dict(tree_flatten(loaded.model.parameters()))
    update(loaded.model, weights_of(loaded, base, healed))
    return True
