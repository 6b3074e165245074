"""Isolation benchmark: "one chat never hurts another" (docs/SECURITY.md, Threat model), as numbers.

Real clusters on loopback, started as subprocesses exactly as `mlxmoe demo` starts them (`mlxmoe node`
per group and `mlxmoe serve`, mutual TLS, the demo's cluster key and CA, in --workdir), on the bundled
reference model. Each scenario is a JSON section:

  schema      1 group: V victim chats stream (temperature 0, distinct prompts, end tokens biased away so
              each runs its max_tokens) while a chat with a self-referencing tool schema (`{"$ref": "#"}`,
              tool_choice "required") comes through the API and the same grammar comes straight to the
              node as a signed `generate`. The hostile requests' status and latency; victims lost (an
              error, or fewer than max_tokens tokens without finish_reason "stop"); victims whose text
              differs from a round without the hostile requests, beside the same count between two
              rounds without them (batched greedy decoding is not bit-stable); 5xx.
  flood       1 group: F idle TCP connections (no TLS, no byte) to the node's port, then to the
              router's: K chats (one after another, each on a new connection) before and during each
              flood (time ratio), node and router RSS and open descriptors before / peak / held /
              after, the flood's summary log lines; then a slowloris on the router (N connections
              sending a partial header then one byte every 0.5 s, each one closed replaced by a new
              one) with a chat a second (each after the previous one: on 2 cores a chat takes longer
              than a second): served, max time, log lines, tracebacks.
  longprompt  1 group: a long stream (max_tokens 300, end tokens biased away: the API has no
              ignore_eos) and, once it streams, a ~2000-token prompt on another session: the stream's
              inter-token gaps while that prompt prefills (worst, p50, p99), the prompt's TTFT beside
              the stream and alone (before and after); then a signed member `prefill` RPC of ~2000
              tokens with a 2-token `generate` sent 50 ms after: the generate's latency against the
              prefill's.
  split       3 groups, a fresh cluster per mode (warmed with pin chats): rounds of concurrent
              streaming chats in router mode `split`, then `onehop`, on prompts of the reference
              model's domains (spread over the nodes: X-MLXMoE-Node): streams ended with an error,
              failovers (/status counters), 5xx in the nodes' access lines, `experts` calls over 5 s.

    python tools/bench_isolation.py --out benchmarks/                  # every scenario (~12 min on 2 cores)
    python tools/bench_isolation.py --only flood,schema --flood 2100
    python tools/bench_isolation.py --quick --out /tmp/x.json          # smoke test, < 60 s

Writes benchmarks/isolation-<YYYY-MM-DD>.json ({"date", "machine", "settings", "scenarios"}) and prints a
short table. Every wait has a timeout; every process started is stopped on the way out (its process
group killed), on Ctrl-C, SIGTERM and errors too.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import math
import os
import platform
import re
import resource
import select
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]
from bench_concurrency import percentile  # noqa: E402  (the same statistic in both benchmarks)

SCENARIOS = ("schema", "flood", "longprompt", "split")
HOSTILE_SCHEMA = {"$ref": "#"}  # "an object that is itself": no finite answer satisfies it
HOSTILE_TOOLS = [{"type": "function", "function": {"name": "f", "parameters": HOSTILE_SCHEMA}}]
FLOOD_LOG = "connections in the last"  # cluster/limits.py: one summary line per interval, never one per connection
PROBLEMS = ("Traceback", "AssertionError")
STATUS_5XX = re.compile(r"\bstatus=5\d\d\b")
ACCESS = re.compile(r"\bstatus=\d{3}\b")
SRC = f"bench-isolation@{socket.gethostname()}"  # our signed RPCs' sender (not the router's: node_server.close_unheld)


def log(msg: str) -> None:
    print(f"[isolation {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- measurements (pure)

def gaps(times: list[float]) -> list[float]:
    """Gaps between consecutive arrivals."""
    return [b - a for a, b in zip(times, times[1:])]


def gaps_during(times: list[float], start: float, end: float) -> list[float]:
    """The gaps between consecutive arrivals that overlap [start, end] (a gap that began before the
    window and ended inside it counts: the stream was waiting during the window)."""
    return [b - a for a, b in zip(times, times[1:]) if b > start and a < end]


def gap_stats(xs: list[float]) -> dict:
    """{n, worst_ms, p50_ms, p99_ms} of gaps in seconds (None when there are none)."""
    if not xs:
        return {"n": 0, "worst_ms": None, "p50_ms": None, "p99_ms": None}
    return {"n": len(xs), "worst_ms": _ms(max(xs)), "p50_ms": _ms(percentile(xs, 50)), "p99_ms": _ms(percentile(xs, 99))}


def time_stats(xs: list[float]) -> dict:
    """{n, p50_ms, max_ms} of durations in seconds."""
    if not xs:
        return {"n": 0, "p50_ms": None, "max_ms": None}
    return {"n": len(xs), "p50_ms": _ms(percentile(xs, 50)), "max_ms": _ms(max(xs))}


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _ms(s: float | None) -> float | None:
    return None if s is None or (isinstance(s, float) and math.isnan(s)) else round(1e3 * s, 1)


def log_counts(text: str) -> dict:
    """What a stretch of a log holds: access lines, 5xx among them, flood summary lines, problems."""
    lines = text.splitlines()
    return {"access_lines": sum(1 for ln in lines if "mlxmoe.access" in ln and ACCESS.search(ln)),
            "status_5xx": sum(1 for ln in lines if "mlxmoe.access" in ln and STATUS_5XX.search(ln)),
            "flood_lines": sum(FLOOD_LOG in ln for ln in lines),
            **{p.lower(): sum(p in ln for ln in lines) for p in PROBLEMS},
            "errors": sum(" ERROR " in ln for ln in lines)}


def excerpts(text: str, needles=(FLOOD_LOG, *PROBLEMS, " ERROR "), n: int = 3, width: int = 300) -> list[str]:
    """The first `n` lines holding any of `needles` (with a traceback's last line), cut to `width`."""
    lines, out = text.splitlines(), []
    for i, ln in enumerate(lines):
        if any(s in ln for s in needles):
            if ln.startswith("Traceback"):  # the exception itself: the first unindented line after it
                ln += " ... " + next((x for x in lines[i + 1:] if x and not x.startswith(" ")), "")
            out.append(ln[:width])
            if len(out) >= n:
                break
    return out


def slow_experts(text: str, over_ms: float = 5000.0) -> list[str]:
    """Access lines of `experts` calls (a peer's remote-expert requests) that took longer than `over_ms`."""
    out = []
    for ln in text.splitlines():
        m = re.search(r"\bms=([0-9.]+)", ln)
        if "op=experts" in ln and m and float(m.group(1)) > over_ms:
            out.append(ln.strip())
    return out


def merge_counts(parts: list[dict]) -> dict:
    out: dict = {}
    for p in parts:
        for k, v in p.items():
            out[k] = out.get(k, 0) + v
    return out


@dataclass
class Chat:
    """One chat through the API: its HTTP status, times (perf_counter), tokens and how it ended."""
    sent: float
    status: int = 0
    chunks: list[float] = field(default_factory=list)  # arrival of each token's content chunk
    tokens: int = 0  # usage.completion_tokens, else the number of content chunks
    prompt_tokens: int | None = None
    finish: str | None = None
    error: str | None = None  # an HTTP error's code, an error event in the stream, a dropped connection
    node: str | None = None  # X-MLXMoE-Node
    text: str = ""
    done: float | None = None
    notice: dict | None = None  # the final chunk's "mlxmoe" (e.g. groups whose experts part of it ran without)

    @property
    def ttft(self) -> float | None:
        return self.chunks[0] - self.sent if self.chunks else None

    @property
    def latency(self) -> float | None:
        return self.done - self.sent if self.done is not None else None

    @property
    def served(self) -> bool:
        return self.status == 200 and self.error is None and self.tokens > 0


def lost(c: Chat, max_tokens: int) -> bool:
    """A victim that did not get its whole answer: an error, or fewer than max_tokens tokens without
    having stopped on its own."""
    return c.error is not None or c.status != 200 or (c.tokens < max_tokens and c.finish != "stop")


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "arch": platform.machine(), "cpu": cpu, "cpus": os.cpu_count(),
            "python": platform.python_version(), "network": "loopback"}


