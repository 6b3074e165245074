"""Node RPC server with a FakeEngine on loopback: every op, streaming, auth,
limits, admission (503 + Retry-After), engine errors, and HTTP fuzzing."""

from __future__ import annotations

import asyncio
import http.client
import os
import time
import urllib.parse

import aiohttp
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlxmoe import wire
from mlxmoe.cluster.client import NodeClient
from mlxmoe.errors import RpcError
from mlxmoe.cluster.node_server import start_node
from fakes import HASH, FakeEngine, LocalCluster, encode, expected_text
import fakes

pytestmark = pytest.mark.timeout(60)
KEY = b"n" * 32


def run(coro_fn, engine=None, timeout=30):
    """Start a node with `engine`, run coro_fn(client, node), stop it."""
    async def main():
        node = await start_node(engine or FakeEngine(group=1), KEY, "127.0.0.1", 0, advertise=False)
        try:
            async with aiohttp.ClientSession() as http:
                return await coro_fn(NodeClient(http, node.url, KEY, HASH), node)
        finally:
            await node.stop()
    return asyncio.run(asyncio.wait_for(main(), timeout))


async def collect(client, session, prompt, **params):
    return [f async for f in client.generate(session, prompt, {"max_tokens": 8, **params})]


def test_info_reports_identity_and_load():
    async def t(c, node):
        return await c.call("info")
    info = run(t)
    assert info["groups"] == [1] and info["manifest_hash"] == HASH and info["model"] == "fake-moe"
    assert info["protocol"] == wire.PROTOCOL_VERSION and info["sessions"] == 0 and info["backend"] == "fake"


def test_generate_streams_then_end_frame():
    prompt = encode("hello")

    async def t(c, node):
        return await collect(c, "s1", prompt, max_tokens=12)
    frames = run(t)
    toks, end = frames[:-1], frames[-1]
    assert [f["t"] for f in toks] == ["tok"] * 12 and end["t"] == "end"
    assert "".join(f["text"] for f in toks) == expected_text(prompt, 12)
    assert toks[-1]["finish_reason"] == "length" and end["completion_tokens"] == 12 and end["prompt_tokens"] == 5


def test_prefill_close_export_import_and_cache_reuse():
    eng = FakeEngine(group=0)

    async def t(c, node):
        assert (await c.call("prefill", {"session": "a", "prompt": [1, 2, 3]}))["prompt_tokens"] == 3
        await collect(c, "a", [1, 2, 3, 4], max_tokens=2)
        state = await c.call("export_session", {"session": "a"})
        assert state["tokens"][:4] == [1, 2, 3, 4] and state["id"] == "a" and state["manifest"] == HASH
        assert state["caches"]
        assert (await c.call("close", {"session": "a"}))["closed"] is True
        assert (await c.call("close", {"session": "a"}))["closed"] is False
        with pytest.raises(RpcError) as ei:
            await c.call("export_session", {"session": "a"})
        assert ei.value.status == 404 and "'a'" in ei.value.message
        state["id"] = "b"
        assert (await c.call("import_session", {"state": state}))["session"] == "b"
        assert (await c.call("info"))["sessions"] == 1
    run(t, eng)
    assert eng.reused == [("a", 0), ("a", 3)]  # prefill warmed the cache that generate reused
    assert len(eng.threads) == 1  # every engine call on the one worker thread


def test_admission_503_with_retry_after():
    eng = FakeEngine(max_sessions=0)

    async def t(c, node):
        with pytest.raises(RpcError) as ei:
            await collect(c, "x", [1])
        return ei.value
    e = run(t, eng)
    assert e.status == 503 and e.retryable and e.retry_after == 2 and "KV budget" in e.message


def test_context_overflow_is_400_before_stream():
    async def t(c, node):
        with pytest.raises(RpcError) as ei:
            await collect(c, "x", [1] * 50, max_tokens=100)  # the prompt alone fills the context
        return ei.value
    e = run(t, FakeEngine(max_context=50))
    assert e.status == 400 and e.code == "context_length_exceeded" and not e.retryable


