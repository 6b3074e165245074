"""The cost model behind `mlxmoe plan --link/--chip`: per mode (mlxmoe's pin,
onehop, split; the exact peers' pipeline and tensor parallel) the predicted
single-stream decode tok/s, time to first token, aggregate tok/s of concurrent
chats and bytes on the wire per token, from the model's shape, the chip, the
link and each mode's remote-step share. Pure functions; docs/PERFORMANCE.md
("The cost model") has the formulas and where every constant comes from.

Decode is memory-bound: a step reads the weights it touches once, at the chip's
bandwidth times an efficiency, plus a fixed cost per decoder layer (kernel
launches, host work). Every network step adds the link's latency, its bytes
over the link's bandwidth, and a fixed software cost per call or collective.
The device constants are fitted (tools/fit_cost.py) and read from
assets/cost.json, which the tools write."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass

from mlxmoe import ASSETS
from mlxmoe.bundle.plan import Counts, qbytes
from mlxmoe.errors import MlxMoeError

CALIBRATION = ASSETS / "cost.json"
MODES = ("pin", "onehop", "split", "pipeline", "tensor")
PEER_NAMES = {"pipeline": "mlx-lm pipeline", "tensor": "mlx-lm tensor"}


def mode_name(mode: str) -> str:
    """How tables name a mode: mlxmoe's own, or the peer's (mlx-lm's distributed inference)."""
    return PEER_NAMES.get(mode, f"mlxmoe {mode}")


@dataclass(frozen=True)
class Chip:
    bandwidth: float  # bytes/s of unified memory (Apple's figure)
    flops: float  # FLOP/s of the GPU at 16 bits (cores x 128 ALUs x 2 x clock)


# Apple's published memory bandwidth per chip (the largest GPU of each).
CHIPS = {
    "m1-max": Chip(400e9, 10.4e12), "m1-ultra": Chip(800e9, 20.8e12),
    "m2-max": Chip(400e9, 13.6e12), "m2-ultra": Chip(800e9, 27.2e12),
    "m3-pro": Chip(150e9, 7.4e12), "m3-max": Chip(400e9, 16.4e12), "m3-ultra": Chip(819e9, 28.7e12),
    "m4": Chip(120e9, 4.3e12), "m4-pro": Chip(273e9, 8.1e12), "m4-max": Chip(546e9, 16.1e12),
}


@dataclass(frozen=True)
class Link:
    rtt: float  # s, a TCP round trip (mlxmoe's HTTP calls; mx.distributed's ring backend)
    bandwidth: float  # bytes/s
    rdma_rtt: float | None = None  # s, mx.distributed over JACCL (Thunderbolt 5 RDMA) where the link has it


# Typical figures, not measurements of ours: docs/PERFORMANCE.md says so.
LINKS = {
    "tb5": Link(0.1e-3, 80e9 / 8, rdma_rtt=0.01e-3), "tb4": Link(0.15e-3, 40e9 / 8),
    "10gbe": Link(0.1e-3, 10e9 / 8), "1gbe": Link(0.3e-3, 1e9 / 8), "wifi": Link(3e-3, 0.4e9 / 8),
}


@dataclass(frozen=True)
class Device:
    """How mlx runs on a kind of machine (fitted or measured; assets/cost.json)."""

    eff: float = 0.6  # share of the memory bandwidth a decode step reaches
    layer_s: float = 50e-6  # fixed cost per decoder layer per step
    sync_s: float = 0.2e-3  # fixed cost per mx.distributed send or collective
    call_s: float = 1e-3  # fixed software cost of one mlxmoe experts call (HTTP, msgpack, HMAC)
    prefill_eff: float = 0.5  # share of the GPU's FLOP/s a long prompt reaches
    act_bytes: int = 2  # bytes per activation element on the wire (bf16)
    call_extra_bytes: int = 4500  # envelope, headers and ids of one experts call
    parallel: int | None = None  # nodes that compute at once (None: all; hosts sharing one CPU: fewer)


@dataclass(frozen=True)
class Shares:
    """Share of (token, MoE layer) steps routed to another node, as `mlxmoe eval` reports them."""

    onehop: float
    split: float
    source: str


def calibration() -> dict:
    """assets/cost.json: {"devices": {name: Device fields}, "shares": Shares fields}."""
    return json.loads(CALIBRATION.read_text()) if CALIBRATION.exists() else {"devices": {}, "shares": None}


def device(name: str = "apple") -> Device:
    return Device(**calibration()["devices"].get(name, {}))


def default_shares() -> Shares:
    s = calibration().get("shares")
    return Shares(**s) if s else Shares(0.36, 0.65, "built-in guess")


def shares_from_eval(path: str) -> Shares:
    """Remote-step shares from an `mlxmoe eval --onehop --split` JSON report."""
    try:
        report = json.loads(open(path).read())
        return Shares(report["onehop"]["mean"]["remote_share"], report["split"]["mean"]["remote_share"], str(path))
    except (OSError, ValueError, KeyError, TypeError):
        raise MlxMoeError(f"{path}: not an eval report with onehop and split results (run eval --onehop --split)") from None


def parse_link(spec: str) -> Link:
    """'tb5' | '10gbe' | 'wifi' | 'RTT_MS,GBPS' (e.g. '0.5,10')."""
    if spec in LINKS:
        return LINKS[spec]
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*,\s*(\d+(?:\.\d*)?)\s*", spec)
    if not m or float(m.group(2)) <= 0:
        raise MlxMoeError(f"--link {spec!r}: expected {', '.join(LINKS)} or RTT_MS,GBPS (e.g. 0.5,10)")
    return Link(float(m.group(1)) / 1e3, float(m.group(2)) * 1e9 / 8)


def parse_chip(spec: str) -> Chip:
    if spec not in CHIPS:
        raise MlxMoeError(f"--chip {spec!r}: expected one of {', '.join(CHIPS)}")
    return CHIPS[spec]


# ---------------------------------------------------------------- bytes and device time

@dataclass(frozen=True)
class Weights:
    bits: int | None = 4
    trunk_bits: int | None = 8
    group_size: int = 64
    kv_bits: int | None = 8
    float_bytes: int = 2  # unquantized weights: bf16 (float32 on a CPU)


def step_bytes(k: Counts, w: Weights, context: int, batch: int = 1) -> dict:
    """Bytes one decode step of `batch` tokens reads: the trunk less the embedding table
    (one row of it), the distinct experts the batch touches, and the KV caches."""
    embed = k.vocab * k.hidden
    experts = k.n_experts * (1 - (1 - k.top_k / k.n_experts) ** batch)  # distinct, per layer, random routing
    kv_per_elem = w.kv_bits / 8 + 4 / w.group_size if w.kv_bits else w.float_bytes

    def q(params, bits):
        return qbytes(params, bits, w.group_size) if bits else params * w.float_bytes

    parts = {"trunk": q(k.trunk_matrix - embed, w.trunk_bits) + 2 * k.trunk_other,
             "experts": k.n_moe_layers * experts * q(k.expert, w.bits),
             "kv": batch * k.kv_elems_per_token * context * kv_per_elem}
    return {**parts, "total": sum(parts.values())}


def device_s(nbytes: float, layers: int, chip: Chip, dev: Device) -> float:
    return nbytes / (chip.bandwidth * dev.eff) + layers * dev.layer_s


def prefill_s(k: Counts, w: Weights, prompt: int, chip: Chip, dev: Device, share: float = 1.0) -> float:
    """A prompt: compute-bound (2 FLOP per active parameter per token) or, if longer, one
    read of every weight; `share` of the model on this node."""
    flops = 2 * k.active * prompt * share / (chip.flops * dev.prefill_eff)
    weights = step_bytes(k, w, 0, batch=prompt)  # every weight the prompt's tokens select, no cache yet
    reads = share * (weights["trunk"] + weights["experts"]) / (chip.bandwidth * dev.eff)
    return max(flops, reads) + k.n_layers * dev.layer_s


# ---------------------------------------------------------------- network steps

def hop_s(nbytes: float, link: Link, dev: Device, rdma: bool) -> float:
    """One mx.distributed send: half a round trip, the bytes, the fixed cost."""
    rtt = link.rdma_rtt if rdma and link.rdma_rtt is not None else link.rtt
    return rtt / 2 + nbytes / link.bandwidth + dev.sync_s


def all_sum_s(nbytes: float, n: int, link: Link, dev: Device, rdma: bool) -> float:
    """A ring all-reduce: reduce-scatter + all-gather, 2(n-1) sends of nbytes/n."""
    return 2 * (n - 1) * hop_s(nbytes / n, link, dev, rdma)


def call_s(nbytes_each_way: float, link: Link, dev: Device) -> float:
    """One mlxmoe experts call (signed HTTP): a round trip, both directions' bytes, the software cost."""
    return link.rtt + 2 * (nbytes_each_way + dev.call_extra_bytes) / link.bandwidth + dev.call_s


# ---------------------------------------------------------------- the modes

@dataclass(frozen=True)
class Cluster:
    nodes: int
    chip: Chip
    link: Link
    dev: Device
    rdma: bool = True  # the peers use JACCL where the link has RDMA


def contention(busy: int, c: Cluster) -> float:
    """How much slower each of `busy` nodes computes when fewer can compute at once."""
    return max(1.0, busy / (c.dev.parallel or c.nodes))


def predict_mode(mode: str, k: Counts, w: Weights, c: Cluster, shares: Shares, *, context=1024, prompt=1024,
                 chats=3) -> dict:
    """{decode_s, tok_s, ttft_s, agg_tok_s, bytes_per_token, calls_per_token} of one mode."""
    n, L, dev, link = c.nodes, k.n_layers, c.dev, c.link
    act = k.hidden * dev.act_bytes
    one = step_bytes(k, w, context)["total"]
    if mode in ("pin", "onehop", "split"):
        s = {"pin": 0.0, "onehop": shares.onehop, "split": shares.split}[mode]
        calls = s * k.n_moe_layers
        t = device_s(one, L, c.chip, dev) + calls * call_s(act, link, dev)
        # a prompt: one call per MoE layer to each other group, carrying its share of the tokens
        fan = 0 if mode == "pin" or n == 1 else n - 1
        ttft = prefill_s(k, w, prompt, c.chip, dev) + k.n_moe_layers * fan * call_s(s * prompt * act / fan if fan else 0,
                                                                                  link, dev)
        per_node = math.ceil(chats / n)  # a node steps its streams one token each (no batching)
        agg = chats / (per_node * t * contention(min(n, chats), c))
        wire = calls * (2 * act + dev.call_extra_bytes)
    elif mode == "pipeline":
        # mlx-lm: n-1 sends through the stages, then an all_gather of the last hidden state (n-1 ring steps)
        hops = 2 * (n - 1)
        t = device_s(one, L, c.chip, dev) + hops * hop_s(act, link, dev, c.rdma)
        ttft = prefill_s(k, w, prompt, c.chip, dev) + hops * hop_s(prompt * act, link, dev, c.rdma)
        tb = device_s(step_bytes(k, w, context, chats)["total"], L, c.chip, dev) + hops * hop_s(chats * act, link, dev, c.rdma)
        agg, calls = chats / tb, hops
        wire = (n * n - 1) * act  # n-1 sends + n ranks sending n-1 pieces in the all_gather
    elif mode == "tensor":
        # mlx-lm's shard: every layer's attention and MLP/MoE sharded n ways, two all_sums per layer;
        # the embedding and lm_head stay whole on every rank
        head = qbytes(k.vocab * k.hidden, w.trunk_bits, w.group_size) if w.trunk_bits else k.vocab * k.hidden * w.float_bytes
        crowd = contention(n, c)

        def step(batch, ctx):
            b = step_bytes(k, w, ctx, batch)["total"]
            return crowd * device_s((b - head) / n + head, L, c.chip, dev) + 2 * L * all_sum_s(batch * act, n, link, dev, c.rdma)

        t = step(1, context)
        ttft = crowd * prefill_s(k, w, prompt, c.chip, dev, share=1 / n) + 2 * L * all_sum_s(prompt * act, n, link, dev, c.rdma)
        agg, calls = chats / step(chats, context), 2 * L
        wire = 2 * L * 2 * (n - 1) * act
    else:
        raise MlxMoeError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    return {"mode": mode, "decode_s": t, "tok_s": 1 / t, "ttft_s": ttft, "agg_tok_s": agg,
            "bytes_per_token": wire, "calls_per_token": calls}


def predict(k: Counts, w: Weights, c: Cluster, shares: Shares, modes=MODES, **kw) -> list[dict]:
    return [predict_mode(m, k, w, c, shares, **kw) for m in modes]


def describe(c: Cluster, shares: Shares) -> dict:
    return {"nodes": c.nodes, "chip": asdict(c.chip), "link": asdict(c.link), "device": asdict(c.dev),
            "rdma": c.rdma, "shares": asdict(shares)}


def estimate(k: Counts, nodes: int, chip: str, link: str, w: Weights, shares: Shares | None = None, **kw) -> dict:
    """What `mlxmoe plan --chip --link` adds: the cluster, its constants and one row per mode."""
    shares = shares or default_shares()
    c = Cluster(nodes, parse_chip(chip), parse_link(link), device("apple"))
    return {**describe(c, shares), "chip": chip, "link": link, "rows": predict(k, w, c, shares, **kw)}
