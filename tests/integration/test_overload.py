"""Overload is not an outage (docs/ARCHITECTURE.md, The router): a node busy
decoding answers health from its event loop and stays up; a node at its
stream limit answers 429, and so does the API (with Retry-After) when every
node is; placement spreads concurrent chats over replicas and groups within
the tie margin, and keeps each chat on its best group outside it."""

from __future__ import annotations

import asyncio
import collections
import threading
import time

import aiohttp
import pytest

import fakes
from fakes import FakeEngine, FakeFrontend, LocalCluster, encode_chat, expected_text

from mlxmoe.cluster.client import NodeClient
from mlxmoe.errors import RpcError

pytestmark = pytest.mark.timeout(120)


def chat(content: str, max_tokens: int = 6) -> dict:
    return {"model": "fake-moe", "max_tokens": max_tokens, "user": content,
            "messages": [{"role": "user", "content": content}]}


async def post(url: str, body: dict) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/v1/chat/completions", json=body,
                             timeout=aiohttp.ClientTimeout(total=60)) as r:
            return r.status, dict(r.headers), await r.json()


def wait_for(cond, what: str, timeout: float = 20.0) -> None:
    end = time.time() + timeout
    while not cond():
        assert time.time() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def start_chat(c: LocalCluster, body: dict):
    return asyncio.run_coroutine_threadsafe(post(c.api_url, body), c.loop)


def test_busy_node_answers_health_at_once_and_stays_up():
    hold = threading.Event()  # the engine thread is stuck in a long step until we release it
    with LocalCluster([FakeEngine(group=0, hold=hold)], probe_interval=0.3) as c:
        fut = start_chat(c, chat("topic0 a long prefill", 5))
        wait_for(lambda: c.router.peers.live() and c.router.peers.live()[0].inflight == 1, "the stream to open")
        wait_for(lambda: c.nodes[0].server.worker.load()["streams"] == 1, "the engine to start it")

        async def info():
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=fakes.client_context())) as http:
                return await NodeClient(http, c.node_url(0), c.key).call("info", timeout=5)

        got = c.run(info())  # the engine thread is blocked: this is served from the event loop
        assert got["streams"] == 1 and got["busy"] and got["groups"] == [0]
        assert got["info_age_s"] is not None and got["model"] == "fake-moe"
        time.sleep(2.5)  # several probe rounds (2 s probe timeout) while the engine is stuck
        p = c.router.peers.live()
        assert [x.state for x in p] == ["up"], c.router.peers.status()
        async def status():
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=fakes.client_context())) as http:
                async with http.get(c.api_url + "/status", timeout=aiohttp.ClientTimeout(total=10)) as r:
                    return r.status, await r.json()

        code, st = c.run(status())  # the router's /status shows each node's queue depth
        assert code == 200 and st["peers"][0]["queue_depth"] == 1, st["peers"]
        assert st["peers"][0]["streams"] == 1 and st["peers"][0]["inflight"] == 1
        assert not fut.done()
        hold.set()
        status, _, out = fut.result(30)
        assert status == 200 and out["choices"][0]["message"]["content"] == \
            expected_text(encode_chat([{"role": "user", "content": "topic0 a long prefill"}]), 5)
        wait_for(lambda: c.router.status()["peers"][0]["inflight"] == 0, "the stream to be counted closed")


def test_overload_is_429_with_retry_after_then_retry_succeeds():
    hold = threading.Event()
    engines = [FakeEngine(group=0, hold=hold) for _ in range(2)]  # two replicas of group 0
    with LocalCluster(engines, frontend=FakeFrontend(fixed={0: 0.8, 1: 0.1, 2: 0.1})) as c:
        for n in c.nodes:  # one stream each, none waiting
            n.server.worker.max_streams, n.server.max_queue = 1, 0
        first = [start_chat(c, chat(f"chat {i}")) for i in range(2)]
        wait_for(lambda: sum(p.inflight for p in c.router.peers.live()) == 2, "two streams to open")
        assert sorted(p.inflight for p in c.router.peers.live()) == [1, 1]  # one per replica
        status, headers, out = asyncio.run_coroutine_threadsafe(post(c.api_url, chat("one too many")), c.loop).result(30)
        assert status == 429, out
        assert out["error"]["code"] == "overloaded" and int(headers["Retry-After"]) >= 1
        assert all(p.state == "up" for p in c.router.peers.peers.values())  # full, not down
        hold.set()
        assert [f.result(30)[0] for f in first] == [200, 200]
        status, _, out = asyncio.run_coroutine_threadsafe(post(c.api_url, chat("one too many")), c.loop).result(30)
        assert status == 200 and out["choices"][0]["message"]["content"]


def test_node_at_its_limit_refuses_generate_with_429():
    hold = threading.Event()
    with LocalCluster([FakeEngine(group=0, hold=hold)]) as c:
        c.nodes[0].server.worker.max_streams, c.nodes[0].server.max_queue = 1, 1

        async def gen(sid):
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=fakes.client_context())) as http:
                return [f async for f in NodeClient(http, c.node_url(0), c.key).generate(sid, [1, 2], {"max_tokens": 2})]

        a = asyncio.run_coroutine_threadsafe(gen("a"), c.loop)  # decoding (held)
        wait_for(lambda: c.nodes[0].server.worker.load()["streams"] == 1, "stream a to start")
        b = asyncio.run_coroutine_threadsafe(gen("b"), c.loop)  # waiting its turn
        wait_for(lambda: c.nodes[0].server.worker.load()["queued"] == 1, "stream b to queue")
        with pytest.raises(RpcError) as e:
            c.run(gen("c"))
        assert e.value.status == 429 and e.value.code == "overloaded" and e.value.retry_after >= 1
        assert e.value.retryable and "max_queue" in e.value.message or "waiting" in e.value.message
        hold.set()
        assert [f["t"] for f in a.result(30)] == ["tok", "tok", "end"]
        assert [f["t"] for f in b.result(30)] == ["tok", "tok", "end"]  # it waited, in order, and ran


