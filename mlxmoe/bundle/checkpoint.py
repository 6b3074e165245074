"""Reading checkpoints and writing bundles, one tensor at a time.

`SafetensorsFile` parses and validates a header, then reads single tensors (or
single experts of a stacked tensor) with plain file reads, so memory stays near
the size of one tensor. `BundleWriter` lays out every tensor of an output file
up front and accepts the data piece by piece, in any order."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxmoe.errors import CheckpointError

# safetensors dtype -> (numpy dtype used to read the bytes, mlx dtype)
_DTYPES = {
    "F32": (np.float32, mx.float32), "F16": (np.float16, mx.float16),
    "BF16": (np.uint16, mx.bfloat16), "F64": (np.float64, None),
    "I64": (np.int64, mx.int64), "I32": (np.int32, mx.int32), "I16": (np.int16, mx.int16),
    "I8": (np.int8, mx.int8), "U64": (np.uint64, mx.uint64), "U32": (np.uint32, mx.uint32),
    "U16": (np.uint16, mx.uint16), "U8": (np.uint8, mx.uint8), "BOOL": (np.bool_, mx.bool_),
    "F8_E4M3": (np.uint8, None),
}
_MX_TO_ST = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.int64: "I64",
             mx.int32: "I32", mx.int16: "I16", mx.int8: "I8", mx.uint64: "U64",
             mx.uint32: "U32", mx.uint16: "U16", mx.uint8: "U8", mx.bool_: "BOOL"}
MAX_HEADER = 100 * 1024 * 1024


def itemsize(dtype: str) -> int:
    return np.dtype(_DTYPES[dtype][0]).itemsize


@dataclass
class TensorInfo:
    dtype: str
    shape: tuple
    start: int  # absolute file offsets
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsFile:
    """A validated safetensors file: header checked against the file size, every
    tensor's byte range checked against its dtype and shape."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: truncated (no safetensors header)")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER or 8 + n > size:
                    raise CheckpointError(f"{self.path}: corrupt or truncated safetensors header (header length {n}, file size {size})")
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file not found") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header: {e}") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.tensors: dict[str, TensorInfo] = {}
        base = 8 + n
        for name, h in header.items():
            self.tensors[name] = self._check(name, h, base, size)

    def _check(self, name, h, base, size) -> TensorInfo:
        try:
            dtype, shape, (s, e) = h["dtype"], tuple(h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{self.path}: tensor {name!r}: malformed header entry") from None
        if dtype not in _DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r}: unsupported dtype {dtype}")
        want = int(np.prod(shape, dtype=np.int64)) * itemsize(dtype)
        if e - s != want or s < 0:
            raise CheckpointError(f"{self.path}: tensor {name!r}: {e - s} bytes for shape {list(shape)} {dtype} (expected {want})")
        if base + e > size:
            raise CheckpointError(f"{self.path}: truncated: tensor {name!r} ends at byte {base + e} but the file has {size} bytes")
        return TensorInfo(dtype, shape, base + s, base + e)

    def keys(self):
        return self.tensors.keys()

    def read_bytes(self, name: str, index: int | None = None) -> bytes:
        """Raw bytes of a tensor, or of entry `index` along its first axis."""
        t = self.tensors[name]
        start, n = t.start, t.nbytes
        if index is not None:
            n //= t.shape[0]
            start += index * n
        with open(self.path, "rb") as f:
            f.seek(start)
            data = f.read(n)
        if len(data) != n:
            raise CheckpointError(f"{self.path}: truncated while reading {name!r}")
        return data

    def read(self, name: str, index: int | None = None) -> mx.array:
        t = self.tensors[name]
        shape = t.shape[1:] if index is not None else t.shape
        return to_mx(self.read_bytes(name, index), t.dtype, shape, f"{self.path}:{name}")


def to_mx(data: bytes, dtype: str, shape, where: str = "") -> mx.array:
    npd, mxd = _DTYPES[dtype]
    a = np.frombuffer(data, dtype=npd).reshape(shape)
    if dtype == "F8_E4M3":
        return mx.from_fp8(mx.array(a), dtype=mx.bfloat16)
    if mxd is None:
        raise CheckpointError(f"{where}: dtype {dtype} is not supported by MLX")
    arr = mx.array(a)
    return arr.view(mx.bfloat16) if dtype == "BF16" else arr


