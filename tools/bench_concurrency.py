"""Concurrency benchmark (issue 19): streaming chats at once against an mlxmoe node behind the
router and against `mlx_lm.server`, same model, same machine, one run.

Every server is a real process on loopback, reached only over HTTP through the OpenAI streaming
chat endpoint with the same body (max_tokens, temperature 0, no seed so mlx-lm batches, the model's
special tokens biased away so no answer ends early). Rows: per server and number of concurrent
streams, aggregate tok/s (all tokens over the wall time from the first request sent to the last token
received), p50 / p95 inter-token latency (gaps between consecutive content chunks of one stream,
pooled over streams) and TTFT (median over streams). Then, one chat at a time: TTFT of fresh prompts of
about --prefill-tokens tokens (prefill speed), and of two chats that share a --shared-prefix-token system
prompt, the second after the first (the cross-session prefix cache: node/prefixes.py; mlx_lm.server has its
own LRU prompt cache).

    python tools/bench_concurrency.py --synthesize qwen3-30b-a3b:12:4 --out benchmarks/   # GPU
    python tools/bench_concurrency.py --model-dir mlxmoe/assets/reference-moe --streams 1,2,4   # CPU
    python tools/bench_concurrency.py --table benchmarks/concurrency-2026-12-02-h200.json

A synthesized model gets a tokenizer written here: byte-level BPE over printable ASCII plus one
word-like token for every other id of the model's vocabulary, so each token is text of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BASE_BYTES = [10, *range(32, 127)]  # newline and printable ASCII: the tokenizer's base alphabet
CHAT_TEMPLATE = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] "
                 "+ '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
                 "{%- endif %}")
# runs mlx_lm.server in a child that also stops when the benchmark dies (ui/demo.py's watchdog)
MLX_LM_BOOT = ("from mlxmoe.children import watch_parent; watch_parent(); import sys, runpy; "
               "sys.argv[0] = 'mlx_lm.server'; runpy.run_module('mlx_lm.server', run_name='__main__')")


def log(msg: str) -> None:
    print(f"[concurrency {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- measurements (pure)

@dataclass
class StreamResult:
    """One streamed chat: when it was sent, when each content chunk came, how many tokens."""
    sent: float
    chunks: list[float] = field(default_factory=list)
    tokens: int = 0  # usage.completion_tokens, else the number of content chunks
    prompt_tokens: int | None = None  # usage.prompt_tokens
    retries: int = 0  # 503s before it started (see one_stream)


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default)."""
    if not xs:
        return math.nan
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def inter_token_gaps(r: StreamResult) -> list[float]:
    return [b - a for a, b in zip(r.chunks, r.chunks[1:])]


def make_row(server: str, results: list[StreamResult]) -> dict:
    """The issue's row for one server at len(results) concurrent streams (times in ms)."""
    start = min(r.sent for r in results)
    end = max((r.chunks[-1] for r in results if r.chunks), default=start)
    total = sum(r.tokens for r in results)
    gaps = [g for r in results for g in inter_token_gaps(r)]
    ttfts = [r.chunks[0] - r.sent for r in results if r.chunks]
    return {"server": server, "streams": len(results),
            "agg_tok_s": round(total / (end - start), 2) if end > start else 0.0,
            "p50_itl_ms": round(1e3 * percentile(gaps, 50), 2) if gaps else None,
            "p95_itl_ms": round(1e3 * percentile(gaps, 95), 2) if gaps else None,
            "ttft_ms": round(1e3 * statistics.median(ttfts), 2) if ttfts else None,
            "tokens": total, "tokens_per_stream": sorted({r.tokens for r in results}),
            "retries": sum(r.retries for r in results)}


def machine_slug(gpu_list: str, device_name: str | None) -> str:
    """A short machine name for file names: the GPU model from `nvidia-smi -L` ("h200"), an Apple
    chip ("apple-m2-max"), else "cpu"."""
    m = re.search(r"GPU \d+: (?:NVIDIA )?([^(]+?)\s*(?:\(|$)", gpu_list or "", re.M)
    name = m.group(1) if m else device_name
    if not name:
        return "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    slug = re.sub(r"-(sxm|pcie|nvl)\d*.*$", "", slug)  # "h100-80gb-hbm3" stays, "h200-nvl" -> "h200"
    return slug or "gpu"