def test_error_mid_stream_is_an_error_frame():
    async def t(c, node):
        got = []
        with pytest.raises(RpcError) as ei:
            async for f in c.generate("x", [1], {"max_tokens": 10}):
                got.append(f)
        return got, ei.value
    got, e = run(t, FakeEngine(fail_after=3))
    assert len(got) == 3 and e.status == 500 and e.retryable and "fake failure" in e.message


def test_wrong_key_and_wrong_manifest():
    async def t(c, node):
        bad = NodeClient(c.http, node.url, b"z" * 32, HASH)
        with pytest.raises(RpcError) as e1:
            await bad.call("info")
        other = NodeClient(c.http, node.url, KEY, "otherhash")
        with pytest.raises(RpcError) as e2:
            await other.call("info")
        return e1.value, e2.value
    e1, e2 = run(t)
    assert e1.status == 401 and "cluster key" in e1.message
    assert e2.status == 409 and "otherhash" in e2.message and HASH in e2.message


def test_client_rejects_unsigned_answers():
    """A LAN device without the key cannot pose as a node."""
    from aiohttp import web

    async def main():
        app = web.Application()
        app.router.add_post("/rpc/{op}", lambda r: web.Response(body=wire.ok_response({"groups": [0]})))
        app.router.add_get("/hello", lambda r: web.Response(body=wire.hello_response("n", "e")))  # anyone can say hello
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        try:
            async with aiohttp.ClientSession() as http:
                c = NodeClient(http, f"http://127.0.0.1:{runner.addresses[0][1]}", KEY)
                with pytest.raises(RpcError) as ei:
                    await c.call("info")
                return ei.value
        finally:
            await runner.cleanup()
    e = asyncio.run(main())
    assert e.code == "unauthenticated"


# ---------------------------------------------------------------- raw HTTP

def _connect(url):
    u = urllib.parse.urlparse(url)
    return (http.client.HTTPSConnection(u.hostname, u.port, timeout=10, context=fakes.client_context())
            if u.scheme == "https" else http.client.HTTPConnection(u.hostname, u.port, timeout=10))


