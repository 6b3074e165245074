"""Router with FakeEngine nodes on loopback: placement, ties/overload,
pinning (session id and message prefix), failover mid-stream (node error and
node killed), admission control, and the /status schema."""

from __future__ import annotations

import json
import threading
import time

import openai
import pytest

from fakes import FakeEngine, FakeFrontend, LocalCluster, encode_chat, expected_text

pytestmark = pytest.mark.timeout(60)


def client(c: LocalCluster, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=c.api_url + "/v1", api_key="unused", max_retries=0, timeout=20, **kw)


def chat(cl, messages, **kw):
    r = cl.chat.completions.with_raw_response.create(model="fake-moe", messages=messages, **kw)
    return r.headers, r.parse()


def three(**kw):
    return [FakeEngine(group=g, **kw) for g in range(3)]


def test_placement_on_best_group_with_headers_and_status():
    with LocalCluster(three()) as c:
        msgs = [{"role": "user", "content": "tell me about topic2"}]
        h, out = chat(client(c), msgs, max_tokens=10)
        assert h["x-mlxmoe-node"] == c.peer_name(2) and h["x-mlxmoe-group"] == "2"
        scores = json.loads(h["x-mlxmoe-scores"])
        assert scores["2"] == 0.8 and float(h["x-mlxmoe-margin"]) == pytest.approx(0.69, abs=1e-3)
        assert out.choices[0].message.content == expected_text(encode_chat(msgs), 10)
        st = c.router.status()
        assert set(st) == {"model", "manifest_hash", "uptime_s", "peers", "sessions", "last_placement", "counters",
                           "mobility", "traffic"}
        assert {p["state"] for p in st["peers"]} == {"up"} and all(p["reason"] is None for p in st["peers"])
        assert set(st["peers"][0]) >= {"name", "url", "groups", "manifest_hash", "protocol", "free_memory",
                                       "active_sessions", "state", "reason", "backend"}
        (s,) = st["sessions"]
        assert s["id"] == h["x-mlxmoe-session"] and s["group"] == 2 and s["mode"] == "pin"
        assert s["turns"] == 1 and s["tokens"] == out.usage.total_tokens and set(s["scores"]) == {"0", "1", "2"}
        lp = st["last_placement"]
        assert lp["session"] == s["id"] and lp["best"] == 2 and lp["layers"] == [1, 2] and lp["elapsed_ms"] >= 0
        assert st["counters"] == {"requests": 1, "failovers": 0, "rejected": 0, "migrations": 0, "races": 0}


def test_tie_goes_to_least_loaded_node():
    front = FakeFrontend(fixed={0: 0.5, 1: 0.495, 2: 0.1})  # 0 and 1 within tie_margin
    with LocalCluster(three(), frontend=front) as c:
        cl = client(c)
        nodes = [chat(cl, [{"role": "user", "content": f"q{i}"}], max_tokens=2, temperature=0.7)[0]["x-mlxmoe-node"]
                 for i in range(4)]
        assert sorted(nodes) == sorted([c.peer_name(0), c.peer_name(1)] * 2)  # spread, never group 2
        # greedy (the default): the best score among the tied groups, every time
        again = {chat(cl, [{"role": "user", "content": f"p{i}"}], max_tokens=2)[0]["x-mlxmoe-node"] for i in range(4)}
        assert again == {c.peer_name(0)}


def test_overloaded_best_node_goes_to_next():
    engines = [FakeEngine(group=0), FakeEngine(group=1, max_sessions=0), FakeEngine(group=2)]
    with LocalCluster(engines) as c:
        h, _ = chat(client(c), [{"role": "user", "content": "topic1"}], max_tokens=3)
        assert h["x-mlxmoe-node"] != c.peer_name(1)


def test_all_full_is_429_with_retry_after_then_recovers():
    engines = [FakeEngine(group=g, max_sessions=0) for g in range(2)]
    with LocalCluster(engines) as c:
        with pytest.raises(openai.RateLimitError) as ei:
            chat(client(c), [{"role": "user", "content": "hi"}], max_tokens=3)
        assert ei.value.response.headers["retry-after"] == "2"
        assert ei.value.body["code"] == "overloaded"
        assert c.router.status()["counters"]["rejected"] == 1 and c.router.status()["sessions"] == []
        engines[0].max_sessions = None
        c.router.fleet.busy_until.clear()
        chat(client(c), [{"role": "user", "content": "hi"}], max_tokens=3)