def out_path(out: Path, date: str) -> Path:
    return out if out.suffix == ".json" else out / f"isolation-{date}.json"


def table(doc: dict) -> str:
    """A short plain-text table: one line per measured figure."""
    sc, rows = doc["scenarios"], []

    def row(scenario, what, value):
        rows.append((scenario, what, "-" if value is None else str(value)))
    if "schema" in sc:
        s = sc["schema"]
        for h in s["hostile"]:
            row("schema", f"hostile {h['via']}: status, ms", f"{h['status']}, {h['ms']}")
        row("schema", "victims lost / streamed", f"{s['victims']['lost']} / {s['victims']['n']}")
        row("schema", "victim texts changed: beside hostile / control round",
            f"{s['victims']['text_changed']} / {s['victims'].get('text_changed_without_hostile')}")
        row("schema", "5xx (client, logs)", f"{s['status_5xx']['client']}, {s['status_5xx']['logs']}")
    if "flood" in sc:
        f = sc["flood"]
        for target in ("node", "router"):
            if target not in f:
                continue
            t = f[target]
            row("flood", f"{target} flood: connections opened", t["flood"]["opened"])
            row("flood", f"{target} flood: chats served, time ratio",
                f"{t['chats_served']}/{t['chats']}, x{t['time_ratio']}")
            row("flood", f"{target} flood: {target} RSS MB before/peak/after",
                "/".join(str(t["rss_mb"][target][k]) for k in ("before", "peak", "after")))
            row("flood", f"{target} flood: {target} fds before/peak/after",
                "/".join(str(t["fds"][target][k]) for k in ("before", "peak", "after")))
            row("flood", f"{target} flood: summary lines in the {target}'s log", t["log"][target]["flood_lines"])
        if "slowloris" in f:
            s = f["slowloris"]
            row("flood", "slowloris: connections opened, closed by the router",
                f"{s['slow']['opened']}, {s['slow']['closed_by_server']}")
            row("flood", "slowloris: chats served, max ms, time ratio",
                f"{s['chats_served']}/{s['chats']}, {s['chat_ms']['max_ms']}, x{s.get('time_ratio')}")
            row("flood", "slowloris: tracebacks/assertions in logs",
                f"{s['log']['traceback']}/{s['log']['assertionerror']}")
    if "longprompt" in sc:
        lp = sc["longprompt"]
        g = lp["stream_gaps_during_prefill"]
        row("longprompt", "stream gaps during prefill: worst/p50/p99 ms", f"{g['worst_ms']}/{g['p50_ms']}/{g['p99_ms']}")
        row("longprompt", "long prompt TTFT ms: beside stream / alone",
            f"{lp['long_prompt']['ttft_ms_beside_stream']} / {lp['long_prompt']['ttft_ms_alone']}")
        r = lp["prefill_rpc"]
        row("longprompt", "generate beside prefill RPC ms (prefill ms)", f"{r['generate_ms']} ({r['prefill_ms']})")
    if "split" in sc:
        for mode, m in sc["split"]["modes"].items():
            row("split", f"{mode}: streams errored / total, failovers, 5xx in node logs",
                f"{m['errored']} / {m['streams']}, {m['failovers']}, {m['status_5xx']}")
            row("split", f"{mode}: worst TTFT ms, experts calls > 5 s", f"{m['ttft_max_ms']}, {len(m['slow_experts_calls'])}")
            row("split", f"{mode}: nodes used", ", ".join(f"{k}: {v}" for k, v in sorted(m["nodes"].items())))
    w = max((len(f"{a}  {b}") for a, b, _ in rows), default=10)
    return "\n".join(f"{(a + '  ' + b).ljust(w)}  {c}" for a, b, c in rows)


# ---------------------------------------------------------------- prompts

def passages() -> dict[str, list[str]]:
    """The held-out suite's passages by domain (code, prose in four languages, structured records)."""
    from mlxmoe.quality.suites import load_suites

    _, ps = load_suites(("builtin",), "heldout")
    by: dict[str, list[str]] = {}
    for p in ps:
        by.setdefault(p.domain, []).append(p.text.strip())
    return by


