"""The exact peers beside mlxmoe's modes, on one cluster and one model.

Three "hosts" in network namespaces on one bridge (tests/netns.py). At each added
one-way delay (default 0, 0.5, 2 ms; `tc netem` on every bridge port):
  mlx-lm pipeline   mlx-lm's own model, `model.model.pipeline(group)` over
                    mx.distributed's ring backend (a real TCP ring between the hosts)
  mlx-lm tensor     the same with `model.shard(group)` (ranks: the most of 3 that
                    divide the model's heads, KV heads and expert widths)
  mlxmoe pin / onehop / split   three `mlxmoe node`s and `mlxmoe serve` (router on host 0)
Both sides run the same weights: the peers load the bundle's full model quantized as
the bundle is (model/reference.py). Per row:
  tok_s             single-stream greedy decode tokens/s
  ttft_ms           time to the first token of a ~1k-token prompt
  agg_tok_s         3 concurrent chats (the peers: one batch of 3; mlxmoe: 3 chats at once)
  bytes_per_token   every byte the hosts sent through the bridge, per decoded token
  predicted_tok_s   the cost model (bundle/cost.py) with this machine's constants
                    (measured here: see `calibrate`); exact: the peers' greedy tokens
                    equal one process's full model
    sudo python tools/bench_peers.py [--model DIR] [--bundle DIR] [--delays 0,0.5,2]
        [--tokens 32] [--out benchmarks/peers-<date>.json] [--perf-doc docs/PERFORMANCE.md]
The hosts share this machine's cores: absolute figures are of a tiny model on a shared
CPU; compare the rows. Skips (exit 0, a note) without network namespaces."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tools")]
from mlxmoe.bundle.cost import mode_name  # noqa: E402
RING_PORT, N_HOSTS = 5900, 3
EVAL = ROOT / "benchmarks/2026-11-24-cpu-split-onehop-domain-sets29-reference-moe.json"


# --cpu (a CUDA or Metal machine): every process of the run on MLX's CPU device
if os.environ.get("MLXMOE_BENCH_CPU"):
    import mlx.core as _mx
    _mx.set_default_device(_mx.cpu)
NODE_CPU = "import sys, runpy, mlx.core as mx; mx.set_default_device(mx.cpu); sys.argv[0] = 'mlxmoe'; " \
           "runpy.run_module('mlxmoe.cli', run_name='__main__')"


def node_argv(*args: str) -> list[str]:
    if os.environ.get("MLXMOE_BENCH_CPU"):
        return [sys.executable, "-c", NODE_CPU, *args]
    return [sys.executable, "-m", "mlxmoe.cli", *args]


def log(msg: str) -> None:
    print(f"[bench_peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- shared by every process

def hosts_sent_bytes(hosts: str) -> int:
    """Bytes every host has sent onto the segment (tx of each host's interface but lo)."""
    total = 0
    for ns in hosts.split(","):
        out = subprocess.run(["ip", "-n", ns, "-s", "-j", "link", "show"], capture_output=True, text=True, check=True)
        total += sum(d["stats64"]["tx"]["bytes"] for d in json.loads(out.stdout) if d["ifname"] != "lo")
    return total


def load_reference(model_dir: str, bundle: str | None):
    """mlx-lm's own model of the bundle's checkpoint, quantized as the bundle is (bundle
    None: unquantized, float32 on CPU)."""
    from mlxmoe.bundle.manifest import Manifest
    from mlxmoe.model.reference import mlx_lm_model

    return mlx_lm_model(model_dir, Manifest.load(bundle) if bundle else None)


def quantized_for(kind: str, job: dict) -> bool:
    """mlx-lm's shard splits each quantization group whole: experts narrower than two
    groups per rank stay unquantized for tensor parallel (the reference model's 64)."""
    return kind != "tensor" or job["expert_width"] // job["tensor_ranks"] >= 64


def greedy(model, prompts, n: int, on_first=None):
    """Greedy decode of a batch of equal-length prompts: (tokens per prompt, decode seconds)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    tok = mx.argmax(model(mx.array(prompts), cache=cache)[:, -1], axis=-1)
    mx.eval(tok)
    if on_first:
        on_first()
    out, t0 = [tok], time.perf_counter()
    for _ in range(n - 1):
        tok = mx.argmax(model(tok[:, None], cache=cache)[:, -1], axis=-1)
        mx.eval(tok)
        out.append(tok)
    dt = time.perf_counter() - t0
    return mx.stack(out, axis=1).tolist(), dt


def ttft(model, prompt) -> float:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    t0 = time.perf_counter()
    mx.eval(mx.argmax(model(mx.array([prompt]), cache=make_prompt_cache(model))[:, -1], axis=-1))
    return time.perf_counter() - t0


# ---------------------------------------------------------------- calibrate: this machine, one process

def calibrate_main(a) -> None:
    """This machine's cost-model constants from one process (no network): memory
    bandwidth, matmul FLOP/s, and the full model's decode and prefill, which give the
    fixed per-layer cost (the bandwidth efficiency is taken as 1) and the prefill
    efficiency. Also the reference tokens the peers must equal."""
    import mlx.core as mx

    from mlxmoe.bundle import cost
    from mlxmoe.bundle.plan import resolve_counts
    from mlxmoe.node.bench import measure_bandwidth

    job = json.loads(Path(a.job).read_text())
    plain = load_reference(job["model"], None)  # what the tensor peers run when they cannot keep the bundle's bits
    greedy(plain, [job["short"][0]], 4)
    plain_toks, plain_dt = greedy(plain, [job["short"][0]], job["tokens"])
    plain_tokens = plain_toks[0]
    ttft(plain, job["long"][:32])
    plain_ttft = ttft(plain, job["long"])
    del plain
    model = load_reference(job["model"], job["bundle"])
    greedy(model, [job["short"][0]], 4)
    toks, dt = greedy(model, [job["short"][0]], job["tokens"])
    log(f"one process: {(job['tokens'] - 1) / dt:.1f} tok/s")
    ttft(model, job["long"][:32])
    t_long = ttft(model, job["long"])
    log(f"one process: TTFT {t_long * 1e3:.0f} ms")
    bw = measure_bandwidth()
    m = mx.random.normal((1024, 1024))
    mx.eval(m @ m)
    t0 = time.perf_counter()
    for _ in range(10):
        mx.eval(m @ m)
    flops = 10 * 2 * 1024 ** 3 / (time.perf_counter() - t0)
    del model
    # an mlxmoe node of the same bundle runs its own decode path (model/fused.py): its own constants
    from mlxmoe.node.bench import run_decode
    from mlxmoe.node.contract import GenParams
    from mlxmoe.node.engine import Node

    node = Node.load(job["bundle"], 0, verify=False, tokenizer=False)
    gen = lambda p, n: node.generate(None, p, GenParams(max_tokens=n))  # noqa: E731
    run_decode(gen, job["short"][0], 4, 1)
    node_tok_s = run_decode(gen, job["short"][0], job["tokens"], 1)[2]
    node_ttft = run_decode(gen, job["long"], 2, 1)[0]
    log(f"one mlxmoe node: {node_tok_s:.1f} tok/s, TTFT {node_ttft * 1e3:.0f} ms")
    k, _ = resolve_counts(job["model"])
    w = cost.Weights(job["bits"], job["trunk_bits"])
    chip = cost.Chip(bw, flops)

    def fit(t_tok, t_prompt):
        """(layer_s, prefill_eff) from one process's decode step and prompt (bandwidth efficiency 1), weights `w`."""
        layer_s = max(0.0, (t_tok - cost.step_bytes(k, w, len(job["short"][0]))["total"] / bw) / k.n_layers)
        base = cost.Device(eff=1.0, layer_s=layer_s, prefill_eff=1.0)
        pre = cost.prefill_s(k, w, len(job["long"]), chip, base) - k.n_layers * layer_s
        return layer_s, max(1e-3, pre / max(1e-9, t_prompt - k.n_layers * layer_s))

    t_tok = dt / (job["tokens"] - 1)
    (layer_s, prefill_eff), (node_layer_s, node_prefill_eff) = fit(t_tok, t_long), fit(1 / node_tok_s, node_ttft)
    w = cost.Weights(None, None, kv_bits=None, float_bytes=4)
    plain_layer_s, plain_prefill_eff = fit(plain_dt / (job["tokens"] - 1), plain_ttft)
    Path(a.out).write_text(json.dumps({"bandwidth": bw, "flops": flops, "eff": 1.0, "layer_s": layer_s,
                                       "prefill_eff": prefill_eff, "tok_s": 1 / t_tok, "ttft_s": t_long,
                                       "node": {"layer_s": node_layer_s, "prefill_eff": node_prefill_eff,
                                                "tok_s": node_tok_s, "ttft_s": node_ttft},
                                       "unquantized": {"layer_s": plain_layer_s, "prefill_eff": plain_prefill_eff,
                                                       "tok_s": (job["tokens"] - 1) / plain_dt, "ttft_s": plain_ttft},
                                       "tokens": toks[0], "tokens_unquantized": plain_tokens}))


# ---------------------------------------------------------------- peer: one rank of mlx-lm's pipeline / tensor

def peer_main(a) -> None:
    import mlx.core as mx

    job = json.loads(Path(a.job).read_text())
    group = mx.distributed.init(backend="ring", strict=True)
    model = load_reference(job["model"], job["bundle"] if quantized_for(a.kind, job) else None)
    if a.kind == "pipeline":
        model.model.pipeline(group)
    else:
        model.shard(group)
    mx.eval(model.parameters())
    rank, work = group.rank(), Path(a.work)
    ring = None
    if a.kind == "pipeline":  # the experts exchange over mx.distributed (node/remote/ring.py), rank 0 <-> 1
        from mlxmoe.node.remote.peers import Inbox
        from mlxmoe.node.remote.ring import RingGroup, control_addrs, control_sockets

        addrs = control_addrs(os.environ["MLX_HOSTFILE"])
        ring = RingGroup(group, control_sockets(rank, addrs), lambda body: {"y": body["x"]}, Inbox())
    hidden = mx.zeros((1, job["hidden"]), dtype=model.model.norm.weight.dtype)
    greedy(model, [job["short"][0]], 4)  # warm-up: first compiles, connections
    for i, delay in enumerate(job["delays"]):
        go = work / f"{a.kind}-go-{i}"
        while not go.exists():
            time.sleep(0.05)
        mx.eval(mx.distributed.all_sum(mx.ones(1), group=group))  # every rank starts together
        for _ in range(3):
            mx.eval(mx.distributed.all_sum(hidden, group=group))
        t0 = time.perf_counter()
        for _ in range(20):
            mx.eval(mx.distributed.all_sum(hidden, group=group))
        all_sum_s = (time.perf_counter() - t0) / 20
        ring_ms = ring_call_ms(ring, rank, hidden) if ring is not None else None
        marks = {}
        toks, dt = greedy(model, [job["short"][0]], job["tokens"], on_first=lambda: marks.update(b0=hosts_sent_bytes(a.hosts)))
        sent = hosts_sent_bytes(a.hosts) - marks["b0"]
        t_long = ttft(model, job["long"])
        agg_toks, agg_dt = greedy(model, job["short"], job["tokens"])
        if rank == 0:
            row = {"tok_s": (job["tokens"] - 1) / dt, "ttft_ms": 1e3 * t_long,
                   "agg_tok_s": len(job["short"]) * (job["tokens"] - 1) / agg_dt,
                   "bytes_per_token": sent / (job["tokens"] - 1), "all_sum_ms": 1e3 * all_sum_s,
                   "ring_experts_call_ms": ring_ms,
                   "ranks": group.size(), "tokens": toks[0], "quantized": quantized_for(a.kind, job)}
            (work / f"{a.kind}-result-{i}.json").write_text(json.dumps(row))


def ring_call_ms(ring, rank: int, hidden, n: int = 30):
    """Median round trip of an experts call over the ring transport, rank 0 to rank 1
    (the answer is the input: the transport alone, without the experts' compute)."""
    from mlxmoe import wire

    body, times = {"layer": 0, "x": wire.encode_tensor(hidden)}, []
    if rank == 0:
        link = ring.link(1)
        for _ in range(n + 3):
            t0 = time.perf_counter()
            link.call("experts", body)
            times.append(time.perf_counter() - t0)
    elif rank == 1:  # serve them (the engine's inbox, as a node's worker does when idle)
        target, deadline = ring.served + n + 3, time.monotonic() + 120
        while ring.served < target and time.monotonic() < deadline:
            select.select([ring.inbox], [], [], 0.5)
            ring.inbox.drain()
    return 1e3 * statistics.median(times[3:]) if times else None


# ---------------------------------------------------------------- mlxmoe client (router's host)

async def _timed_turn(http, url, text, headers, max_tokens):
    from bench_mobility import _turn

    # temperature 0: placed deterministically, so the same prompt lands on the same node every time
    return await _turn(http, url, [{"role": "user", "content": text}], headers, max_tokens, {"temperature": 0})


async def mlxmoe_mode(url: str, mode: str, job: dict, hosts: str, tag: str) -> dict:
    import aiohttp

    n = job["tokens"]
    hdr = lambda i: {"X-Session-Id": f"{tag}-{mode}-{i}", "X-Mlxmoe-Mode": mode}  # noqa: E731
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        await _timed_turn(http, url, job["short_text"][0], hdr("warm"), 4)
        # bytes per decoded token: a long and a short turn of the same prompt, differenced (the prompt cancels)
        b0 = hosts_sent_bytes(hosts)
        short = await _timed_turn(http, url, job["short_text"][0], hdr("s"), 8)
        b1 = hosts_sent_bytes(hosts)
        single = await _timed_turn(http, url, job["short_text"][0], hdr("l"), n)
        b2 = hosts_sent_bytes(hosts)
        long = await _timed_turn(http, url, job["long_text"], hdr("ttft"), 2)
        agg = await asyncio.gather(*(_timed_turn(http, url, t, hdr(f"c{i}"), n) for i, t in enumerate(job["short_text"])))
    per_tok = ((b2 - b1) - (b1 - b0)) / max(1, single["tokens"] - short["tokens"])
    return {"tok_s": single["tok_s"], "ttft_ms": 1e3 * long["ttft"],
            "agg_tok_s": sum(r["tok_s"] or 0 for r in agg), "bytes_per_token": max(0.0, per_tok)}


def experts_call_ms(node_url: str, key_file: str, mh: str, layer: int, hidden: int, n: int = 30) -> float:
    """Median round trip of one signed `experts` call (one token's hidden state) to a
    node, over mutual TLS as nodes call each other."""
    import mlx.core as mx

    from mlxmoe import wire
    from mlxmoe.cluster import keys, tls
    from mlxmoe.node.remote.peers import PeerLink

    ident = tls.ensure_identity(Path(key_file).parent, "bench-client", [])
    link = PeerLink(node_url, keys.load_key(key_file), mh, context=tls.client_context(ident))
    x = wire.encode_tensor(mx.zeros((1, hidden), dtype=mx.bfloat16))
    times = []
    for _ in range(n + 3):
        t0 = time.perf_counter()
        link.call("experts", {"layer": layer, "x": x})
        times.append(time.perf_counter() - t0)
    link.close()
    return 1e3 * statistics.median(times[3:])


def client_main(a) -> None:
    from bench_mobility import wait_up

    job = json.loads(Path(a.job).read_text())
    wait_up(a.url, N_HOSTS, 180)
    call_ms = experts_call_ms(a.node_url, job["key"], job["manifest_hash"],
                              job["moe_layer"], job["hidden"])
    print(json.dumps({"experts_call_ms": call_ms}), flush=True)
    for mode in a.modes.split(","):
        print(json.dumps({"mode": mode, **asyncio.run(mlxmoe_mode(a.url, mode, job, a.hosts, a.tag))}), flush=True)


# ---------------------------------------------------------------- orchestration (root)

def tensor_ranks(cfg: dict, most: int) -> int:
    """The most ranks (≤ most) that mlx-lm's shard can split this model's heads and widths into."""
    dims = [cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
            cfg.get("moe_intermediate_size", cfg.get("intermediate_size")), cfg.get("intermediate_size", 0) or 0]
    return next(n for n in range(most, 0, -1) if all(d % n == 0 for d in dims))


def make_job(a, bundle: str, key: Path) -> dict:
    from tokenizers import Tokenizer

    from mlxmoe.bundle.manifest import Manifest
    from mlxmoe.quality.suites import load_suites

    m = Manifest.load(bundle)
    tk = Tokenizer.from_file(str(Path(bundle) / "tokenizer.json"))
    _, passages = load_suites(("builtin",), "heldout")
    texts = [p.text.strip() for p in passages]
    short_ids = [tk.encode(t).ids[:16] for t in texts[:N_HOSTS * 4:4]]
    long_text = ""
    for t in texts:
        if len(tk.encode(long_text).ids) >= a.prompt_tokens:
            break
        long_text += t + "\n\n"
    long_ids = tk.encode(long_text).ids[:a.prompt_tokens]
    cfg = m.model["config"]
    q = m.quantization
    return {"model": a.model, "bundle": bundle, "tokens": a.tokens, "delays": a.delays, "hidden": cfg["hidden_size"],
            "short": short_ids, "short_text": [tk.decode(s) for s in short_ids], "long": long_ids,
            "long_text": tk.decode(long_ids), "key": str(key), "manifest_hash": m.hash, "moe_layer": m.moe_layers[0],
            "bits": (q.get("experts") or {}).get("bits"), "trunk_bits": (q.get("trunk") or {}).get("bits"),
            "tensor_ranks": tensor_ranks(cfg, N_HOSTS),
            "expert_width": cfg.get("moe_intermediate_size") or cfg["intermediate_size"]}


def set_delay(lab, d: float) -> None:
    """One-way +d between any two hosts (round trip +2d): netem on every bridge port, or the userspace switch."""
    if hasattr(lab, "set_delay"):
        return lab.set_delay(d)
    for i in range(len(lab.hosts)):
        subprocess.run(["ip", "netns", "exec", lab.hub, "tc", "qdisc", "replace", "dev", f"v{i}", "root", "netem",
                        "delay", f"{d}ms"], check=True)


def make_lab(tmp: Path):
    """NetnsLab with netem where the kernel has it, else the same hosts on tools/tap_switch.py."""
    import netns
    from bench_mobility import netem_available
    from tap_switch import TapLab

    prefix = f"mlxp{os.getpid()}"
    if netem_available()[0]:
        return netns.NetnsLab(N_HOSTS, tmp / "logs", prefix=prefix), "tc netem on a Linux bridge"
    return TapLab(N_HOSTS, tmp / "logs", tmp / "delay_ms", prefix=prefix), "userspace TAP switch (no sch_netem)"


def run_peers(lab, kind: str, job_path: Path, job: dict, work: Path) -> list[dict]:
    n = job["tensor_ranks"] if kind == "tensor" else N_HOSTS
    hostfile = work / f"{kind}-hosts.json"
    hostfile.write_text(json.dumps([f"{lab.ips[r]}:{RING_PORT}" for r in range(n)]))
    procs = [lab.spawn(r, [sys.executable, __file__, "peer", "--kind", kind, "--job", str(job_path), "--work", str(work),
                           "--hosts", ",".join(lab.hosts)], f"{kind}-{r}.log", env={"MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile),
                                                                      "PYTHONPATH": str(ROOT)})
             for r in range(n)]
    rows = []
    for i, d in enumerate(job["delays"]):
        set_delay(lab, d)
        (work / f"{kind}-go-{i}").write_text(str(d))
        res = work / f"{kind}-result-{i}.json"
        deadline = time.time() + 300
        while not res.exists():
            if any(p.poll() is not None for p in procs) or time.time() > deadline:
                raise SystemExit(f"{kind} peers failed:\n" + "\n".join(lab.log(f"{kind}-{r}.log")[-2000:] for r in range(n)))
            time.sleep(0.1)
        time.sleep(0.1)
        rows.append({"system": mode_name(kind), "delay_ms": d, **json.loads(res.read_text())})
        log(f"{rows[-1]['system']} at {d} ms: {rows[-1]['tok_s']:.1f} tok/s")
    for p in procs:
        p.wait(60)
    return rows


def run_mlxmoe(lab, a, bundle: str, key: Path, job_path: Path, job: dict, tmp: Path,
               ring: bool = False) -> tuple[list[dict], list[dict]]:
    """mlxmoe's modes on three nodes and a router; ring: the nodes joined by `--ring` (experts calls on mx.distributed)."""
    from bench_mobility import PORT_NODE, start_router, stop, write_conf

    extra, tag = [], ""
    if ring:
        hostfile = tmp / "nodes-ring.json"
        hostfile.write_text(json.dumps([f"{lab.ips[g]}:{RING_PORT + 50}" for g in range(N_HOSTS)]))
        extra, tag = ["--ring", str(hostfile)], " (ring)"
    nodes = []
    for g in range(N_HOSTS):
        ip = lab.ips[g]
        nodes.append(lab.spawn(g, node_argv("node", bundle, "--group", str(g), "--host", ip, "--port", str(PORT_NODE),
                                            "--key", str(key), "--interface", ip, *extra),
                               f"node{g}{tag.strip(' ()')}.log", env={"PYTHONPATH": str(ROOT)}))
    conf = tmp / "router.toml"
    write_conf(conf, [])
    router = start_router(lab, bundle, str(key), conf, mdns=True)
    url = f"http://{lab.ips[0]}:8000"
    rows, calls = [], []
    try:
        for d in job["delays"]:
            set_delay(lab, d)
            modes = ",".join(m for m in a.modes.split(",") if m != "pin") if ring else a.modes
            r = lab.run(0, [sys.executable, __file__, "client", "--url", url, "--job", str(job_path), "--modes", modes,
                            "--hosts", ",".join(lab.hosts), "--tag", f"d{d}", "--node-url", f"https://{lab.ips[1]}:{PORT_NODE}"],
                        timeout=600)
            if r.returncode:
                raise SystemExit(f"client failed: {r.stdout}\n{r.stderr}\n" + "\n".join(
                    f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(lab.logdir.glob("node*.log"))))
            for x in (json.loads(s) for s in r.stdout.splitlines() if s.startswith("{")):
                if "experts_call_ms" in x:
                    calls.append({"delay_ms": d, "transport": "http", **x})
                else:
                    rows.append({"system": mode_name(x.pop("mode")) + tag, "delay_ms": d, **x})
                    log(f"{rows[-1]['system']} at {d} ms: {rows[-1]['tok_s']:.1f} tok/s")
    finally:
        stop(router)
        for p in nodes:
            stop(p)
    return rows, calls


def run_summary(job: dict) -> dict:
    """What the predictions need of a run (kept in the JSON, so --from-json can redo them)."""
    return {"model": job["model"], "bits": job["bits"], "trunk_bits": job["trunk_bits"], "delays": job["delays"],
            "context": len(job["short"][0]) + job["tokens"], "prompt": len(job["long"]), "chats": len(job["short"])}


def predictions(rows: list[dict], job: dict, cal: dict, calls: list[dict]) -> dict:
    """predicted_* per row from the cost model with this machine's constants, measured
    apart from the rows: each code path's device from one process (`calibrate`: mlx-lm's
    model for the peers, an mlxmoe node for pin/onehop/split), the ring's fixed cost per
    send and the HTTP call's fixed cost from their microbenchmarks at the first delay."""
    from dataclasses import asdict, replace

    from mlxmoe.bundle import cost
    from mlxmoe.bundle.plan import resolve_counts

    k, _ = resolve_counts(job["model"])
    first = min(job["delays"])
    zero = {r["system"]: r for r in rows if r["delay_ms"] == first and "all_sum_ms" in r}
    ranks = {name: r["ranks"] for name, r in zero.items()}
    # each peer system's own ring: one all_sum of a hidden state on n ranks = 2(n-1) sends
    sync = {name: r["all_sum_ms"] / 1e3 / (2 * (r["ranks"] - 1)) for name, r in zero.items()}
    call_ms = min((c["experts_call_ms"] for c in calls if c["delay_ms"] == first), default=1.0)
    peer = cost.Device(eff=cal["eff"], layer_s=cal["layer_s"], call_s=call_ms / 1e3, prefill_eff=cal["prefill_eff"],
                       parallel=os.cpu_count())
    node = replace(peer, layer_s=cal["node"]["layer_s"], prefill_eff=cal["node"]["prefill_eff"])
    chip = cost.Chip(cal["bandwidth"], cal["flops"])
    shares = cost.shares_from_eval(str(EVAL.relative_to(ROOT)))
    quantized, plain = cost.Weights(job["bits"], job["trunk_bits"]), cost.Weights(None, None, kv_bits=None, float_bytes=4)
    # a ring call: the transport's round trip (measured between two peer ranks) + one layer step on the node
    ring_ms = next((r["ring_experts_call_ms"] for r in zero.values() if r.get("ring_experts_call_ms")), None)
    ring_node = replace(node, call_s=(ring_ms or 0) / 1e3 + node.layer_s, call_extra_bytes=0)
    for r in rows:
        ringed = r["system"].endswith(" (ring)")
        mode, q = r["system"].removesuffix(" (ring)").split()[-1], r.get("quantized", True)
        dev = (ring_node if ringed else node) if r["system"].startswith("mlxmoe") else replace(peer, sync_s=sync[r["system"]])
        if not q:  # float32 weights and activations, timed in one process by `calibrate` where it could
            plain_fit = {f: cal["unquantized"][f] for f in ("layer_s", "prefill_eff")} if "unquantized" in cal else {}
            dev = replace(dev, act_bytes=4, **plain_fit)
        c = cost.Cluster(ranks.get(r["system"], N_HOSTS), chip, cost.Link(2 * r["delay_ms"] / 1e3, 10e9 / 8), dev,
                         rdma=False)
        p = cost.predict_mode(mode, k, quantized if q else plain, c, shares, context=job["context"], prompt=job["prompt"],
                              chats=job["chats"])
        r.update(predicted_tok_s=p["tok_s"], predicted_ttft_ms=1e3 * p["ttft_s"], predicted_agg_tok_s=p["agg_tok_s"],
                 predicted_bytes_per_token=p["bytes_per_token"], error=p["tok_s"] / r["tok_s"] - 1)
    return {"peers_device": asdict(peer), "sync_s": sync, "node_device": asdict(node),
            "ring_node_device": asdict(ring_node), "chip": asdict(chip),
            "shares": asdict(shares)}


def table(rows: list[dict], prompt: int) -> str:
    out = [f"| system | one-way delay | tok/s | predicted | TTFT {prompt}-token prompt | predicted | 3 chats tok/s "
           "| predicted | bytes/token | quality |", "|" + " --- |" * 10]
    for r in rows:
        q = r["quality"]
        qual = ("exact" if r["exact"] else "NOT exact") if r["exact"] is not None else \
            f"ppl ×{q['ppl_ratio']:.2f}, agreement {q['agreement']:.2f}"
        out.append(f"| {r['system']}{' (%d ranks)' % r['ranks'] if 'ranks' in r else ''} | {r['delay_ms']:g} ms "
                   f"| {r['tok_s']:.1f} | {r['predicted_tok_s']:.1f} ({r['error']:+.0%}) | {r['ttft_ms']:.0f} ms "
                   f"| {r['predicted_ttft_ms']:.0f} ms | {r['agg_tok_s']:.1f} | {r['predicted_agg_tok_s']:.1f} "
                   f"| {r['bytes_per_token']:.0f} | {qual} |")
    return "\n".join(out)


def exchange_table(rows: list[dict], calls: list[dict]) -> str:
    """Per delay: one experts call over HTTP (a node, its experts computed) and over the
    ring transport (the transport alone), and one ring all_sum of a hidden state."""
    out = ["| one-way delay | HTTP experts call (TLS, signed) | ring experts call (transport only) "
           "| ring all_sum, 3 ranks |", "|" + " --- |" * 4]
    for d in sorted({r["delay_ms"] for r in rows}):
        http = next((c["experts_call_ms"] for c in calls if c["delay_ms"] == d), None)
        pipe = next((r for r in rows if r["delay_ms"] == d and r["system"] == "mlx-lm pipeline"), {})
        cell = lambda v: "–" if v is None else f"{v:.2f} ms"  # noqa: E731
        out.append(f"| {d:g} ms | {cell(http)} | {cell(pipe.get('ring_experts_call_ms'))} | {cell(pipe.get('all_sum_ms'))} |")
    return "\n".join(out)


def quality_of(system: str):
    """Peers: exact by construction (checked: their tokens equal one process's). mlxmoe: the eval report."""
    rep = json.loads(EVAL.read_text())
    mode = system.removesuffix(" (ring)").split()[-1]
    if mode in ("onehop", "split"):
        return {"ppl_ratio": rep[mode]["mean"]["ppl_ratio"], "agreement": rep[mode]["mean"]["agreement"]}
    if mode == "pin":
        r = next(x for x in rep["results"] if x["placement"] == "first")
        return {"ppl_ratio": r["mean"]["ppl_ratio"], "agreement": r["mean"]["agreement"]}
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    p = sub.add_parser("peer")
    for k in ("--kind", "--job", "--work", "--hosts"):
        p.add_argument(k, required=True)
    c = sub.add_parser("client")
    for k in ("--url", "--job", "--modes", "--hosts", "--tag", "--node-url"):
        c.add_argument(k, required=True)
    cb = sub.add_parser("calibrate")
    cb.add_argument("--job", required=True)
    cb.add_argument("--out", required=True)
    ap.add_argument("--model", default=None, help="an HF checkpoint directory (default: the bundled reference model)")
    ap.add_argument("--bundle", default=None, help="its 3-group bundle (default: split it here, 8-bit)")
    ap.add_argument("--delays", default="0,0.5,2")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--modes", default="pin,onehop,split")
    ap.add_argument("--systems", default="pipeline,tensor,mlxmoe,ring")
    ap.add_argument("--out", default=None)
    ap.add_argument("--perf-doc", default=None, help="write the table into this markdown file's peers markers")
    ap.add_argument("--cpu", action="store_true", help="run every process on MLX's CPU device (a CUDA/Metal machine)")
    ap.add_argument("--from-json", default=None, help="redo the predictions and tables of a saved run (no measuring)")
    a = ap.parse_args()
    if a.from_json:
        d = json.loads(Path(a.from_json).read_text())
        return finish(a, d["meta"], d["rows"])
    if a.cpu:
        os.environ["MLXMOE_BENCH_CPU"] = "1"  # inherited by every process the run starts
    if a.cmd == "peer":
        return peer_main(a)
    if a.cmd == "client":
        return client_main(a)
    if a.cmd == "calibrate":
        return calibrate_main(a)
    import netns

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run still takes its namespaces down
    ok, why = netns.available()
    if not ok:
        print(json.dumps({"skipped": f"network namespaces: {why}"}))
        return
    a.delays = [float(x) for x in a.delays.split(",")]
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="mlxmoe-bench-peers-") as tmp:
        tmp = Path(tmp)
        from mlxmoe.cluster.keys import create_key
        from mlxmoe.cluster.tls import create_ca
        from mlxmoe.ui.demo import REFERENCE, ensure_bundle

        a.model = str(Path(a.model or REFERENCE).resolve())
        if a.bundle is None:
            if a.model == str(REFERENCE.resolve()):
                a.bundle = str(ensure_bundle(tmp, N_HOSTS, quiet=True))
            else:
                from mlxmoe.bundle.split import split
                split(a.model, tmp / "bundle", N_HOSTS, bits=8, group_size=64, trunk_bits=8, kv_bits=8)
                a.bundle = str(tmp / "bundle")
        key = create_key(tmp / "cluster.key")
        create_ca(tmp)  # nodes and router talk mutual TLS, as `mlxmoe init` sets them up
        job = make_job(a, a.bundle, key)
        job_path = tmp / "job.json"
        job_path.write_text(json.dumps(job))
        log("calibrating this machine (one process)")
        subprocess.run([sys.executable, __file__, "calibrate", "--job", str(job_path), "--out", str(tmp / "cal.json")],
                       check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        cal = json.loads((tmp / "cal.json").read_text())
        log(f"calibration: {json.dumps({k: v for k, v in cal.items() if k != 'tokens'})}")
        rows, calls = [], []
        lab, via = make_lab(tmp)
        with lab:
            for kind in ("pipeline", "tensor"):
                if kind in a.systems:
                    log(f"mlx-lm {kind}")
                    rows += run_peers(lab, kind, job_path, job, tmp)
            if "mlxmoe" in a.systems:
                log("mlxmoe nodes + router")
                more, calls = run_mlxmoe(lab, a, a.bundle, key, job_path, job, tmp)
                rows += more
            if "ring" in a.systems:
                log("mlxmoe nodes joined by --ring + router")
                try:
                    rows += run_mlxmoe(lab, a, a.bundle, key, job_path, job, tmp, ring=True)[0]
                except SystemExit as e:  # keep what the other systems measured
                    log(f"the ring pass failed: {str(e)[-3000:]}")
        for r in rows:
            toks = r.pop("tokens", None)
            ref = cal["tokens"] if r.get("quantized", True) else cal["tokens_unquantized"]
            r["exact"] = (toks == ref) if toks is not None else None
            r["quality"] = quality_of(r["system"])
    import mlx.core as mx
    meta = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "tool": "tools/bench_peers.py",
            "machine": f"{platform.machine()}, {os.cpu_count()} cores shared by {N_HOSTS} namespace hosts, "
                       f"mlx {mx.__version__} ({mx.default_device()})",
            "delay_via": via, "model": a.model, "bundle_bits": [job["bits"], job["trunk_bits"]], "tokens": a.tokens,
            "prompt_tokens": len(job["long"]), "chats": len(job["short"]), "seconds": round(time.time() - t_start, 1),
            "run": run_summary(job), "calibration": {k: v for k, v in cal.items() if k != "tokens"},
            "experts_call": calls}
    finish(a, meta, rows)


def finish(a, meta: dict, rows: list[dict]) -> None:
    """Predictions, tables, the JSON, this machine's constants in assets/cost.json, the doc tables."""
    meta["cost_model"] = predictions(rows, meta["run"], meta["calibration"], meta["experts_call"])
    t, x = table(rows, meta["run"]["prompt"]), exchange_table(rows, meta["experts_call"])
    print(t)
    if a.out:  # this machine's node constants, for `plan`-style predictions of the netns cluster
        from mlxmoe.bundle import cost
        c = cost.calibration()
        c["devices"]["cpu-netns"] = {k: v for k, v in meta["cost_model"]["node_device"].items() if k != "parallel"}
        cost.CALIBRATION.write_text(json.dumps(c, indent=1) + "\n")
        Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows, "table": t, "exchange_table": x}, indent=1) + "\n")
    if a.perf_doc:
        from markers import write_between
        write_between(Path(a.perf_doc), "peers table", t)
        write_between(Path(a.perf_doc), "exchange table", x)


if __name__ == "__main__":
    main()