def test_no_nodes_is_503():
    with LocalCluster([FakeEngine(group=0)]) as c:
        c.kill(0)
        with pytest.raises(openai.InternalServerError) as ei:
            chat(client(c), [{"role": "user", "content": "hi"}], max_tokens=3)
        assert ei.value.status_code == 503 and "retry-after" in ei.value.response.headers


def test_pinning_by_session_header_reuses_node_cache():
    with LocalCluster(three()) as c:
        cl = client(c, default_headers={"X-Session-Id": "conv-42"})
        h1, _ = chat(cl, [{"role": "user", "content": "topic0 first"}], max_tokens=5)
        h2, _ = chat(cl, [{"role": "user", "content": "topic0 first"}, {"role": "user", "content": "now topic2"}],
                     max_tokens=5)
        assert h1["x-mlxmoe-node"] == h2["x-mlxmoe-node"] == c.peer_name(0)
        assert h1["x-mlxmoe-session"] == h2["x-mlxmoe-session"]
        assert c.frontend.score_calls == 1  # scored once per conversation
        assert c.engines[0].reused[-1][1] > 0
        # the router's own session id works as a hint too
        h3, _ = chat(client(c, default_headers={"X-Session-Id": h1["x-mlxmoe-session"]}),
                     [{"role": "user", "content": "topic1"}], max_tokens=2)
        assert h3["x-mlxmoe-session"] == h1["x-mlxmoe-session"]


def test_pinning_by_message_prefix():
    with LocalCluster(three()) as c:
        cl = client(c)
        sys_msg = {"role": "system", "content": "be brief"}
        m1 = [sys_msg, {"role": "user", "content": "topic1 hello"}]
        h1, o1 = chat(cl, m1, max_tokens=6)
        m2 = m1 + [{"role": "assistant", "content": o1.choices[0].message.content},
                   {"role": "user", "content": "topic2 more"}]
        h2, o2 = chat(cl, m2, max_tokens=6)
        assert h2["x-mlxmoe-session"] == h1["x-mlxmoe-session"] and h2["x-mlxmoe-node"] == c.peer_name(1)
        # the next token the node saw extends its cache: prompt + reply were reused
        assert c.engines[1].reused[-1][1] >= len(encode_chat(m1)) + 6
        # same system prompt, new first turn: a new conversation
        h3, _ = chat(cl, [sys_msg, {"role": "user", "content": "topic1 hello"}], max_tokens=2)
        assert h3["x-mlxmoe-session"] != h1["x-mlxmoe-session"]
        # an edited history does not match
        m2b = m1 + [{"role": "assistant", "content": "something else"}, {"role": "user", "content": "x"}]
        h4, _ = chat(cl, m2b, max_tokens=2)
        assert h4["x-mlxmoe-session"] not in (h1["x-mlxmoe-session"], h3["x-mlxmoe-session"])
        assert [s["turns"] for s in c.router.status()["sessions"]] == [2, 1, 1]


def test_failover_when_node_errors_mid_stream():
    engines = [FakeEngine(group=0), FakeEngine(group=1, fail_after=5), FakeEngine(group=2)]
    with LocalCluster(engines) as c:
        msgs = [{"role": "user", "content": "topic1 go"}]
        stream = client(c).chat.completions.create(model="fake-moe", messages=msgs, max_tokens=20, stream=True,
                                                   stream_options={"include_usage": True})
        text, usage, finish = "", None, None
        for ch in stream:
            if ch.usage:
                usage = ch.usage
            for choice in ch.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        assert text == expected_text(encode_chat(msgs), 20)  # nothing lost, nothing repeated
        assert usage.completion_tokens == 20 and finish == "length"
        st = c.router.status()
        assert st["counters"]["failovers"] == 1
        assert st["sessions"][0]["node"] != c.peer_name(1)
        # an engine error does not take the node out: it is still up
        assert all(p["state"] == "up" for p in st["peers"])