def mixed_prompts(by: dict[str, list[str]], n: int, chars: int = 240, offset: int = 0) -> list[str]:
    """n distinct prompts cycling through the domains."""
    domains = sorted(by)
    return [by[domains[i % len(domains)]][(offset + i // len(domains)) % len(by[domains[i % len(domains)]])][:chars]
            for i in range(n)]


class Tok:
    """The bundle's tokenizer (tokenizers, no MLX): long prompts cut to a token count, token ids for RPCs."""

    def __init__(self, bundle: Path):
        from tokenizers import Tokenizer

        self.t = Tokenizer.from_file(str(bundle / "tokenizer.json"))
        tok = json.loads((bundle / "tokenizer.json").read_text())
        self.special = [a["id"] for a in tok.get("added_tokens", []) if a.get("special")]

    def ids(self, text: str) -> list[int]:
        return self.t.encode(text, add_special_tokens=False).ids

    def text_of(self, by: dict[str, list[str]], n_tokens: int, offset: int = 0) -> str:
        """About n_tokens tokens of text (passages of every domain, from `offset` on)."""
        parts, ids, i = [], [], 0
        flat = [p for d in sorted(by) for p in by[d]]
        while len(ids) < n_tokens:
            parts.append(flat[(offset + i) % len(flat)])
            ids += self.ids(parts[-1] + "\n\n")
            i += 1
        return self.t.decode(ids[:n_tokens])


# ---------------------------------------------------------------- clusters

@dataclass
class Cluster:
    """`mlxmoe node` per group and `mlxmoe serve`, as `mlxmoe demo` starts them (ui/demo.py)."""
    name: str
    n_groups: int
    url: str
    node_urls: list[str]
    children: object  # mlxmoe.children.Children
    logs: list[Path]  # nodes', then the router's
    bundle: Path

    @property
    def node_procs(self):
        return self.children.procs[:-1]

    @property
    def router_proc(self):
        return self.children.procs[-1]

    def stop(self) -> None:
        self.children.stop()


LIVE: list[Cluster] = []  # stopped by main's finally and by the signal handler


def start_cluster(name: str, n_groups: int, work: Path, timeout: float) -> Cluster:
    from mlxmoe.children import Children
    from mlxmoe.ui.demo import ensure_bundle, ensure_key, free_port, wait_ready

    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    bundle = ensure_bundle(work, n_groups, quiet=True, equal=True)  # no node holds every expert: split calls peers
    key = ensure_key(work)
    ports = [free_port() for _ in range(n_groups)]
    peers = work / f"peers-{name}.toml"
    peers.write_text("".join(f'[[peers]]\nurl = "https://127.0.0.1:{p}"\n\n' for p in ports))
    port = free_port()
    children = Children()
    c = Cluster(name, n_groups, f"http://127.0.0.1:{port}", [f"https://127.0.0.1:{p}" for p in ports], children,
                [logs / f"{name}-node-{g}.log" for g in range(n_groups)] + [logs / f"{name}-router.log"], bundle)
    LIVE.append(c)
    for g, p in enumerate(ports):
        children.start(["node", str(bundle), "--group", str(g), "--host", "127.0.0.1", "--port", str(p), "--key",
                        str(key), "--no-advertise"], c.logs[g])
    children.start(["serve", str(bundle), "--host", "127.0.0.1", "--port", str(port), "--key", str(key), "--peers",
                    str(peers), "--no-mdns"], c.logs[-1])
    t0 = time.perf_counter()
    wait_ready(c.url, n_groups, children, timeout)
    log(f"cluster {name}: {n_groups} node(s) and a router up in {time.perf_counter() - t0:.1f}s ({c.url}; logs "
        f"{logs}/{name}-*.log)")
    return c


def stop_cluster(c: Cluster) -> None:
    """Stop `c` once (a signal handler may have stopped it already)."""
    if c in LIVE:
        LIVE.remove(c)
        c.stop()


def stop_all() -> None:
    while LIVE:
        LIVE.pop().stop()


class LogMark:
    """Where each of a cluster's logs ended when made; `since()` is what they gained after."""

    def __init__(self, paths: list[Path]):
        self.at = {p: _size(p) for p in paths}

    def since(self, paths: list[Path] | None = None) -> str:
        out = []
        for p in paths or list(self.at):
            try:
                with open(p, "rb") as f:
                    f.seek(self.at.get(p, 0))
                    out.append(f.read().decode(errors="replace"))
            except OSError:
                pass
        return "\n".join(out)


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def proc_stats(pids: dict[str, int]) -> dict[str, dict]:
    """{name: {rss_mb, fds}} of each process (psutil)."""
    import psutil

    out = {}
    for name, pid in pids.items():
        try:
            p = psutil.Process(pid)
            out[name] = {"rss_mb": round(p.memory_info().rss / 1e6, 1), "fds": p.num_fds()}
        except psutil.Error:
            out[name] = {"rss_mb": None, "fds": None}
    return out


class Sampler:
    """Peak RSS and descriptors of some processes, sampled every `every` s in a thread."""

    def __init__(self, pids: dict[str, int], every: float = 0.25):
        self.pids, self.every = pids, every
        self.peak = {n: {"rss_mb": 0.0, "fds": 0} for n in pids}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for n, s in proc_stats(self.pids).items():
                for k in ("rss_mb", "fds"):
                    if s[k] is not None:
                        self.peak[n][k] = max(self.peak[n][k], s[k])
            self._stop.wait(self.every)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(10)


# ---------------------------------------------------------------- the API client

def _timeout(total: float):
    import aiohttp

    return aiohttp.ClientTimeout(total=total, sock_connect=10)


async def chat(http, url: str, prompt: str, max_tokens: int, *, extra: dict | None = None, session: str | None = None,
               timeout: float = 300.0, into: Chat | None = None) -> Chat:
    """One streaming chat (temperature 0, usage included); never raises for the server's failures.
    `into`: the Chat to fill as tokens arrive (a caller watches its chunks meanwhile)."""
    import aiohttp

    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}
    headers = {"X-Session-Id": session} if session else {}
    c = into or Chat(sent=0.0)
    c.sent = time.perf_counter()
    try:
        async with http.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=_timeout(timeout)) as r:
            c.status, c.node = r.status, r.headers.get("X-MLXMoE-Node")
            if r.status != 200:
                raw = await r.read()
                try:
                    err = json.loads(raw).get("error", {})
                    c.error = str(err.get("code") or err.get("type") or f"http_{r.status}")
                except (ValueError, AttributeError):
                    c.error = f"http_{r.status}"
                return c
            text = []
            async for line in r.content:
                if not line.startswith(b"data: {"):
                    continue
                d = json.loads(line[6:])
                if "error" in d:
                    c.error = str(d["error"].get("code") or d["error"].get("message") or "stream_error")[:200]
                    continue
                if isinstance(d.get("mlxmoe"), dict):
                    c.notice = d["mlxmoe"]
                if d.get("usage"):
                    c.tokens = int(d["usage"].get("completion_tokens") or c.tokens)
                    c.prompt_tokens = d["usage"].get("prompt_tokens")
                for ch in d.get("choices", []):
                    delta = ch.get("delta") or {}
                    if ch.get("finish_reason"):
                        c.finish = ch["finish_reason"]
                    elif "role" not in delta and ("content" in delta or "tool_calls" in delta):
                        c.chunks.append(time.perf_counter())
                        text.append(delta.get("content") or "")
            c.text = "".join(text)
            c.tokens = c.tokens or len(c.chunks)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
        c.error = f"{type(e).__name__}: {e}"[:200]
    finally:
        c.done = time.perf_counter()
    return c