def to_bytes(a: mx.array) -> bytes:
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.array(a)).tobytes()


def st_dtype(a_dtype) -> str:
    return _MX_TO_ST[a_dtype]


@dataclass
class Entry:
    name: str
    dtype: str
    shape: tuple
    offset: int = 0  # relative to the data section

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * itemsize(self.dtype)


@dataclass
class BundleWriter:
    """Write a safetensors file whose layout is fixed up front. `put(name, data,
    index)` writes a whole tensor, or entry `index` along its first axis."""

    path: Path
    entries: list
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        off = 0
        for e in self.entries:
            e.offset, off = off, off + e.nbytes
        header = {e.name: {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.offset, e.offset + e.nbytes]}
                  for e in self.entries}
        if self.metadata:
            header["__metadata__"] = {k: str(v) for k, v in self.metadata.items()}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._base = 8 + len(blob)
        self._by_name = {e.name: e for e in self.entries}
        self._written = {e.name: 0 for e in self.entries}
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(blob)) + blob)
        self._f.truncate(self._base + off)

    def put(self, name: str, data: bytes, index: int | None = None):
        e = self._by_name[name]
        pos = e.offset
        if index is not None:
            step = e.nbytes // e.shape[0]
            if len(data) != step:
                raise ValueError(f"{self.path.name}:{name}[{index}]: {len(data)} bytes, expected {step}")
            pos += index * step
        elif len(data) != e.nbytes:
            raise ValueError(f"{self.path.name}:{name}: {len(data)} bytes, expected {e.nbytes}")
        self._f.seek(self._base + pos)
        self._f.write(data)
        self._written[name] += len(data)

    def close(self):
        missing = [n for n, e in self._by_name.items() if self._written[n] != e.nbytes]
        self._f.close()
        if missing:
            raise RuntimeError(f"{self.path.name}: tensors not fully written: {missing[:5]}")


def sha256_file(path, chunk=1 << 24) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


# ---------------------------------------------------------------- sources

@dataclass
class Source:
    """A checkpoint on disk: its config and where each tensor lives."""

    path: Path
    config: dict
    files: dict  # tensor name -> SafetensorsFile
    is_mlx: bool  # mlx-community layout: already MLX names, maybe quantized
    model_id: str
    revision: str | None = None

    def info(self, name) -> TensorInfo:
        return self.files[name].tensors[name]


def resolve(source: str) -> tuple[Path, str, str | None]:
    """A local directory, or a HF repo id found in the huggingface_hub cache."""
    p = Path(source).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"{p}: expected a model directory (config.json + *.safetensors)")
        return p, p.name, None
    if source.count("/") != 1:
        raise CheckpointError(f"{source}: no such directory, and not a Hugging Face repo id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(source, local_files_only=True)
    except Exception:
        raise CheckpointError(
            f"{source}: not in the local Hugging Face cache ({os.environ.get('HF_HUB_CACHE') or '~/.cache/huggingface/hub'}). "
            f"mlxmoe does not download models: run `hf download {source}` on a machine with network, "
            "or pass a local directory.") from None
    return Path(local), source, Path(local).name


def open_source(source: str) -> Source:
    path, model_id, revision = resolve(source)
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{cfg_path}: missing (every model directory needs config.json)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON: {e}") from None
    index = path / "model.safetensors.index.json"
    files: dict[str, SafetensorsFile] = {}
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from None
        opened = {}
        for name, shard in weight_map.items():
            if shard not in opened:
                if not (path / shard).exists():
                    raise CheckpointError(f"{index}: names shard {shard!r} (for tensor {name!r}) but {path / shard} does not exist")
                opened[shard] = SafetensorsFile(path / shard)
            if name not in opened[shard].tensors:
                raise CheckpointError(f"{path / shard}: index says it holds tensor {name!r} but it does not")
            files[name] = opened[shard]
    else:
        shards = sorted(path.glob("model*.safetensors"))
        if not shards:
            raise CheckpointError(f"{path}: no model*.safetensors files and no model.safetensors.index.json")
        for s in shards:
            f = SafetensorsFile(s)
            files.update({k: f for k in f.keys()})
    is_mlx = "quantization" in config or any(".switch_mlp." in k for k in files) or \
        any(k.endswith(".experts.gate_proj.weight") for k in files)
    return Source(path, config, files, is_mlx, config.get("_name_or_path") or model_id, revision)
