"""Node RPC hardening (docs/SECURITY.md): nothing of a body is read before
the headers authenticate it; requests are bound to one node's run; HTTP
timeouts and a connection cap; session expiry (TTL, and the router's held
list); and hypothesis over hostile envelopes against a real node server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import os
import socket
import subprocess
import sys
import time
import urllib.parse

import aiohttp
import click
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlxmoe import wire
from mlxmoe.cluster import node_server
from mlxmoe.cluster.client import NodeClient
from mlxmoe.cluster.node_server import expired_sessions, start_node, unheld_sessions
from mlxmoe.commands.node import parse_duration
from mlxmoe.errors import RpcError
from fakes import HASH, FakeEngine, LocalCluster

pytestmark = pytest.mark.timeout(90)
KEY = b"h" * 32
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def arun(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _hostport(url):
    u = urllib.parse.urlparse(url)
    return u.hostname, u.port


def _raw(url, head: bytes, body: bytes = b"", wait: float = 10.0) -> tuple[int, bytes, bool]:
    """Send `head` (+ `body`) on a raw socket; (status, answer, closed by the node)."""
    s = socket.create_connection(_hostport(url), timeout=wait)
    try:
        s.sendall(head)
        try:
            s.sendall(body)
        except OSError:  # the node closed on us mid-body: what it should do
            pass
        data = b""
        while True:
            try:
                chunk = s.recv(1 << 16)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            data += chunk
        closed = True
    finally:
        s.close()
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    return status, data, closed


def _hello(url) -> tuple[str, str]:
    c = http.client.HTTPConnection(*_hostport(url), timeout=10)
    try:
        c.request("GET", "/hello")
        return wire.open_hello(c.getresponse().read())
    finally:
        c.close()


def _post(url, path, data, headers):
    c = http.client.HTTPConnection(*_hostport(url), timeout=10)
    try:
        c.request("POST", path, body=data, headers=headers)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


@pytest.fixture(scope="module")
def cluster():
    # plain HTTP: the signed envelope on its own, as under --insecure-plain-http (raw sockets
    # read its bytes); TLS in front of it is tests/integration/test_tls.py
    with LocalCluster([FakeEngine(group=0, max_context=64), FakeEngine(group=1, max_context=64)], key=KEY,
                      probe_interval=3600, tls=None) as c:  # no probes in the byte counts
        yield c


# ---------------------------------------------------------------- authenticate before reading

@pytest.mark.parametrize("signed_with", [None, b"q" * 32])
def test_a_big_unauthenticated_body_is_never_read(cluster, signed_with):
    url, server = cluster.node_url(0), cluster.nodes[0].server
    n = 250_000_000
    headers = {"Content-Length": str(n), "Content-Type": wire.CONTENT_TYPE}
    if signed_with:  # a well-formed preamble, for this very node, with the wrong key
        node, ep = _hello(url)
        pre = {"v": wire.PROTOCOL_VERSION, "op": "import_session", "ts": time.time(), "nonce": os.urandom(8).hex(),
               "dst": node, "ep": ep, "len": n, "sha": b"\0" * 32, "src": "x"}
        raw = msgpack.packb(pre)
        headers.update({wire.PREAMBLE_HEADER: base64.urlsafe_b64encode(raw).decode(),
                        wire.AUTH_HEADER: wire.sign(signed_with, b"req:" + raw)})
    head = "POST /rpc/import_session HTTP/1.1\r\nHost: x\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    before = server.bytes_in
    status, data, closed = _raw(url, head.encode() + b"\r\n", b"\0" * (4 << 20))
    assert status == 401 and closed and b"unauthorized" in data
    assert server.bytes_in == before  # not one body byte taken in
    node, ep = _hello(url)  # and the node still serves
    data, h = wire.encode_request(KEY, "info", {}, dst=node, epoch=ep)
    assert _post(url, "/rpc/info", data, h)[0] == 200


def test_a_signed_request_with_a_short_body_times_out(cluster):
    url, server = cluster.node_url(1), cluster.nodes[1].server
    node, ep = _hello(url)
    body = wire.pack({"session": "s"})
    data, h = wire.encode_request(KEY, "close", {"session": "s"}, dst=node, epoch=ep)
    head = "POST /rpc/close HTTP/1.1\r\nHost: x\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items())
    head += f"Content-Length: {len(body)}\r\n\r\n"
    server.body_timeout = 0.5
    try:
        status, answer, _ = _raw(url, head.encode(), body[:-1], wait=10)
    finally:
        server.body_timeout = node_server.BODY_TIMEOUT_S
    assert status == 408 and b"body not received" in answer


def test_chunked_body_without_length_is_refused(cluster):
    url = cluster.node_url(0)
    node, ep = _hello(url)
    data, h = wire.encode_request(KEY, "info", {}, dst=node, epoch=ep)
    head = "POST /rpc/info HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
    status, answer, _ = _raw(url, head.encode(), f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n")
    assert status == 400 and b"Content-Length" in answer


# ---------------------------------------------------------------- destination and epoch

def test_a_captured_request_fails_on_another_node_and_after_a_restart():
    async def main():
        a = await start_node(FakeEngine(group=0), KEY, "127.0.0.1", 0, advertise=False, name="a")
        b = await start_node(FakeEngine(group=1), KEY, "127.0.0.1", 0, advertise=False, name="b")
        try:
            async with aiohttp.ClientSession() as http:
                ca = NodeClient(http, a.url, KEY, HASH)
                assert (await ca.call("info"))["epoch"] == a.server.epoch  # first contact works (via /hello)
                node, ep = ca.dst
                data, h = wire.encode_request(KEY, "close", {"session": "s"}, dst=node, epoch=ep)
                st_b, raw_b = await asyncio.to_thread(_post, b.url, "/rpc/close", data, h)
                port = a.port
                await a.stop()
                a2 = await start_node(FakeEngine(group=0), KEY, "127.0.0.1", port, advertise=False, name="a")
                try:
                    st_a, raw_a = await asyncio.to_thread(_post, a2.url, "/rpc/close", data, h)
                    info = await ca.call("info")  # the client learns the new epoch and carries on
                    return st_b, raw_b, st_a, raw_a, info, a2.server.epoch, ep
                finally:
                    await a2.stop()
        finally:
            await b.stop()
    st_b, raw_b, st_a, raw_a, info, epoch2, epoch1 = arun(main())
    assert st_b == 401 and wire.refusal(raw_b)["code"] == "destination"
    assert st_a == 401 and wire.refusal(raw_a)["code"] == "epoch"
    assert info["epoch"] == epoch2 != epoch1


def test_peerlink_follows_a_restarted_peer():
    from mlxmoe.node.remote.peers import PeerLink

    async def main():
        a = await start_node(FakeEngine(group=0), KEY, "127.0.0.1", 0, advertise=False, name="a")
        link = PeerLink(a.url, KEY, HASH)
        first, _ = await asyncio.to_thread(link.call, "info", {})
        port = a.port
        await a.stop()
        a2 = await start_node(FakeEngine(group=0), KEY, "127.0.0.1", port, advertise=False, name="a")
        try:
            second, _ = await asyncio.to_thread(link.call, "info", {})
        finally:
            link.close()
            await a2.stop()
        return first["epoch"], second["epoch"], a2.server.epoch
    e1, e2, now = arun(main())
    assert e2 == now != e1


# ---------------------------------------------------------------- HTTP limits

def test_unfinished_headers_are_dropped_while_signed_requests_work():
    async def main():
        node = await start_node(FakeEngine(group=0), KEY, "127.0.0.1", 0, advertise=False, keepalive_timeout=1.0)
        socks = []
        try:
            for _ in range(100):
                r, w = await asyncio.open_connection("127.0.0.1", node.port)
                w.write(b"POST /rpc/info HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                socks.append((r, w))
            async with aiohttp.ClientSession() as http:
                info = await NodeClient(http, node.url, KEY, HASH).call("info")  # meanwhile
            t0 = time.monotonic()
            dropped = await asyncio.wait_for(asyncio.gather(*(r.read() for r, _ in socks)), 20)
            return info, dropped, time.monotonic() - t0
        finally:
            for _, w in socks:
                w.close()
            await node.stop()
    info, dropped, _ = arun(main())
    assert info["groups"] == [0]
    assert len(dropped) == 100 and all(d == b"" for d in dropped)  # each closed by the node, no answer


def test_connections_past_the_cap_are_closed():
    async def main():
        node = await start_node(FakeEngine(group=0), KEY, "127.0.0.1", 0, advertise=False, max_connections=10)
        conns = []
        try:
            for _ in range(15):
                conns.append(await asyncio.open_connection("127.0.0.1", node.port))
            got = await asyncio.gather(*(asyncio.wait_for(r.read(), 1.0) for r, _ in conns), return_exceptions=True)
            for _, w in conns:
                w.close()
            await asyncio.sleep(0.2)
            async with aiohttp.ClientSession() as http:  # a freed slot serves again
                info = await NodeClient(http, node.url, KEY, HASH).call("info")
            return got, info
        finally:
            await node.stop()
    got, info = arun(main())
    closed = [i for i, g in enumerate(got) if g == b""]
    waiting = [g for g in got if isinstance(g, asyncio.TimeoutError)]
    assert closed == [0, 1, 2, 3, 4] and len(waiting) == 10 and info["groups"] == [0]  # the oldest idle made room


# ---------------------------------------------------------------- session expiry

def test_expiry_decisions():
    s = {"a": ("r", 0.0), "b": ("r", 95.0), "c": ("other", 0.0), "busy": ("r", 0.0)}
    busy = {"busy": 1}
    assert expired_sessions(s, busy, 100.0, 10.0) == ["a", "c"]
    assert unheld_sessions(s, busy, "r", {"a"}, 100.0, 10.0) == []  # b is recent, busy streams, c is not ours
    assert unheld_sessions(s, busy, "r", set(), 100.0, 10.0) == ["a"]
    assert unheld_sessions(s, busy, "r", set(), 100.0, 1.0) == ["a", "b"]


def test_idle_sessions_expire_by_ttl():
    eng = FakeEngine(group=0)

    async def main():
        node = await start_node(eng, KEY, "127.0.0.1", 0, advertise=False, session_ttl=0.3)
        try:
            async with aiohttp.ClientSession() as http:
                c = NodeClient(http, node.url, KEY, HASH)
                await c.call("prefill", {"session": "old", "prompt": [1, 2]})
                for _ in range(100):
                    if not node.server.sessions:
                        break
                    await asyncio.sleep(0.05)
                return node.server.sessions, (await c.call("info"))["sessions"]
        finally:
            await node.stop()
    left, n = arun(main())
    assert left == {} and n == 0 and "old" not in eng.sessions


def test_a_router_closes_its_forgotten_sessions(monkeypatch):
    """After a router restart its first probe lists nothing: the node closes
    the old router's idle sessions, and nobody else's."""
    monkeypatch.setattr(node_server, "HELD_GRACE_S", 0.0)
    eng = FakeEngine(group=0)

    async def main():
        node = await start_node(eng, KEY, "127.0.0.1", 0, advertise=False)
        try:
            async with aiohttp.ClientSession() as http:
                old = NodeClient(http, node.url, KEY, HASH, src="router@mac")
                other = NodeClient(http, node.url, KEY, HASH, src="router@other")
                for sid in ("kept", "forgotten"):
                    await old.call("prefill", {"session": sid, "prompt": [1]})
                await other.call("prefill", {"session": "theirs", "prompt": [1]})
                await asyncio.sleep(0.01)
                new = NodeClient(http, node.url, KEY, HASH, src="router@mac")  # the restarted router
                await new.call("info", {"held": ["kept"]})
                return sorted(node.server.sessions)
        finally:
            await node.stop()
    assert arun(main()) == ["kept", "theirs"]
    assert "forgotten" not in eng.sessions


def test_the_router_probe_sends_its_held_list(cluster):
    r = cluster.router
    p = r.peers.by_url(cluster.node_url(0))
    assert r.held_on(p) == [s.id for s in r.sessions if s.peer == p.name]


def test_session_ttl_option():
    assert parse_duration("30m", "--session-ttl") == 1800 and parse_duration("90", "--session-ttl") == 90
    assert parse_duration("1h", "--session-ttl") == 3600 and parse_duration("2d", "x") == 172800
    for bad in ("", "0", "-1m", "abc", "infh", "nan"):
        with pytest.raises(click.BadParameter):
            parse_duration(bad, "--session-ttl")


# ---------------------------------------------------------------- junk import_session

def test_junk_import_session_is_400_naming_the_field():
    async def main():
        node = await start_node(FakeEngine(group=0), KEY, "127.0.0.1", 0, advertise=False)
        try:
            async with aiohttp.ClientSession() as http:
                c = NodeClient(http, node.url, KEY, HASH)
                out = []
                for state in ({"type": "x"}, {"id": "s", "tokens": [1], "manifest": HASH, "caches": [{"state": 1}]}):
                    with pytest.raises(RpcError) as ei:
                        await c.call("import_session", {"state": state})
                    out.append(ei.value)
                return out
        finally:
            await node.stop()
    e1, e2 = arun(main())
    assert e1.status == 400 and "body.state" in e1.message and "unknown session" not in e1.message
    assert e2.status == 400 and "body.state.caches.0.type" in e2.message


# ---------------------------------------------------------------- hypothesis over envelopes

values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=True) | st.text(max_size=12)
    | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
shapes = st.fixed_dictionaries({}, optional={
    "session": values | st.text(max_size=300), "prompt": values | st.lists(st.integers(-5, 2**32), max_size=40),
    "params": values | st.fixed_dictionaries({"max_tokens": st.integers(-3, 20)}, optional={
        "temperature": values, "top_p": values, "seed": values, "routing": values, "peers": values,
        "expert_group": values, "stop": values}),
    "state": values | st.fixed_dictionaries({"id": values, "tokens": values, "manifest": st.just(HASH) | values,
                                             "caches": st.lists(st.dictionaries(
                                                 st.sampled_from(["type", "state", "meta", "x"]), values), max_size=3)}),
    "held": values | st.lists(st.text(max_size=8), max_size=5), "layer": values, "x": values, "ids": values,
    "rows": values, "extra": values})
PRE_FIELDS = ["v", "op", "ts", "nonce", "dst", "ep", "len", "sha", "src", "mh", "zz"]


@st.composite
def envelopes(draw):
    """(path, headers, body bytes): a signed-and-right envelope with random
    mutations of its preamble, headers and body, or junk."""
    op = draw(st.sampled_from(wire.OPS) | st.from_regex(r"[a-z_]{1,12}", fullmatch=True))
    body = draw(shapes.map(wire.pack) | st.binary(max_size=64))
    pre = {"v": wire.PROTOCOL_VERSION, "op": op, "ts": time.time(), "nonce": os.urandom(8).hex(), "dst": "DST",
           "ep": "EP", "len": len(body), "sha": hashlib.sha256(body).digest(), "src": "fuzz"}
    pre.update(draw(st.dictionaries(st.sampled_from(PRE_FIELDS), values, max_size=2)))
    for k in draw(st.lists(st.sampled_from(PRE_FIELDS), max_size=1)):
        pre.pop(k, None)
    key = draw(st.sampled_from([KEY, KEY, KEY, b"q" * 32]))
    headers = {"Content-Type": draw(st.sampled_from([wire.CONTENT_TYPE, "text/plain"])), "PRE": pre, "KEY": key}
    junk = draw(st.dictionaries(st.sampled_from([wire.PREAMBLE_HEADER, wire.AUTH_HEADER, "X-Other"]),
                                st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=80), max_size=2))
    headers.update(junk)
    return f"/rpc/{op}", headers, body


def _fuzz_one(url, node, ep, path, headers, body):
    headers = dict(headers)
    pre, key = headers.pop("PRE"), headers.pop("KEY")
    pre = dict(pre)
    if pre.get("dst") == "DST":  # the placeholders become this node's name and epoch; mutations stay
        pre["dst"] = node
    if pre.get("ep") == "EP":
        pre["ep"] = ep
    raw = msgpack.packb(pre, use_bin_type=True)
    headers.setdefault(wire.PREAMBLE_HEADER, base64.urlsafe_b64encode(raw).decode())
    headers.setdefault(wire.AUTH_HEADER, wire.sign(key, b"req:" + raw))
    status, answer = _post(url, path, body, headers)
    assert status < 500 or status == 503, (status, answer[:300])
    if status >= 400 and status != 404:  # 404: aiohttp's own, for a path that is no op
        err = wire.refusal(answer)
        assert err.get("code") and err.get("message"), answer[:300]


def _fuzz(cluster, n):
    url = cluster.node_url(0)
    node, ep = _hello(url)

    @settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(env=envelopes())
    def run(env):
        _fuzz_one(url, node, ep, *env)
    run()
    data, h = wire.encode_request(KEY, "info", {}, dst=node, epoch=ep)
    assert _post(url, "/rpc/info", data, h)[0] == 200  # still serving


def test_fuzz_envelopes_never_5xx(cluster):
    _fuzz(cluster, 200)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_fuzz_envelopes_never_5xx_slow(cluster):
    _fuzz(cluster, 2000)


# ---------------------------------------------------------------- memory per unauthenticated connection

def rss_after_keyless_posts(repo: str, n_posts: int = 4, size: int = 250_000_000) -> tuple[int, int]:
    """(RSS before, RSS after) in bytes of a `fakes.py node` process from `repo`
    that gets `n_posts` keyless POSTs of `size` bytes (bounded, loopback)."""
    return _with_node(repo, lambda port: _keyless_posts(port, n_posts, size))


def _keyless_posts(port: int, n_posts: int, size: int) -> None:
    chunk = b"\0" * (1 << 20)
    for _ in range(n_posts):
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        try:
            s.sendall(f"POST /rpc/import_session HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())
            for _ in range(size // len(chunk)):
                s.sendall(chunk)
            s.recv(4096)
        except OSError:  # refused mid-body: the node closed on us
            pass
        finally:
            s.close()


def rss_with_open_connections(repo: str, n: int = 100) -> tuple[int, int]:
    """(RSS before, RSS while) `n` keyless connections each hold 4 KB of
    unfinished headers plus a keyless 1 MB body write pending."""
    held: list = []

    def flood(port):
        for i in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.setblocking(False)
            head = b"POST /rpc/import_session HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 4000
            if i % 2:  # half: complete keyless headers, then body bytes the node should not take in
                head = b"POST /rpc/import_session HTTP/1.1\r\nHost: x\r\nContent-Length: 250000000\r\n\r\n"
            try:
                s.send(head + (b"\0" * (1 << 20) if i % 2 else b""))
            except OSError:
                pass
            held.append(s)
        time.sleep(0.5)
    try:
        return _with_node(repo, flood)
    finally:
        for s in held:
            s.close()


def _with_node(repo: str, action) -> tuple[int, int]:
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        keyf = os.path.join(d, "k")
        with open(keyf, "w") as f:
            f.write(KEY.hex())
        os.chmod(keyf, 0o600)
        port = _free_port()
        env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.path.join(repo, "tests")}
        p = subprocess.Popen([sys.executable, os.path.join(repo, "tests", "fakes.py"), "node", "--key", keyf,
                              "--port", str(port), "--no-advertise"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        try:
            _wait_port(port)
            before = _rss(p.pid)
            action(port)
            time.sleep(0.5)
            return before, _rss(p.pid)
        finally:
            p.terminate()
            p.wait(10)


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _wait_port(port: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"node on port {port} did not start")


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_keyless_posts_do_not_grow_the_node():
    before, after = rss_after_keyless_posts(REPO, n_posts=4, size=250_000_000)
    assert after - before < 32 * 2**20, (before, after)  # was +1256 MB before the signed preamble


if __name__ == "__main__":  # python tests/integration/test_rpc_hardening.py REPO: the figures for docs/SECURITY.md
    b, a = rss_after_keyless_posts(sys.argv[1] if len(sys.argv) > 1 else REPO)
    print(f"RSS before {b / 1e6:.0f} MB, after 4 keyless 250 MB POSTs {a / 1e6:.0f} MB (+{(a - b) / 1e6:.1f} MB)")
    b, a = rss_with_open_connections(sys.argv[1] if len(sys.argv) > 1 else REPO)
    print(f"RSS before {b / 1e6:.0f} MB, with 100 open keyless connections {a / 1e6:.0f} MB "
          f"(+{(a - b) / 100 / 1e3:.0f} KB per connection)")
