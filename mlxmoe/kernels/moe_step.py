"""The routed-MoE step of one decoded token in two kernels.

mlx-lm runs a single token's MoE block as ~13 small ops (softmax, argpartition,
take, normalise, three gather_qmm, swiglu, weighted sum, casts). At batch size
1 each op costs far more in launch and dispatch than in bytes moved, so here
the whole step after the router's matmul is two kernels:

  gate_up: route (softmax over the router logits, top-k, optional
           renormalisation), then h[j] = silu(Wg[e_j] x) * (Wu[e_j] x) for the
           k selected experts; one simdgroup/warp per (expert, row).
  down:    route again (cheaper than a third launch), then
           y = sum_j w_j * Wd[e_j] h[j]; one simdgroup/warp per output row
           (down_res: plus the residual stream, the decoder layer's add).

Routing is done by every threadgroup in shared memory (each expert's logit
ranked against all others, in parallel), so no kernel waits on another
kernel's routing output; only `down` needs the softmax weights. Weights are MLX's affine
quantization (uint32 words, a scale and a bias per group); accumulation is in
float32, as MLX's own quantized matmuls do on the GPU.

`reference` is the same computation in plain MLX ops: the definition the
kernels are tested against, and the path used on CPU (where float32 compute is
also several times faster than MLX's bfloat16 CPU kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from mlxmoe.kernels.jit import KernelSet

SIMD = 32  # threads per warp (CUDA) / simdgroup (Apple GPUs)
THREADGROUP = 256  # 8 warps per threadgroup
MAX_EXPERTS = 16 * SIMD  # routing keeps E/32 logits per lane in registers
MAX_TOP_K = 16


@dataclass(frozen=True)
class QuantizedExperts:
    """The three stacked projections of a SwitchGLU, MLX affine-quantized:
    each a (weight uint32 [E, out, in*bits/32], scales [E, out, in/gs], biases)."""

    gate: tuple
    up: tuple
    down: tuple
    group_size: int
    bits: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """(n_experts, hidden, intermediate)."""
        w, s, _ = self.gate
        return w.shape[0], s.shape[-1] * self.group_size, w.shape[1]


def unsupported(ex: QuantizedExperts, top_k: int) -> str | None:
    """Why the kernels cannot run these experts (None: they can)."""
    e, h, i = ex.shape
    if ex.bits not in (4, 8) or ex.group_size not in (32, 64, 128):
        return f"bits {ex.bits} / group size {ex.group_size} (kernels: bits 4, 8; group size 32, 64, 128)"
    if e > MAX_EXPERTS or not 1 <= top_k <= min(MAX_TOP_K, e):
        return f"{e} experts, top-{top_k} (kernels: at most {MAX_EXPERTS} experts, top-k at most {MAX_TOP_K})"
    if h % ex.group_size or i % ex.group_size:
        return f"hidden {h} / intermediate {i} not multiples of the group size {ex.group_size}"
    return None


# ---------------------------------------------------------------- reference

def route(logits: mx.array, top_k: int, norm: bool) -> tuple[mx.array, mx.array]:
    """Softmax over the (masked) router logits, top-k, optional renormalisation:
    the rule of qwen3_moe / qwen2_moe / olmoe (and, with norm, mixtral's)."""
    p = mx.softmax(logits.astype(mx.float32), axis=-1)
    idx = mx.argpartition(-p, kth=top_k - 1, axis=-1)[..., :top_k]
    w = mx.take_along_axis(p, idx, axis=-1)
    if norm:
        w = w / w.sum(axis=-1, keepdims=True)
    return idx, w


def reference(x: mx.array, logits: mx.array, ex: QuantizedExperts, top_k: int, norm: bool,
              res: mx.array | None = None, dtype=mx.float32) -> mx.array:
    """One token: x [..., H], logits [..., E] -> y of x's shape and dtype. Only
    the k selected experts' rows are read; no sort/scatter machinery (that is
    for batches). Computes in `dtype` (float32: the kernels' precision).
    res: the residual stream, added to y in x's dtype (the decoder layer's add)."""
    idx, w = route(logits.reshape(-1), top_k, norm)

    def proj(p, a):
        wq, s, b = (t[idx] for t in p)
        return mx.gather_qmm(a, wq, s.astype(dtype), b.astype(dtype), transpose=True,
                             group_size=ex.group_size, bits=ex.bits)

    a = mx.broadcast_to(x.reshape(1, 1, -1).astype(dtype), (top_k, 1, x.size))
    g, u = proj(ex.gate, a), proj(ex.up, a)
    y = proj(ex.down, mx.sigmoid(g) * g * u)  # [k, 1, H]
    return _plus(res, (y[:, 0, :] * w[:, None].astype(dtype)).sum(axis=0).astype(x.dtype).reshape(x.shape))


def dense(x: mx.array, logits: mx.array, ex: QuantizedExperts, top_k: int, norm: bool,
          res: mx.array | None = None) -> mx.array:
    """`reference` through mx.dequantize and dense float32 matmuls: independent
    of MLX's quantized-matmul kernels, so it can judge them and the fused ones
    alike (the kernels' self-check at load uses it)."""
    idx, w = route(logits.reshape(-1), top_k, norm)

    def deq(p):
        wq, s, b = (t[idx] for t in p)
        return mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size=ex.group_size, bits=ex.bits)

    xv = x.reshape(-1, 1).astype(mx.float32)
    g, u = (deq(ex.gate) @ xv), (deq(ex.up) @ xv)  # [k, I, 1]
    y = (deq(ex.down) @ (mx.sigmoid(g) * g * u))[..., 0]  # [k, H]
    return _plus(res, (y * w[:, None]).sum(axis=0).astype(x.dtype).reshape(x.shape))


