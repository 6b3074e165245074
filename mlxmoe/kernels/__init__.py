"""Fused decode kernels for mlxmoe.

Each kernel module holds its kernel bodies, written once for Apple GPUs
(`mx.fast.metal_kernel`) and CUDA (`mx.fast.cuda_kernel`) in the names of
dialect.py, and the pure-MLX reference that defines what each kernel computes
(used on CPU and as the fallback). jit.py specialises each kernel per shape,
its constants written into the source."""
