"""Build the mlx-lm model of a bundle with only this node's experts.

A node holds the trunk, its group and the overlay; each MoE block's SwitchGLU
holds exactly those experts (eligible(g, layer)), and routing is masked to
them (see moe.py). `group=None` loads every group: the full model, used as
the reference and by calibrate/eval; `experts=False` loads the trunk alone,
used by the router to score placement."""

from __future__ import annotations

from dataclasses import dataclass, field
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxmoe.bundle.arch import Arch, get_arch
from mlxmoe.errors import BundleError
from mlxmoe.bundle.manifest import OVERLAY_FILE, TRUNK_FILE, Manifest, first_rows, group_file, heal_file
from mlxmoe.model import fused, heal, moe


@dataclass
class Loaded:
    model: nn.Module
    manifest: Manifest
    arch: Arch
    group: int | None  # None: every group (full model)
    local_ids: dict = field(default_factory=dict)  # layer -> global ids in local row order
    bytes: dict = field(default_factory=dict)  # trunk / experts bytes resident
    moe_path: str = "mlx-lm"  # single-token MoE path (fused.py); why, if it fell back:
    moe_path_reason: str | None = None
    fused_layers: int = 0  # MoE layers whose single-token tail (o_proj .. residual) is fused too

    @property
    def blocks(self) -> dict:
        """layer -> MoE block."""
        return {l: getattr(self.model.layers[l], self.arch.block) for l in self.manifest.moe_layers}

    @property
    def gates(self) -> list:
        return [getattr(b, self.arch.gate) for b in self.blocks.values()]

    def eligible(self, layer: int) -> list[int]:
        return sorted(self.local_ids.get(layer, []))

    def set_eligible(self, per_layer: dict | None):
        """Mask routing to per_layer[layer] (experts stay loaded); None = all.
        Only on a full model (group=None): a node's routers hold local rows only."""
        if self.group is not None:
            raise ValueError("set_eligible needs the full model (load_bundle(..., group=None))")
        n = self.manifest.n_experts
        for l, b in self.blocks.items():
            moe.set_eligible(b, n, None if per_layer is None else per_layer[l])


def _files_for(m: Manifest, group, experts) -> list[str]:
    overlay = [OVERLAY_FILE] if OVERLAY_FILE in m.files else []
    if experts == WHOLE:
        return [TRUNK_FILE] + (overlay if m.whole_layers() else [])
    if not experts:
        return [TRUNK_FILE]
    if group is None:  # (a layout keeps the experts every node holds in the overlay alone)
        return [TRUNK_FILE] + [group_file(g) for g in range(m.n_groups)] + overlay
    if not 0 <= group < m.n_groups:
        raise BundleError(f"group {group} does not exist: this bundle has groups 0..{m.n_groups - 1}")
    extra = [OVERLAY_FILE] if OVERLAY_FILE in m.files else []
    extra += [heal_file(group)] if heal_file(group) in m.files else []
    return [TRUNK_FILE, group_file(group)] + extra


def _expert_weights(d: Path, m: Manifest, arch: Arch, group, whole: bool = False) -> tuple[dict, dict]:
    """Stacked local expert tensors and the global ids of their rows, per layer (whole: only the
    layers whose every expert is in the overlay, for the router's front end)."""
    if whole:
        keep = m.whole_layers()
        ov = mx.load(str(d / OVERLAY_FILE)) if keep else {}
        parts = [({n: t for n, t in ov.items() if int(n.split(".")[2]) in keep},
                  [m.overlay_experts(l) if l in keep else [] for l in m.moe_layers])]
    elif group is None:
        parts = [(mx.load(str(d / group_file(g))), [m.group_experts(l, g) for l in m.moe_layers]) for g in range(m.n_groups)]
        if OVERLAY_FILE in m.files:
            parts.append((mx.load(str(d / OVERLAY_FILE)), [m.overlay_experts(l) for l in m.moe_layers]))
    else:
        parts = [(mx.load(str(d / group_file(group))), [m.group_experts(l, group) for l in m.moe_layers])]
        if OVERLAY_FILE in m.files:
            ov = mx.load(str(d / OVERLAY_FILE))
            # overlay experts already in this group come from the group file
            keep = [[i for i, e in enumerate(m.overlay_experts(l)) if e not in set(m.group_experts(l, group))] for l in m.moe_layers]
            sel = {}
            for name, t in ov.items():
                l = int(name.split(".")[2])
                rows = keep[m.moe_layers.index(l)]
                if rows:
                    sel[name] = t[mx.array(rows)]
            parts.append((sel, [[m.overlay_experts(l)[i] for i in k] for l, k in zip(m.moe_layers, keep)]))
    weights, local_ids = {}, {}
    for i, l in enumerate(m.moe_layers):
        ids = [e for _, ids in parts for e in ids[i]]
        # the full model keeps experts in global order, so that masks (eval) index it directly
        order = first_rows(ids) if group is None and not whole else None
        if whole and not ids:
            continue  # not loaded: the front end stops before this layer's experts
        local_ids[l] = sorted(set(ids)) if group is None and not whole else ids
        prefix = f"model.layers.{l}.{arch.block}.{arch.experts}."
        names = {n for w, _ in parts for n in w if n.startswith(prefix)}
        for n in names:
            pieces = [w[n] for w, _ in parts if n in w]
            t = pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=0)
            weights[n] = t if order is None or order == list(range(len(ids))) else t[mx.array(order)]
    return weights, local_ids


