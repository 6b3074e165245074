"""The front of a single token's attention in two kernels (Qwen3-style layers).

mlx-lm's attention before the KV cache runs RMSNorm, three quantized matmuls,
three reshapes, q/k RMSNorm, three transposes and two RoPEs: 14 ops. Here:

  qkv:   xn = RMSNorm(x) in every threadgroup, then one warp per row of the
         stacked q|k|v projections
  heads: one warp per head: q and k heads get their RMSNorm and RoPE at the
         cache's offset, v heads are copied; outputs are in the (1, heads,
         1, head_dim) layout the KV cache and attention take

Rounding follows mlx-lm's ops in the model dtype T (projections, norms, RoPE
outputs), RoPE's angle as MLX computes it (exp2(-d log2 base) * offset).
The KV cache update and the attention itself stay mlx-lm's / MLX's.
`reference` is the same computation in MLX ops, in mlx-lm's order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from mlxmoe.kernels.jit import KernelSet
from mlxmoe.kernels.layer_tail import NORM, QLinear, grid
from mlxmoe.kernels.moe_step import THREADGROUP


@dataclass(frozen=True)
class Front:
    """What the front reads of one layer: the input RMSNorm, the q/k/v
    projections, the per-head q/k RMSNorms and the RoPE base."""

    norm: mx.array
    eps: float
    q: QLinear
    k: QLinear
    v: QLinear
    q_norm: mx.array
    k_norm: mx.array
    qk_eps: tuple[float, float]
    base: float
    n_heads: int
    n_kv_heads: int

    @property
    def head_dim(self) -> int:
        return self.q_norm.size


def unsupported(f: Front) -> str | None:
    q = f.q
    if (q.bits, q.group_size) != (f.k.bits, f.k.group_size) or (q.bits, q.group_size) != (f.v.bits, f.v.group_size):
        return "q/k/v projections quantized differently"
    if q.bits not in (4, 8) or q.group_size not in (32, 64, 128):
        return f"q/k/v: bits {q.bits} / group size {q.group_size} (kernels: bits 4, 8; group size 32, 64, 128)"
    if f.head_dim % 64:
        return f"head_dim {f.head_dim} (kernels: a multiple of 64)"
    if f.norm.size * 4 > 32 * 1024:
        return f"hidden {f.norm.size}: the normalised x does not fit the kernel's shared memory"
    return None


def reference(x: mx.array, f: Front, offset: int) -> tuple[mx.array, mx.array, mx.array]:
    """(q, k, v) of one token, each (1, heads, 1, head_dim), as mlx-lm's attention computes them."""
    xn = mx.fast.rms_norm(x.reshape(1, 1, -1), f.norm, f.eps)
    d = f.head_dim

    def heads(p, n, norm=None, eps=None):
        y = p(xn).reshape(1, 1, n, d)
        return y.transpose(0, 2, 1, 3) if norm is None else mx.fast.rms_norm(y, norm, eps).transpose(0, 2, 1, 3)

    q = heads(f.q, f.n_heads, f.q_norm, f.qk_eps[0])
    k = heads(f.k, f.n_kv_heads, f.k_norm, f.qk_eps[1])
    rope = dict(traditional=False, base=f.base, scale=1.0, offset=offset)
    return mx.fast.rope(q, d, **rope), mx.fast.rope(k, d, **rope), heads(f.v, f.n_kv_heads)


# ---------------------------------------------------------------- kernel sources

# One body per kernel, in the names of dialect.py (CUDA and Metal alike).

QKV = NORM.replace("XN_STORE", "") + """
  constexpr int WORDS = H * BITS / 32;
  if (warp < RQ + 2 * RK) {
    const bool is_q = warp < RQ, is_k = !is_q && warp < RQ + RK;
    size_t r = is_q ? warp : is_k ? warp - RQ : warp - RQ - RK;
    float acc;
    if (is_q) acc = qdot_lane<BITS, GS, WORDS>(wq + r * WORDS, sq + r * (H / GS), bq + r * (H / GS), s_x, lane);
    else if (is_k) acc = qdot_lane<BITS, GS, WORDS>(wk + r * WORDS, sk + r * (H / GS), bk + r * (H / GS), s_x, lane);
    else acc = qdot_lane<BITS, GS, WORDS>(wv + r * WORDS, sv + r * (H / GS), bv + r * (H / GS), s_x, lane);
    acc = warp_sum(acc);
    if (lane == 0) qkv[warp] = static_cast<T>(acc);
  }
"""

