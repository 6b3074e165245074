"""The router's public API under hostile input (docs/SECURITY.md): prompts
checked before any scoring, whole bodies up to the limit, 4xx naming the
field (never 5xx), model names, API keys, sessions bound to their client,
and the HTTP limits (header/body timeouts, connection cap)."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.parse
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakes import FakeEngine, LocalCluster
from mlxmoe.cluster.api.app import HttpLimits
from mlxmoe.cluster.limits import Limits
from mlxmoe.cluster.sessionview import session_ref

pytestmark = pytest.mark.timeout(300)
CHAT, COMP = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "topic1 hello"}]


class Cluster(LocalCluster):
    """LocalCluster with HTTP limits and, optionally, a frontend built on the router's thread."""

    def __init__(self, engines, limits=HttpLimits(), frontend_factory=None, **kw):
        super().__init__(engines, **kw)
        self.limits, self.frontend_factory = limits, frontend_factory

    async def _start(self):
        from mlxmoe.cluster.api import start_router
        from mlxmoe.cluster.node_server import start_node
        from mlxmoe.cluster.router import Router
        from mlxmoe.ui.status_page import render
        for i, e in enumerate(self.engines):
            self.nodes.append(await start_node(e, self.key, "127.0.0.1", 0, advertise=False, name=self.names[i]))
        fe = None if self.frontend_factory else self.frontend
        router = Router(fe, self.key, frontend_factory=self.frontend_factory,
                        static_peers=[n.url for n in self.nodes], mdns=False, **self.router_kw)
        self.running = await start_router(router, "127.0.0.1", 0, page=render, limits=self.limits)


@pytest.fixture(scope="module")
def cluster():
    with Cluster([FakeEngine(group=g) for g in range(3)], vocab_size=256,
                 limits=HttpLimits(idle_timeout=1.5, body_timeout=1.5)) as c:
        yield c


def _addr(url):
    u = urllib.parse.urlparse(url)
    return u.hostname, u.port


