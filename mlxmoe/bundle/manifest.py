"""distribution.json: what a bundle holds and how experts are distributed.

Versioned, validated on load, hashed. The hash travels in Bonjour TXT records
and in every RPC so that a node built from another model revision or another
distribution is never used."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from mlxmoe.errors import BundleError, ManifestError

FORMAT = "mlxmoe.distribution"
VERSION = 1
FILENAME = "distribution.json"


def group_file(g: int) -> str:
    return f"experts-group-{g:02d}.safetensors"


def heal_file(g: int) -> str:
    """A group's healed parameters (`mlxmoe calibrate --heal`, model/heal.py)."""
    return f"heal-group-{g:02d}.safetensors"


TRUNK_FILE = "trunk.safetensors"
OVERLAY_FILE = "experts-overlay.safetensors"


@dataclass
class Manifest:
    model: dict  # id, revision, model_type, config (normalized config.json)
    moe: dict  # MoEFacts as a dict
    n_groups: int
    grouping: dict  # {"strategy": str, "layers": {layer(str): [[ids of group 0], ...]}, "overlap"?: bool}
    overlay: dict  # {"source": str|None, "layers": {layer(str): [ids]}}
    quantization: dict  # {"trunk": {bits, group_size}|None, "experts": {...}|None, "kv_bits": int|None}
    files: dict = field(default_factory=dict)  # name -> {sha256, size, role, group?}
    calibration: dict | None = None
    created: str = ""
    version: int = VERSION

    # ---- derived facts
    @property
    def model_id(self) -> str:
        return self.model["id"]

    @property
    def moe_layers(self) -> list[int]:
        return list(self.moe["moe_layers"])

    @property
    def top_k(self) -> int:
        return int(self.moe["top_k"])

    @property
    def n_experts(self) -> int:
        return int(self.moe["n_experts"])

    def group_experts(self, layer: int, g: int) -> list[int]:
        return list(self.grouping["layers"][str(layer)][g])

    def expert_bytes(self) -> float:
        """Bytes of one routed expert at one layer (from the group and overlay files' sizes)."""
        total = sum(f["size"] for f in self.files.values() if f["role"] in ("group", "overlay"))
        rows = sum(len(self.group_experts(l, g)) for l in self.moe_layers for g in range(self.n_groups))  # overlap repeats rows
        if any(f["role"] == "overlay" for f in self.files.values()):
            rows += sum(len(self.overlay_experts(l)) for l in self.moe_layers)
        return total / max(rows, 1)

    def left_out(self, layer: int) -> list[int]:
        """Experts no node holds at `layer` (a layout whose nodes together hold less than the model)."""
        return list(self.grouping.get("left_out", {}).get(str(layer), []))

    def placement_layers(self) -> list[int]:
        """The MoE layers placement scores (a layout's first layer whose node sets differ; else the first)."""
        return list(self.grouping.get("placement", {}).get("layers") or self.moe_layers[:1])

    def whole_layers(self) -> list[int]:
        """MoE layers whose every expert is in the overlay (on every node; the router's front end loads them)."""
        return [l for l in self.moe_layers if len(self.overlay_experts(l)) == self.n_experts]

    @property
    def overlapping(self) -> bool:
        """Groups may share experts (per-node sets that cover every expert,
        e.g. domain-calibrated sets) instead of partitioning them."""
        return bool(self.grouping.get("overlap", False))

    def heal_bytes(self) -> int:
        """The largest group's healed-parameter file (0 when not healed)."""
        return max((f["size"] for f in self.files.values() if f["role"] == "heal"), default=0)

    def overlay_experts(self, layer: int) -> list[int]:
        return list(self.overlay.get("layers", {}).get(str(layer), []))

    def eligible(self, g: int, layer: int) -> list[int]:
        """eligible(g, layer) = group g's experts ∪ overlay, sorted."""
        return sorted(set(self.group_experts(layer, g)) | set(self.overlay_experts(layer)))

    # ---- serialisation
    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": self.version, "created": self.created,
                "model": self.model, "moe": self.moe, "n_groups": self.n_groups,
                "grouping": self.grouping, "overlay": self.overlay,
                "quantization": self.quantization, "files": self.files,
                "calibration": self.calibration}

    @property
    def hash(self) -> str:
        """Identity of the model + distribution (creation time excluded)."""
        d = self.to_dict()
        d.pop("created")
        blob = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def save(self, bundle_dir) -> Path:
        p = Path(bundle_dir) / FILENAME
        p.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n")
        return p

    @classmethod
    def from_dict(cls, d: dict, where: str = FILENAME) -> "Manifest":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ManifestError(f"{where}: not an mlxmoe distribution manifest (field 'format' must be {FORMAT!r})")
        if d.get("version") != VERSION:
            raise ManifestError(f"{where}: manifest version {d.get('version')!r} is not supported (this mlxmoe reads version {VERSION})")
        need = ["model", "moe", "n_groups", "grouping", "overlay", "quantization", "files"]
        for k in need:
            if k not in d:
                raise ManifestError(f"{where}: missing field {k!r}")
        m = cls(**{k: d[k] for k in need}, calibration=d.get("calibration"),
                created=d.get("created", ""), version=d["version"])
        m.validate(where)
        return m

    @classmethod
    def load(cls, bundle_dir) -> "Manifest":
        p = Path(bundle_dir)
        p = p / FILENAME if p.is_dir() else p
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise ManifestError(f"{p}: not found (is this a bundle made by `mlxmoe split`?)") from None
        except json.JSONDecodeError as e:
            raise ManifestError(f"{p}: not valid JSON: {e}") from None
        return cls.from_dict(d, str(p))

    # ---- validation
    def validate(self, where: str = FILENAME):
        n, k = self.n_experts, self.top_k
        if not isinstance(self.n_groups, int) or self.n_groups < 1:
            raise ManifestError(f"{where}: field 'n_groups' must be a positive integer")
        layers = self.grouping.get("layers", {})
        for layer in self.moe_layers:
            groups = layers.get(str(layer))
            if not isinstance(groups, list) or len(groups) != self.n_groups:
                raise ManifestError(f"{where}: grouping.layers[{layer}] must list {self.n_groups} groups")
            ov = self.overlay_experts(layer)
            check_partition(groups, n, f"{where}: grouping.layers[{layer}]", self.overlapping,
                            set(ov) | set(self.left_out(layer)))
            bad = [e for e in ov if not (isinstance(e, int) and 0 <= e < n)]
            if bad or len(set(ov)) != len(ov):
                raise ManifestError(f"{where}: overlay.layers[{layer}]: experts must be distinct ids in 0..{n - 1}, got {bad or ov}")
            for g in range(self.n_groups):
                if len(self.eligible(g, layer)) < k:
                    raise ManifestError(f"{where}: layer {layer}, group {g}: {len(self.eligible(g, layer))} eligible experts, fewer than top_k={k}")
        extra = set(layers) - {str(l) for l in self.moe_layers}
        if extra:
            raise ManifestError(f"{where}: grouping.layers names non-MoE layers {sorted(extra)}")

    def verify_files(self, bundle_dir, names=None, check_hash=True):
        """Refuse bundle files that are missing or do not match the manifest."""
        from mlxmoe.bundle.checkpoint import sha256_file

        d = Path(bundle_dir)
        for name in names or self.files:
            meta = self.files.get(name)
            if meta is None:
                raise BundleError(f"{d / name}: not listed in {FILENAME} (manifest {self.hash})")
            p = d / name
            if not p.exists():
                raise BundleError(f"{p}: missing (manifest {self.hash} lists it)")
            if p.stat().st_size != meta["size"]:
                raise BundleError(f"{p}: size {p.stat().st_size} does not match the manifest ({meta['size']}); from another split?")
            if check_hash and sha256_file(p) != meta["sha256"]:
                raise BundleError(f"{p}: sha256 does not match {FILENAME}; the file is corrupt or from another split")


