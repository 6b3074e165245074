"""Fused decode kernels for mlxmoe.

Each kernel module holds its Metal source (Apple GPUs, `mx.fast.metal_kernel`),
a CUDA twin (`mx.fast.cuda_kernel`), and the pure-MLX reference that defines
what the kernel computes (used on CPU and as the fallback). jit.py specialises
each kernel per shape, its constants written into the source."""