def test_failover_when_node_killed_mid_stream():
    with LocalCluster(three(delay=0.02)) as c:
        msgs = [{"role": "user", "content": "topic2 story"}]
        stream = client(c).chat.completions.create(model="fake-moe", messages=msgs, max_tokens=40, stream=True)
        text, n = "", 0
        for ch in stream:
            for choice in ch.choices:
                text += choice.delta.content or ""
            n += 1
            if n == 8:
                threading.Thread(target=c.kill, args=(2,)).start()
        assert text == expected_text(encode_chat(msgs), 40)
        st = c.router.status()
        assert st["counters"]["failovers"] == 1
        assert st["sessions"][0]["node"] in (c.peer_name(0), c.peer_name(1))
        assert st["sessions"][0]["group"] == 1  # the next best group (scores 0.8 / 0.11 / 0.1)


def test_pinned_node_gone_between_turns_replaces_session():
    with LocalCluster(three()) as c:
        cl = client(c, default_headers={"X-Session-Id": "abc"})
        h1, _ = chat(cl, [{"role": "user", "content": "topic0"}], max_tokens=3)
        c.kill(0)
        h2, o2 = chat(cl, [{"role": "user", "content": "topic0"}, {"role": "user", "content": "again"}],
                      max_tokens=3)
        assert h2["x-mlxmoe-session"] == h1["x-mlxmoe-session"] and h2["x-mlxmoe-node"] != c.peer_name(0)
        st = c.router.status()
        assert st["counters"]["failovers"] == 1
        dead = next(p for p in st["peers"] if p["name"] == c.peer_name(0))
        assert dead["state"] == "down" and "node" in dead["reason"]


def test_probe_marks_dead_node_down_and_back():
    with LocalCluster(three()) as c:
        c.kill(1)
        deadline = time.time() + 5
        while time.time() < deadline and c.router.peers.by_url(c.node_url(1)).state != "down":
            time.sleep(0.1)
        p = c.router.peers.by_url(c.node_url(1))
        assert p.state == "down" and "info probe failed" in p.reason


def test_context_overflow_is_clear_400():
    with LocalCluster([FakeEngine(group=g, max_context=40) for g in range(2)]) as c:
        with pytest.raises(openai.BadRequestError) as ei:
            chat(client(c), [{"role": "user", "content": "x" * 30}], max_tokens=30)
        assert ei.value.body["code"] == "context_length_exceeded" and "context limit" in ei.value.body["message"]
        assert c.router.status()["sessions"] == []


def test_ignored_peer_of_other_manifest():
    engines = [FakeEngine(group=0), FakeEngine(group=1, manifest_hash="different")]
    with LocalCluster(engines) as c:
        peers = {p["url"]: p for p in c.router.status()["peers"]}
        bad = peers[c.node_url(1)]
        assert bad["state"] == "ignored" and "different" in bad["reason"]
        h, _ = chat(client(c), [{"role": "user", "content": "topic1"}], max_tokens=2)
        assert h["x-mlxmoe-node"] == c.peer_name(0)


def test_client_disconnect_mid_stream_frees_the_node_session(caplog):
    import http.client
    import logging
    import urllib.parse
    caplog.set_level(logging.INFO)
    with LocalCluster(three(delay=0.02)) as c:
        u = urllib.parse.urlparse(c.api_url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        body = json.dumps({"model": "fake-moe", "messages": [{"role": "user", "content": "topic0"}], "max_tokens": 500,
                           "stream": True})
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json",
                                                                          "X-Session-Id": "gone"})
        r = conn.getresponse()
        assert r.status == 200 and r.read(200)
        conn.sock.close()  # the client goes away mid-stream
        conn.close()
        deadline = time.time() + 5
        while time.time() < deadline and (c.engines[0].busy or c.router.sessions.find(
                "gone", None).lock.locked()):
            time.sleep(0.05)
        assert not c.engines[0].busy and c.engines[0].generated < 500  # the node stopped generating
        time.sleep(0.3)  # the access lines of the ended streams
        lines = [r.getMessage() for r in caplog.records]
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], lines  # quietly
        ended = [ln for ln in lines if "op=generate" in ln or "path=/v1/chat/completions" in ln]
        assert ended and all("status=499" in ln for ln in ended), ended  # no 5xx on router or node
        h, _ = chat(client(c, default_headers={"X-Session-Id": "gone"}), [{"role": "user", "content": "topic0"}],
                    max_tokens=3)
        assert h["x-mlxmoe-node"] == c.peer_name(0)