def default_machine() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    device = None
    if not out:
        import mlx.core as mx
        if mx.default_device() != mx.cpu:
            device = mx.device_info().get("device_name", "gpu")
    return machine_slug(out, device)


def table(doc: dict) -> str:
    """Markdown for docs/PERFORMANCE.md from a benchmark file: one line per server and streams,
    with the aggregate against that server's single-stream figure."""
    rows = doc["rows"]
    single = {r["server"]: r["agg_tok_s"] for r in rows if r["streams"] == 1}
    lines = ["| server | streams | aggregate tok/s | vs 1 stream | p50 ITL ms | p95 ITL ms | TTFT ms |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(rows, key=lambda r: (r["server"], r["streams"])):
        base = single.get(r["server"])
        ratio = f"{r['agg_tok_s'] / base:.2f}x" if base else "-"
        lines.append(f"| {r['server']} | {r['streams']} | {r['agg_tok_s']:.1f} | {ratio} | {_ms(r['p50_itl_ms'])} | "
                     f"{_ms(r['p95_itl_ms'])} | {_ms(r['ttft_ms'])} |")
    meta = doc.get("meta", {})
    lines += [""] + [f"- {t}" for t in targets(rows)]
    if doc.get("prefill"):
        lines += ["", "| server | one chat | prompt tokens | TTFT ms | vs the first chat |", "| --- | --- | ---: | ---: | ---: |"]
        lines += [f"| {r['server']} | {r['kind']} | {r['prompt_tokens']} | {_ms(r['ttft_ms'])} | "
                  f"{r['vs_first']:.2f}x |" if "vs_first" in r else
                  f"| {r['server']} | {r['kind']} | {r['prompt_tokens']} | {_ms(r['ttft_ms'])} | |" for r in doc["prefill"]]
    note = ", ".join(f"{k} {meta[k]}" for k in ("model", "layers", "bits", "tokens", "device", "date") if k in meta)
    return "\n".join(lines) + (f"\n\n{doc['machine']}: {note}." if note else "")


def targets(rows: list[dict]) -> list[str]:
    """Issue 19's GPU targets, checked for every mlxmoe server: aggregate at 8 streams >= 3x one
    stream and >= mlx_lm.server's at every concurrency; p50 ITL at 4 streams <= 1.5x one stream."""
    at = {(r["server"], r["streams"]): r for r in rows}
    out = []
    for name in sorted({r["server"] for r in rows if r["server"].startswith("mlxmoe")}):
        one, eight, four = at.get((name, 1)), at.get((name, 8)), at.get((name, 4))
        if one and eight:
            x = eight["agg_tok_s"] / one["agg_tok_s"]
            out.append(f"{name}: 8 streams {x:.2f}x one stream (target 3x): {'met' if x >= 3 else 'not met'}")
        if one and four and one["p50_itl_ms"] and four["p50_itl_ms"]:
            x = four["p50_itl_ms"] / one["p50_itl_ms"]
            out.append(f"{name}: p50 ITL at 4 streams {x:.2f}x one stream (target <= 1.5x): "
                       f"{'met' if x <= 1.5 else 'not met'}")
        behind = [n for (srv, n), r in at.items() if srv == "mlx_lm.server" and (name, n) in at
                  and at[(name, n)]["agg_tok_s"] < r["agg_tok_s"]]
        if any(srv == "mlx_lm.server" for srv, _ in at):
            out.append(f"{name}: aggregate >= mlx_lm.server's at every concurrency: "
                       + ("met" if not behind else f"not met at {', '.join(map(str, sorted(behind)))} streams"))
    return out


def _ms(v) -> str:
    return "-" if v is None else f"{v:.1f}"


# ---------------------------------------------------------------- the model directory

def ascii_tokenizer(vocab_size: int) -> dict:
    """tokenizer.json: byte-level BPE whose base tokens are printable ASCII, space and newline
    (prompts encode one character a token), one " w<letters>" token for every further id below
    the specials, and the ChatML specials as the last three ids: every id decodes to whole text."""
    byte_char = dict(enumerate(_bytes_to_unicode()))
    base = [byte_char[b] for b in BASE_BYTES]
    vocab = {c: i for i, c in enumerate(base)}
    for i in range(len(base), vocab_size - len(SPECIALS)):
        vocab[byte_char[32] + "w" + _letters(i)] = i
    added = [{"id": vocab_size - len(SPECIALS) + j, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for j, s in enumerate(SPECIALS)]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": []}}


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (what ByteLevel uses)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def _letters(i: int) -> str:
    s = ""
    while True:
        i, r = divmod(i, 26)
        s = chr(97 + r) + s
        if i == 0:
            return s


def add_tokenizer(model_dir: Path) -> list[int]:
    """Write the tokenizer, its config and a generation config into a synthesized model directory;
    returns the special token ids (biased away in every request)."""
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    n = cfg["vocab_size"]
    ids = [n - len(SPECIALS) + j for j in range(len(SPECIALS))]
    (model_dir / "tokenizer.json").write_text(json.dumps(ascii_tokenizer(n)))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": SPECIALS[2], "pad_token": SPECIALS[0],
        "bos_token": None, "unk_token": None, "additional_special_tokens": SPECIALS[1:], "model_max_length": 40960,
        "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}))
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [ids[2], ids[0]]}))
    cfg_path.write_text(json.dumps({**cfg, "eos_token_id": ids[2]}, indent=2))
    return ids


