"""Expert weights and inputs shared by the CPU and GPU kernel tests."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlxmoe.kernels.moe_step import QuantizedExperts

GRID = [(bits, gs, k) for bits in (4, 8) for gs in (32, 64, 128) for k in (2, 3, 6, 8)]
# each GPU case is its own JIT compile (~6 s per kernel on CUDA): a smaller grid there
GPU_GRID = [(bits, gs, 2 + 6 * (gs == 64)) for bits in (4, 8) for gs in (32, 64, 128)] + [(4, 64, 3), (8, 128, 6)]


def make_experts(e, h, i, bits, gs, dtype=mx.float32, seed=0):
    keys = mx.random.split(mx.random.key(seed), 3)
    projs = []
    for key, shape in zip(keys, [(e, i, h), (e, i, h), (e, h, i)]):
        w = mx.random.normal(shape, key=key) / np.sqrt(shape[-1])
        wq, s, b = mx.quantize(w, group_size=gs, bits=bits)
        projs.append((wq, s.astype(dtype), b.astype(dtype)))
    return QuantizedExperts(*projs, group_size=gs, bits=bits)


def ground_truth(x, logits, ex, k, norm):
    """float64 numpy: softmax, top-k, renormalise, SwiGLU over the chosen experts."""
    deq = [np.array(mx.dequantize(*p, group_size=ex.group_size, bits=ex.bits).astype(mx.float32), np.float64)
           for p in (ex.gate, ex.up, ex.down)]
    z = np.array(logits.astype(mx.float32), np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    idx = np.argsort(-p)[:k]
    w = p[idx] / (p[idx].sum() if norm else 1.0)
    xv = np.array(x.astype(mx.float32), np.float64)
    y = 0
    for e, we in zip(idx, w):
        g, u = deq[0][e] @ xv, deq[1][e] @ xv
        y = y + we * (deq[2][e] @ (g / (1 + np.exp(-g)) * u))
    return y


def inputs(e, h, seed=1):
    kx, kl = mx.random.split(mx.random.key(seed))
    return mx.random.normal((h,), key=kx), 2 * mx.random.normal((e,), key=kl)


def tail_case(obits, ogs, router, dtype, h=256, a=512, e=48):
    from mlxmoe.kernels.layer_tail import QLinear, Tail

    w = mx.random.normal((h, a), key=mx.random.key(11)) / np.sqrt(a)
    o = QLinear(*mx.quantize(w, group_size=ogs, bits=obits), obits, ogs)
    o = QLinear(o.weight, o.scales.astype(dtype), o.biases.astype(dtype), obits, ogs)
    wr = (mx.random.normal((e, h), key=mx.random.key(12)) / np.sqrt(h)).astype(dtype)
    if router == "quantized":
        q = mx.quantize(wr.astype(mx.float32), group_size=64, bits=8)
        wr = QLinear(q[0], q[1].astype(dtype), q[2].astype(dtype), 8, 64)
    norm = (1 + 0.1 * mx.random.normal((h,), key=mx.random.key(13))).astype(dtype)
    x = mx.random.normal((1, 1, a), key=mx.random.key(14)).astype(dtype)
    res = mx.random.normal((1, 1, h), key=mx.random.key(15)).astype(dtype)
    return x, res, Tail(o, norm, 1e-6, wr)


def front_case(bits, gs, d, dtype, h=256, nq=4, nk=2):
    from mlxmoe.kernels.attn_front import Front
    from mlxmoe.kernels.layer_tail import QLinear

    def q(rows, seed):
        w = mx.random.normal((rows, h), key=mx.random.key(seed)) / np.sqrt(h)
        wq, sc, bi = mx.quantize(w, group_size=gs, bits=bits)
        return QLinear(wq, sc.astype(dtype), bi.astype(dtype), bits, gs)

    norm = lambda n, seed: (1 + 0.1 * mx.random.normal((n,), key=mx.random.key(seed))).astype(dtype)
    f = Front(norm(h, 20), 1e-6, q(nq * d, 21), q(nk * d, 22), q(nk * d, 23), norm(d, 24), norm(d, 25), (1e-6, 1e-6),
              1e6, nq, nk)
    return mx.random.normal((1, 1, h), key=mx.random.key(26)).astype(dtype), f