WHOLE = "whole"  # load_bundle(experts=WHOLE): the trunk and the layers whose every expert is on every node


def _resize_experts(model, m: Manifest, arch: Arch, local_ids: dict):
    """Shrink each SwitchGLU to the local expert count (params are still lazy)."""
    for l in m.moe_layers:
        sw = getattr(getattr(model.layers[l], arch.block), arch.experts)
        n = len(local_ids.get(l, []))
        for _, lin in sw.named_modules():
            if "weight" in lin and lin.weight.ndim == 3:
                lin.weight = lin.weight[:n]
                if "bias" in lin:
                    lin.bias = lin.bias[:n]


def load_bundle(bundle_dir, group: int | None = None, *, experts: bool | str = True, verify: bool = True,
                dtype=None, healed: bool = True) -> Loaded:
    """experts=False: the trunk alone; experts=WHOLE: the trunk and the layers every node holds whole
    (the router's front end scores placement after them). `healed=False`: leave out the group's
    healed parameters (before/after comparisons)."""
    from mlx_lm.utils import _get_classes, infer_quant_config

    d = Path(bundle_dir)
    m = Manifest.load(d)
    files = _files_for(m, group, experts)
    if verify:
        meta = [n for n, f in m.files.items() if f["role"] == "meta"]
        m.verify_files(d, files + meta)
    config = m.model["config"]
    arch = get_arch(config["model_type"])
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))

    weights = dict(mx.load(str(d / TRUNK_FILE)))
    local_ids: dict = {}
    expert_bytes = 0
    if experts:
        ew, local_ids = _expert_weights(d, m, arch, group, whole=experts == WHOLE)
        expert_bytes = sum(t.nbytes for t in ew.values())
        weights.update(ew)
    _resize_experts(model, m, arch, local_ids)

    def quantized(path, module):
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return infer_quant_config(path, module, weights)

    nn.quantize(model, group_size=64, bits=4, class_predicate=quantized)
    try:
        model.load_weights(list(weights.items()), strict=experts is True)
    except ValueError as e:
        raise BundleError(f"{d}: bundle does not fit the {config['model_type']} model of its manifest: {e}") from None
    for l in m.moe_layers:
        block = getattr(model.layers[l], arch.block)
        moe.install(block, arch.gate, arch.experts, l, m.moe["scoring"], m.n_experts, local_ids.get(l))
    dtype = dtype or _default_dtype(m)
    if dtype is not None:
        model.set_dtype(dtype)
    model.eval()
    mx.eval(model.parameters())
    total = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    loaded = Loaded(model, m, arch, group if experts is True else None, local_ids,
                    {"trunk": total - expert_bytes if experts else total, "experts": expert_bytes, "total": total})
    if experts and group is not None and healed and heal_file(group) in m.files:
        # before the fused paths read the weights; a node with every expert eligible ignores them
        applied = heal.apply_to_node(loaded, dict(mx.load(str(d / heal_file(group)))))
        loaded.bytes["heal"] = m.files[heal_file(group)]["size"] if applied else 0  # on disk; merged in memory
    if experts is True:
        fused.install(loaded)
    return loaded


def _default_dtype(m: Manifest):
    # MLX's CPU gather_mm runs in float32 only: unquantized experts need it there.
    if m.quantization.get("experts") is None and mx.default_device() == mx.cpu:
        return mx.float32
    return None


def load_tokenizer(bundle_dir):
    """mlx-lm's TokenizerWrapper; its eos_token_ids hold the tokenizer's eos and, as mlx-lm's own load()
    does, config.json's and generation_config.json's eos_token_id (an int or a list)."""
    from mlx_lm.utils import load_tokenizer as _load

    d = Path(bundle_dir)
    if not any((d / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise BundleError(f"{d}: no tokenizer (tokenizer.json / tokenizer_config.json); split a checkpoint that includes one")
    eos = eos_ids(_read_json(d / "config.json")) | eos_ids(load_generation_config(d))
    return _load(d, eos_token_ids=sorted(eos) or None)


def load_generation_config(bundle_dir) -> dict:
    """The bundle's generation_config.json ({} when absent or unreadable: it is optional)."""
    return _read_json(Path(bundle_dir) / "generation_config.json")


def eos_ids(cfg: dict) -> set[int]:
    v = cfg.get("eos_token_id") if isinstance(cfg, dict) else None
    v = [v] if isinstance(v, int) else v if isinstance(v, list) else []
    return {int(t) for t in v if isinstance(t, int) and not isinstance(t, bool) and t >= 0}


def _read_json(path: Path) -> dict:
    try:
        v = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return v if isinstance(v, dict) else {}
