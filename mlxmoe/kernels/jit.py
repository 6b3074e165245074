"""Custom kernels specialised per shape, with their constants in the source.

MLX's custom kernels take template arguments, but each call then rebuilds the
kernel's source on the host: with 8 arguments a launch cost 11 µs of host time
on the H100 machine against 4.4 µs with none (`tools/bench_launch.py`), and a
single-token decode step is bound by host time. So every (kernel, constants)
pair gets its own kernel object whose source begins with the constants.
"""

from __future__ import annotations

import hashlib

import mlx.core as mx

from mlxmoe.kernels.dialect import HEADERS, THREADS

TYPE_NAMES = {
    "cuda": {mx.float32: "float", mx.bfloat16: "__nv_bfloat16", mx.float16: "__half"},
    "metal": {mx.float32: "float", mx.bfloat16: "bfloat16_t", mx.float16: "half"},
}


def prelude(backend: str, consts: tuple) -> str:
    """The source lines that define `consts` ((name, int | bool | dtype) pairs)
    and the thread indices (dialect.THREADS)."""
    lines = []
    for name, v in consts:
        if isinstance(v, mx.Dtype):
            lines.append(f"  using {name} = {TYPE_NAMES[backend][v]};")
        elif isinstance(v, bool):
            lines.append(f"  constexpr bool {name} = {'true' if v else 'false'};")
        else:
            lines.append(f"  constexpr int {name} = {int(v)};")
    return "\n".join(lines) + "\n" + THREADS[backend]


class KernelSet:
    """The kernels of one backend ('cuda' or 'metal'). Subclasses give BODIES
    (name -> source, in the names of dialect.py), INPUTS and OUTPUTS (name ->
    names); `kernel(name, consts)` compiles a specialisation on first use."""

    BODIES: dict = {}
    INPUTS: dict = {}
    OUTPUTS: dict = {}

    def __init__(self, backend: str):
        if backend not in TYPE_NAMES:
            raise ValueError(f"backend {backend!r}: expected 'cuda' or 'metal'")
        self.backend = backend
        self._made: dict = {}
        self._launch: dict = {}  # the subclass's per-shape launch arguments

    def sources(self) -> dict:
        return {"header": HEADERS[self.backend], **self.BODIES}

    def kernel(self, name: str, consts: tuple):
        key = (name, consts)
        if key not in self._made:
            src = prelude(self.backend, consts) + self.sources()[name]
            tag = hashlib.sha1(src.encode()).hexdigest()[:10]
            make = mx.fast.cuda_kernel if self.backend == "cuda" else mx.fast.metal_kernel
            self._made[key] = make(name=f"mlxmoe_{name}_{tag}", input_names=self.INPUTS[name],
                                   output_names=self.OUTPUTS[name], source=src, header=self.sources()["header"])
        return self._made[key]