def _plus(res, y):
    return y if res is None else res.reshape(y.shape) + y


# ---------------------------------------------------------------- kernel sources
# One body per kernel, in the names of dialect.py (CUDA and Metal alike).
# Template constants: H (hidden), I (intermediate), E (experts), K (top-k),
# BITS, GS (group size), NORM; T is the output dtype.

# Routing in shared memory: every thread < E ranks one expert's logit against
# all others (ties: lower index first), so the top-k need no sequential argmax
# rounds; the softmax is only needed for the weights (the down kernel).
SELECT = """
  SHARED float s_l[E];
  SHARED int s_sel[K];
  for (int e = tid; e < E; e += ntg) s_l[e] = static_cast<float>(logits[e]);
  SYNC();
  for (int e = tid; e < E; e += ntg) {
    float v = s_l[e];
    int rank = 0;
    for (int o = 0; o < E; o++) rank += (s_l[o] > v) || (s_l[o] == v && o < e);
    if (rank < K) s_sel[rank] = e;
  }
  SYNC();
"""

WEIGHTS = """
  SHARED float s_w[K];
  if (wig == 0) {  // softmax over all E (precise: float32, max subtracted), then the top-k's share
    float m = NEG_INF;
    for (int e = lane; e < E; e += 32) m = s_l[e] > m ? s_l[e] : m;
    m = warp_max(m);
    float z = 0.f;
    for (int e = lane; e < E; e += 32) z += f_exp(s_l[e] - m);
    z = warp_sum(z);
    float p = lane < K ? f_exp(s_l[s_sel[lane < K ? lane : 0]] - m) / z : 0.f;
    float tot = warp_sum(p);
    if (lane < K) s_w[lane] = NORM ? p / tot : p;
  }
  SYNC();
"""

GATE_UP = SELECT + """
  constexpr int WORDS = H * BITS / 32;
  if (warp < K * I) {
    int j = warp / I, row = warp % I;
    size_t r = size_t(s_sel[j]) * I + row;
    float g = qdot_lane<BITS, GS, WORDS>(wg + r * WORDS, sg + r * (H / GS), bg + r * (H / GS), x, lane);
    float u = qdot_lane<BITS, GS, WORDS>(wu + r * WORDS, su + r * (H / GS), bu + r * (H / GS), x, lane);
    g = warp_sum(g); u = warp_sum(u);
    if (lane == 0) hid[warp] = g / (1.f + f_exp(-g)) * u;
  }
"""