# one warp per head: q heads, then k heads, then v heads (as they lie in qkv)
HEADS = """
  constexpr int HALF = D / 2;
  constexpr int PAIRS = HALF / 32;
  const int head = warp;
  if (head >= NQ + NK && head < NQ + 2 * NK) {
    for (int e = lane; e < D; e += 32) v[(head - NQ - NK) * D + e] = qkv[head * D + e];
  } else if (head < NQ + NK) {
    const bool is_q = head < NQ;
    float x1[PAIRS], x2[PAIRS], ss = 0.f;
    #pragma unroll
    for (int p = 0; p < PAIRS; p++) {
      x1[p] = static_cast<float>(qkv[head * D + lane + 32 * p]);
      x2[p] = static_cast<float>(qkv[head * D + lane + 32 * p + HALF]);
      ss += x1[p] * x1[p] + x2[p] * x2[p];
    }
    ss = warp_sum(ss);
    float inv = f_rsqrt(ss / D + eps[is_q ? 0 : 1]);
    float pos = static_cast<float>(offset[0]);
    #pragma unroll
    for (int p = 0; p < PAIRS; p++) {
      int j = lane + 32 * p;
      float w1 = static_cast<float>(is_q ? qw[j] : kw[j]), w2 = static_cast<float>(is_q ? qw[j + HALF] : kw[j + HALF]);
      float y1 = static_cast<float>(static_cast<T>(w1 * static_cast<float>(static_cast<T>(x1[p] * inv))));
      float y2 = static_cast<float>(static_cast<T>(w2 * static_cast<float>(static_cast<T>(x2[p] * inv))));
      float theta = pos * f_exp2(-(static_cast<float>(j) / static_cast<float>(HALF)) * log2_base[0]);
      float c = f_cos(theta), s = f_sin(theta);
      T o1 = static_cast<T>(y1 * c - y2 * s), o2 = static_cast<T>(y1 * s + y2 * c);
      int o = (is_q ? head : head - NQ) * D + j;
      if (is_q) { q[o] = o1; q[o + HALF] = o2; } else { k[o] = o1; k[o + HALF] = o2; }
    }
  }
"""


class FusedFront(KernelSet):
    """qkv and heads of one backend ('cuda' or 'metal')."""

    BODIES = {"qkv": QKV, "heads": HEADS}
    INPUTS = {"qkv": ["h", "nw", "eps", "wq", "sq", "bq", "wk", "sk", "bk", "wv", "sv", "bv"],
              "heads": ["qkv", "qw", "kw", "eps", "offset", "log2_base"]}
    OUTPUTS = {"qkv": ["qkv"], "heads": ["q", "k", "v"]}

    def _launches(self, f: Front, dtype):
        key = (f.norm.size, f.q.shape, f.k.shape, f.q.bits, f.q.group_size, f.n_heads, f.n_kv_heads, dtype,
               f.eps, f.qk_eps, f.base)  # the small constant inputs below are per key
        if key not in self._launch:
            h, d, tg = f.norm.size, f.head_dim, (THREADGROUP, 1, 1)
            rq, rk = f.n_heads * d, f.n_kv_heads * d
            qkv = (self.kernel("qkv", (("T", dtype), ("H", h), ("RQ", rq), ("RK", rk), ("BITS", f.q.bits),
                                            ("GS", f.q.group_size))),
                   dict(grid=grid(rq + 2 * rk), threadgroup=tg, output_shapes=[(rq + 2 * rk,)], output_dtypes=[dtype]))
            shapes = [(1, f.n_heads, 1, d), (1, f.n_kv_heads, 1, d), (1, f.n_kv_heads, 1, d)]
            heads = (self.kernel("heads", (("T", dtype), ("D", d), ("NQ", f.n_heads), ("NK", f.n_kv_heads))),
                     dict(grid=grid(f.n_heads + 2 * f.n_kv_heads), threadgroup=tg, output_shapes=shapes,
                          output_dtypes=[dtype] * 3))
            consts = (mx.array([f.eps], dtype=mx.float32), mx.array(list(f.qk_eps), dtype=mx.float32),
                      mx.array([math.log2(f.base)], dtype=mx.float32))
            self._launch[key] = (qkv, heads, consts)
        return self._launch[key]

    def __call__(self, x: mx.array, f: Front, offset: int) -> tuple[mx.array, mx.array, mx.array]:
        """x: the layer's input (one token) -> (q, k, v), each (1, heads, 1, head_dim), in x's dtype."""
        (qkv_k, a_qkv), (heads_k, a_heads), (eps, qk_eps, log2_base) = self._launches(f, x.dtype)
        qkv = qkv_k(inputs=[x, f.norm, eps, *_parts(f.q), *_parts(f.k), *_parts(f.v)], **a_qkv)[0]
        return tuple(heads_k(inputs=[qkv, f.q_norm, f.k_norm, qk_eps, mx.array([offset], dtype=mx.int32), log2_base],
                             **a_heads))


def _parts(p: QLinear) -> tuple:
    return p.weight, p.scales, p.biases