def _post(url, path, data, headers=None, method="POST"):
    conn = _connect(url)
    try:
        conn.request(method, path, body=data, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def hello(url) -> dict:
    return msgpack.unpackb(_post(url, "/hello", None, method="GET")[2])


def signed(url, op, body, key=KEY, **kw):
    h = hello(url)
    return wire.encode_request(key, op, body, dst=h["node"], epoch=h["epoch"], **kw)


@pytest.fixture(scope="module")
def node_url():
    with LocalCluster([FakeEngine(group=0, max_context=64)], key=KEY) as c:
        yield c.node_url(0)


def test_http_status_codes(node_url):
    st_, h, body = _post(node_url, "/rpc/info", b"\x80")
    assert st_ == 401 and wire.AUTH_HEADER not in h
    assert msgpack.unpackb(body)["error"]["message"] == "unauthorized"
    assert _post(node_url, "/rpc/info", b"\x80", {wire.AUTH_HEADER: "\xe9" * 64})[0] == 401
    # 413 from the headers alone: the node answers before any body byte is sent (and
    # closes, reading none of it: a client still sending then sees a reset instead)
    conn = _connect(node_url)
    conn.putrequest("POST", "/rpc/generate")
    conn.putheader("Content-Length", str(wire.DEFAULT_MAX_BYTES + 1))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and msgpack.unpackb(r.read())["error"]["code"] == "too_large"
    conn.close()
    data, headers = signed(node_url, "info", {})
    st_, _, body = _post(node_url, "/rpc/info", b"\xc1\xc1", headers)  # not the signed length
    assert st_ == 400 and "Content-Length" in msgpack.unpackb(body)["error"]["message"]
    data, headers = signed(node_url, "info", {})
    st_, _, body = _post(node_url, "/rpc/info", b"\xc1", headers)  # the signed length, another body
    assert st_ == 401 and msgpack.unpackb(body)["error"]["code"] == "body_digest"
    data, headers = signed(node_url, "info", {})
    headers[wire.PREAMBLE_HEADER] = headers[wire.PREAMBLE_HEADER][:-4] + "AAAA"
    assert _post(node_url, "/rpc/info", data, headers)[0] == 401  # a preamble the HMAC does not cover
    h = hello(node_url)
    pre = {"v": 7, "op": "info", "ts": time.time(), "nonce": os.urandom(8).hex(), "body": {}}
    raw = msgpack.packb(pre)
    headers = {wire.PREAMBLE_HEADER: __import__("base64").urlsafe_b64encode(raw).decode(),
               wire.AUTH_HEADER: wire.sign(KEY, b"req:" + raw)}
    assert _post(node_url, "/rpc/info", b"", headers)[0] == 426
    data, headers = signed(node_url, "info", {})
    assert _post(node_url, "/rpc/info", data, headers)[0] == 200
    assert _post(node_url, "/rpc/info", data, headers)[0] == 401  # replayed
    data, headers = signed(node_url, "nosuch", {})
    st_, _, body = _post(node_url, "/rpc/nosuch", data, headers)
    assert st_ == 400 and "unknown op" in msgpack.unpackb(body)["error"]["message"]
    data, headers = wire.encode_request(KEY, "info", {}, dst="another-node", epoch=h["epoch"])
    st_, _, body = _post(node_url, "/rpc/info", data, headers)
    assert st_ == 401 and msgpack.unpackb(body)["error"]["code"] == "destination"


bodies = st.fixed_dictionaries({}, optional={
    "session": st.one_of(st.text(max_size=300), st.integers(-2**63, 2**63 - 1), st.none()),
    "prompt": st.one_of(st.lists(st.integers(-5, 2**32), max_size=80), st.text(max_size=5), st.none()),
    "params": st.one_of(st.fixed_dictionaries({}, optional={
        "max_tokens": st.one_of(st.integers(-3, 100), st.floats(), st.text(max_size=3)),
        "temperature": st.one_of(st.floats(), st.integers(-1, 200)),
        "top_p": st.floats(), "stop": st.lists(st.text(max_size=3), max_size=3), "seed": st.integers(-2**63, 2**63 - 1),
        "bogus": st.integers(-2**63, 2**63 - 1)}), st.integers(-2**63, 2**63 - 1)),
    "state": st.dictionaries(st.text(max_size=5), st.integers(-2**63, 2**63 - 1), max_size=3),
    "extra": st.integers(-2**63, 2**63 - 1)})


@settings(max_examples=120, deadline=None)
@given(op=st.sampled_from(wire.OPS), body=bodies, sign=st.booleans())
def test_fuzz_http_never_5xx(node_url, op, body, sign):
    data, headers = signed(node_url, op, body, KEY if sign else b"q" * 32)
    status, _, raw = _post(node_url, f"/rpc/{op}", data, headers)
    if not sign:
        assert status == 401
        return
    assert status < 500 or status == 503, raw[:200]
    if status >= 400:
        err = msgpack.unpackb(raw)["error"]
        assert err["message"] and err["code"]


def test_control_answers_do_not_wait_behind_compute():
    """While the engine thread is busy (a long prefill: the first token held), info and close answer at once."""
    import threading

    hold = threading.Event()
    eng = FakeEngine(group=0, hold=hold)

    async def t(c, node):
        await c.call("prefill", {"session": "idle", "prompt": [1, 2, 3]})
        busy = asyncio.ensure_future(collect(c, "busy", [4, 5, 6], max_tokens=2))
        deadline = time.time() + 5
        while not node.server.worker.load()["busy"] and time.time() < deadline:
            await asyncio.sleep(0.02)
        t0 = time.perf_counter()
        info = await c.call("info")
        closed = await c.call("close", {"session": "idle"})
        took = time.perf_counter() - t0
        hold.set()
        await busy
        await asyncio.sleep(0.1)
        return info, closed, took
    info, closed, took = run(t, eng)
    assert took < 2.0 and info["busy"] and info["streams"] == 1
    assert closed == {"closed": True, "deferred": True}
    assert "idle" not in eng.sessions  # closed once the engine was free
