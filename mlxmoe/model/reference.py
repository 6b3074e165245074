"""mlx-lm's own model of a checkpoint, quantized the way `mlxmoe split` quantizes
a bundle (experts at the expert bits, trunk at the trunk bits, router gates
kept): the baseline that a node must equal and must be as fast as."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlxmoe.bundle.arch import get_arch, normalize_config
from mlxmoe.bundle.manifest import Manifest


def mlx_lm_model(source, manifest: Manifest | None = None):
    from mlx_lm.utils import load_model

    source = Path(source)
    model, _ = load_model(source, model_config=normalize_config(json.loads((source / "config.json").read_text())))
    q = manifest.quantization if manifest else {}
    if manifest and "quantization" not in manifest.model["config"] and (q.get("experts") or q.get("trunk")):
        arch = get_arch(manifest.model["model_type"])
        experts, trunk = q.get("experts"), q.get("trunk")

        def predicate(path, m):
            if not hasattr(m, "to_quantized") or arch.is_gate(path + "."):
                return False
            spec = experts if f".{arch.experts}." in path + "." else trunk
            if not spec or m.weight.shape[-1] % spec["group_size"]:
                return False
            return {"bits": spec["bits"], "group_size": spec["group_size"]}

        nn.quantize(model, class_predicate=predicate)
    if (manifest is None or not q.get("experts")) and mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)  # MLX's CPU gather_mm is float32-only
    mx.eval(model.parameters())
    return model
