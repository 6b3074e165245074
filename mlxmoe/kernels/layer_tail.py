"""The rest of a decoder layer's single-token step, around the MoE kernels.

After attention, mlx-lm's decoder layer runs o_proj (a quantized matmul), the
residual add, RMSNorm, the router's matmul, the MoE block and a second
residual add: with moe_step.py's two kernels that is 7 launches per layer.
Here it is 4:

  attn_out:    h = res + Wo a            (one warp per output row)
  norm_router: xn = RMSNorm(h) * w, logits = Wr xn
               (every threadgroup normalises h in shared memory, one warp
               per router row; threadgroup 0 also writes xn for gate_up)
  gate_up, down_res: moe_step.py, down adding its output to h

Values are rounded to the model dtype T wherever mlx-lm's ops round them (the
matmul outputs, h, the normalised x before and after the weight), so the
kernels reproduce mlx-lm's layer up to float32 summation order.
`reference` is the same computation in plain MLX ops: MLX's own kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from mlxmoe.kernels.jit import KernelSet
from mlxmoe.kernels.moe_step import SIMD, THREADGROUP


@dataclass(frozen=True)
class QLinear:
    """An affine-quantized Linear without bias (MLX layout: y = W x)."""

    weight: mx.array
    scales: mx.array
    biases: mx.array
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in)."""
        return self.weight.shape[0], self.scales.shape[-1] * self.group_size

    def __call__(self, x):
        return mx.quantized_matmul(x, self.weight, self.scales, self.biases, transpose=True,
                                   group_size=self.group_size, bits=self.bits)


@dataclass(frozen=True)
class Tail:
    """What the tail reads of one decoder layer: o_proj, the post-attention
    RMSNorm (weight, eps) and the router (quantized, or a dense weight [E, H])."""

    o: QLinear
    norm: mx.array
    eps: float
    gate: QLinear | mx.array

    @property
    def n_router(self) -> int:
        return self.gate.shape[0]


def unsupported(t: Tail) -> str | None:
    """Why the kernels cannot run this tail (None: they can)."""
    for name, q in (("o_proj", t.o), ("router", t.gate)):
        if isinstance(q, QLinear) and (q.bits not in (4, 8) or q.group_size not in (32, 64, 128)):
            return f"{name}: bits {q.bits} / group size {q.group_size} (kernels: bits 4, 8; group size 32, 64, 128)"
    if t.norm.size * 4 > 32 * 1024:
        return f"hidden {t.norm.size}: the normalised x does not fit the kernel's shared memory"
    return None


def reference(a: mx.array, res: mx.array, t: Tail) -> tuple[mx.array, mx.array, mx.array]:
    """(h, xn, logits) of one token: h = res + o_proj(a), xn = RMSNorm(h), logits = router(xn)."""
    h = res.reshape(-1) + t.o(a.reshape(1, -1))[0]
    xn = mx.fast.rms_norm(h, t.norm, t.eps)
    logits = t.gate(xn[None])[0] if isinstance(t.gate, QLinear) else xn @ t.gate.T
    return h, xn, logits


# ---------------------------------------------------------------- kernel sources

# One body per kernel, in the names of dialect.py (CUDA and Metal alike).

ATTN_OUT = """
  constexpr int WORDS = A * OBITS / 32;
  if (warp < H) {
    size_t r = warp;
    float acc = warp_sum(qdot_lane<OBITS, OGS, WORDS>(wo + r * WORDS, so + r * (A / OGS), bo + r * (A / OGS), a, lane));
    if (lane == 0) h[warp] = static_cast<T>(static_cast<float>(res[warp]) + static_cast<float>(static_cast<T>(acc)));
  }
"""

