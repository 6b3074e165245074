"""Host cost of one op on MLX's CUDA backend, per op over N chained ops:
Python graph building (build), MLX encoding and launching (encode:
async_eval's return) and waiting for the device (wait). Ops: an add, and one
small custom kernel called with 8 template arguments, with its constants in
the source instead, and with a large header (CUDA only):

    python tools/bench_launch.py [--ops 200]
"""

import argparse
import json
import statistics
import time

import mlx.core as mx

SOURCE = "int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < H) y[i] = static_cast<T>(static_cast<float>(x[i]) + 1.f);"
CONSTS = "constexpr int H = 2048; using T = __nv_bfloat16;\n"


def per_op_us(f, x0, n, runs=7) -> dict:
    y = x0
    for _ in range(n):
        y = f(y)
    mx.eval(y)  # warm-up (JIT)
    parts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        y = x0
        for _ in range(n):
            y = f(y)
        t1 = time.perf_counter()
        mx.async_eval(y)
        t2 = time.perf_counter()
        mx.eval(y)
        parts.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
    return {k: round(statistics.median(p[i] for p in parts) / n * 1e6, 2)
            for i, k in enumerate(("build_us", "encode_us", "wait_us"))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", type=int, default=200)
    a = ap.parse_args()
    if not (getattr(mx, "cuda", None) is not None and mx.cuda.is_available()):
        raise SystemExit("bench_launch: needs MLX's CUDA backend (mlx-cuda); this MLX has none")
    x0 = mx.zeros((2048,), dtype=mx.bfloat16)
    mx.eval(x0)
    make = lambda name, src, header="": mx.fast.cuda_kernel(name=name, input_names=["x"], output_names=["y"],
                                                            source=src, header=header)
    templated, plain = make("t_tmpl", SOURCE), make("t_plain", CONSTS + SOURCE)
    big = make("t_big", CONSTS + SOURCE, "\n".join(f"__device__ float pad{i}(float a) {{ return a * {i}.f; }}" for i in range(150)))
    tmpl8 = [("T", mx.bfloat16), ("H", 2048), ("A", 1), ("B", 2), ("C", 3), ("D", 4), ("E", 5), ("F", 6)]
    kw = dict(grid=(2048, 1, 1), threadgroup=(256, 1, 1), output_shapes=[(2048,)], output_dtypes=[mx.bfloat16])
    ops = {"add": lambda x: x + 1,
           "custom_8_template_args": lambda x: templated(inputs=[x], template=tmpl8, **kw)[0],
           "custom_no_template": lambda x: plain(inputs=[x], **kw)[0],
           "custom_big_header": lambda x: big(inputs=[x], **kw)[0]}
    print(json.dumps({name: per_op_us(f, x0, a.ops) for name, f in ops.items()}))


if __name__ == "__main__":
    main()
