"""/health, access lines on router and node, and the live session state,
against a LocalCluster of fake engines (with the openai client)."""

from __future__ import annotations

import json
import logging
import re
import shlex
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from fakes import FakeEngine, LocalCluster, encode_chat, expected_text

MSGS = [{"role": "user", "content": "hello"}]


def client(c: LocalCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=c.api_url + "/v1", api_key="unused", max_retries=0, timeout=20)


def get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def fields(line: str) -> dict:
    return dict(p.split("=", 1) for p in shlex.split(line))


def access_lines(caplog, key: str, value: str) -> list[dict]:
    out = []
    for r in caplog.records:
        if r.name == "mlxmoe.access":
            f = fields(r.getMessage())
            if f.get(key) == value:
                out.append(f)
    return out


def test_health_up_down_and_open_without_key():
    with LocalCluster([FakeEngine(group=0), FakeEngine(group=1)], api_keys=["sekret"]) as c:
        status, headers, body = get(c.api_url + "/health")
        h = json.loads(body)
        assert status == 200 and h["status"] == "ok" and h["nodes_up"] == 2 and h["nodes_known"] == 2
        assert "sekret" not in body.decode() and "s-" not in body.decode()
        assert get(c.api_url + "/status")[0] == 401  # /status still needs the key; /health does not
        status, _, body = get(c.api_url + "/health?x=%00<script>", {"Authorization": "Bearer wrong"})
        assert status == 200
        req = urllib.request.Request(c.api_url + "/health", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(req, timeout=10)
        assert ei.value.code == 405 and "/health" in json.load(ei.value)["error"]["message"]
        c.kill(0), c.kill(1)
        deadline = time.time() + 10
        while time.time() < deadline and get(c.api_url + "/health")[0] != 503:
            time.sleep(0.2)
        status, _, body = get(c.api_url + "/health")
        h = json.loads(body)
        assert status == 503 and h["status"] == "unavailable" and h["nodes_up"] == 0 and set(h) >= {"nodes_known"}


def test_access_lines_for_a_chat_on_router_and_node(caplog):
    caplog.set_level(logging.DEBUG, logger="mlxmoe.access")
    with LocalCluster([FakeEngine(group=g) for g in range(3)]) as c:
        cl = client(c)
        r = cl.chat.completions.with_raw_response.create(model="fake-moe", messages=MSGS, max_tokens=6,
                                                         extra_headers={"X-Session-Id": "my-chat"})
        sid, node = r.headers["x-mlxmoe-session"], r.headers["x-mlxmoe-node"]
        stream = cl.chat.completions.create(model="fake-moe", messages=MSGS, max_tokens=5, stream=True,
                                            extra_headers={"X-Session-Id": "my-chat"})
        text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        assert text == expected_text(encode_chat(MSGS), 5)
        with pytest.raises(openai.BadRequestError):
            cl.chat.completions.create(model="fake-moe", messages=[{"role": "user", "content": 5}])
        get(c.api_url + "/status")
        time.sleep(0.3)  # the node's line is written once its stream is closed
    lines = access_lines(caplog, "path", "/v1/chat/completions")
    assert len(lines) == 3
    ok, streamed, bad = lines
    assert ok["status"] == "200" and ok["method"] == "POST" and ok["node"] == node and ok["group"].isdigit()
    assert ok["session"].startswith("ref-") and ok["prompt_tokens"] == str(len(encode_chat(MSGS)))
    assert ok["completion_tokens"] == "6" and float(ok["ttft_s"]) >= 0 and float(ok["tok_s"]) > 0
    assert streamed["status"] == "200" and streamed["completion_tokens"] == "5" and streamed["session"] == ok["session"]
    assert bad["status"] == "400" and "session" not in bad
    log_text = "\n".join(r.getMessage() for r in caplog.records)
    assert sid not in log_text and "my-chat" not in log_text  # refs only, never the id or the client's hint
    gens = access_lines(caplog, "op", "generate")
    assert len(gens) == 2 and all(g["status"] == "200" and g["session"] == ok["session"] for g in gens)
    assert sorted(g["completion_tokens"] for g in gens) == ["5", "6"] and all(float(g["tok_s"]) > 0 for g in gens)
    assert all(g["finish_reason"] == "length" and float(g["ttft_s"]) >= 0 for g in gens)
    infos = [r for r in caplog.records if r.name == "mlxmoe.access" and "op=info" in r.getMessage()]
    assert infos and all(r.levelno == logging.DEBUG for r in infos)  # probes every few seconds: debug only
    status_lines = [r for r in caplog.records if r.name == "mlxmoe.access" and "path=/status" in r.getMessage()]
    assert status_lines and status_lines[0].levelno == logging.DEBUG


def test_unauthenticated_rpc_gets_an_access_line(caplog):
    caplog.set_level(logging.INFO, logger="mlxmoe.access")
    with LocalCluster([FakeEngine(group=0)], tls=None) as c:
        req = urllib.request.Request(c.node_url(0) + "/rpc/generate", data=b"\x00" * 10, method="POST")
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(req, timeout=10)
        assert ei.value.code in (400, 401)
        time.sleep(0.2)
    lines = access_lines(caplog, "op", "generate")
    assert lines and lines[0]["status"] == str(ei.value.code) and "session" not in lines[0]


def test_streaming_chat_shows_live_in_status_then_api_sessions_expire():
    go = threading.Event()
    with LocalCluster([FakeEngine(group=0, delay=0.05, hold=go)], api_session_ttl=0.6) as c:
        cl = client(c)
        got: list[str] = []

        def stream():
            s = cl.chat.completions.create(model="fake-moe", messages=MSGS, max_tokens=40, stream=True,
                                           extra_headers={"X-Session-Id": "live-chat"})
            got.extend(ch.choices[0].delta.content or "" for ch in s if ch.choices)

        t = threading.Thread(target=stream)
        t.start()
        deadline = time.time() + 10
        st = None
        while time.time() < deadline:
            sess = json.loads(get(c.api_url + "/status")[2])["sessions"]
            if sess and sess[0]["generating"]:
                st = sess[0]
                break
            time.sleep(0.05)
        assert st is not None and st["turns"] == 1 and st["turn_tokens"] == 0 and st["active"]  # placed, held
        go.set()
        while time.time() < deadline:
            st = json.loads(get(c.api_url + "/status")[2])["sessions"][0]
            if st["turn_tokens"] >= 5:
                break
            time.sleep(0.05)
        assert st["generating"] and st["turns"] == 1 and st["tokens"] > st["turn_tokens"] >= 5  # prompt + so far
        assert st["tok_s"] and st["tok_s"] > 0 and not st["api"]
        t.join(20)
        assert "".join(got) == expected_text(encode_chat(MSGS), 40)
        # a one-shot API chat (no session id) is kept only api_session_ttl; the named one stays
        cl.chat.completions.create(model="fake-moe", messages=[{"role": "user", "content": "one shot"}],
                                   max_tokens=3)
        sess = json.loads(get(c.api_url + "/status")[2])["sessions"]
        assert len(sess) == 2 and not any(s["generating"] for s in sess)
        assert sorted(s["api"] for s in sess) == [False, True]
        while time.time() < deadline + 10 and len(sess) > 1:
            time.sleep(0.2)
            sess = json.loads(get(c.api_url + "/status")[2])["sessions"]
        assert len(sess) == 1 and not sess[0]["api"] and sess[0]["turns"] == 1


def test_chat_page_route_is_open_and_static():
    with LocalCluster([FakeEngine(group=0)], api_keys=["sekret"]) as c:
        status, headers, body = get(c.api_url + "/chat?q=%3Cscript%3E")
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert b"sekret" not in body and b"<script>" in body and b"%3Cscript" not in body
        assert re.search(rb'<option value="split">', body)
    with LocalCluster([FakeEngine(group=0)], chat_page=False) as c:
        assert get(c.api_url + "/chat")[0] == 404


def test_json_access_lines_for_a_streamed_completion():
    import io

    from mlxmoe.cluster.accesslog import JsonFormatter
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    lg = logging.getLogger("mlxmoe.access")
    lg.addHandler(handler)
    old = lg.level
    lg.setLevel(logging.INFO)
    try:
        with LocalCluster([FakeEngine(group=0)]) as c:
            s = client(c).completions.create(model="fake-moe", prompt="once upon", max_tokens=4, stream=True)
            assert len("".join(ch.choices[0].text for ch in s if ch.choices)) > 0
            time.sleep(0.3)
    finally:
        lg.removeHandler(handler)
        lg.setLevel(old)
    lines = [json.loads(ln) for ln in buf.getvalue().splitlines()]  # every line is one JSON object
    router = [d for d in lines if d.get("path") == "/v1/completions"]
    node = [d for d in lines if d.get("op") == "generate"]
    assert len(router) == 1 and len(node) == 1
    r, n = router[0], node[0]
    assert r["status"] == 200 and r["completion_tokens"] == 4 and r["prompt_tokens"] > 0 and r["node"] == "node0"
    assert r["session"].startswith("ref-") and r["session"] == n["session"] and r["level"] == "info"
    assert n["completion_tokens"] == 4 and n["tok_s"] > 0 and isinstance(n["ttft_s"], float)


def test_api_session_continued_by_its_id_is_kept():
    with LocalCluster([FakeEngine(group=0)]) as c:
        cl = client(c)
        r = cl.chat.completions.with_raw_response.create(model="fake-moe", messages=MSGS, max_tokens=3)
        sid = r.headers["x-mlxmoe-session"]
        assert [s["api"] for s in c.router.status()["sessions"]] == [True]
        msgs = MSGS + [{"role": "assistant", "content": r.parse().choices[0].message.content},
                       {"role": "user", "content": "more"}]
        r2 = cl.chat.completions.with_raw_response.create(model="fake-moe", messages=msgs, max_tokens=3,
                                                          extra_headers={"X-Mlxmoe-Session": sid})
        assert r2.headers["x-mlxmoe-session"] == sid
        assert [(s["api"], s["turns"]) for s in c.router.status()["sessions"]] == [(False, 2)]


def test_one_shot_completion_shows_only_while_it_streams():
    go = threading.Event()
    with LocalCluster([FakeEngine(group=0, hold=go)]) as c:
        done: list[str] = []
        t = threading.Thread(target=lambda: done.extend(
            ch.choices[0].text for ch in client(c).completions.create(model="fake-moe", prompt="once", max_tokens=3,
                                                                       stream=True) if ch.choices))
        t.start()
        deadline, sess = time.time() + 10, []
        while time.time() < deadline and not sess:
            sess = json.loads(get(c.api_url + "/status")[2])["sessions"]
            time.sleep(0.05)
        assert len(sess) == 1 and sess[0]["generating"] and sess[0]["api"]
        go.set()
        t.join(20)
        assert done and json.loads(get(c.api_url + "/status")[2])["sessions"] == []


class BrokenEngine(FakeEngine):
    """An engine that loads but cannot generate (as gpt_oss did with a quantized KV cache)."""

    def generate(self, session_id, prompt, params):
        raise NotImplementedError("RotatingKVCache Quantization NYI")


def test_a_node_that_cannot_generate_is_not_up():
    with LocalCluster([BrokenEngine(group=0)]) as c:
        status, _, body = get(c.api_url + "/health")
        health = json.loads(body)
        assert status == 503 and health["nodes_up"] == 0 and health["nodes_known"] == 1
        assert any("cannot generate: NotImplementedError: RotatingKVCache" in w for w in health["why"])
        peer = json.loads(get(c.api_url + "/status")[2])["peers"][0]
        assert peer["state"] == "down" and "cannot generate" in peer["reason"]
        with pytest.raises(openai.APIStatusError) as e:
            client(c).chat.completions.create(model="fake-moe", messages=MSGS, max_tokens=4)
        assert e.value.status_code == 503


def test_health_says_why_no_node_is_up_and_logs_no_down_before_up(caplog):
    caplog.set_level(logging.INFO, logger="mlxmoe")
    with LocalCluster([FakeEngine(group=0)]) as c:
        assert get(c.api_url + "/health")[0] == 200
        c.kill(0)
        deadline = time.time() + 15
        while get(c.api_url + "/health")[0] == 200 and time.time() < deadline:
            time.sleep(0.2)
        status, _, body = get(c.api_url + "/health")
        assert status == 503 and json.loads(body)["why"]
    peer_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("peer ")]
    assert peer_lines and ": up" in peer_lines[0], peer_lines  # its first news is "up", not "down"