def raw(url, data: bytes, parts: int = 1, pause: float = 0.05, timeout: float = 20) -> tuple[int, dict, bytes]:
    """Send `data` in `parts` TCP writes; (status, headers, body) of the answer."""
    s = socket.create_connection(_addr(url), timeout=timeout)
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        step = max(1, len(data) // parts)
        for i in range(0, len(data), step):
            s.sendall(data[i:i + step])
            time.sleep(pause)
        return _read_response(s)
    finally:
        s.close()


def _read_response(s) -> tuple[int, dict, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        got = s.recv(65536)
        if not got:
            break
        buf += got
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
    n = int(headers.get("content-length", "0"))
    while len(body) < n:
        got = s.recv(65536)
        if not got:
            break
        body += got
    return int(lines[0].split()[1]), headers, body


def request(method: str, path: str, body: bytes = b"", headers: dict | None = None) -> bytes:
    h = {"Host": "x", "Content-Type": "application/json", "Content-Length": str(len(body)), "Connection": "close",
         **(headers or {})}
    return (f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n").encode() + body


def post(url, path, body, headers=None) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, h, b = raw(url, request("POST", path, data, headers))
    return status, h, json.loads(b) if b.strip() else {}


def get(url, path, headers=None) -> tuple[int, dict, bytes]:
    return raw(url, request("GET", path, b"", headers))


def refused(url, path, body, param, code=None, status=400, headers=None) -> dict:
    st_, _, out = post(url, path, body, headers)
    assert st_ == status, out
    err = out["error"]
    assert err["param"] == param and err["message"], err
    if code:
        assert err["code"] == code, err
    return err


# ---------------------------------------------------------------- 1: validate before any work

def test_token_ids_and_length_are_checked_before_scoring(cluster):
    fe = cluster.frontend
    before = fe.score_calls
    for bad in ([1, 2147483647], [1, 256], [-1, 3], [1, 2 ** 70]):
        refused(cluster.api_url, COMP, {"prompt": bad, "max_tokens": 2}, "prompt", "invalid_value")
    assert cluster.router.context_limit == 8192  # what the nodes report
    refused(cluster.api_url, COMP, {"prompt": [97] * 60000, "max_tokens": 2}, "prompt", "context_length_exceeded")
    refused(cluster.api_url, COMP, {"prompt": [97] * 8192, "max_tokens": 2}, "prompt", "context_length_exceeded")
    refused(cluster.api_url, COMP, {"prompt": "a" * 60000}, "prompt", "context_length_exceeded")
    refused(cluster.api_url, COMP, {"prompt": "a" * 600000}, "prompt", "context_length_exceeded")  # not even tokenized
    refused(cluster.api_url, CHAT, {"messages": [{"role": "user", "content": "ab"}] * 10000}, "messages",
            "context_length_exceeded")
    refused(cluster.api_url, CHAT, {"messages": [{"role": "user", "content": "a"}] * 10001}, "messages",
            "invalid_value")
    assert fe.score_calls == before  # nothing was scored
    st_, _, out = post(cluster.api_url, COMP, {"prompt": [97] * 8000, "max_tokens": 2})
    assert st_ == 200 and out["usage"]["prompt_tokens"] == 8000 and fe.score_calls == before + 1


def test_router_never_scores_a_prompt_past_the_context(cluster):
    """The last guard, in Router.session_for itself (whatever the caller)."""
    from mlxmoe.errors import ContextOverflow
    with pytest.raises(ContextOverflow):
        cluster.run(cluster.router.session_for([1] * 9000))
    with pytest.raises(ContextOverflow):
        cluster.run(cluster.router.session_for([300]))


# ---------------------------------------------------------------- 3: bodies

def test_body_in_two_writes_and_large_valid_bodies(cluster):
    body = json.dumps({"messages": [{"role": "user", "content": "hi" + "x" * 24}], "max_tokens": 2}).encode()
    assert len(body) == 90
    s = socket.create_connection(_addr(cluster.api_url), timeout=20)
    try:  # the headers and half the body, then the rest in a second TCP write
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(request("POST", CHAT, body)[:-45])
        time.sleep(0.3)
        s.sendall(body[-45:])
        status, _, out = _read_response(s)
    finally:
        s.close()
    assert status == 200 and json.loads(out)["usage"]["completion_tokens"] == 2, out
    padded = body[:-1] + b" " * (3 << 20) + b"}"  # a valid 3 MiB body
    status, _, out = raw(cluster.api_url, request("POST", CHAT, padded), parts=8, pause=0)
    assert status == 200, out
    exact = body[:-1] + b" " * ((8 << 20) - len(body)) + b"}"
    assert len(exact) == 8 << 20
    status, _, out = raw(cluster.api_url, request("POST", CHAT, exact))
    assert status == 200, out


def test_oversized_chunked_body_is_413(cluster):
    s = socket.create_connection(_addr(cluster.api_url), timeout=20)
    try:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))
        sent = 0
        try:
            while sent < 100:  # up to 100 MiB, but the router answers past 8 MiB
                s.sendall(chunk)
                sent += 1
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, _, body = _read_response(s)
    finally:
        s.close()
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"  # the rest was discarded


def test_slow_body_times_out_with_408(cluster):
    s = socket.create_connection(_addr(cluster.api_url), timeout=20)
    try:
        s.sendall(request("POST", CHAT, b"")[:-4].replace(b"Content-Length: 0", b"Content-Length: 100") +
                  b"\r\n\r\n{\"messa")
        t0 = time.time()
        status, _, body = _read_response(s)
    finally:
        s.close()
    assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout" and time.time() - t0 < 10


# ---------------------------------------------------------------- 6: 5xx on bad input

@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": {"a": 1}, "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": ["user"], "content": "x"}]}, "messages[0].role"),
    ({"messages": USER, "seed": 2 ** 64}, "seed"),
    ({"messages": USER, "seed": -1}, "seed"),
    ({"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, "messages[0].content[0].text"),
    ({"messages": USER, "stop": ["\ud800"]}, "stop"),
    ({"messages": USER, "user": "\ud800"}, "user"),
    ({"messages": USER, "temperature": 10 ** 400}, "temperature"),
    ({"messages": USER, "top_p": 1e400}, "top_p"),
    ({"messages": USER, "presence_penalty": 10 ** 400}, "presence_penalty"),
    ({"messages": USER, "model": ["fake-moe"]}, "model"),
])
def test_bad_values_are_400_naming_the_field(cluster, body, param):
    err = refused(cluster.api_url, CHAT, body, param)
    assert "binding" not in err["message"] and "internal" not in err["message"]


def test_nan_and_surrogates_in_raw_json(cluster):
    for raw_body, param in ((b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "temperature"),
                            (b'{"messages": [{"role": "user", "content": "x"}], "top_p": Infinity}', "top_p"),
                            (b'{"prompt": "\\ud800"}', "prompt")):
        path = COMP if b"prompt" in raw_body else CHAT
        refused(cluster.api_url, path, raw_body, param)
    st_, _, out = post(cluster.api_url, CHAT, {"messages": USER, "seed": 2 ** 64 - 1, "max_tokens": 2})
    assert st_ == 200, out


def test_model_names(cluster):
    refused(cluster.api_url, CHAT, {"model": "gpt-4", "messages": USER}, "model", "model_not_found", 404)
    refused(cluster.api_url, COMP, {"model": "x", "prompt": "hi"}, "model", "model_not_found", 404)
    assert post(cluster.api_url, CHAT, {"model": "fake-moe", "messages": USER, "max_tokens": 2})[0] == 200
    status, _, body = get(cluster.api_url, "/v1/models/fake-moe")
    assert status == 200 and json.loads(body)["id"] == "fake-moe" and json.loads(body)["object"] == "model"
    status, _, body = get(cluster.api_url, "/v1/models/other")
    assert status == 404 and json.loads(body)["error"]["code"] == "model_not_found"


# ---------------------------------------------------------------- 9: API keys and sessions

@pytest.fixture(scope="module")
def keyed():
    with Cluster([FakeEngine(group=g) for g in range(3)], api_keys=["alice-key", "bob-key"]) as c:
        yield c


def _bearer(k):
    return {"Authorization": f"Bearer {k}"}


def test_api_key_is_required_on_every_route(keyed):
    u = keyed.api_url
    for path in ("/v1/models", "/v1/models/fake-moe", "/status"):
        for h in ({}, _bearer("wrong"), {"Authorization": "alice-key"}, _bearer("")):
            status, _, body = get(u, path, h)
            assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key", (path, h)
        assert get(u, path, _bearer("alice-key"))[0] == 200
    for path, body in ((CHAT, {"messages": USER}), (COMP, {"prompt": "hi"})):
        st_, _, out = post(u, path, body, _bearer("nope"))
        assert st_ == 401 and out["error"]["code"] == "invalid_api_key"
    assert keyed.frontend.score_calls == 0
    st_, _, out = post(u, CHAT, {"messages": USER, "max_tokens": 2}, _bearer("bob-key"))
    assert st_ == 200


def test_sessions_are_bound_to_their_client_and_hidden(keyed):
    u = keyed.api_url
    st_, h, _ = post(u, CHAT, {"messages": USER, "max_tokens": 2}, {**_bearer("alice-key"), "X-Session-Id": "conv"})
    sid = h["x-mlxmoe-session"]
    assert st_ == 200 and sid.startswith("s-") and len(sid) >= 2 + 22  # >= 128 random bits
    # Alice continues her session by its id or her hint
    for hint in (sid, "conv"):
        assert post(u, CHAT, {"messages": USER, "max_tokens": 2},
                    {**_bearer("alice-key"), "X-Mlxmoe-Session": hint})[1]["x-mlxmoe-session"] == sid
    # Bob sending Alice's id or hint gets a session of his own
    for hint in (sid, "conv"):
        st_, hb, _ = post(u, CHAT, {"messages": USER, "max_tokens": 2}, {**_bearer("bob-key"), "X-Session-Id": hint})
        assert st_ == 200 and hb["x-mlxmoe-session"] != sid
    mine = json.loads(get(u, "/status", _bearer("alice-key"))[2])["sessions"]
    theirs = json.loads(get(u, "/status", _bearer("bob-key"))[2])["sessions"]
    assert sid in [s["id"] for s in mine] and sid not in json.dumps(theirs)
    assert session_ref(sid) in [s["id"] for s in theirs]
    page = get(u, "/")[2].decode()
    assert get(u, "/")[0] == 200 and sid not in page and "alice-key" not in page and session_ref(sid) in page


def test_keyless_status_shows_no_session_ids(cluster):
    st_, h, _ = post(cluster.api_url, CHAT, {"messages": USER, "max_tokens": 2, "user": "u1"})
    sid = h["x-mlxmoe-session"]
    body = get(cluster.api_url, "/status")[2].decode()
    assert sid not in body and session_ref(sid) in body
    assert sid not in get(cluster.api_url, "/")[2].decode()


# ---------------------------------------------------------------- 8: HTTP limits

def test_unfinished_headers_are_dropped_and_others_served(cluster):
    socks = []
    try:
        for _ in range(100):
            s = socket.create_connection(_addr(cluster.api_url), timeout=10)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
            socks.append(s)
        assert post(cluster.api_url, CHAT, {"messages": USER, "max_tokens": 2})[0] == 200  # meanwhile
        t0 = time.time()
        for s in socks:
            try:
                assert s.recv(100) == b""  # closed by the router (idle_timeout 1.5 s)
            except ConnectionResetError:
                pass
        assert time.time() - t0 < 9
    finally:
        for s in socks:
            s.close()
    assert post(cluster.api_url, CHAT, {"messages": USER, "max_tokens": 2})[0] == 200


def test_connection_cap_evicts_idle_connections_for_a_real_client():
    with Cluster([FakeEngine(group=0, n_groups=1)], limits=HttpLimits(connections=Limits(max_connections=8))) as c:
        socks = [socket.create_connection(_addr(c.api_url), timeout=10) for _ in range(12)]  # idle: no request
        try:
            time.sleep(0.3)
            assert get(c.api_url, "/v1/models")[0] == 200  # at the cap: the oldest idle one made room
            closed = 0
            for s in socks:
                s.settimeout(0.2)
                try:
                    closed += s.recv(100) == b""
                except ConnectionResetError:
                    closed += 1
                except socket.timeout:
                    pass
            assert closed >= 5  # 12 idle on a cap of 8, then one real client
        finally:
            for s in socks:
                s.close()


# ---------------------------------------------------------------- hypothesis over the bodies

scalars = (st.none() | st.booleans() | st.integers() | st.integers(-2 ** 70, 2 ** 70) | st.floats() |
           st.text(max_size=12) | st.sampled_from(["\ud800", "user", "assistant", "fake-moe", "", "race"]))
json_values = st.recursive(scalars, lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=8), ch,
                                                                                         max_size=4), max_leaves=16)
