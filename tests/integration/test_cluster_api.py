"""The router's OpenAI-compatible API through the `openai` client, and
malformed/oversized requests (hypothesis): every refusal is a clear 4xx in
OpenAI's error shape, nothing crashes."""

from __future__ import annotations

import http.client
import json
import urllib.parse

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakes import MODEL, FakeEngine, LocalCluster, encode, encode_chat, expected_text

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster([FakeEngine(group=g, max_context=4096) for g in range(3)]) as c:
        yield c


@pytest.fixture
def cl(cluster):
    return openai.OpenAI(base_url=cluster.api_url + "/v1", api_key="unused", max_retries=0, timeout=20)


MSGS = [{"role": "system", "content": "you are terse"}, {"role": "user", "content": "topic1 say something"}]


def test_chat_non_streaming_with_usage_and_logprobs(cl):
    out = cl.chat.completions.create(model="fake-moe", messages=MSGS, max_tokens=12, logprobs=True)
    assert out.object == "chat.completion" and out.model == "fake-moe"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected_text(encode_chat(MSGS), 12)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(encode_chat(MSGS)) and out.usage.completion_tokens == 12
    lps = out.choices[0].logprobs.content
    assert len(lps) == 12 and all(lp.logprob < 0 for lp in lps)
    assert "".join(lp.token for lp in lps) == out.choices[0].message.content


def test_chat_streaming(cl):
    chunks = list(cl.chat.completions.create(model="fake-moe", messages=MSGS, max_completion_tokens=9,
                                             stream=True, logprobs=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text(encode_chat(MSGS), 9)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 9 and chunks[-1].choices == []


def test_chat_stop_string(cl):
    full = expected_text(encode_chat(MSGS), 30)
    stop = full[10:12]
    out = cl.chat.completions.create(model="fake-moe", messages=MSGS, max_tokens=30, stop=[stop])
    assert out.choices[0].finish_reason == "stop" and out.choices[0].message.content == full[:full.index(stop)]
    assert len(out.choices[0].message.content) <= 10  # the stop string itself is not sent


def test_completions_both_modes(cl):
    out = cl.completions.create(model="fake-moe", prompt="once upon a time", max_tokens=7, logprobs=1)
    assert out.choices[0].text == expected_text(encode("once upon a time"), 7)
    assert out.usage.completion_tokens == 7 and len(out.choices[0].logprobs.token_logprobs) == 7
    chunks = list(cl.completions.create(model="fake-moe", prompt="once upon a time", max_tokens=7, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text
    out = cl.completions.create(model="fake-moe", prompt=[104, 105], max_tokens=3)  # token ids
    assert out.choices[0].text == expected_text([104, 105], 3)


def test_completions_sessions_are_ephemeral(cluster, cl):
    before = len(cluster.router.sessions)
    cl.completions.create(model="fake-moe", prompt="abc", max_tokens=2)
    assert len(cluster.router.sessions) == before


def test_models_status_and_page(cl, cluster):
    assert [m.id for m in cl.models.list()] == ["fake-moe"]
    st = _get(cluster.api_url, "/status")
    assert st[0] == 200 and json.loads(st[2])["model"] == "fake-moe"
    page = _get(cluster.api_url, "/")
    assert page[0] == 200 and "text/html" in page[1]["Content-Type"] and b"fake-moe" in page[2]


@pytest.mark.parametrize("body,param", [
    ({"model": "m"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": [""]}, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "session_id": 5}, "session_id"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": True}, "max_tokens"),
])
def test_chat_bad_requests_name_the_param(cluster, body, param):
    status, _, raw = _post(cluster.api_url, "/v1/chat/completions", json.dumps(body).encode())
    assert status == 400, raw
    err = json.loads(raw)["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_malformed_and_oversized_bodies(cluster):
    for data in (b"{", b"[1,2]", b"\xff\xfe", b'"str"', b"[" * 100000):
        status, _, raw = _post(cluster.api_url, "/v1/chat/completions", data)
        assert status == 400 and json.loads(raw)["error"]["code"] == "invalid_json"
    status, _, raw = _post(cluster.api_url, "/v1/chat/completions", b" " * ((8 << 20) + 1) + b"{}")
    assert status == 413 and json.loads(raw)["error"]["code"] == "request_too_large"
    status, _, raw = _post(cluster.api_url, "/v1/completions", json.dumps({"prompt": 5}).encode())
    assert status == 400 and json.loads(raw)["error"]["param"] == "prompt"
    status, _, raw = _get(cluster.api_url, "/v1/nothing")
    assert status == 404 and json.loads(raw)["error"]["message"]
    status, _, raw = _get(cluster.api_url, "/v1/chat/completions")
    assert status == 405 and json.loads(raw)["error"]["message"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=8), ch, max_size=4), max_leaves=12)
message = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "assistant", "system", "x", 3]),
                                              "content": json_values | st.text(max_size=20)})
chat_bodies = st.fixed_dictionaries({}, optional={
    "model": json_values, "messages": st.lists(message, max_size=4) | json_values,
    "max_tokens": st.integers(-2, 40) | json_values, "temperature": json_values, "top_p": json_values,
    "stream": st.booleans() | json_values, "stop": json_values, "logprobs": json_values,
    "n": json_values, "user": json_values, "stream_options": json_values, "seed": json_values})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=chat_bodies, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
       prompt=json_values)
def test_fuzz_api_never_5xx(cluster, body, path, prompt):
    if path == "/v1/completions":
        body = {**body, "prompt": prompt}
    status, headers, raw = _post(cluster.api_url, path, json.dumps(body).encode())
    assert status < 500, raw[:300]
    if status >= 400:
        err = json.loads(raw)["error"]
        assert err["message"] and err["type"] == "invalid_request_error"
    elif headers.get("Content-Type", "").startswith("text/event-stream"):
        assert raw.rstrip().endswith(b"data: [DONE]")
    else:
        assert json.loads(raw)["usage"]["completion_tokens"] >= 1


def _conn(url):
    u = urllib.parse.urlparse(url)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=20)


def _post(url, path, data):
    c = _conn(url)
    try:
        c.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        c.close()


def _get(url, path):
    c = _conn(url)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        c.close()


def test_a_new_chat_goes_to_the_replica_that_holds_its_prefix():
    """Two nodes of one group: a chat's context is recorded for its node (router/prefix_index.py), and a new
    chat with the same long system prompt goes there, though the other node is less loaded; a chat with
    another system prompt goes by load."""
    system = "You are the home lab's assistant. Tools: weather, lights, calendar, music, doors. " * 4
    with LocalCluster([FakeEngine(group=0, n_groups=1, max_context=4096) for _ in range(2)], names=["a", "b"]) as c:
        cl = openai.OpenAI(base_url=c.api_url + "/v1", api_key="x")

        def node_of(sys_prompt, question):
            r = cl.chat.completions.with_raw_response.create(
                model=MODEL, max_tokens=4, messages=[{"role": "system", "content": sys_prompt},
                                                     {"role": "user", "content": question}])
            return r.headers["x-mlxmoe-node"]

        first = node_of(system, "What is the weather?")
        other = "b" if first == "a" else "a"
        c.router.peers.peers[next(u for u, p in c.router.peers.peers.items() if p.name == first)].inflight = 3
        assert node_of(system, "Turn on the lights.") == first
        assert node_of("A different system prompt, short.", "Hello?") == other