async def status(http, url: str) -> dict:
    async with http.get(url + "/status", timeout=_timeout(20)) as r:
        return await r.json()


def http_session(**kw):
    """An aiohttp session whose every request opens a new connection (a client kept alive from before a
    flood would not show what a new client meets)."""
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=0), **kw)


def node_http(work: Path):
    """An aiohttp session that speaks to nodes as a cluster member (the demo's identity, mutual TLS)."""
    import aiohttp

    from mlxmoe.cluster import tls

    ctx = tls.client_context(tls.Identity.in_dir(work))
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=0))


def node_client(http, url: str, work: Path):
    from mlxmoe.cluster.client import NodeClient
    from mlxmoe.cluster.keys import load_key

    return NodeClient(http, url, load_key(work / "demo-cluster.key"), src=SRC)


async def rpc_generate(client, session: str, prompt: list[int], params: dict, timeout: float = 120.0) -> dict:
    """A signed `generate`: {status, code, tokens, first_ms, ms} (status 200 once a frame came)."""
    from mlxmoe.errors import RpcError

    t0 = time.perf_counter()
    out = {"status": None, "code": None, "tokens": 0, "first_ms": None}

    async def run():
        async for f in client.generate(session, prompt, params, token_timeout=timeout):
            if f.get("t") == "tok":
                out["tokens"] += 1
                if out["first_ms"] is None:
                    out["first_ms"] = _ms(time.perf_counter() - t0)
                out["status"] = 200
            elif f.get("t") == "end":
                out["status"], out["finish"] = 200, f.get("finish_reason")
    try:
        await asyncio.wait_for(run(), timeout)
    except RpcError as e:
        out["status"], out["code"], out["message"] = e.status, e.code, str(e)[:200]
    except asyncio.TimeoutError:
        out["code"] = "client_timeout"
    out["ms"] = _ms(time.perf_counter() - t0)
    return out


def gen_params(**kw) -> dict:
    from mlxmoe.node.contract import GenParams

    return GenParams(**kw).to_dict()


async def warm(a, http, c: Cluster, by, n: int = 2) -> None:
    """A few short chats at once (pin): imports, first compiles, the batch's first shapes."""
    if a.warm:
        await asyncio.gather(*(chat(http, c.url, p, 8, timeout=a.timeout) for p in mixed_prompts(by, n, offset=30)))


# ---------------------------------------------------------------- scenario 1: hostile schema

async def scenario_schema(a, c: Cluster, by, tok: Tok) -> dict:
    V, M = a.victims, a.victim_tokens
    prompts = mixed_prompts(by, V, offset=1)
    ends = {"logit_bias": {str(i): -100 for i in tok.special}}  # every victim runs its max_tokens: a short one is lost
    async with http_session() as http, node_http(a.workdir) as nh:
        await warm(a, http, c, by)
        mark = LogMark(c.logs)
        log(f"schema: two rounds without hostile requests, {V} victims x {M} tokens")
        base = await asyncio.gather(*(chat(http, c.url, p, M, session=f"schema-base-{i}-{time.time_ns()}",
                                           extra=ends, timeout=a.timeout) for i, p in enumerate(prompts)))
        # the control: greedy texts may differ between two rounds without any hostile request (rows join the
        # batch at other steps, and a batched step can round differently: docs/ARCHITECTURE.md, Batching)
        control = await asyncio.gather(*(chat(http, c.url, p, M, session=f"schema-control-{i}-{time.time_ns()}",
                                              extra=ends, timeout=a.timeout) for i, p in enumerate(prompts)))
        log("schema: victims again, with the hostile requests")
        live = [Chat(sent=0.0) for _ in prompts]
        victims = [asyncio.ensure_future(chat(http, c.url, p, M, session=f"schema-victim-{i}-{time.time_ns()}",
                                              extra=ends, into=live[i], timeout=a.timeout))
                   for i, p in enumerate(prompts)]
        # every victim streams before the hostile requests go (bounded wait)
        await until(lambda: all(x.chunks or v.done() for x, v in zip(live, victims)), a.timeout)
        client = node_client(nh, c.node_urls[0], a.workdir)
        hostile = []
        for rep in range(a.hostile_repeats):
            t0 = time.perf_counter()
            h = await chat(http, c.url, "Call the function.", 32, timeout=a.timeout,
                           extra={"tools": HOSTILE_TOOLS, "tool_choice": "required"})
            hostile.append({"via": "api", "repeat": rep, "status": h.status, "code": h.error, "tokens": h.tokens,
                            "ms": _ms(time.perf_counter() - t0)})
            spec = {"type": "tool_call", "tools": HOSTILE_TOOLS, "choice": "required"}
            r = await rpc_generate(client, f"schema-hostile-{rep}-{time.time_ns()}", tok.ids("Call the function."),
                                   gen_params(max_tokens=32, grammar=spec), a.timeout)
            hostile.append({"via": "node rpc", "repeat": rep, **r})
        streaming = sum(1 for v in victims if not v.done())  # victims still streaming when the last hostile ended
        done = await asyncio.gather(*victims)
        await asyncio.sleep(0.5)
        logs = log_counts(mark.since())
    changed = [i for i, (b, v) in enumerate(zip(base, done)) if b.text != v.text]
    changed_control = [i for i, (b, v) in enumerate(zip(base, control)) if b.text != v.text]
    lost_ = [i for i, v in enumerate(done) if lost(v, M)]
    lost_control = [i for i, v in enumerate([*base, *control]) if lost(v, M)]
    client_5xx = (sum(1 for x in [*done, *base, *control] if x.status >= 500)
                  + sum(1 for h in hostile if (h["status"] or 0) >= 500))
    # the hostile requests by kind: statuses and the worst latency
    out = {
        "cluster": "1 group (every stream on one node)", "hostile_schema": HOSTILE_SCHEMA, "hostile": hostile,
        "hostile_summary": {via: {"statuses": sorted({h["status"] for h in hostile if h["via"] == via}, key=str),
                                  "max_ms": max(h["ms"] for h in hostile if h["via"] == via)}
                            for via in ("api", "node rpc")},
        "victims": {"n": V, "max_tokens": M, "lost": len(lost_), "lost_ids": lost_,
                    "still_streaming_after_hostile": streaming,
                    "tokens": [v.tokens for v in done], "finish": [v.finish for v in done],
                    "errors": [v.error for v in done if v.error],
                    "lost_without_hostile": len(lost_control),
                    "text_changed": len(changed), "text_changed_ids": changed,
                    "text_changed_without_hostile": len(changed_control),
                    "ms": time_stats([v.latency for v in done]),
                    "baseline_ms": time_stats([b.latency for b in [*base, *control]])},
        "status_5xx": {"client": client_5xx, "logs": logs["status_5xx"]},
        "log": logs, "log_excerpts": excerpts(mark.since())}
    log(f"schema: hostile {out['hostile_summary']}; victims lost {len(lost_)}/{V}, texts changed {len(changed)} "
        f"(between two rounds without hostile requests: {len(changed_control)}), "
        f"still streaming after the hostile requests {streaming}")
    return out