def special_ids(model_dir: Path) -> list[int]:
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    return [t["id"] for t in tok.get("added_tokens", []) if t.get("special")]


def prepare_model(spec: str, work: Path) -> Path:
    """--synthesize PRESET:LAYERS:BITS -> a random-weight mlx directory with a tokenizer (cached)."""
    from mlxmoe.node.bench import synthesize

    preset, layers, bits = spec.split(":")
    out = work / f"src-{preset}-{layers}l-{bits}b"
    if (out / "tokenizer.json").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    log(f"synthesizing {preset} with {layers} layers, {bits}-bit")
    synthesize(preset, int(layers), int(bits), out)
    add_tokenizer(out)
    return out


def quantized_copy(model_dir: Path, work: Path, bits: int = 4) -> Path:
    """An unquantized checkpoint (e.g. the bundled reference model) as mlx-lm's own 4-bit conversion,
    which both servers load (on CPU mlx-lm's MoE runs quantized or float32 experts only)."""
    if "quantization" in json.loads((model_dir / "config.json").read_text()):
        return model_dir
    out = work / f"q{bits}-{model_dir.name}"
    if not (out / "config.json").exists():
        from mlx_lm.convert import convert

        shutil.rmtree(out, ignore_errors=True)
        log(f"quantizing {model_dir} to {bits}-bit with mlx-lm")
        convert(str(model_dir), str(out), quantize=True, q_bits=bits, q_group_size=64)
    return out


def prepare_bundle(model_dir: Path, n_groups: int, work: Path) -> Path:
    from mlxmoe.bundle.split import split

    out = work / f"bundle-{model_dir.name}-{n_groups}g"
    if not (out / "distribution.json").exists():
        log(f"splitting into {n_groups} group(s)")
        split(str(model_dir), out, n_groups, force=True)
    return out


# ---------------------------------------------------------------- servers

@dataclass
class Server:
    name: str
    url: str
    procs: list
    meta: dict


