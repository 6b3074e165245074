"""Routing modes on a multi-host cluster: speed and network cost per mode,
with added latency between hosts, plus quality against the full model.

Three `mlxmoe node` processes (groups 0..2) and `mlxmoe serve` run in network
namespaces on one bridge (tests/netns.py), finding each other over real mDNS.
For each added one-way delay X (default 0, 0.5, 2 ms; round trip +2X) and each
mode (pin, soft, hard, onehop, split, race), a client in the router's namespace runs
the same multi-turn conversations (turn 1 English prose, then code: a topic
change that soft/hard may follow) and reports
  tok_s            decode tokens/s (per turn, after the first token; median)
  ttft_ms          time to first token, first turn (placement, race) and later turns
  remote_calls_per_token, node_node_bytes_per_token   from the nodes' session stats
  router_node_bytes_per_token   RPC bytes router<->node (incl. KV moved by hard)
  migrations, race outcomes
Quality per mode comes from `mlxmoe eval`'s machinery (mlxmoe/quality/eval.py) on
held-out text: pin = placement on the prompt's first MoE layer, race = race
placement, soft/hard = placement re-scored at every MoE layer (the closest
static analog of re-scoring; an eval passage has no turn boundary), onehop =
quality.py's one-hop evaluation where present.

Latency: `tc qdisc ... netem delay X` on every bridge port when the kernel has
sch_netem; otherwise a userspace forwarder in each node's namespace delays
every chunk by X in each direction (the router then lists the nodes through
it as static peers, so that run is without mDNS; a 0 ms run through the
forwarder is measured too, to show its own cost).

    sudo python tools/bench_mobility.py [--delays 0,0.5,2] [--turns 4] [--tokens 16]
        [--out benchmarks/...json] [--no-quality]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from mlxmoe.modes import ROUTER_MODES  # noqa: E402
PORT_NODE, PORT_PROXY, PORT_ROUTER = 7420, 7421, 8000
API_KEY = "bench-api-key"  # `mlxmoe serve` on a namespace address needs one
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# the reference model's S(g) spread is small (groups within ~0.05): a small margin, the default debounce,
# and a short re-scoring window so a change of topic shows
ROUTER_CONF = {"margin": 0.01, "checks": 2, "window": 128, "race_tokens": 8, "race_candidates": 3}


# ---------------------------------------------------------------- conversations

def conversations(n: int, turns: int, chars: int = 240) -> list[list[str]]:
    """n scripts of `turns` user messages: English prose, then code passages
    (chosen so the re-scored transcript moves from group 0 toward group 1 on
    the demo bundle: a topic change for soft/hard to follow)."""
    from mlxmoe.quality.suites import load_suites

    _, passages = load_suites(("builtin",), "heldout")
    by = {}
    for p in passages:
        by.setdefault(p.domain, []).append(p.text.strip()[:chars])
    out = []
    for i in range(n):
        en, code = (2, 6) if i % 2 == 0 else (1, 3)
        out.append([by["prose_en"][en + 2 * (i // 2)]] +
                   [by["code"][(code + 6 * (i // 2) + t) % len(by["code"])] for t in range(turns - 1)])
    return out


# ---------------------------------------------------------------- delay forwarder (no netem)

async def _pipe(reader, writer, delay: float) -> None:
    loop, q = asyncio.get_running_loop(), asyncio.Queue()

    async def read():
        while True:
            data = await reader.read(1 << 16)
            q.put_nowait((loop.time() + delay, data))
            if not data:
                return

    async def write():
        while True:
            due, data = await q.get()
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    try:
        await asyncio.gather(read(), write())
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


def proxy_main(listen: str, port: int, target: str, tport: int, delay_ms: float) -> None:
    async def handle(r, w):
        try:
            tr, tw = await asyncio.open_connection(target, tport)
        except OSError:
            w.close()
            return
        await asyncio.gather(_pipe(r, tw, delay_ms / 1e3), _pipe(tr, w, delay_ms / 1e3))

    async def main():
        server = await asyncio.start_server(handle, listen, port)
        async with server:
            await server.serve_forever()
    asyncio.run(main())


def netem_available() -> tuple[bool, str]:
    ns = f"mlxb{os.getpid()}-probe"
    try:
        subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
        subprocess.run(["ip", "-n", ns, "link", "add", "pa", "type", "veth", "peer", "name", "pb"], check=True,
                       capture_output=True)
        r = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "pa", "root", "netem", "delay",
                            "1ms"], capture_output=True, text=True)
        return r.returncode == 0, f"`tc qdisc add ... netem`: {r.stderr.strip()}"
    except (OSError, subprocess.CalledProcessError) as e:
        return False, f"{e}: {getattr(e, 'stderr', '')}"
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


# ---------------------------------------------------------------- client (router's namespace)

def _status(url: str) -> dict:
    import urllib.request
    with urllib.request.urlopen(urllib.request.Request(url + "/status", headers=AUTH), timeout=20) as r:
        return json.loads(r.read())


def wait_up(url: str, n: int, timeout: float) -> None:
    """Until the router at `url` sees `n` peers up (SystemExit after `timeout` s)."""
    deadline = time.time() + timeout
    while True:
        try:
            if sum(p["state"] == "up" for p in _status(url)["peers"]) >= n:
                return
        except OSError:
            pass
        if time.time() > deadline:
            raise SystemExit("nodes did not come up")
        time.sleep(0.3)


async def _turn(http, url: str, messages: list[dict], headers: dict, max_tokens: int, extra: dict | None = None) -> dict:
    t0 = time.perf_counter()
    first, n, text = None, 0, []
    body = {"model": _status(url)["model"], "messages": messages, "max_tokens": max_tokens, "stream": True, **(extra or {})}
    async with http.post(url + "/v1/chat/completions", json=body, headers={**AUTH, **headers}) as r:
        if r.status != 200:
            raise SystemExit(f"HTTP {r.status}: {await r.text()}")
        session = r.headers.get("X-MLXMoE-Session")
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            d = json.loads(line[6:])
            if "error" in d:
                raise SystemExit(f"stream error: {d['error']}")
            for c in d.get("choices", []):
                if c["delta"].get("role") is None and c.get("finish_reason") is None:
                    n += 1
                    text.append(c["delta"].get("content") or "")
                    first = first or time.perf_counter() - t0
    total = time.perf_counter() - t0
    return {"session": session, "ttft": first, "total": total, "tokens": n, "text": "".join(text),
            "tok_s": (n - 1) / (total - first) if n > 1 and total > first else None}


async def run_mode(url: str, mode: str, scripts: list[list[str]], max_tokens: int, tag: str) -> dict:
    import aiohttp

    before = _status(url)["traffic"]
    turns, sessions = [], []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        for i, script in enumerate(scripts):
            msgs, hdr = [], {"X-Session-Id": f"{tag}-{mode}-{i}", "X-Mlxmoe-Mode": mode}
            for t, user in enumerate(script):
                msgs.append({"role": "user", "content": user})
                r = await _turn(http, url, msgs, hdr, max_tokens)
                r["turn"] = t
                turns.append(r)
                msgs.append({"role": "assistant", "content": r["text"]})
            sessions.append(turns[-1]["session"])
    st = _status(url)
    after = st["traffic"]
    ss = [s for s in st["sessions"] if s["id"] in sessions]
    tokens = sum(t["tokens"] for t in turns)
    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    # turns that ran after the session's first switch (onehop: all): the mode's steady state
    first = {s["id"]: 0 if mode in ("onehop", "split") else min((m["turn"] for m in s["migrations"] if m["ok"]), default=None)
             for s in ss}
    moved = [t for t in turns if first.get(t["session"]) is not None and t["turn"] >= first[t["session"]]]
    n_moved = sum(t["tokens"] for t in moved)
    remote = [s for s in ss if first.get(s["id"]) is not None]
    return {
        "mode": mode, "conversations": len(scripts), "turns": len(turns), "tokens": tokens,
        "tok_s": med([t["tok_s"] for t in turns if t["tok_s"]]),
        "ttft_ms_first_turn": 1e3 * med([t["ttft"] for t in turns if t["turn"] == 0]),
        "ttft_ms_later_turns": 1e3 * med([t["ttft"] for t in turns if t["turn"] > 0]),
        "context_tokens": sum(s["tokens"] for s in ss),  # every token the nodes processed (prompts + replies)
        "remote_calls_per_token": sum(s["remote_calls"] for s in ss) / max(tokens, 1),
        "remote_calls_per_context_token": sum(s["remote_calls"] for s in ss) / max(sum(s["tokens"] for s in ss), 1),
        "node_node_bytes_per_token": sum(s["remote_bytes"] for s in ss) / max(tokens, 1),
        "router_node_bytes_per_token": (after["bytes_in"] + after["bytes_out"] - before["bytes_in"]
                                        - before["bytes_out"]) / max(tokens, 1),
        "after_switch": {
            "turns": len(moved), "tokens": n_moved, "tok_s": med([t["tok_s"] for t in moved if t["tok_s"]]),
            "ttft_ms": 1e3 * med([t["ttft"] for t in moved]) if moved else None,
            "remote_calls_per_token": sum(s["remote_calls"] for s in remote) / max(n_moved, 1),
            "node_node_bytes_per_token": sum(s["remote_bytes"] for s in remote) / max(n_moved, 1),
            "remote_ms_per_token": 1e3 * sum(s.get("remote_s", 0) for s in remote) / max(n_moved, 1)},
        "migrations": [{k: m.get(k) for k in ("kind", "from", "to", "ok", "turn", "ms")} for s in ss
                       for m in s["migrations"]],
        "race": [s["race"] for s in ss if s.get("race")],
        "groups": [s["group"] for s in ss], "expert_groups": [s["expert_group"] for s in ss],
    }


def client_main(a) -> None:
    wait_up(a.url, 3, 120)
    scripts = json.loads(Path(a.scripts).read_text())
    asyncio.run(run_mode(a.url, "pin", scripts[:1], 4, f"warm{a.tag}"))  # imports, first compiles
    for mode in a.modes.split(","):
        print(json.dumps({"delay_ms": a.delay, "via": a.via, **asyncio.run(run_mode(a.url, mode, scripts, a.tokens,
                                                                                   a.tag))}), flush=True)


# ---------------------------------------------------------------- quality (eval machinery)

def quality(bundle: str, per_domain: int) -> dict:
    from mlxmoe.quality import eval as q
    rep = q.run_eval(bundle, placements=("first", "layers", "race", "oracle"), per_domain=per_domain, onehop=True,
                     split=True)
    by = {r["placement"]: r for r in rep["results"]}
    pick = lambda r: {"kl": r["mean"]["kl"], "ppl_ratio": r["mean"]["ppl_ratio"],  # noqa: E731
                      "agreement": r["mean"]["agreement"], "worst_ppl_ratio": r["worst"]["ppl_ratio"]}
    return {"pin": pick(by["first"]), "race": pick(by["race"]), "soft": pick(by["layers"]),
            "hard": pick(by["layers"]), "oracle": pick(by["oracle"]), "onehop": pick(rep["onehop"]), "split": pick(rep["split"]),
            "passages": rep["passages"]}


# ---------------------------------------------------------------- orchestration

def start_router(lab, bundle, key, conf, mdns: bool):
    rip = lab.ips[0]
    argv = [sys.executable, "-m", "mlxmoe.cli", "serve", str(bundle), "--host", rip, "--port", str(PORT_ROUTER),
            "--key", key, "--interface", rip, "--peers", str(conf), "--api-key", API_KEY] + ([] if mdns else ["--no-mdns"])
    return lab.spawn(0, argv, f"router-{time.time():.0f}.log")


def stop(p) -> None:
    import signal
    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(p.pid, signal.SIGKILL)


def write_conf(path: Path, peers: list[str]) -> None:
    lines = [f'[[peers]]\nurl = "{u}"\n' for u in peers]
    lines.append("[router]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in ROUTER_CONF.items()))
    path.write_text("\n".join(lines))


def run_cluster(a, bundle: str, tmp: Path) -> list[dict]:
    import netns
    from mlxmoe.cluster.keys import create_key
    from mlxmoe.cluster.tls import create_ca

    key = str(create_key(tmp / "cluster.key"))
    create_ca(tmp)  # nodes and router talk mutual TLS, as `mlxmoe init` sets them up
    scripts = tmp / "scripts.json"
    scripts.write_text(json.dumps(conversations(a.conversations, a.turns)))
    netem, why = netem_available()
    rows = []
    with netns.NetnsLab(4, tmp / "logs", prefix=f"mlxb{os.getpid()}") as lab:
        rip, url = lab.ips[0], f"http://{lab.ips[0]}:{PORT_ROUTER}"
        for g in range(3):
            ip = lab.ips[g + 1]
            lab.spawn(g + 1, [sys.executable, "-m", "mlxmoe.cli", "node", str(bundle), "--group", str(g), "--host", ip,
                              "--port", str(PORT_NODE), "--key", key, "--interface", ip], f"node{g}.log")

        def client(delay, via):
            r = lab.run(0, [sys.executable, str(Path(__file__).resolve()), "client", "--url", url, "--scripts", str(scripts), "--modes",
                            a.modes, "--tokens", str(a.tokens), "--delay", str(delay), "--via", via,
                            "--tag", f"{via}{delay}"], timeout=3000)
            if r.returncode:
                raise SystemExit(f"client failed: {r.stdout}\n{r.stderr}\n" + "\n".join(
                    f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(lab.logdir.glob("*.log"))))
            out = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
            for x in out:
                print(json.dumps(x), flush=True)
            return out

        conf = tmp / "router.toml"
        write_conf(conf, [])
        if netem:
            for d in a.delays or [0.0]:
                for i in range(4):  # every bridge port: one-way +d, round trip +2d
                    subprocess.run(["ip", "netns", "exec", lab.hub, "tc", "qdisc", "replace", "dev", f"v{i}", "root",
                                    "netem", "delay", f"{d}ms"], check=True)
                router = start_router(lab, bundle, key, conf, mdns=True)
                rows += client(d, "netem")
                stop(router)
            return rows
        print(json.dumps({"note": f"tc netem unavailable ({why}); delays by a userspace forwarder"}), flush=True)
        router = start_router(lab, bundle, key, conf, mdns=True)
        rows += client(0, "direct")  # real mDNS, no forwarder
        stop(router)
        for d in a.delays:
            procs = [lab.spawn(g + 1, [sys.executable, str(Path(__file__).resolve()), "proxy", "--listen", lab.ips[g + 1], "--port",
                                       str(PORT_PROXY), "--target", lab.ips[g + 1], "--target-port", str(PORT_NODE),
                                       "--delay", str(d)], f"proxy{g}-{d}.log") for g in range(3)]
            write_conf(conf, [f"http://{lab.ips[g + 1]}:{PORT_PROXY}" for g in range(3)])
            time.sleep(1.0)
            router = start_router(lab, bundle, key, conf, mdns=False)
            rows += client(d, "forwarder")
            stop(router)
            for p in procs:
                stop(p)
    return rows


def table(rows: list[dict], qual: dict | None) -> str:
    head = ("| delay (one-way) | mode | tok/s | tok/s after switch | TTFT 1st turn | TTFT later | remote calls/tok "
            "| node↔node B/tok | router↔node B/tok | switches | KL | ppl × |\n|" + " --- |" * 12)
    out = [head]
    fmt = lambda v, f, unit="": "–" if v is None else format(v, f) + unit  # noqa: E731
    for r in rows:
        if "mode" not in r:
            continue
        q, a = (qual or {}).get(r["mode"]) or {}, r["after_switch"]
        mig = ", ".join(f"{m['kind']} {m['from']}→{m['to']}" + ("" if m["ok"] else " (failed)")
                        for m in r["migrations"]) or "–"
        if r["race"]:
            mig = "race won by " + ", ".join(f"g{x['winner']}" for x in r["race"])
        via = {"forwarder": " (fwd)", "direct": " (mDNS)"}.get(r["via"], "")
        out.append(f"| {r['delay_ms']:g} ms{via} | {r['mode']} | {fmt(r['tok_s'], '.1f')} | {fmt(a['tok_s'], '.1f')} "
                   f"| {fmt(r['ttft_ms_first_turn'], '.0f', ' ms')} | {fmt(r['ttft_ms_later_turns'], '.0f', ' ms')} "
                   f"| {a['remote_calls_per_token']:.2f} | {a['node_node_bytes_per_token']:.0f} "
                   f"| {r['router_node_bytes_per_token']:.0f} | {mig} "
                   f"| {fmt(q.get('kl'), '.3f')} | {fmt(q.get('ppl_ratio'), '.2f')} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    c = sub.add_parser("client")
    for k in ("--url", "--scripts", "--modes", "--via", "--tag"):
        c.add_argument(k, required=True)
    c.add_argument("--tokens", type=int, required=True)
    c.add_argument("--delay", type=float, required=True)
    p = sub.add_parser("proxy")
    p.add_argument("--listen", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--target-port", type=int, required=True)
    p.add_argument("--delay", type=float, required=True)
    ap.add_argument("--delays", default="0,0.5,2")
    ap.add_argument("--modes", default=",".join(ROUTER_MODES))
    ap.add_argument("--conversations", type=int, default=2)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--bundle", default=None, help="a split bundle (default: the demo's 3-group reference bundle)")
    ap.add_argument("--passages", type=int, default=8, help="quality: held-out passages per domain")
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--out", default=None, help="write every JSON line and the table here")
    a = ap.parse_args()
    if a.cmd == "client":
        return client_main(a)
    if a.cmd == "proxy":
        return proxy_main(a.listen, a.port, a.target, a.target_port, a.delay)
    a.delays = [float(x) for x in a.delays.split(",")]
    with tempfile.TemporaryDirectory(prefix="mlxmoe-bench-mob-") as tmp:
        tmp = Path(tmp)
        if a.bundle is None:
            from mlxmoe.ui.demo import ensure_bundle
            a.bundle = str(ensure_bundle(tmp, 3, quiet=True, equal=True))
        t0 = time.time()
        rows = run_cluster(a, a.bundle, tmp)
        qual = None if a.no_quality else quality(a.bundle, a.passages)
    if qual:
        print(json.dumps({"quality": qual}), flush=True)
    import mlx.core as mx
    meta = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
            f"mlx {mx.__version__} ({mx.default_device()})", "router_config": ROUTER_CONF, "bundle": a.bundle,
            "conversations": a.conversations, "turns": a.turns, "tokens_per_turn": a.tokens,
            "seconds": round(time.time() - t0, 1)}
    print(json.dumps({"meta": meta}))
    t = table(rows, qual)
    print(t)
    if a.out:
        Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows, "quality": qual, "table": t}, indent=1) + "\n")


if __name__ == "__main__":
    main()
