"""What differs between CUDA and Metal, so that every kernel body is written once.

Each backend's header defines the same names: SHARED (threadgroup memory),
SYNC() (threadgroup barrier), NEG_INF, warp_sum / warp_max (over the 32
lanes of a warp or simdgroup), f_exp / f_exp2 / f_rsqrt / f_cos / f_sin
(float32, precise) and qdot_lane (one lane's share of a quantized row's dot
product). THREADS[backend] declares the thread indices every body uses: tid
and ntg (thread in and size of the threadgroup), gid (threadgroup), lane,
wig (warp in threadgroup) and warp (global warp = one output row). On Metal
they must sit in the kernel's source, not its header: MLX adds the attributes
(thread_index_in_simdgroup, ...) that the source names.
"""

# One lane's share of dot(dequant(row), x): MLX's affine quantization (uint32
# words, a scale and a bias per group); words never straddle groups (GS >= 32
# >= 32/BITS). All of the lane's words are loaded before any is used: one
# memory latency, not ITERS.
QDOT_BODY = """
  constexpr int PER = 32 / BITS;
  constexpr int ITERS = (WORDS + 31) / 32;
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  uint32_t q[ITERS];
  #pragma unroll
  for (int it = 0; it < ITERS; it++) q[it] = (lane + 32 * it) < WORDS ? w[lane + 32 * it] : 0u;
  float acc = 0.f;
  #pragma unroll
  for (int it = 0; it < ITERS; it++) {
    int wd = lane + 32 * it;
    if (wd < WORDS) {
      int col = wd * PER;
      float d = 0.f, xs = 0.f;
      #pragma unroll
      for (int t = 0; t < PER; t++) {
        float xv = static_cast<float>(x[col + t]);
        d += static_cast<float>((q[it] >> (BITS * t)) & MASK) * xv;
        xs += xv;
      }
      acc += static_cast<float>(sc[col / GS]) * d + static_cast<float>(bi[col / GS]) * xs;
    }
  }
  return acc;
}
"""

CUDA_HEADER = """
#define SHARED __shared__
#define SYNC() __syncthreads()
#define NEG_INF (-__int_as_float(0x7f800000))

__device__ inline float warp_sum(float a) {
  for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffff, a, o);
  return a;
}
__device__ inline float warp_max(float a) {
  for (int o = 16; o > 0; o >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffff, a, o));
  return a;
}
__device__ inline float f_exp(float a) { return expf(a); }
__device__ inline float f_exp2(float a) { return exp2f(a); }
__device__ inline float f_rsqrt(float a) { return rsqrtf(a); }
__device__ inline float f_cos(float a) { return cosf(a); }
__device__ inline float f_sin(float a) { return sinf(a); }

template <int BITS, int GS, int WORDS, typename S, typename X>
__device__ float qdot_lane(const uint32_t* w, const S* sc, const S* bi, const X* x, int lane) {""" + QDOT_BODY

METAL_HEADER = """
#define SHARED threadgroup
#define SYNC() threadgroup_barrier(mem_flags::mem_threadgroup)
#define NEG_INF (-INFINITY)

inline float warp_sum(float a) { return simd_sum(a); }
inline float warp_max(float a) { return simd_max(a); }
inline float f_exp(float a) { return metal::precise::exp(a); }
inline float f_exp2(float a) { return metal::precise::exp2(a); }
inline float f_rsqrt(float a) { return metal::precise::rsqrt(a); }
inline float f_cos(float a) { return metal::precise::cos(a); }
inline float f_sin(float a) { return metal::precise::sin(a); }

// XP: a device or threadgroup pointer (the address space is part of the type)
template <int BITS, int GS, int WORDS, typename S, typename XP>
float qdot_lane(const device uint32_t* w, const device S* sc, const device S* bi, XP x, int lane) {""" + QDOT_BODY

HEADERS = {"cuda": CUDA_HEADER, "metal": METAL_HEADER}

THREADS = {
    "cuda": ("  const int tid = threadIdx.x, ntg = blockDim.x, gid = blockIdx.x;\n"
             "  const int lane = tid % 32, wig = tid / 32, warp = gid * (ntg / 32) + wig;\n"),
    "metal": ("  const int tid = thread_index_in_threadgroup, ntg = threads_per_threadgroup.x;\n"
              "  const int gid = threadgroup_position_in_grid.x, lane = thread_index_in_simdgroup;\n"
              "  const int wig = simdgroup_index_in_threadgroup, warp = gid * (ntg / 32) + wig;\n"),
}