def run_many(c: LocalCluster, bodies: list[dict]) -> list[tuple[int, dict, dict]]:
    async def all_at_once():
        return await asyncio.gather(*(post(c.api_url, b) for b in bodies))
    return c.run(all_at_once(), timeout=100)


def test_concurrent_chats_spread_over_replicas():
    engines = [FakeEngine(group=0, delay=0.01) for _ in range(3)]
    with LocalCluster(engines, frontend=FakeFrontend(fixed={0: 0.8, 1: 0.1, 2: 0.1})) as c:
        res = run_many(c, [chat(f"user {i} says hello", 10) for i in range(32)])
        assert [r[0] for r in res] == [200] * 32
        per_node = collections.Counter(r[1]["X-MLXMoE-Node"] for r in res)
        assert set(per_node) == set(c.names) and min(per_node.values()) >= 4, per_node
        assert all(r[1]["X-MLXMoE-Group"] == "0" for r in res)


def test_chats_stay_on_their_best_group_outside_the_margin():
    engines = [FakeEngine(group=g, delay=0.01) for g in range(3)]
    with LocalCluster(engines) as c:  # "topic<k>" scores group k 0.8, the others ~0.1: far outside the margin
        res = run_many(c, [chat(f"topic{i % 3} question {i}", 8) for i in range(24)])
        assert [r[0] for r in res] == [200] * 24
        assert [r[1]["X-MLXMoE-Group"] for r in res] == [str(i % 3) for i in range(24)]
        assert [r[1]["X-MLXMoE-Node"] for r in res] == [c.names[i % 3] for i in range(24)]


# ---- the engine worker: bounded streams in order, a load snapshot readable from the loop

def test_worker_steps_at_most_max_streams_and_starts_waiting_ones_in_order():
    from mlxmoe.cluster.worker import EngineWorker

    w = EngineWorker("test-worker", max_streams=2)
    started, hold = [], threading.Event()

    def make(i):
        def it():
            started.append(i)
            hold.wait(10)
            yield from range(3)
        return it

    async def main():
        streams = [w.stream(make(i)) for i in range(4)]
        for _ in range(200):
            if w.load()["streams"] == 2 and w.load()["queued"] == 2:
                break
            await asyncio.sleep(0.01)
        load = w.load()
        hold.set()
        return load, [[x async for x in s] for s in streams]

    w.watch(lambda: {"n": len(started)}, every=0.0)
    try:
        load, outs = asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        w.stop()
    assert load["streams"] == 2 and load["queued"] == 2 and load["busy"]
    assert outs == [[0, 1, 2]] * 4 and started == [0, 1, 2, 3]
    assert w.snapshot is not None and w.snapshot_at > 0  # taken on the worker thread while it decoded


def test_worker_drops_a_waiting_stream_whose_caller_left():
    from mlxmoe.cluster.worker import EngineWorker

    w = EngineWorker("test-worker", max_streams=1)
    ran, hold = [], threading.Event()

    def make(i):
        def it():
            ran.append(i)
            hold.wait(10)
            yield i
        return it

    async def main():
        a, b, c = (w.stream(make(i)) for i in range(3))
        for _ in range(200):
            if w.load()["queued"] == 2:
                break
            await asyncio.sleep(0.01)
        b.cancel()  # its client went away while it waited
        hold.set()
        return [x async for x in a], [x async for x in c]

    try:
        assert asyncio.run(asyncio.wait_for(main(), 30)) == ([0], [2])
    finally:
        w.stop()
    assert ran == [0, 2]


def test_chat_queued_past_the_first_token_timeout_gets_429_and_the_node_stays_up():
    eng = FakeEngine(group=0, delay=0.05)  # decoding, slowly: it makes progress all the time
    with LocalCluster([eng], first_token_timeout=1.0, probe_interval=0.3) as c:
        c.nodes[0].server.worker.max_streams = 1  # one stream at a time: the next one waits its turn
        long = start_chat(c, chat("a long answer", 60))  # ~3 s of tokens
        wait_for(lambda: c.nodes[0].server.worker.load()["streams"] == 1, "the long stream to start")
        status, headers, out = asyncio.run_coroutine_threadsafe(post(c.api_url, chat("me next")), c.loop).result(30)
        assert status == 429 and out["error"]["code"] == "overloaded" and int(headers["Retry-After"]) >= 1, out
        assert [p.state for p in c.router.peers.peers.values()] == ["up"]
        assert long.result(30)[0] == 200
        status, _, out = asyncio.run_coroutine_threadsafe(post(c.api_url, chat("me next")), c.loop).result(30)
        assert status == 200


def test_engine_stuck_past_the_first_token_timeout_is_down_until_it_moves_again():
    hold = threading.Event()
    with LocalCluster([FakeEngine(group=0, hold=hold)], first_token_timeout=1.0, probe_interval=0.3) as c:
        fut = start_chat(c, chat("stuck", 3))
        p = c.router.peers.live()[0]
        wait_for(lambda: p.state == "down", "the stalled engine to be marked down")
        assert "no progress" in p.reason or "first token" in p.reason, p.reason
        hold.set()
        wait_for(lambda: p.state == "up", "the engine to come back once it moves")
        fut.result(30)  # the stuck chat ends either way (its answer or a clear error), never hangs