def check_partition(groups, n: int, where: str, overlap: bool = False, elsewhere: set = frozenset()):
    """Every expert in exactly one group; with overlap=True in at least one, or `elsewhere` (the
    overlay, or left out: a layout's coverage below 1), and then a group may be empty."""
    seen: dict[int, int] = {e: -1 for e in elsewhere} if overlap else {}
    for g, ids in enumerate(groups):
        if not isinstance(ids, list) or (not ids and not (overlap and elsewhere)):
            raise ManifestError(f"{where}: group {g} must be a non-empty list of expert ids")
        if len(set(ids)) != len(ids):
            raise ManifestError(f"{where}: group {g} lists an expert twice")
        for e in ids:
            if not isinstance(e, int) or not 0 <= e < n:
                raise ManifestError(f"{where}: group {g}: expert {e!r} does not exist (0..{n - 1})")
            if e in seen and not overlap:
                raise ManifestError(f"{where}: expert {e} is in group {seen[e]} and group {g} "
                                    f"(set \"overlap\": true for groups that share experts)")
            seen.setdefault(e, g)
    if len(seen) != n:
        missing = sorted(set(range(n)) - set(seen))
        raise ManifestError(f"{where}: experts {missing[:10]} are in no group")


def first_rows(ids: list[int]) -> list[int]:
    """For rows holding experts `ids` (overlapping groups may repeat one), the
    row of each distinct expert, in global expert order."""
    first: dict[int, int] = {}
    for row, e in enumerate(ids):
        first.setdefault(e, row)
    return [first[e] for e in sorted(first)]


def contiguous(n_experts: int, n_groups: int) -> list[list[int]]:
    """Default grouping: contiguous ranges, sizes differing by at most one."""
    base, extra = divmod(n_experts, n_groups)
    out, start = [], 0
    for g in range(n_groups):
        size = base + (g < extra)
        out.append(list(range(start, start + size)))
        start += size
    return out
