"""`mlxmoe split`: checkpoint -> trunk + expert groups + overlay + manifest.

Streaming: tensors are read, sliced, quantized and written one at a time (one
expert at a time for routed experts), so peak memory stays near the largest
single tensor. The bundle is written by bundle/writer.py (temporary directory,
hashed, swapped into place only when complete)."""

from __future__ import annotations

import json
import re
import shutil
import struct
import time
from pathlib import Path

import mlx.core as mx

from mlxmoe import __version__
from mlxmoe.bundle.arch import Arch, get_arch, moe_facts, normalize_config
from mlxmoe.bundle.checkpoint import BundleWriter, Entry, Source, open_source, st_dtype, to_bytes
from mlxmoe.errors import CheckpointError, ManifestError, MlxMoeError
from mlxmoe.bundle.manifest import (OVERLAY_FILE, TRUNK_FILE, Manifest, check_partition, contiguous, group_file)
from mlxmoe.bundle.writer import write_bundle

# small non-weight files copied verbatim into every bundle (tokenizer, templates)
_COPY = re.compile(r".*\.(json|jinja|model|txt|tiktoken|py)$")
_SKIP = {"model.safetensors.index.json"}


def quantizer(bits, group_size):
    def q(w: mx.array, name: str) -> dict:
        if bits is None:
            return {"weight": w}
        if w.shape[-1] % group_size:
            raise CheckpointError(f"tensor {name!r}: input size {w.shape[-1]} is not a multiple of --group-size {group_size}; "
                                  "pick a group size that divides it, or --bits 16")
        wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
        return {"weight": wq, "scales": scales, "biases": biases}
    return q


class Experts:
    """Routed experts of a source, one expert at a time, in MLX orientation
    ([out, in]), quantized as asked (or as stored, for MLX sources)."""

    def __init__(self, src: Source, arch: Arch, bits, group_size):
        self.src, self.arch, self.q = src, arch, quantizer(bits, group_size)
        self.names: dict = {}  # (layer, expert|None, proj, kind) -> source tensor name
        rx = arch.mlx_expert_re() if src.is_mlx else arch.expert_re()
        for name in src.files:
            m = rx.match(name)
            if not m:
                continue
            if src.is_mlx:
                layer, proj, kind = m.groups()
                self.names[(int(layer), None, proj, kind)] = name
            elif arch.packed:
                layer, proj, kind = m.groups()
                if kind in ("_blocks", "_scales"):
                    raise CheckpointError(f"{src.files[name].path}: tensor {name!r} is MXFP4-packed; split the bf16 checkpoint or an MLX conversion instead")
                self.names[(int(layer), None, proj, kind or "")] = name
            else:
                layer, e, proj, kind = m.groups()
                self.names[(int(layer), int(e), arch.proj[proj], kind)] = name

    def tensor_names(self):
        return set(self.names.values())

    def layers(self):
        return sorted({k[0] for k in self.names})

    def get(self, layer: int, e: int) -> dict:
        """{(proj, kind): array} for one expert."""
        if self.src.is_mlx:
            return {(p, k): self._read(n, e) for (l, _, p, k), n in self.names.items() if l == layer}
        if self.arch.packed:
            return self._packed(layer, e)
        out = {}
        for (l, ex, p, k), n in self.names.items():
            if l != layer or ex != e:
                continue
            a = self._read(n)
            if k == "weight":
                for kind, v in self.q(dequant_fp8(self.src, n, a), n).items():
                    out[(p, kind)] = v
            elif k == "bias":
                out[(p, k)] = a
        return out

    def _read(self, name, index=None):
        return self.src.files[name].read(name, index)

    def _packed(self, layer, e):
        # gpt_oss (transformers layout): gate_up_proj [E, in, 2*out] interleaved, down_proj [E, in, out]
        gu_name, down_name = self.names[(layer, None, "gate_up_proj", "")], self.names[(layer, None, "down_proj", "")]
        gu, down = self._read(gu_name, e).T, self._read(down_name, e).T
        out = {}
        for p, w, n in (("gate_proj", gu[::2], gu_name), ("up_proj", gu[1::2], gu_name), ("down_proj", down, down_name)):
            out.update({(p, k): v for k, v in self.q(mx.contiguous(w), n).items()})
        b = self.names.get((layer, None, "gate_up_proj", "_bias"))
        if b:
            gub = self._read(b, e)
            out[("gate_proj", "bias")], out[("up_proj", "bias")] = gub[::2], gub[1::2]
        b = self.names.get((layer, None, "down_proj", "_bias"))
        if b:
            out[("down_proj", "bias")] = self._read(b, e)
        return out