# RMSNorm of h in every threadgroup (MLX's formula: w * T(x * rsqrt(mean(x^2) + eps)));
# XN_STORE writes the normalised x (threadgroup 0), or nothing (attn_front's qkv)
NORM = """
  SHARED float s_x[H];
  SHARED float s_red[32];
  float ss = 0.f;
  for (int i = tid; i < H; i += ntg) { float v = static_cast<float>(h[i]); ss += v * v; }
  ss = warp_sum(ss);
  if (lane == 0) s_red[wig] = ss;
  SYNC();
  float tot = 0.f;
  for (int i = 0; i < ntg / 32; i++) tot += s_red[i];
  float inv = f_rsqrt(tot / H + eps[0]);
  for (int i = tid; i < H; i += ntg) {
    T v = static_cast<T>(static_cast<float>(nw[i]) * static_cast<float>(static_cast<T>(static_cast<float>(h[i]) * inv)));
    s_x[i] = static_cast<float>(v);
    XN_STORE
  }
  SYNC();
"""
NORM_XN = NORM.replace("XN_STORE", "if (gid == 0) xn[i] = v;")

ROUTER_DENSE = NORM_XN + """
  if (warp < E) {
    float acc = 0.f;
    for (int i = lane; i < H; i += 32) acc += static_cast<float>(wr[size_t(warp) * H + i]) * s_x[i];
    acc = warp_sum(acc);
    if (lane == 0) logits[warp] = static_cast<T>(acc);
  }
"""

ROUTER_Q = NORM_XN + """
  constexpr int WORDS = H * RBITS / 32;
  if (warp < E) {
    size_t r = warp;
    float acc = warp_sum(qdot_lane<RBITS, RGS, WORDS>(wr + r * WORDS, sr + r * (H / RGS), br + r * (H / RGS), s_x, lane));
    if (lane == 0) logits[warp] = static_cast<T>(acc);
  }
"""


def grid(rows: int) -> tuple:
    """Whole threadgroups of THREADGROUP threads, one warp per row."""
    return (-(-rows * SIMD // THREADGROUP) * THREADGROUP, 1, 1)


class FusedTail(KernelSet):
    """attn_out and norm_router of one backend ('cuda' or 'metal')."""

    BODIES = {"attn_out": ATTN_OUT, "router_dense": ROUTER_DENSE, "router_q": ROUTER_Q}
    INPUTS = {"attn_out": ["a", "res", "wo", "so", "bo"],
              "router_dense": ["h", "nw", "eps", "wr"],
              "router_q": ["h", "nw", "eps", "wr", "sr", "br"]}
    OUTPUTS = {"attn_out": ["h"], "router_dense": ["logits", "xn"], "router_q": ["logits", "xn"]}

    def _launches(self, a, t: Tail, dtype):
        quantized = isinstance(t.gate, QLinear)
        key = (a.size, t.o.shape, t.o.bits, t.o.group_size, t.n_router, dtype, t.eps,
               (t.gate.bits, t.gate.group_size) if quantized else None)
        if key not in self._launch:
            h, tg = t.o.shape[0], (THREADGROUP, 1, 1)
            out = (self.kernel("attn_out", (("T", dtype), ("A", a.size), ("H", h), ("OBITS", t.o.bits),
                                                 ("OGS", t.o.group_size))),
                   dict(grid=grid(h), threadgroup=tg, output_shapes=[(h,)], output_dtypes=[dtype]))
            consts = (("T", dtype), ("H", h), ("E", t.n_router))
            if quantized:
                consts += (("RBITS", t.gate.bits), ("RGS", t.gate.group_size))
            router = (self.kernel("router_q" if quantized else "router_dense", consts),
                      dict(grid=grid(t.n_router), threadgroup=tg, output_shapes=[(t.n_router,), (h,)],
                           output_dtypes=[dtype, dtype]))
            self._launch[key] = (out, router, mx.array([t.eps], dtype=mx.float32))
        return self._launch[key]

    def __call__(self, a: mx.array, res: mx.array, t: Tail) -> tuple[mx.array, mx.array, mx.array]:
        """a: attention output before o_proj, res: the layer's input (one token,
        any shape) -> (h, xn, logits), flat, in res's dtype."""
        (attn_out, a_out), (router, a_router), eps = self._launches(a, t, res.dtype)
        h = attn_out(inputs=[a, res, t.o.weight, t.o.scales, t.o.biases], **a_out)[0]
        w = [t.gate.weight, t.gate.scales, t.gate.biases] if isinstance(t.gate, QLinear) else [t.gate]
        logits, xn = router(inputs=[h, t.norm, eps, *w], **a_router)
        return h, xn, logits