DOWN = SELECT + WEIGHTS + """
  constexpr int WORDS = I * BITS / 32;
  if (warp < H) {
    float acc = 0.f;
    #pragma unroll
    for (int j = 0; j < K; j++) {
      size_t r = size_t(s_sel[j]) * H + warp;
      acc += s_w[j] * qdot_lane<BITS, GS, WORDS>(wd + r * WORDS, sd + r * (I / GS), bd + r * (I / GS), hid + j * I, lane);
    }
    acc = warp_sum(acc);
    if (lane == 0) y[warp] = STORE;
  }
"""

GATE_UP_INPUTS = ["x", "logits", "wg", "sg", "bg", "wu", "su", "bu"]
DOWN_INPUTS = ["hid", "logits", "wd", "sd", "bd"]
# down's store: y alone, or y added to the residual stream `res` the way the
# decoder layer adds them (both rounded to T first)
STORE = "static_cast<T>(acc)"
STORE_RES = "static_cast<T>(static_cast<float>(res[warp]) + static_cast<float>(static_cast<T>(acc)))"


def geometry(ex: QuantizedExperts, top_k: int) -> dict:
    """Grid (threads) and threadgroup of both kernels: one warp per output row."""
    _, h, i = ex.shape
    tg = (THREADGROUP, 1, 1)

    def grid(rows):
        return (-(-rows * SIMD // THREADGROUP) * THREADGROUP, 1, 1)  # whole threadgroups

    return {"gate_up": {"grid": grid(top_k * i), "threadgroup": tg, "output_shape": (top_k, i)},
            "down": {"grid": grid(h), "threadgroup": tg, "output_shape": (h,)}}


def template(ex: QuantizedExperts, top_k: int, norm: bool, dtype) -> list:
    e, h, i = ex.shape
    return [("T", dtype), ("H", h), ("I", i), ("E", e), ("K", top_k), ("BITS", ex.bits),
            ("GS", ex.group_size), ("NORM", bool(norm))]


class FusedMoE(KernelSet):
    """gate_up and down (down_res: plus the residual) of one backend ('cuda' or 'metal')."""

    BODIES = {"gate_up": GATE_UP, "down": DOWN.replace("STORE", STORE), "down_res": DOWN.replace("STORE", STORE_RES)}
    INPUTS = {"gate_up": GATE_UP_INPUTS, "down": DOWN_INPUTS, "down_res": DOWN_INPUTS + ["res"]}
    OUTPUTS = {"gate_up": ["hid"], "down": ["y"], "down_res": ["y"]}

    def _launches(self, ex: QuantizedExperts, top_k: int, norm: bool, dtype) -> dict:
        key = (ex.shape, ex.bits, ex.group_size, top_k, norm, dtype)
        if key not in self._launch:  # per-token Python work is per-token latency
            geo, consts = geometry(ex, top_k), tuple(template(ex, top_k, norm, dtype))
            self._launch[key] = {
                name: (self.kernel(name, consts), dict(grid=geo[g]["grid"], threadgroup=geo[g]["threadgroup"]))
                for name, g in (("gate_up", "gate_up"), ("down", "down"), ("down_res", "down"))}
        return self._launch[key]

    def __call__(self, x: mx.array, logits: mx.array, ex: QuantizedExperts, top_k: int, norm: bool,
                 res: mx.array | None = None) -> mx.array:
        """x [..., H] and logits [..., E] of one token (masked, any float dtype)
        -> y of x's shape and dtype (plus `res`, the residual stream, if given).
        Kernels index flat: no reshape ops."""
        launch = self._launches(ex, top_k, norm, x.dtype)
        gate_up, a_up = launch["gate_up"]
        hid = gate_up(inputs=[x, logits, *ex.gate, *ex.up], output_shapes=[(top_k, ex.shape[2])],
                      output_dtypes=[mx.float32], **a_up)[0]
        if res is None:
            down, a_down = launch["down"]
            return down(inputs=[hid, logits, *ex.down], output_shapes=[x.shape], output_dtypes=[x.dtype], **a_down)[0]
        down, a_down = launch["down_res"]
        return down(inputs=[hid, logits, *ex.down, res], output_shapes=[x.shape], output_dtypes=[x.dtype], **a_down)[0]