def start_servers(a, model_dir: Path, work: Path, children) -> list[Server]:
    """Every server at once (each loads and JIT-compiles in parallel); measured one at a time."""
    from mlxmoe.ui.demo import ensure_key, free_port

    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    servers = []
    if not a.skip_mlx_lm:
        port = free_port()
        p = children.start(["--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port)],
                           logs / "mlx_lm.server.log", boot=MLX_LM_BOOT)
        servers.append(Server("mlx_lm.server", f"http://127.0.0.1:{port}", [p], {"kv_bits": None}))
    key = ensure_key(work) if a.groups else None
    for spec in a.groups:
        n = 1 if spec == "all" else int(spec)
        g = 0 if spec == "all" else a.group
        bundle = prepare_bundle(model_dir, n, work)
        node_port, port = free_port(), free_port()
        peers = work / f"peers-{n}g.toml"
        peers.write_text(f'[[peers]]\nurl = "https://127.0.0.1:{node_port}"\n')
        tag = f"{n}g-group{g}"
        node = children.start(["node", str(bundle), "--group", str(g), "--host", "127.0.0.1", "--port", str(node_port),
                               "--key", str(key), "--no-advertise", "--max-streams", str(max(a.streams)),
                               "--max-queue", "8", "--kv-bits", str(a.kv_bits or 16)], logs / f"node-{tag}.log")
        router = children.start(["serve", str(bundle), "--host", "127.0.0.1", "--port", str(port), "--key", str(key),
                                 "--peers", str(peers), "--no-mdns"], logs / f"router-{tag}.log")
        name = "mlxmoe" if spec == "all" else f"mlxmoe group {g}/{n}"
        servers.append(Server(name, f"http://127.0.0.1:{port}", [node, router], {"kv_bits": a.kv_bits, "group": g,
                                                                                 "n_groups": n}))
    return servers


# ---------------------------------------------------------------- the client

def chat_body(prompt: str, tokens: int, banned: list[int], system: str | None = None) -> dict:
    """The one body both servers get (no model name: each serves one; no seed: mlx-lm batches;
    repetition_penalty 1: off in both, where mlxmoe's default would be 1.1)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return {"messages": messages, "max_tokens": tokens, "temperature": 0.0,
            "repetition_penalty": 1.0,
            "stream": True, "stream_options": {"include_usage": True},
            "logit_bias": {str(i): -100 for i in banned}}


def prompt_text(tag: str, words: int) -> str:
    """A different prompt per stream from its first characters on (no shared prompt cache)."""
    return f"{tag} " + " ".join(f"word{(7 * i) % 97}" for i in range(words))


async def one_stream(http, s: Server, body: dict, attempts: int = 3) -> StreamResult:
    """One chat; a 503 before the first token (a router that just marked its busy node down) is
    sent again once healthy, its TTFT still counted from the first send, and counted in `retries`."""
    r = StreamResult(sent=time.perf_counter())
    for attempt in range(attempts):
        async with http.post(s.url + "/v1/chat/completions", json=body) as resp:
            if resp.status == 503 and attempt + 1 < attempts:
                r.retries += 1
                await healthy(http, s)
                continue
            if resp.status != 200:
                raise RuntimeError(f"{s.name}: HTTP {resp.status}: {(await resp.text())[:300]}")
            await read_stream(resp, r)
            return r


async def read_stream(resp, r: StreamResult) -> None:
    usage = None
    async for line in resp.content:
        if not line.startswith(b"data: {"):
            continue
        d = json.loads(line[6:])
        if d.get("usage"):
            usage = d["usage"].get("completion_tokens")
            r.prompt_tokens = d["usage"].get("prompt_tokens")
        if any((c.get("delta") or {}).get("content") for c in d.get("choices", [])):
            r.chunks.append(time.perf_counter())
    r.tokens = usage if usage is not None else len(r.chunks)


async def run_level(http, s: Server, n: int, tokens: int, banned: list[int], tag: str, words: int) -> list[StreamResult]:
    """n chats sent at once, after the server says it is healthy (on a loaded CPU a router may
    have marked its busy node down between two levels; it is up again at the next probe)."""
    await healthy(http, s)
    bodies = [chat_body(prompt_text(f"{tag}-{n}-{i}", words), tokens, banned) for i in range(n)]
    return await asyncio.gather(*(one_stream(http, s, b) for b in bodies))


async def healthy(http, s: Server, timeout: float = 120) -> None:
    """GET /health answers 200 (mlx_lm.server: the model is loaded; the router: a node is up),
    while every process of the server still runs."""
    import aiohttp

    deadline = time.monotonic() + timeout
    while True:
        dead = [p for p in s.procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{s.name}: a process exited (code {dead[0].returncode}); see its log")
        try:
            async with http.get(s.url + "/health") as r:
                if r.status == 200:
                    return
        except (OSError, aiohttp.ClientError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{s.name}: {s.url}/health not healthy within {timeout:.0f}s")
        await asyncio.sleep(0.5)


async def measure(a, servers: list[Server], banned: list[int]) -> list[dict]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as http:
        # warm up all servers together (first CUDA runs JIT-compile): a full single stream, then a
        # short run at every concurrency so each batch size has been seen once
        async def warm(s: Server):
            await run_level(http, s, 1, a.tokens, banned, "warm", a.prompt_words)
            for n in a.streams:
                await run_level(http, s, n, a.warmup_tokens, banned, "warm", a.prompt_words)
            log(f"warm: {s.name}")
        await asyncio.gather(*(healthy(http, s, a.start_timeout) for s in servers))
        log("all servers up")
        await asyncio.gather(*(warm(s) for s in servers))
        rows = []
        for run in range(a.runs):
            for s in servers:
                for n in a.streams:
                    results = await run_level(http, s, n, a.tokens, banned, f"run{run}", a.prompt_words)
                    row = {**make_row(s.name, results), **s.meta, "run": run}
                    log(f"{s.name:22s} streams {n:2d}: {row['agg_tok_s']:8.1f} tok/s, p50 ITL {row['p50_itl_ms']} ms, "
                        f"TTFT {row['ttft_ms']} ms, tokens {row['tokens_per_stream']}")
                    rows.append(row)
        rows = median_runs(rows) if a.runs > 1 else rows
        prefill = [r for s in servers for r in await prefill_rows(a, http, s, banned)]
    return rows, prefill


async def prefill_rows(a, http, s: Server, banned: list[int]) -> list[dict]:
    """One chat at a time: TTFT of a fresh prompt of about each --prefill-tokens size, then of two chats
    sharing a system prompt of about --shared-prefix tokens (the second finds the first's prefix)."""
    rows = []

    async def one(kind: str, body: dict) -> dict:
        await healthy(http, s)
        r = await one_stream(http, s, body)
        row = {"server": s.name, "kind": kind, "prompt_tokens": r.prompt_tokens,
               "ttft_ms": round(1e3 * (r.chunks[0] - r.sent), 2) if r.chunks else None}
        log(f"{s.name:22s} {kind:16s} {r.prompt_tokens} prompt tokens: TTFT {row['ttft_ms']} ms")
        rows.append(row)
        return row

    probe = await one_stream(http, s, chat_body(prompt_text("probe", 200), 1, banned))
    per_word = (probe.prompt_tokens or 1400) / 200  # this tokenizer's tokens per "wordN" (the synthesized one: ~7)
    for n in a.prefill_tokens:
        await one(f"fresh-{n}", chat_body(prompt_text(f"fresh{n}", int(n / per_word)), 4, banned))
    if a.shared_prefix:
        system = prompt_text("system prompt and tools", int(a.shared_prefix / per_word))
        first = await one("shared-first", chat_body("first question: word1 word2", 4, banned, system))
        second = await one("shared-second", chat_body("second question: word3 word4", 4, banned, system))
        if first["ttft_ms"] and second["ttft_ms"]:
            second["vs_first"] = round(second["ttft_ms"] / first["ttft_ms"], 3)
    return rows


def median_runs(rows: list[dict]) -> list[dict]:
    """Several runs: per (server, streams) the run of median aggregate tok/s."""
    out = []
    for key in dict.fromkeys((r["server"], r["streams"]) for r in rows):
        same = sorted((r for r in rows if (r["server"], r["streams"]) == key), key=lambda r: r["agg_tok_s"])
        out.append({**same[len(same) // 2], "agg_tok_s_runs": [r["agg_tok_s"] for r in same]})
    return out


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model-dir", type=Path, help="a model directory with a tokenizer; an unquantized one is "
                     "first converted to 4-bit by mlx-lm (e.g. mlxmoe/assets/reference-moe)")
    src.add_argument("--synthesize", metavar="PRESET:LAYERS:BITS", help="random weights of a preset, e.g. qwen3-30b-a3b:12:4")
    src.add_argument("--table", type=Path, metavar="JSON", help="print the Markdown table of a benchmark file and exit")
    ap.add_argument("--streams", default="1,2,4,8,16", help="concurrent streams per row (comma-separated)")
    ap.add_argument("--tokens", type=int, default=128, help="max_tokens of every chat")
    ap.add_argument("--groups", default="all,3", help="mlxmoe rows: 'all' (one node with every expert) and/or N "
                                                      "(one node holding group --group of an N-group split)")
    ap.add_argument("--group", type=int, default=0, help="which group of an N-group split the node serves")
    ap.add_argument("--kv-bits", type=int, default=8, choices=[4, 8, 16], help="the mlxmoe node's KV cache bits "
                    "(mlx_lm.server keeps its KV unquantized: quantized KV turns its batching off)")
    ap.add_argument("--prompt-words", type=int, default=24, help="words per prompt (a word is about 7 tokens)")
    ap.add_argument("--warmup-tokens", type=int, default=8)
    ap.add_argument("--prefill-tokens", default="1024,8192", help="fresh prompts of about these many tokens, one "
                    "at a time: TTFT ('' for none)")
    ap.add_argument("--shared-prefix", type=int, default=1536, help="tokens of the system prompt two chats share "
                    "(0: skip)")
    ap.add_argument("--runs", type=int, default=1, help="rounds; each row keeps the run of median aggregate tok/s")
    ap.add_argument("--out", type=Path, default=Path("benchmarks"), help="a directory (the file is named "
                    "concurrency-<date>-<machine>.json) or a .json path")
    ap.add_argument("--machine", default=None, help="machine name (default: the GPU from nvidia-smi -L, an Apple "
                    "chip, else cpu)")
    ap.add_argument("--skip-mlx-lm", action="store_true")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mlxmoe-bench-concurrency"))
    ap.add_argument("--start-timeout", type=float, default=300)
    a = ap.parse_args(argv)
    if not a.table and not (a.model_dir or a.synthesize):
        ap.error("give --model-dir, --synthesize or --table")
    a.streams = [int(x) for x in a.streams.split(",") if x]
    a.prefill_tokens = [int(x) for x in a.prefill_tokens.split(",") if x]
    a.groups = [g.strip() for g in a.groups.split(",") if g.strip()]
    if a.kv_bits == 16:
        a.kv_bits = None
    return a


def out_path(out: Path, date: str, machine: str) -> Path:
    return out if out.suffix == ".json" else out / f"concurrency-{date}-{machine}.json"


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.table:
        print(table(json.loads(a.table.read_text())))
        return 0
    from mlxmoe.children import Children
    from mlxmoe.ui.demo import on_signals

    a.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = quantized_copy(a.model_dir, a.workdir) if a.model_dir else prepare_model(a.synthesize, a.workdir)
    banned = special_ids(model_dir)
    machine = a.machine or default_machine()
    children = Children()
    on_signals(children.stop)
    try:
        servers = start_servers(a, model_dir, a.workdir, children)
        log(f"started {', '.join(s.name for s in servers)}; logs in {a.workdir / 'logs'}")
        rows, prefill = asyncio.run(measure(a, servers, banned))
    except KeyboardInterrupt:
        return 130
    except Exception:
        show_logs(a.workdir / "logs")
        raise
    finally:
        children.stop()
    date = time.strftime("%Y-%m-%d")
    cfg = json.loads((model_dir / "config.json").read_text())
    source = a.synthesize or str(a.model_dir) + (" (mlx-lm 4-bit)" if model_dir != a.model_dir else "")
    meta = {"date": date, "model": source, "layers": cfg.get("num_hidden_layers"),
            "bits": (cfg.get("quantization") or {}).get("bits"), "tokens": a.tokens, "streams": a.streams,
            "device": device_name(), "platform": platform.platform(), "runs": a.runs,
            "sampling": "temperature 0, no seed, repetition_penalty 1, special tokens biased -100"}
    doc = {"machine": machine, "meta": meta, "rows": rows, "prefill": prefill}
    path = out_path(a.out, date, machine)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(table(doc))
    log(f"wrote {path}")
    return 0


def show_logs(logs: Path, lines: int = 15) -> None:
    """On a failure, the end of every server's log (the GPU run's logs stay on that machine)."""
    for f in sorted(logs.glob("*.log")):
        tail = f.read_text(errors="replace").splitlines()[-lines:]
        print(f"--- {f.name}\n" + "\n".join(tail), file=sys.stderr)


def device_name() -> str:
    from mlxmoe.node.bench import _device

    return _device()


if __name__ == "__main__":
    sys.exit(main())