message = st.dictionaries(st.sampled_from(["role", "content", "name", "x"]), json_values, max_size=3) | st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool"]),
     "content": st.text(max_size=30) | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=8)}),
                                              max_size=3) | json_values})
FIELDS = {"model": st.sampled_from(["fake-moe"]) | json_values, "messages": st.lists(message, max_size=4) | json_values,
          "prompt": st.text(max_size=40) | st.lists(st.integers(-5, 300), max_size=20) | st.lists(st.integers(), max_size=5)
          | json_values,
          "max_tokens": st.integers(-2, 12) | json_values, "max_completion_tokens": st.integers(-2, 12) | json_values,
          "temperature": json_values, "top_p": json_values, "stream": st.booleans() | json_values,
          "stop": json_values, "logprobs": json_values, "top_logprobs": json_values, "n": json_values,
          "user": json_values, "session_id": json_values, "stream_options": json_values, "seed": json_values,
          "presence_penalty": json_values, "frequency_penalty": json_values, "echo": json_values,
          "suffix": json_values, "mlxmoe": json_values | st.fixed_dictionaries({"mode": json_values})}
bodies = st.fixed_dictionaries({}, optional=FIELDS) | json_values


def _fuzz_one(c, body, path):
    try:
        data = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    except (ValueError, RecursionError):
        return
    status, headers, out = raw(c.api_url, request("POST", path, data))
    assert status < 500, out[:300]
    if status >= 400:
        err = json.loads(out)["error"]
        assert err["message"] and err["type"] == "invalid_request_error"
    elif headers.get("content-type", "").startswith("text/event-stream"):
        assert out.rstrip().endswith(b"data: [DONE]") or b"chunked" in headers.get("transfer-encoding", "").encode()


