"""The fused kernels on an NVIDIA GPU (MLX's CUDA backend): each kernel against
MLX's own ops and the float32 reference. Run on the GPU machine: `pytest -m gpu tests/gpu`."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from kernel_cases import GPU_GRID, front_case, ground_truth, inputs, make_experts, tail_case
from mlxmoe.kernels.moe_step import FusedMoE, reference


def _gpu_backend():
    if mx.default_device() == mx.cpu:
        return None
    return "metal" if mx.metal.is_available() else "cuda"


def _check_kernel(kernel, e, h, i, bits, gs, k, norm, dtype):
    """Kernel vs the float64 ground truth of the same (rounded) inputs."""
    ex = make_experts(e, h, i, bits, gs, dtype)
    x, logits = (t.astype(dtype) for t in inputs(e, h))
    got = np.array(kernel(x, logits, ex, k, norm).astype(mx.float32))
    want = ground_truth(x, logits, ex, k, norm)
    tol = 1e-4 if dtype == mx.float32 else 1e-2  # bfloat16: the output's own rounding
    assert np.abs(got - want).max() <= tol * (np.abs(want).max() + 1e-3), (e, h, i, bits, gs, k, norm, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("bits,gs,k", GPU_GRID)
def test_kernel_equals_reference_on_gpu(bits, gs, k):
    """One launch configuration per case (each is a separate JIT compile)."""
    backend = _gpu_backend()
    if backend is None:
        pytest.skip("no GPU")
    _check_kernel(FusedMoE(backend), 48, 256, 128, bits, gs, k, k % 2 == 0, mx.bfloat16 if bits == 4 else mx.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_kernel_equals_reference_on_gpu_qwen3_30b_shapes(bits):
    backend = _gpu_backend()
    if backend is None:
        pytest.skip("no GPU")
    _check_kernel(FusedMoE(backend), 128, 2048, 768, bits, 64, 8, True, mx.bfloat16)


MLX_BUG = pytest.mark.xfail(reason="MLX 0.32.4 CUDA gather_qmm, float32 activations, input width == group size "
                                   "(benchmarks/2026-11-23-h100-fused-kernel-tests.txt)", strict=False)


@pytest.mark.gpu
@pytest.mark.parametrize("bits,gs,i", [pytest.param(4, 64, 64, marks=MLX_BUG), pytest.param(4, 128, 128, marks=MLX_BUG),
                                       (4, 64, 128)])
def test_mlx_quantized_reference_on_gpu(bits, gs, i):
    """MLX's own gather_qmm on this GPU (the reference path) vs the ground truth:
    tells a kernel bug from an MLX one when the two disagree."""
    if _gpu_backend() is None:
        pytest.skip("no GPU")
    _check_kernel(reference, 48, 256, i, bits, gs, 6, True, mx.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("obits,ogs,router,dtype", [(8, 64, "dense", "bfloat16"), (4, 32, "quantized", "bfloat16"),
                                                    (8, 128, "quantized", "float32"), (4, 64, "dense", "float32")])
def test_layer_tail_kernels_equal_mlx_ops_on_gpu(obits, ogs, router, dtype):
    """attn_out and norm_router against MLX's own kernels: equal up to one
    rounding of the model dtype (bfloat16) or float32 summation order."""
    from mlxmoe.kernels.layer_tail import FusedTail, reference as tail_reference

    backend = _gpu_backend()
    if backend is None:
        pytest.skip("no GPU")
    a, res, t = tail_case(obits, ogs, router, getattr(mx, dtype))
    tol = 1e-4 if dtype == "float32" else 1.6e-2
    for got, want in zip(FusedTail(backend)(a, res, t), tail_reference(a, res, t)):
        got, want = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
        assert np.abs(got - want).max() <= tol * (np.abs(want).max() + 1e-3), (obits, ogs, router, dtype)


@pytest.mark.gpu
def test_down_with_residual_on_gpu():
    backend = _gpu_backend()
    if backend is None:
        pytest.skip("no GPU")
    ex = make_experts(48, 256, 128, 4, 64, mx.bfloat16)
    x, logits = (t.astype(mx.bfloat16) for t in inputs(48, 256))
    res = mx.random.normal((256,), key=mx.random.key(9)).astype(mx.bfloat16)
    got = FusedMoE(backend)(x, logits, ex, 6, True, res=res).astype(mx.float32)
    want = (res.astype(mx.float32) + mx.array(ground_truth(x, logits, ex, 6, True), mx.float32))
    assert mx.abs(got - want).max().item() <= 1e-2 * (mx.abs(want).max().item() + 1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("bits,gs,d,dtype", [(8, 64, 128, "bfloat16"), (4, 32, 64, "bfloat16"), (8, 128, 128, "float32")])
def test_attention_front_kernels_equal_mlx_ops_on_gpu(bits, gs, d, dtype):
    """qkv + heads (RMSNorm, q/k/v, q/k RMSNorm, RoPE at offsets 0, 7 and 5000)
    against MLX's own ops: equal up to one rounding of the model dtype."""
    from mlxmoe.kernels.attn_front import FusedFront, reference as front_reference

    backend = _gpu_backend()
    if backend is None:
        pytest.skip("no GPU")
    x, f = front_case(bits, gs, d, getattr(mx, dtype))
    tol = 1e-4 if dtype == "float32" else 1.6e-2
    for offset in (0, 7, 5000):
        for got, want in zip(FusedFront(backend)(x, f, offset), front_reference(x, f, offset)):
            assert got.shape == want.shape
            got, want = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
            assert np.abs(got - want).max() <= tol * (np.abs(want).max() + 1e-3), (bits, gs, d, dtype, offset)