async def until(cond, timeout: float, every: float = 0.02) -> bool:
    """Wait until cond() holds (True) or `timeout` s pass (False)."""
    deadline = time.perf_counter() + timeout
    while not cond():
        if time.perf_counter() > deadline:
            return False
        await asyncio.sleep(every)
    return True


# ---------------------------------------------------------------- scenario 2: idle flood, slowloris

class Flood:
    """`n` idle TCP connections to host:port: connected, never a byte (no TLS handshake either)."""

    def __init__(self, host: str, port: int, n: int):
        self.host, self.port, self.n = host, port, n
        self.socks: list[socket.socket] = []
        self.failed: dict[str, int] = {}

    def open(self, timeout: float) -> dict:
        """Non-blocking connects, all in flight at once (a full accept backlog makes some retry)."""
        t0, pending = time.perf_counter(), {}
        poller = select.poll()
        for _ in range(self.n):
            s = socket.socket()
            s.setblocking(False)
            rc = s.connect_ex((self.host, self.port))
            if rc in (0, errno.EINPROGRESS):
                pending[s.fileno()] = s
                poller.register(s, select.POLLOUT)
            else:
                self._fail(errno.errorcode.get(rc, str(rc)))
                s.close()
        deadline = t0 + timeout
        while pending and time.perf_counter() < deadline:
            for fd, _ev in poller.poll(200):
                s = pending.pop(fd)
                poller.unregister(fd)
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._fail(errno.errorcode.get(err, str(err)))
                    s.close()
                else:
                    self.socks.append(s)
        for s in pending.values():
            self._fail("connect timeout")
            s.close()
        return {"asked": self.n, "opened": len(self.socks), "failed": dict(self.failed),
                "open_s": round(time.perf_counter() - t0, 2)}

    def _fail(self, why: str) -> None:
        self.failed[why] = self.failed.get(why, 0) + 1

    def still_open(self) -> int:
        """Connections the server has not closed (closed: readable with EOF, reset, or hung up)."""
        n = 0
        for s in self.socks:
            try:
                data = s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                n += data != b""
            except BlockingIOError:
                n += 1
            except OSError:
                pass
        return n

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.socks = []


def raise_nofile(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def sequential_chats(http, url: str, prompts: list[str], max_tokens: int, tag: str, timeout: float) -> list[Chat]:
    out = []
    for i, p in enumerate(prompts):
        out.append(await chat(http, url, p, max_tokens, session=f"{tag}-{i}-{time.time_ns()}", timeout=timeout))
    return out


def _median_latency(chats: list[Chat]) -> float | None:
    xs = [x.latency for x in chats if x.served]
    return percentile(xs, 50) if xs else None


async def flood_one(a, c: Cluster, target: str, port: int, prompts: list[str], before: list[Chat]) -> dict:
    pids = {"node": c.node_procs[0].pid, "router": c.router_proc.pid}
    mark = LogMark(c.logs)
    stats0 = proc_stats(pids)
    fl = Flood("127.0.0.1", port, a.flood)
    t0 = time.perf_counter()
    with Sampler(pids) as sampler:
        try:
            opened = await asyncio.to_thread(fl.open, a.timeout)
            log(f"flood {target}: {opened['opened']}/{a.flood} connections open in {opened['open_s']}s")
            async with http_session() as http:
                during = await sequential_chats(http, c.url, prompts, a.flood_tokens, f"flood-{target}", a.timeout)
            # hold the flood past the header timeout and one summary interval (cluster/limits.py)
            hold = max(0.0, a.flood_hold - (time.perf_counter() - t0))
            await asyncio.sleep(hold)
            stats_during = proc_stats(pids)
            open_at_end = fl.still_open()
        finally:
            fl.close()
    await asyncio.sleep(a.settle)
    stats1 = proc_stats(pids)
    text = mark.since()
    logs = {"node": log_counts(mark.since(c.logs[:1])), "router": log_counts(mark.since(c.logs[-1:]))}
    out = {
        "port": port, "flood": {**opened, "held_s": round(time.perf_counter() - t0 - a.settle, 1),
                                # as the client sees them: includes connections whose handshake the server's
                                # kernel never completed (a full accept backlog), which hold nothing there
                                "not_closed_client_view": open_at_end},
        "chats": len(during), "chats_served": sum(x.served for x in during),
        "chat_errors": [x.error for x in during if x.error],
        "chat_ms_before": [_ms(x.latency) for x in before], "chat_ms_during": [_ms(x.latency) for x in during],
        "time_ratio": ratio(_median_latency(during), _median_latency(before)),
        "rss_mb": {n: {"before": stats0[n]["rss_mb"], "peak": sampler.peak[n]["rss_mb"],
                       "held": stats_during[n]["rss_mb"], "after": stats1[n]["rss_mb"]} for n in pids},
        "fds": {n: {"before": stats0[n]["fds"], "peak": sampler.peak[n]["fds"], "held": stats_during[n]["fds"],
                    "after": stats1[n]["fds"]} for n in pids},
        "log": logs, "log_excerpts": excerpts(text, (FLOOD_LOG, *PROBLEMS))}
    log(f"flood {target}: chats served {out['chats_served']}/{out['chats']}, time x{out['time_ratio']}, "
        f"{target} RSS {out['rss_mb'][target]}, fds {out['fds'][target]}, summary lines {logs[target]['flood_lines']}, "
        f"not closed (client's view) {open_at_end}")
    return out


class Slowloris:
    """`n` connections that each send a partial request header, then one byte every `every` s; one the server
    closes is replaced by a new one, for `seconds` (a slowloris reconnects)."""

    PREFIX = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"X-Slow: ")

    def __init__(self, host: str, port: int, n: int, seconds: float, every: float = 0.5):
        self.host, self.port, self.n, self.seconds, self.every = host, port, n, seconds, every
        self.stop = threading.Event()

    def run(self) -> dict:
        t0 = time.perf_counter()
        alive: dict[int, tuple[socket.socket, float]] = {}
        lifetimes, sent, opened, failed = [], 0, 0, {}
        while time.perf_counter() - t0 < self.seconds and not self.stop.is_set():
            fl = Flood(self.host, self.port, self.n - len(alive))  # top up to n
            got = fl.open(min(10.0, max(0.5, self.seconds - (time.perf_counter() - t0))))
            opened += got["opened"]
            for k, v in got["failed"].items():
                failed[k] = failed.get(k, 0) + v
            now = time.perf_counter()
            for s in fl.socks:
                s.setblocking(True)
                s.settimeout(1.0)
                if self._send(s, self.PREFIX):
                    alive[id(s)] = (s, now)
                else:
                    lifetimes.append(0.0)
                    s.close()
            self.stop.wait(self.every)
            for k, (s, born) in list(alive.items()):
                if self._send(s, b"a"):
                    sent += 1
                else:
                    lifetimes.append(time.perf_counter() - born)
                    s.close()
                    del alive[k]
        for s, _ in alive.values():
            s.close()
        return {"target": self.n, "seconds": self.seconds, "opened": opened, "failed": failed,
                "bytes_trickled": sent, "closed_by_server": len(lifetimes), "open_at_end": len(alive),
                "lifetime_s": {"p50": _r(percentile(lifetimes, 50)), "max": _r(max(lifetimes, default=None))}}

    @staticmethod
    def _send(s: socket.socket, data: bytes) -> bool:
        try:
            s.sendall(data)
            return True
        except OSError:
            return False


