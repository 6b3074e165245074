"""Router benchmark: what the cluster layer itself costs.

Prints JSON with
  router_overhead_ms_per_token   median inter-token time streamed through the
                                 router's SSE API minus streamed directly from
                                 the node's RPC (medians over --runs; on a busy
                                 2-core box the real-engine number is noisy)
  ttft_ms {placed, pinned, direct}  time to first token for a new conversation
                                 (score + place + connect), for a later turn of
                                 a pinned one, and straight from the node
  placement_ms                   the score call alone (from /status last_placement)
  router_node_bytes_per_token    RPC bytes router<->node per decoded token (the
                                 stream itself, plus request envelopes)
  node_to_node_bytes_per_token   bytes a node received from anyone but the router
                                 (target 0: pinned decode never crosses nodes)

Default: in-process FakeEngine nodes (pure overhead, no model). With --bundle,
one real node (group --group) and the real trunk front end, each loaded on its
own engine thread.

    python tools/bench_router.py [--tokens 200] [--runs 5] [--bundle DIR --group 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from mlxmoe.cluster.api import start_router  # noqa: E402
from mlxmoe.cluster.client import NodeClient  # noqa: E402
from mlxmoe.cluster.node_server import start_node  # noqa: E402
from mlxmoe.cluster.router import Router  # noqa: E402

KEY = b"b" * 32


async def sse_stream(http: aiohttp.ClientSession, url: str, body: dict, headers: dict | None = None):
    """(seconds to first token, total seconds, tokens) for one streamed chat."""
    t0 = time.perf_counter()
    first, n = None, 0
    async with http.post(url + "/v1/chat/completions", json={**body, "stream": True}, headers=headers or {}) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            d = json.loads(line[6:])
            for c in d.get("choices", []):
                if c["delta"].get("role") is None and c.get("finish_reason") is None:
                    n += 1
                    if first is None:
                        first = time.perf_counter() - t0
    return first, time.perf_counter() - t0, n


async def direct_stream(client: NodeClient, session: str, prompt: list[int], max_tokens: int):
    t0 = time.perf_counter()
    first, n = None, 0
    async for f in client.generate(session, prompt, {"max_tokens": max_tokens}):
        if f["t"] == "tok":
            n += 1
            if first is None:
                first = time.perf_counter() - t0
    return first, time.perf_counter() - t0, n


async def main(a) -> dict:
    if a.bundle:
        def node_factory():
            from mlxmoe.node.engine import Node
            return Node.load(a.bundle, a.group)

        def front_factory():
            from mlxmoe.node.trunk import TrunkFrontend
            return TrunkFrontend.load(a.bundle)
        nodes = [await start_node(None, KEY, "127.0.0.1", 0, advertise=False, factory=node_factory)]
        router = Router(None, KEY, frontend_factory=front_factory, static_peers=[nodes[0].url], mdns=False)
    else:
        from fakes import FakeEngine, FakeFrontend
        nodes = [await start_node(FakeEngine(group=g, max_context=1 << 20), KEY, "127.0.0.1", 0, advertise=False)
                 for g in range(3)]
        router = Router(FakeFrontend(), KEY, static_peers=[n.url for n in nodes], mdns=False)
    running = await start_router(router, "127.0.0.1", 0)
    out: dict = {"engine": "real:" + a.bundle if a.bundle else "fake", "tokens": a.tokens, "runs": a.runs}
    try:
        async with aiohttp.ClientSession() as http:
            msgs = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
            body = {"model": "m", "messages": msgs, "max_tokens": a.tokens}
            await sse_stream(http, running.url, body)  # warm up (imports, caches)
            prompt = await router.encode_chat(msgs)
            node_client = NodeClient(http, nodes[0].url, KEY, router.manifest_hash)

            placed, pinned, via_router, direct = [], [], [], []
            for i in range(a.runs):
                # a new conversation each run: score + place + connect
                f, total, n = await sse_stream(http, running.url, body, {"X-Session-Id": f"bench-{i}"})
                placed.append(f)
                via_router.append((total - f) / max(n - 1, 1))  # inter-token time, prefill excluded
                # the next turn of the same conversation: pinned, node reuses its cache
                f, _, _ = await sse_stream(http, running.url, {**body, "max_tokens": 8}, {"X-Session-Id": f"bench-{i}"})
                pinned.append(f)
                f, total, n = await direct_stream(node_client, f"direct-{i}", prompt, a.tokens)
                direct.append((f, (total - f) / max(n - 1, 1)))
            st = router.status()
            tr = router.traffic()
            node_in = sum(n.server.bytes_in for n in nodes)
            out.update({
                "router_overhead_ms_per_token": 1e3 * (statistics.median(via_router)
                                                       - statistics.median(d[1] for d in direct)),
                "ms_per_token": {"router": 1e3 * statistics.median(via_router),
                                 "direct": 1e3 * statistics.median(d[1] for d in direct)},
                "ttft_ms": {"placed": 1e3 * statistics.median(placed), "pinned": 1e3 * statistics.median(pinned),
                            "direct": 1e3 * statistics.median(d[0] for d in direct)},
                "placement_ms": st["last_placement"]["elapsed_ms"],
                "router_node_bytes_per_token": (tr["bytes_in"] + tr["bytes_out"]) / max(tr["tokens"], 1),
                # nodes only ever serve: whatever they received beyond the router's requests came from
                # elsewhere (another node); the bench's direct-stream client is subtracted
                "node_to_node_bytes_per_token": (node_in - tr["bytes_out"] - node_client.bytes_out)
                / max(tr["tokens"], 1),
                "failovers": st["counters"]["failovers"],
            })
    finally:
        await running.stop()
        for n in nodes:
            await n.stop()
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--bundle", default=None, help="a split bundle: use a real node + trunk front end")
    ap.add_argument("--group", type=int, default=0)
    print(json.dumps(asyncio.run(main(ap.parse_args())), indent=2))