def dequant_fp8(src: Source, name: str, w: mx.array) -> mx.array:
    """DeepSeek fp8 weights carry 128x128 block scales in `<name>_scale_inv`."""
    inv = name + "_scale_inv"
    if inv not in src.files:
        return w
    s, bs = src.files[inv].read(inv), 128
    m, n = w.shape
    w = mx.pad(w, ((0, -m % bs), (0, -n % bs)))
    w = w.reshape(w.shape[0] // bs, bs, w.shape[1] // bs, bs) * s[:, None, :, None]
    return w.reshape(m + (-m % bs), n + (-n % bs))[:m, :n].astype(mx.bfloat16)


def write_experts(path: Path, experts: Experts, arch: Arch, per_layer: dict, progress) -> None:
    """One bundle file: for every layer, the given experts stacked on axis 0 in
    the listed order (the runtime's local order)."""
    layers = [l for l in sorted(per_layer) if per_layer[l]]
    specs = {}
    for l in layers:  # shapes/dtypes from the layer's first listed expert
        specs[l] = {pk: (st_dtype(a.dtype), tuple(a.shape)) for pk, a in experts.get(l, per_layer[l][0]).items()}
    entries = [Entry(arch.mlx_name(l, p, k), dt, (len(per_layer[l]),) + shp)
               for l in layers for (p, k), (dt, shp) in sorted(specs[l].items())]
    w = BundleWriter(path, entries, {"format": "mlxmoe.experts"})
    for l in layers:
        for i, e in enumerate(per_layer[l]):
            for (p, k), a in experts.get(l, e).items():
                data = to_bytes(a)
                w.put(arch.mlx_name(l, p, k), data, index=i)
                progress(len(data))
    w.close()


class AppendWriter:
    """safetensors writer for tensors of unknown count: data is appended to a
    side file and the header is written in front at close (one streaming copy)."""

    def __init__(self, path: Path):
        self.path, self.entries, self.off = path, {}, 0
        self._data = open(str(path) + ".data", "wb")

    def add(self, name: str, a: mx.array):
        data = to_bytes(a)
        self.entries[name] = {"dtype": st_dtype(a.dtype), "shape": list(a.shape), "data_offsets": [self.off, self.off + len(data)]}
        self._data.write(data)
        self.off += len(data)
        return len(data)

    def close(self):
        self._data.close()
        blob = json.dumps({"__metadata__": {"format": "mlxmoe.trunk"}, **self.entries}, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        side = Path(str(self.path) + ".data")
        with open(self.path, "wb") as out, open(side, "rb") as data:
            out.write(struct.pack("<Q", len(blob)) + blob)
            shutil.copyfileobj(data, out, 1 << 24)
        side.unlink()


def _model_skeleton(config: dict):
    """The mlx-lm model object (lazy, nothing allocated): used for its sanitize
    (HF -> MLX names) and to know which trunk modules are quantizable."""
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    return model_class(args_class.from_dict(config))


def write_trunk(path: Path, src: Source, arch: Arch, skip: set, bits, group_size, progress) -> int:
    q = quantizer(bits, group_size)
    w = AppendWriter(path)
    model = None if src.is_mlx else _model_skeleton(normalize_config(src.config))
    modules = {} if model is None else dict(model.named_modules())
    n = 0
    for name in sorted(src.files):
        if name in skip or name.endswith("_scale_inv"):
            continue
        a = src.files[name].read(name)
        if model is None:  # MLX source: names and quantization already final
            tensors = {name: a}
        else:
            tensors = model.sanitize({name: dequant_fp8(src, name, a)})
        for tname, t in sorted(tensors.items()):
            mod = modules.get(tname.rsplit(".", 1)[0])
            if (bits and tname.endswith(".weight") and t.ndim == 2 and not arch.is_gate(tname)
                    and hasattr(mod, "to_quantized") and t.shape[-1] % group_size == 0):
                for kind, v in q(t, tname).items():
                    progress(w.add(tname[: -len("weight")] + kind, v))
            else:
                progress(w.add(tname, t))
            n += 1
    w.close()
    return n


def load_json_arg(path, what):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MlxMoeError(f"{path}: {what} file not found") from None
    except json.JSONDecodeError as e:
        raise MlxMoeError(f"{path}: {what} file is not valid JSON: {e}") from None


LAYOUT_FIELDS = ("nodes", "placement", "left_out")  # a layout's (quality/layout.py): kept as given


def make_grouping(facts, n_groups: int, spec: dict | None, where="--grouping", overlay: dict | None = None) -> dict:
    """The manifest's grouping from a --grouping spec; `overlay` (make_overlay's): with "overlap", an
    expert in the overlay or a layout's left_out needs no group, and a group may be empty."""
    n, k = facts.n_experts, facts.top_k
    if n_groups < 1 or n_groups > n:
        raise ManifestError(f"--groups {n_groups}: must be between 1 and the number of experts ({n})")
    if spec is None:
        return {"strategy": "contiguous", "layers": {str(l): contiguous(n, n_groups) for l in facts.moe_layers}}
    layers = spec.get("layers")
    if layers is None and "groups" in spec:
        layers = {str(l): spec["groups"] for l in facts.moe_layers}
    if not isinstance(layers, dict):
        raise ManifestError(f"{where}: expected {{\"groups\": [[...], ...]}} or {{\"layers\": {{\"<layer>\": [[...], ...]}}}}")
    overlap = spec.get("overlap", False)
    if not isinstance(overlap, bool):
        raise ManifestError(f"{where}: field 'overlap' must be true or false")
    out = {}
    left_out = spec.get("left_out") or {}
    for l in facts.moe_layers:
        groups = layers.get(str(l))
        if groups is None or len(groups) != n_groups:
            raise ManifestError(f"{where}: layer {l} needs exactly {n_groups} groups")
        elsewhere = set((overlay or {}).get("layers", {}).get(str(l), [])) | set(left_out.get(str(l), []))
        check_partition(groups, n, f"{where}: layer {l}", overlap, elsewhere)
        out[str(l)] = [sorted(g) for g in groups]
    made = {"strategy": spec.get("strategy", "explicit"), "layers": out,
            **{k: spec[k] for k in LAYOUT_FIELDS if k in spec}}
    return {**made, "overlap": True} if overlap else made


def make_overlay(facts, spec: dict | None, where="--overlay") -> dict:
    if spec is None:
        return {"source": None, "layers": {}}
    layers = spec.get("layers")
    if layers is None and "all" in spec:
        layers = {str(l): spec["all"] for l in facts.moe_layers}
    if not isinstance(layers, dict):
        raise ManifestError(f"{where}: expected {{\"all\": [ids]}} or {{\"layers\": {{\"<layer>\": [ids]}}}}")
    moe = {str(l) for l in facts.moe_layers}
    out = {}
    for l, ids in layers.items():
        if str(l) not in moe:
            raise ManifestError(f"{where}: layer {l} is not an MoE layer (MoE layers: {facts.moe_layers})")
        bad = [e for e in ids if not isinstance(e, int) or not 0 <= e < facts.n_experts]
        if bad:
            raise ManifestError(f"{where}: layer {l}: expert(s) {bad} do not exist (0..{facts.n_experts - 1})")
        out[str(l)] = sorted(set(ids))
    return {"source": spec.get("source", str(where)), "layers": out}


def check_groups_fit(facts, grouping, overlay):
    for l in facts.moe_layers:
        for g, ids in enumerate(grouping["layers"][str(l)]):
            n = len(set(ids) | set(overlay["layers"].get(str(l), [])))
            if n < facts.top_k:
                raise ManifestError(
                    f"--groups {len(grouping['layers'][str(l)])}: group {g} at layer {l} would hold {n} experts, "
                    f"fewer than the model's top_k={facts.top_k}; use fewer groups or an overlay")


def quantization(src: Source, bits, trunk_bits, group_size, kv_bits) -> dict:
    """The manifest's `quantization`: an mlx checkpoint's own, else what the options make of it."""
    if src.is_mlx:
        q = src.config.get("quantization")
        return {"trunk": q, "experts": q, "kv_bits": kv_bits}
    return {"trunk": {"bits": trunk_bits, "group_size": group_size} if trunk_bits else None,
            "experts": {"bits": bits, "group_size": group_size} if bits else None, "kv_bits": kv_bits}


def split(source: str, out: str, n_groups: int, overlay=None, grouping=None, bits=4, group_size=64,
          trunk_bits=8, kv_bits=8, force=False, progress=None, calibration=None) -> Manifest:
    src = open_source(source)
    config = normalize_config(src.config)
    arch = get_arch(config.get("model_type"), str(src.path / "config.json"))
    facts = moe_facts(config)
    overlay = make_overlay(facts, overlay)
    grouping = make_grouping(facts, n_groups, grouping, overlay=overlay)
    check_groups_fit(facts, grouping, overlay)

    experts = Experts(src, arch, None if src.is_mlx else bits, group_size)
    if sorted(experts.layers()) != sorted(facts.moe_layers):
        raise CheckpointError(f"{src.path}: routed-expert tensors found for layers {experts.layers()}, config says MoE layers are {facts.moe_layers}")
    if not src.is_mlx and not arch.packed:
        _check_complete(experts, facts, src)
    quant = quantization(src, bits, trunk_bits, group_size, kv_bits)

    out = Path(out)
    if out.exists() and not force:
        raise MlxMoeError(f"{out}: already exists (use --force to replace it)")
    progress = progress or (lambda n: None)

    def fill(tmp: Path) -> dict:
        write_trunk(tmp / TRUNK_FILE, src, arch, experts.tensor_names(), None if src.is_mlx else trunk_bits, group_size, progress)
        files = {TRUNK_FILE: {"role": "trunk"}}
        for g in range(n_groups):
            per_layer = {l: grouping["layers"][str(l)][g] for l in facts.moe_layers}
            write_experts(tmp / group_file(g), experts, arch, per_layer, progress)
            files[group_file(g)] = {"role": "group", "group": g}
        if any(overlay["layers"].values()):
            per_layer = {int(l): ids for l, ids in overlay["layers"].items()}
            write_experts(tmp / OVERLAY_FILE, experts, arch, per_layer, progress)
            files[OVERLAY_FILE] = {"role": "overlay"}
        for f in sorted(src.path.iterdir()):
            if f.is_file() and _COPY.match(f.name) and f.name not in _SKIP and f.stat().st_size < 64 << 20:
                shutil.copy2(f, tmp / f.name)
                files[f.name] = {"role": "meta"}
        return files

    def manifest(files: dict) -> Manifest:
        model = {"id": src.model_id, "revision": src.revision, "model_type": config["model_type"], "config": config,
                 "mlxmoe_version": __version__}
        return Manifest(model=model, moe=facts.to_dict(), n_groups=n_groups, grouping=grouping, overlay=overlay,
                        quantization=quant, files=files, calibration=calibration,
                        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    return write_bundle(out, fill, manifest)


def _check_complete(experts: Experts, facts, src):
    have = {(l, e, p) for (l, e, p, k) in experts.names if k == "weight"}
    projs = sorted({p for (_, _, p) in have})
    for l in facts.moe_layers:
        for e in range(facts.n_experts):
            for p in projs:
                if (l, e, p) not in have:
                    raise CheckpointError(f"{src.path}: expert tensor for layer {l}, expert {e}, {p} is missing from the checkpoint")