def _still_serves(c):
    st_, _, out = post(c.api_url, CHAT, {"messages": USER, "max_tokens": 2})
    assert st_ == 200 and out["usage"]["completion_tokens"] >= 1


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, path=st.sampled_from([CHAT, COMP]))
def test_fuzz_api_bodies_never_5xx(cluster, body, path):
    _fuzz_one(cluster, body, path)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, path=st.sampled_from([CHAT, COMP]))
def test_fuzz_api_bodies_never_5xx_slow(cluster, body, path):
    _fuzz_one(cluster, body, path)


def test_after_fuzz_the_router_still_serves(cluster):
    _still_serves(cluster)


# ---------------------------------------------------------------- the real front end

REFERENCE = Path(__file__).parents[2] / "mlxmoe" / "assets" / "reference-moe"


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from mlxmoe.bundle.split import split
    from mlxmoe.node.trunk import TrunkFrontend
    out = tmp_path_factory.mktemp("hardening") / "b3"
    man = split(str(REFERENCE), out, 3)
    engines = [FakeEngine(group=g, n_groups=3, model_id=man.model_id, manifest_hash=man.hash) for g in range(3)]
    with Cluster(engines, frontend_factory=lambda: TrunkFrontend.load(str(out))) as c:
        yield c


def test_real_frontend_refuses_bad_ids_and_long_prompts_fast(real):
    import psutil
    u = real.api_url
    assert real.router.vocab_size == 4096 and real.router.context_limit == 2048
    refused(u, COMP, {"prompt": [1, 2147483647]}, "prompt", "invalid_value")
    refused(u, COMP, {"prompt": [1, 4096]}, "prompt", "invalid_value")
    proc = psutil.Process(os.getpid())
    rss0, figures = proc.memory_info().rss, {}
    for name, body in (("ids", {"prompt": [5] * 60000}), ("text", {"prompt": "hello world " * 15000}),
                       ("text_tokenized", {"prompt": "hello world " * 10000}),
                       ("chat", {"messages": [{"role": "user", "content": "hi"}] * 10000})):
        t0 = time.perf_counter()
        err = refused(u, CHAT if "messages" in body else COMP, body, "messages" if "messages" in body else "prompt",
                      "context_length_exceeded")
        figures[name] = round(time.perf_counter() - t0, 3)
        assert "2048" in err["message"]
    figures["rss_growth_mb"] = round((proc.memory_info().rss - rss0) / 1e6, 1)
    print("refuse 60k-token prompts:", json.dumps(figures))
    assert figures["rss_growth_mb"] < 500
    st_, _, out = post(u, COMP, {"prompt": [5, 6, 7], "max_tokens": 2})  # the node (a FakeEngine) runs ids < 256
    assert st_ == 200, out


