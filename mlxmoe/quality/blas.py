"""Is MLX's CPU matmul fast here? On Linux the mlx CPU wheel links a
reference BLAS whose float32 matmuls are 10-30x slower than OpenBLAS
(benchmarks/2026-12-01-cpu-blas.txt); preloading Debian's OpenBLAS fixes it.
`mlxmoe eval` and `mlxmoe doctor` both ask `verdict(measure())`."""

from __future__ import annotations

import os
import sys
import time

SHAPE = (512, 512, 512)  # m, k, n: ~0.27 GFLOP, ~0.3 s on the reference BLAS, ~20 ms on OpenBLAS
SLOW_GFLOPS = 3.0  # the reference BLAS does ~1 GFLOP/s on one x86 core; OpenBLAS 10+ even on a shared one
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
FIX = f"apt-get install libopenblas0-pthread, then run with LD_PRELOAD={OPENBLAS}"


def measure(repeats: int = 3) -> dict:
    """Best-of-`repeats` float32 matmul throughput on the default device."""
    import mlx.core as mx

    m, k, n = SHAPE
    a, b = mx.random.normal((m, k)), mx.random.normal((k, n))
    mx.eval(a, b, a @ b)  # warm up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - t)
    return {"ms": round(best * 1e3, 2), "gflops": round(2 * m * k * n / best / 1e9, 2),
            "device": str(mx.default_device()), "platform": sys.platform,
            "preload": os.environ.get("LD_PRELOAD", "")}


def verdict(r: dict) -> tuple[str, str, str]:
    """(status "ok"|"warn", detail, fix) for a `measure()` result: slow
    float32 matmuls on a Linux CPU mean the reference BLAS."""
    detail = f"float32 {'x'.join(map(str, SHAPE))} matmul: {r['ms']:.1f} ms ({r['gflops']:.1f} GFLOP/s) on {r['device']}"
    cpu = "cpu" in r["device"].lower()
    if not cpu or not r["platform"].startswith("linux"):
        return "ok", detail, ""
    if r["gflops"] < SLOW_GFLOPS:
        why = " (LD_PRELOAD has no OpenBLAS)" if "openblas" not in r["preload"].lower() else ""
        return "warn", detail + f": the mlx CPU wheel's reference BLAS{why}, 10-30x slower than OpenBLAS", FIX
    return "ok", detail + (", OpenBLAS preloaded" if "openblas" in r["preload"].lower() else ""), ""