def _r(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else round(x, 2)


async def slowloris(a, c: Cluster, port: int, prompts: list[str], before: list[Chat]) -> dict:
    """Chats one a second while the slowloris lasts, each once the previous one ended (on 2 shared cores a
    chat takes longer than a second: overlapping ones would measure the node's queue, not the slowloris)."""
    mark = LogMark(c.logs)
    slow = Slowloris("127.0.0.1", port, a.slowloris, a.slowloris_s)
    job = asyncio.ensure_future(asyncio.to_thread(slow.run))
    done: list[Chat] = []
    try:
        async with http_session() as http:
            await asyncio.sleep(min(2.0, a.slowloris_s / 4))  # the slow connections are in
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < a.slowloris_s - 2 and not job.done():
                next_at = time.perf_counter() + 1.0
                done.append(await chat(http, c.url, prompts[len(done) % len(prompts)], a.flood_tokens,
                                       session=f"slow-{len(done)}-{time.time_ns()}", timeout=a.timeout))
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        res = await asyncio.wait_for(job, a.slowloris_s + 60)
    finally:
        slow.stop.set()
        if not job.done():
            await asyncio.wait([job], timeout=10)
    await asyncio.sleep(a.settle)
    text = mark.since()
    logs = log_counts(text)
    out = {"slow": res, "chats": len(done), "chats_served": sum(x.served for x in done),
           "chat_errors": [x.error for x in done if x.error], "chat_ms": time_stats([x.latency for x in done]),
           "chat_ms_before": time_stats([x.latency for x in before]),
           "time_ratio": ratio(_median_latency(done), _median_latency(before)),
           "log": logs, "log_excerpts": excerpts(text, (FLOOD_LOG, *PROBLEMS))}
    log(f"slowloris: {res['opened']} connections opened ({res['target']} at a time), {res['closed_by_server']} closed "
        f"by the router (lifetime {res['lifetime_s']}); chats served {out['chats_served']}/{out['chats']}, max "
        f"{out['chat_ms']['max_ms']} ms, median x{out['time_ratio']} of before; tracebacks {logs['traceback']}")
    return out


async def scenario_flood(a, c: Cluster, by) -> dict:
    got = raise_nofile(a.flood + a.slowloris + 512)
    prompts = mixed_prompts(by, a.flood_chats, offset=5)
    node_port, router_port = int(c.node_urls[0].rsplit(":", 1)[1]), int(c.url.rsplit(":", 1)[1])
    mark = LogMark(c.logs)
    out: dict = {"cluster": "1 group", "connections": a.flood, "nofile_soft_limit": got}
    async with http_session() as http:
        await warm(a, http, c, by)
        before = await sequential_chats(http, c.url, prompts, a.flood_tokens, "flood-before", a.timeout)
    log(f"flood: {len(before)} chats before: {[_ms(x.latency) for x in before]} ms")
    out["node"] = await flood_one(a, c, "node", node_port, prompts, before)
    out["router"] = await flood_one(a, c, "router", router_port, prompts, before)
    out["slowloris"] = await slowloris(a, c, router_port, prompts, before)
    whole = mark.since()
    out["log"] = log_counts(whole)
    out["problem_excerpts"] = excerpts(whole, PROBLEMS)
    return out


# ---------------------------------------------------------------- scenario 3: long prompt beside a stream

async def scenario_longprompt(a, c: Cluster, by, tok: Tok) -> dict:
    banned = {str(i): -100 for i in tok.special}  # no end token: the stream runs its max_tokens
    n = a.long_tokens
    texts = [tok.text_of(by, n, offset=k * 17) for k in range(3)]  # distinct: no prefix is reused
    async with http_session() as http, node_http(a.workdir) as nh:
        await warm(a, http, c, by)
        log(f"longprompt: a {n}-token prompt alone")
        alone1 = await chat(http, c.url, texts[0], 2, session=f"long-alone-a-{time.time_ns()}", timeout=a.timeout)
        log(f"longprompt: a {a.stream_tokens}-token stream, and the {n}-token prompt once it streams")
        live = Chat(sent=0.0)
        stream = asyncio.ensure_future(chat(http, c.url, "Write a long story about a lighthouse keeper.",
                                            a.stream_tokens, extra={"logit_bias": banned}, into=live,
                                            session=f"long-stream-{time.time_ns()}", timeout=a.timeout))
        await until(lambda: len(live.chunks) >= 8 or stream.done(), a.timeout)
        long_ = await chat(http, c.url, texts[1], 2, session=f"long-beside-{time.time_ns()}", timeout=a.timeout)
        s = await stream
        alone2 = await chat(http, c.url, texts[2], 2, session=f"long-alone-b-{time.time_ns()}", timeout=a.timeout)
        first = long_.chunks[0] if long_.chunks else long_.done
        window = gaps_during(s.chunks, long_.sent, first)
        before = [y - x for x, y in zip(s.chunks, s.chunks[1:]) if y <= long_.sent]
        alone = [x.ttft for x in (alone1, alone2) if x.ttft is not None]
        # a signed member prefill, and a 2-token generate on another session right after it
        client = node_client(nh, c.node_urls[0], a.workdir)
        ids = tok.ids(tok.text_of(by, n, offset=61))[:n]
        short = tok.ids("Hello there, how are you?")
        log("longprompt: 2-token generate alone, then beside a signed prefill RPC")
        g_alone = await rpc_generate(client, f"rpc-gen-alone-{time.time_ns()}", short, gen_params(max_tokens=2),
                                     a.timeout)
        t0 = time.perf_counter()
        sid = f"rpc-prefill-{time.time_ns()}"
        pre = asyncio.ensure_future(client.call("prefill", {"session": sid, "prompt": ids}, timeout=a.timeout))
        await asyncio.sleep(0.05)  # the prefill's first piece is on the engine
        g = await rpc_generate(client, f"rpc-gen-beside-{time.time_ns()}", short, gen_params(max_tokens=2), a.timeout)
        g_end = time.perf_counter()
        try:
            pr = await pre
            prefill_ms, prefill_err = _ms(time.perf_counter() - t0), None
        except Exception as e:  # noqa: BLE001 - recorded, not raised
            prefill_ms, prefill_err = _ms(time.perf_counter() - t0), f"{type(e).__name__}: {e}"[:200]
            pr = {}
        try:
            await client.call("close", {"session": sid}, timeout=30)
        except Exception:  # noqa: BLE001
            pass
    out = {
        "cluster": "1 group",
        "stream": {"max_tokens": a.stream_tokens, "tokens": s.tokens, "finish": s.finish, "error": s.error,
                   "ended_after_long_prompt_ttft": bool(s.chunks) and s.chunks[-1] >= first},
        "stream_gaps_before": gap_stats(before),
        "stream_gaps_during_prefill": gap_stats(window),
        "long_prompt": {"prompt_tokens": long_.prompt_tokens, "status": long_.status, "error": long_.error,
                        "ttft_ms_beside_stream": _ms(long_.ttft),
                        "ttft_ms_alone": _ms(sum(alone) / len(alone)) if alone else None,
                        "ttft_ms_alone_runs": [_ms(x) for x in alone],
                        "ttft_ratio": ratio(long_.ttft, sum(alone) / len(alone) if alone else None)},
        "prefill_rpc": {"prompt_tokens": len(ids), "prefill_ms": prefill_ms, "prefill_error": prefill_err,
                        "prefill_answer": pr, "generate": g, "generate_ms": g["ms"],
                        "generate_alone_ms": g_alone["ms"],
                        "generate_done_before_prefill": prefill_ms is not None and g["ms"] is not None
                        and g_end - t0 < prefill_ms / 1e3}}
    log(f"longprompt: stream gaps during the prefill {out['stream_gaps_during_prefill']}; TTFT beside "
        f"{out['long_prompt']['ttft_ms_beside_stream']} ms, alone {out['long_prompt']['ttft_ms_alone']} ms; "
        f"generate beside prefill RPC {g['ms']} ms (alone {g_alone['ms']} ms), prefill {prefill_ms} ms")
    return out


# ---------------------------------------------------------------- scenario 4: split under concurrency

async def scenario_split(a, by) -> dict:
    """Each mode on a fresh 3-group cluster (its first remote calls included), warmed with pin chats."""
    prompts = mixed_prompts(by, a.split_streams, chars=200, offset=3)
    modes = {}
    for mode in a.split_modes:
        c = await asyncio.to_thread(start_cluster, f"g3-{mode}", 3, a.workdir, a.start_timeout)
        try:
            modes[mode] = await split_mode(a, c, by, prompts, mode)
        finally:
            stop_cluster(c)
    return {"cluster": "3 groups, a fresh cluster per mode", "streams_per_round": len(prompts),
            "max_tokens": a.split_tokens, "modes": modes}


async def split_mode(a, c: Cluster, by, prompts: list[str], mode: str) -> dict:
    """Rounds of concurrent streaming chats in one router mode: errors, failovers, 5xx, where they ran."""
    async with http_session() as http:
        await warm(a, http, c, by, 3)
        mark = LogMark(c.logs)
        st0 = (await status(http, c.url))["counters"]
        rounds = []
        for rnd in range(a.split_rounds):
            t0 = time.perf_counter()
            res = await asyncio.gather(*(chat(http, c.url, p, a.split_tokens, extra={"mlxmoe": {"mode": mode}},
                                              session=f"split-{mode}-{rnd}-{i}-{time.time_ns()}",
                                              timeout=a.timeout) for i, p in enumerate(prompts)))
            wall = time.perf_counter() - t0
            r = {"round": rnd, "wall_s": round(wall, 2), "errored": sum(1 for x in res if x.error or x.status != 200),
                 "lost": sum(1 for x in res if lost(x, a.split_tokens)),
                 "errors": [x.error for x in res if x.error], "statuses": sorted({x.status for x in res}),
                 "tokens": sum(x.tokens for x in res), "agg_tok_s": round(sum(x.tokens for x in res) / wall, 1),
                 "ttft_ms": time_stats([x.ttft for x in res if x.ttft is not None]),
                 "ran_without_groups": sum(1 for x in res if x.notice and x.notice.get("without_groups")),
                 "nodes": _counts(x.node for x in res)}
            rounds.append(r)
            log(f"split: {mode} round {rnd}: {r['errored']} errored of {len(res)}, {r['tokens']} tokens in "
                f"{r['wall_s']}s, TTFT {r['ttft_ms']}, nodes {r['nodes']}")
        await asyncio.sleep(0.5)
        st1 = await status(http, c.url)
        node_logs = log_counts(mark.since(c.logs[:-1]))
        router_logs = log_counts(mark.since(c.logs[-1:]))
        return {
            "rounds": rounds, "streams": sum(len(prompts) for _ in rounds),
            "errored": sum(r["errored"] for r in rounds), "lost": sum(r["lost"] for r in rounds),
            "ran_without_groups": sum(r["ran_without_groups"] for r in rounds),
            "ttft_max_ms": max((r["ttft_ms"]["max_ms"] or 0) for r in rounds),
            "failovers": st1["counters"]["failovers"] - st0["failovers"],
            "counters_delta": {k: st1["counters"][k] - st0.get(k, 0) for k in st1["counters"]},
            "status_5xx": node_logs["status_5xx"], "router_5xx": router_logs["status_5xx"],
            "nodes": merge_counts([r["nodes"] for r in rounds]),
            "node_log": node_logs, "router_log": router_logs,
            "log_excerpts": excerpts(mark.since(), (*PROBLEMS, " ERROR ", "status=5"), n=6),
            "slow_experts_calls": slow_experts(mark.since(c.logs[:-1]))}


def _counts(xs) -> dict:
    out: dict = {}
    for x in xs:
        out[str(x)] = out.get(str(x), 0) + 1
    return out


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks"), help="a directory (the file is named "
                    "isolation-<date>.json) or a .json path")
    ap.add_argument("--only", default=",".join(SCENARIOS), help=f"scenarios, comma-separated: {', '.join(SCENARIOS)}")
    ap.add_argument("--quick", action="store_true", help="everything shrunk: a smoke test (< 60 s)")
    ap.add_argument("--flood", type=int, default=2100, help="idle connections per flood")
    ap.add_argument("--flood-chats", type=int, default=5, help="chats before and during each flood (K)")
    ap.add_argument("--flood-tokens", type=int, default=16, help="max_tokens of a flood or slowloris chat")
    ap.add_argument("--flood-hold", type=float, default=14.0, help="seconds each flood stays open (past the "
                    "servers' 10 s header timeout and one 10 s log interval)")
    ap.add_argument("--slowloris", type=int, default=300, help="slowloris connections")
    ap.add_argument("--slowloris-s", type=float, default=30.0, help="slowloris duration, seconds")
    ap.add_argument("--victims", type=int, default=8, help="victim streams beside the hostile schema (V)")
    ap.add_argument("--victim-tokens", type=int, default=64)
    ap.add_argument("--hostile-repeats", type=int, default=3, help="hostile requests of each kind")
    ap.add_argument("--stream-tokens", type=int, default=300, help="the long stream beside a long prompt")
    ap.add_argument("--long-tokens", type=int, default=1950, help="tokens of the long prompt (the reference "
                    "model's context is 2048)")
    ap.add_argument("--split-streams", type=int, default=16)
    ap.add_argument("--split-tokens", type=int, default=24)
    ap.add_argument("--split-rounds", type=int, default=3)
    ap.add_argument("--split-modes", default="split,onehop")
    ap.add_argument("--settle", type=float, default=11.0, help="seconds after a flood before 'after' is read (the "
                    "servers log their connection summary every 10 s)")
    ap.add_argument("--timeout", type=float, default=300.0, help="bound on any one request or wait, seconds")
    ap.add_argument("--start-timeout", type=float, default=180.0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mlxmoe-bench-isolation"), help="bundles (split "
                    "once, cached), the demo key and CA, and the servers' logs")
    a = ap.parse_args(argv)
    a.only = [s.strip() for s in a.only.split(",") if s.strip()]
    bad = [s for s in a.only if s not in SCENARIOS]
    if bad:
        ap.error(f"unknown scenario(s) {', '.join(bad)} (known: {', '.join(SCENARIOS)})")
    a.warm = True
    if a.quick:
        shrink(a, ap)
    a.split_modes = [m.strip() for m in a.split_modes.split(",") if m.strip()]
    return a


# --quick: a smoke test of the tool itself (one chat at a time in split: see docs/SECURITY.md, Isolation)
QUICK = {"flood": 200, "flood_chats": 1, "flood_tokens": 4, "flood_hold": 1.0, "slowloris": 20, "slowloris_s": 3.0,
         "victims": 2, "victim_tokens": 6, "hostile_repeats": 1, "stream_tokens": 30, "long_tokens": 64,
         "split_streams": 1, "split_tokens": 4, "split_rounds": 1, "split_modes": "split", "settle": 0.2,
         "timeout": 60.0}


def shrink(a, ap) -> None:
    """--quick: every size that was left at its default is shrunk, and nothing is warmed up."""
    for k, v in QUICK.items():
        if getattr(a, k) == ap.get_default(k):
            setattr(a, k, v)
    a.warm = False


def settings(a) -> dict:
    keys = ("quick", "flood", "flood_chats", "flood_tokens", "flood_hold", "slowloris", "slowloris_s", "victims",
            "victim_tokens", "hostile_repeats", "stream_tokens", "long_tokens", "split_streams", "split_tokens",
            "split_rounds", "split_modes", "timeout")
    return {k: getattr(a, k) for k in keys}


async def run(a) -> dict:
    by = passages()
    scenarios: dict = {}
    one = [s for s in ("schema", "longprompt", "flood") if s in a.only]
    if one:
        c = await asyncio.to_thread(start_cluster, "g1", 1, a.workdir, a.start_timeout)
        tok = Tok(c.bundle)
        try:
            for name in one:
                log(f"--- {name}")
                scenarios[name] = await (scenario_schema(a, c, by, tok) if name == "schema" else
                                         scenario_longprompt(a, c, by, tok) if name == "longprompt" else
                                         scenario_flood(a, c, by))
        finally:
            stop_cluster(c)
    if "split" in a.only:
        log("--- split")
        scenarios["split"] = await scenario_split(a, by)
    return scenarios


def main(argv=None) -> int:
    a = parse_args(argv)
    from mlxmoe.ui.demo import on_signals

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    a.workdir.mkdir(parents=True, exist_ok=True)
    on_signals(stop_all)
    t0 = time.perf_counter()
    try:
        scenarios = asyncio.run(run(a))
    except KeyboardInterrupt:
        return 130
    finally:
        stop_all()
    date = time.strftime("%Y-%m-%d")
    doc = {"date": date, "machine": machine(), "model": "bundled reference model (mlxmoe/assets/reference-moe, "
           "8-bit bundle as `mlxmoe demo` splits it)", "settings": settings(a),
           "seconds": round(time.perf_counter() - t0, 1), "scenarios": scenarios}
    path = out_path(a.out, date)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(table(doc))
    log(f"wrote {path} in {doc['seconds']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