def test_scoring_sees_at_most_the_window(cluster):
    fe, seen = cluster.frontend, []
    score = fe.score
    fe.score = lambda tokens: seen.append(len(tokens)) or score(tokens)
    try:
        cluster.router.score_window = 100
        st_, _, out = post(cluster.api_url, COMP, {"prompt": [97] * 5000, "max_tokens": 2})
    finally:
        fe.score, cluster.router.score_window = score, 4096
    assert st_ == 200 and out["usage"]["prompt_tokens"] == 5000 and seen == [100]


def test_a_keyed_router_still_serves_the_public_status_to_its_page_and_tools(keyed, monkeypatch):
    from mlxmoe.ui import fetch_status

    u = keyed.api_url
    st_, h, _ = post(u, CHAT, {"messages": USER, "max_tokens": 2}, _bearer("alice-key"))
    sid = h["x-mlxmoe-session"]
    status, _, body = get(u, "/status/public")
    assert status == 200 and sid not in body.decode() and session_ref(sid) in body.decode()
    monkeypatch.delenv("MLXMOE_API_KEY", raising=False)
    public = fetch_status(u)  # the menu bar, doctor, chat's /status: no key, the public view
    assert sid not in json.dumps(public) and session_ref(sid) in [s["id"] for s in public["sessions"]]
    monkeypatch.setenv("MLXMOE_API_KEY", "alice-key")
    assert sid in [s["id"] for s in fetch_status(u)["sessions"]]  # with the key: its own sessions' ids
    monkeypatch.setenv("MLXMOE_API_KEY", "wrong")
    assert sid not in json.dumps(fetch_status(u))  # refused: falls back to the public view
