"""Gate statistics of a prompt suite on the full model: per MoE layer, top-k
selections, the router probability of selected experts, per-domain usage,
co-selection, and each expert's largest output magnitude (grouping.Stats).
Calibration (calibrate.py), eval and the quality sweep read them."""

from __future__ import annotations

from contextlib import nullcontext

import mlx.core as mx
import numpy as np

from mlxmoe.quality import grouping as gr


class ExpertOutputs:
    """Context manager: per MoE layer, the largest |output| of each expert on
    the tokens routed to it (massive activations mark super experts)."""

    def __init__(self, loaded):
        from mlxmoe.model.moe import state_of

        self.loaded, self.max = loaded, {}
        self.states = [state_of(b) for b in loaded.blocks.values()]  # their `outputs` field

    def __enter__(self):
        for s in self.states:
            s.outputs = self.add
        return self

    def __exit__(self, *exc):
        for s in self.states:
            s.outputs = None

    def add(self, layer, indices, y):
        n = self.loaded.manifest.n_experts
        m = mx.abs(y.astype(mx.float32)).max(axis=-1).reshape(-1)
        idx = indices.reshape(-1)
        per = mx.zeros((n,), dtype=mx.float32).at[idx].maximum(m)
        cur = self.max.get(layer)
        self.max[layer] = per if cur is None else mx.maximum(cur, per)


def collect(loaded, items: list[tuple[str, list[int]]], advance=lambda n: None, outputs: bool = True) -> gr.Stats:
    """Run every (domain, token ids) item through the full model and sum the
    gate statistics (see grouping.Stats)."""
    from mlxmoe.model.placement import router_probs
    from mlxmoe.model.moe import GateRecorder

    m = loaded.manifest
    layers, n, k = m.moe_layers, m.n_experts, m.top_k
    domains = sorted({d for d, _ in items})
    D, L = len(domains), len(layers)
    st = gr.Stats(layers, n, k, domains, {d: 0 for d in domains}, np.zeros((D, L, n)), np.zeros((D, L, n)),
                  np.zeros((D, L, n, n)), np.zeros((D, L)))
    loaded.set_eligible(None)
    eye = np.eye(n, dtype=np.float32)
    with ExpertOutputs(loaded) if outputs else nullcontext() as outs:
        for dom, ids in items:
            d = domains.index(dom)
            with GateRecorder(loaded.gates) as rec:
                mx.eval(loaded.model(mx.array([ids])))
            got = rec.by_layer()
            for i, l in enumerate(layers):
                p = np.array(router_probs(got[l][0], m.moe["scoring"]))  # [T, E]
                top = np.argpartition(-p, k - 1, axis=-1)[:, :k]
                hot = eye[top].sum(axis=1)  # [T, E] 0/1
                st.sel[d, i] += hot.sum(0)
                st.mass[d, i] += (hot * p).sum(0)
                st.coact[d, i] += hot.T @ hot
                st.topk_mass[d, i] += (hot * p).sum()
            st.tokens[dom] += len(ids)
            advance(len(ids))
    for d in range(D):
        for i in range(L):
            np.fill_diagonal(st.coact[d, i], 0.0)
    if outputs:
        st.out_max = np.stack([np.array(outs.max[l]) for l in layers])
    return st
