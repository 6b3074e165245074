"""Anthropic's Messages API (api/anthropic.py) with the official `anthropic` client, FakeEngine level: a Message
and its stream (the same text, the events in Anthropic's order), system prompts and sampling fields as they reach
the node (the rendered prompt, GenParams), stop sequences, tools as tool_use/tool_result blocks, tool_choice and
output_config.format as grammars, count_tokens, API keys, model names, a failure mid-answer; hostile bodies
(a 4xx in Anthropic's error shape naming the field, never a 5xx) while a normal stream on the same cluster is
unharmed. The reference model behind a real router: stop sequences with a real tokenizer and detokenizer."""

from __future__ import annotations

import copy
import http.client
import json
import re
import threading
import time
import urllib.parse

import anthropic
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fakes import FakeEngine, LocalCluster
from test_api_ollama import Described
from test_api_tools import CALL, TOOLS, Scripted
from mlxmoe.cluster.api import anthropic as dialect
from tool_cases import WEATHER

pytestmark = pytest.mark.timeout(120)
TEXT = "Hello from the cluster."
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
A_TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
            "input_schema": t["function"]["parameters"]} for t in TOOLS]  # TOOLS in Anthropic's shape


@pytest.fixture(scope="module")
def fake():
    with LocalCluster([Scripted(TEXT)], frontend=Described()) as c:
        yield c


@pytest.fixture
def answer(fake):
    """Set the scripted answer for one test."""
    eng = fake.engines[0]
    yield lambda a: setattr(eng, "answer", a)
    eng.answer = TEXT


def client(c, **kw) -> anthropic.Anthropic:
    """The client builds /v1/messages on base_url: the router's root."""
    return anthropic.Anthropic(**{"base_url": c.api_url, "api_key": "unused", "max_retries": 0, "timeout": 30, **kw})


def create(c, **kw):
    return client(c).messages.create(**{"model": "fake-moe", "max_tokens": 100, "messages": USER, **kw})


def last(c):
    """(GenParams, decoded prompt) of the node's latest request."""
    return c.engines[0].params[-1], c.engines[0].prompts[-1]


def post(c, path: str, body, headers: dict | None = None) -> tuple[int, str, bytes]:
    """A raw request (the client checks some fields itself): (status, content type, body)."""
    u = urllib.parse.urlparse(c.api_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    data = body if isinstance(body, bytes) else json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    try:
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type", ""), r.read()
    finally:
        conn.close()


def sse(raw: bytes) -> list[tuple[str, dict]]:
    """(event name, data) of each server-sent event."""
    out = []
    for chunk in raw.decode().split("\n\n"):
        fields = dict(ln.split(": ", 1) for ln in chunk.splitlines() if ": " in ln)
        if fields:
            out.append((fields.get("event"), json.loads(fields["data"])))
    return out


def error_of(raw: bytes) -> dict:
    """Anthropic's error shape, checked: {"type": "error", "error": {"type", "message"}}."""
    body = json.loads(raw)
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"} and body["error"]["message"], body
    return body["error"]


# ---------------------------------------------------------------- a message and its stream
def test_a_message(fake):
    r = create(fake)
    assert (r.type, r.role, r.model, r.stop_reason, r.stop_sequence) == ("message", "assistant", "fake-moe",
                                                                          "end_turn", None)
    assert r.id.startswith("msg_") and [(b.type, b.text) for b in r.content] == [("text", TEXT)]
    assert r.usage.input_tokens == len(last(fake)[1].encode()) and r.usage.output_tokens == len(TEXT) + 1  # + end


def test_streamed_and_not_give_the_same_text(fake):
    whole = create(fake)
    with client(fake).messages.stream(model="fake-moe", max_tokens=100, messages=USER) as s:
        pieces = list(s.text_stream)
        final = s.get_final_message()
    assert "".join(pieces) == TEXT and len(pieces) > 2
    assert [(b.type, b.text) for b in final.content] == [("text", TEXT)]
    assert (final.stop_reason, final.stop_sequence, final.model) == ("end_turn", None, "fake-moe")
    assert final.usage == whole.usage


def test_stream_events_come_in_anthropics_order(fake):
    status, ctype, raw = post(fake, "/v1/messages", {"model": "fake-moe", "max_tokens": 50, "messages": USER,
                                                     "stream": True})
    evs = sse(raw)
    assert status == 200 and ctype.startswith("text/event-stream")
    assert all(name == data["type"] for name, data in evs)
    names = [n for n, _ in evs if n != "ping"]
    assert names == (["message_start", "content_block_start"] + ["content_block_delta"] * len(TEXT)
                     + ["content_block_stop", "message_delta", "message_stop"])
    start = evs[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["input_tokens"] > 0
    assert all(d["index"] == 0 for n, d in evs if n.startswith("content_block"))
    assert "".join(d["delta"]["text"] for n, d in evs if n == "content_block_delta") == TEXT
    delta = next(d for n, d in evs if n == "message_delta")
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == len(TEXT) + 1


def test_system_prompt_reaches_the_node(fake):
    create(fake, system="Be brief.")
    assert last(fake)[1] == "<system>Be brief.\n<user>What is the weather in Paris?\n<assistant>"
    create(fake, system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind.",
                                                                  "cache_control": {"type": "ephemeral"}}])
    assert last(fake)[1].startswith("<system>Be brief.\n\nBe kind.\n<user>")


def test_a_last_assistant_message_is_continued_not_answered(fake):
    """Anthropic's prefill: the prompt ends inside the assistant's turn (no new turn opened), and the
    reply holds only what follows it."""
    r = create(fake, messages=USER + [{"role": "assistant", "content": "The weather is"}])
    assert last(fake)[1] == "<user>What is the weather in Paris?\n<assistant>The weather is"
    assert r.content[0].text == TEXT and r.stop_reason == "end_turn"
    create(fake, messages=USER + [{"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "And?"}])
    assert last(fake)[1].endswith("<assistant>Sunny.\n<user>And?\n<assistant>")  # an earlier turn is whole


def test_sampling_fields_reach_the_node(fake):
    r = create(fake, max_tokens=9, stop_sequences=["nowhere"],
               extra_body={"temperature": 0.7, "top_p": 0.9, "top_k": 20})  # this client has no such arguments
    p = last(fake)[0]
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.stop) == (9, 0.7, 0.9, 20, ["nowhere"])
    assert r.content[0].text == TEXT[:9] and (r.stop_reason, r.stop_sequence) == ("max_tokens", None)
    create(fake)
    p = last(fake)[0]
    assert (p.temperature, p.top_p, p.top_k, p.stop, p.min_p) == (None, None, None, [], None)  # model defaults


def test_max_tokens_is_required_and_temperature_is_anthropics_range(fake):
    status, _, raw = post(fake, "/v1/messages", {"model": "fake-moe", "messages": USER})
    err = error_of(raw)
    assert status == 400 and err["type"] == "invalid_request_error" and "'max_tokens'" in err["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        create(fake, extra_body={"temperature": 1.5})
    assert e.value.status_code == 400 and "'temperature'" in e.value.body["error"]["message"]


def test_metadata_user_id_is_the_session_hint(fake):
    hint = f"user-{time.monotonic()}"
    first = client(fake).messages.with_raw_response.create(model="fake-moe", max_tokens=4, messages=USER,
                                                          metadata={"user_id": hint})
    again = client(fake).messages.with_raw_response.create(model="fake-moe", max_tokens=4, messages=USER,
                                                          metadata={"user_id": hint})
    sid = first.headers["x-mlxmoe-session"]
    assert sid and again.headers["x-mlxmoe-session"] == sid


# ---------------------------------------------------------------- stop sequences
def test_a_stop_sequence_says_which(fake):
    r = create(fake, stop_sequences=["cluster", "from", "nowhere"])
    assert [b.text for b in r.content] == ["Hello "] and (r.stop_reason, r.stop_sequence) == ("stop_sequence", "from")
    with client(fake).messages.stream(model="fake-moe", max_tokens=100, messages=USER,
                                      stop_sequences=["nowhere", "cluster."]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "Hello from the " and (final.stop_reason, final.stop_sequence) == ("stop_sequence", "cluster.")
    r = create(fake, stop_sequences=["nowhere"])
    assert r.content[0].text == TEXT and (r.stop_reason, r.stop_sequence) == ("end_turn", None)


def test_a_stop_sequence_at_the_start_or_spanning_tokens(fake, answer):
    r = create(fake, stop_sequences=["Hel"])
    assert r.content == [] and (r.stop_reason, r.stop_sequence) == ("stop_sequence", "Hel")
    answer("It costs 5 EUR -- fine.")  # a stop string over several tokens; one that starts alike, not hit
    r = create(fake, stop_sequences=["costs 6", "EUR --", "5 EUR --!"])
    assert r.content[0].text == "It costs 5 " and (r.stop_reason, r.stop_sequence) == ("stop_sequence", "EUR --")
    r = create(fake, stop_sequences=["EUR -- fine", "EUR -"])  # both start there: the shorter ended it
    assert r.content[0].text == "It costs 5 " and r.stop_sequence == "EUR -"


# ---------------------------------------------------------------- tools
def test_a_tool_call_is_a_tool_use_block(fake, answer):
    answer("Let me look. " + CALL)
    r = create(fake, max_tokens=200, tools=A_TOOLS)
    assert "Available functions" in last(fake)[1] and last(fake)[0].grammar is None  # "auto": parsed, not forced
    assert r.stop_reason == "tool_use" and [b.type for b in r.content] == ["text", "tool_use"]
    text, call = r.content
    assert text.text == "Let me look. " and call.id.startswith("toolu_")
    assert (call.name, call.input) == ("get_weather", {"city": "Paris", "unit": "c"})
    with client(fake).messages.stream(model="fake-moe", max_tokens=200, messages=USER, tools=A_TOOLS) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use" and [b.type for b in final.content] == ["text", "tool_use"]
    assert final.content[1].input == {"city": "Paris", "unit": "c"} and final.content[0].text == "Let me look. "


def test_a_tool_result_turn_pairs_with_its_call_and_reaches_the_prompt(fake, answer):
    answer(CALL)
    first = create(fake, max_tokens=200, tools=A_TOOLS)
    (call,) = first.content
    answer(TEXT)
    msgs = USER + [{"role": "assistant", "content": first.content},  # the client's own blocks, sent back
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                 "content": [{"type": "text", "text": "18 C, sunny"}]},
                                                {"type": "text", "text": "And tomorrow?"}]}]
    r = create(fake, max_tokens=200, tools=A_TOOLS, messages=msgs)
    assert r.content[0].text == TEXT and r.stop_reason == "end_turn"
    prompt = last(fake)[1]
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}</tool_call>' in prompt
    assert prompt.endswith("<user><tool_response>\n18 C, sunny\n</tool_response>\n<user>And tomorrow?\n<assistant>")
    body = {"max_tokens": 10, "messages": json.loads(json.dumps(msgs, default=lambda b: b.model_dump()))}
    neutral = dialect.message_request(body, {})[0].messages
    assert neutral[1]["tool_calls"][0]["id"] == neutral[2]["tool_call_id"] == call.id
    msgs[2]["content"][0] = {"type": "tool_result", "tool_use_id": call.id, "is_error": True, "content": "no network"}
    create(fake, max_tokens=20, tools=A_TOOLS, messages=msgs)
    assert "<tool_response>\nError: no network\n</tool_response>" in last(fake)[1]


def test_tool_choice_forces_a_call(fake, answer):
    answer(CALL)  # what the grammar makes the node say
    r = create(fake, max_tokens=200, tools=A_TOOLS, tool_choice={"type": "tool", "name": "get_weather"})
    assert last(fake)[0].grammar == {"type": "tool_call", "tools": TOOLS, "choice": {"name": "get_weather"}}
    assert r.stop_reason == "tool_use" and [(b.type, b.name) for b in r.content] == [("tool_use", "get_weather")]
    create(fake, max_tokens=200, tools=A_TOOLS, tool_choice={"type": "any", "disable_parallel_tool_use": True})
    assert last(fake)[0].grammar == {"type": "tool_call", "tools": TOOLS, "choice": "required"}
    r = create(fake, max_tokens=200, tools=A_TOOLS, tool_choice={"type": "none"})
    assert last(fake)[0].grammar is None and "Available functions" not in last(fake)[1]
    assert r.content[0].text == CALL and r.stop_reason == "end_turn"  # no tools offered: the text stays text


def test_a_call_cut_by_max_tokens_says_so(fake, answer):
    answer(CALL)
    r = create(fake, max_tokens=60, tools=A_TOOLS, tool_choice={"type": "any"})
    assert r.stop_reason == "max_tokens"
    assert [(b.type, b.name, b.input) for b in r.content] == [("tool_use", "get_weather", {})]


# ---------------------------------------------------------------- answer format
def test_output_format_is_a_grammar(fake):
    fmt = {"format": {"type": "json_schema", "schema": WEATHER}}
    create(fake, output_config=fmt)
    assert last(fake)[0].grammar == {"type": "json_schema", "schema": WEATHER}
    create(fake, output_config={"effort": "low"})
    assert last(fake)[0].grammar is None


@pytest.mark.parametrize("schema", [{"$ref": "#"}, 5, "object", [{"type": "object"}],
                                   {"type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}}])
def test_a_bad_schema_is_a_fast_400_before_any_node(fake, schema):
    n, t0 = len(fake.engines[0].params), time.monotonic()
    status, _, raw = post(fake, "/v1/messages", {"max_tokens": 8, "messages": USER, "output_config": {
        "format": {"type": "json_schema", "schema": schema}}})
    err = error_of(raw)
    assert status == 400 and "'output_config.format.schema'" in err["message"], err
    assert time.monotonic() - t0 < 3 and len(fake.engines[0].params) == n  # no node was asked


def test_an_image_is_refused_naming_the_block(fake):
    img = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "aGk="}}
    with pytest.raises(anthropic.BadRequestError) as e:
        create(fake, messages=[{"role": "user", "content": [{"type": "text", "text": "What is this?"}, img]}])
    err = e.value.body["error"]
    assert err["type"] == "invalid_request_error" and "'messages[0].content[1]'" in err["message"]
    assert "text only" in err["message"]


# ---------------------------------------------------------------- count_tokens
def test_count_tokens(fake):
    cl = client(fake)
    n = cl.messages.count_tokens(model="fake-moe", messages=USER).input_tokens
    assert n > 0 and n == create(fake).usage.input_tokens  # what /v1/messages sends
    longer = [{"role": "user", "content": USER[0]["content"] + " And in Oslo?"}]
    assert cl.messages.count_tokens(model="fake-moe", messages=longer).input_tokens == n + len(" And in Oslo?")
    with_tools = cl.messages.count_tokens(model="fake-moe", messages=USER, tools=A_TOOLS, system="Be brief.")
    assert with_tools.input_tokens > n + 100
    status, _, raw = post(fake, "/v1/messages/count_tokens", {"messages": []})
    assert status == 400 and "'messages'" in error_of(raw)["message"]


# ---------------------------------------------------------------- models, keys, failures
def test_unknown_model_is_a_404(fake):
    with pytest.raises(anthropic.NotFoundError) as e:
        create(fake, model="claude-sonnet-4-5")
    err = e.value.body["error"]
    assert e.value.status_code == 404 and err["type"] == "not_found_error" and "claude-sonnet-4-5" in err["message"]
    status, _, raw = post(fake, "/v1/messages/count_tokens", {"model": "claude", "messages": USER})
    assert status == 404 and error_of(raw)["type"] == "not_found_error"
    status, _, raw = post(fake, "/v1/messages/batches", {})
    assert status == 404 and error_of(raw)["type"] == "not_found_error"


@pytest.fixture(scope="module")
def keyed():
    """One node that fails after 3 tokens, behind a router that asks for an API key."""
    with LocalCluster([FakeEngine(group=0, n_groups=1, fail_after=3)], api_keys=["alice-key"]) as c:
        yield c


def test_api_key_as_x_api_key_or_bearer(keyed):
    for kw in ({"api_key": "alice-key"}, {"api_key": None, "auth_token": "alice-key"}):
        r = client(keyed, **kw).messages.create(model="fake-moe", max_tokens=2, messages=USER)
        assert r.usage.output_tokens == 2
        assert client(keyed, **kw).messages.count_tokens(model="fake-moe", messages=USER).input_tokens > 0
    scored = keyed.frontend.score_calls
    for kw in ({"api_key": "wrong"}, {"api_key": None, "auth_token": "wrong"}):
        with pytest.raises(anthropic.AuthenticationError) as e:
            client(keyed, **kw).messages.create(model="fake-moe", max_tokens=2, messages=USER)
        assert e.value.status_code == 401 and e.value.body["error"]["type"] == "authentication_error"
    assert keyed.frontend.score_calls == scored  # refused before any work
    for h in ({"x-api-key": "nope"}, {"x-api-key": ""}, {"Authorization": "alice-key"}, {}):
        status, _, raw = post(keyed, "/v1/messages/count_tokens", {"messages": USER}, h)
        assert status == 401 and error_of(raw)["type"] == "authentication_error"


def test_a_failure_mid_answer_is_an_error_event(keyed):
    cl = client(keyed, api_key="alice-key")
    pieces = []
    with pytest.raises(anthropic.APIStatusError) as e:
        with cl.messages.stream(model="fake-moe", max_tokens=20, messages=USER) as s:
            for t in s.text_stream:
                pieces.append(t)
    assert len(pieces) == 3 and "fake failure" in str(e.value.body)
    status, _, raw = post(keyed, "/v1/messages", {"max_tokens": 20, "messages": USER, "stream": True},
                          {"x-api-key": "alice-key"})
    evs = sse(raw)
    assert status == 200 and evs[-1][0] == "error" and "message_stop" not in [n for n, _ in evs]
    assert evs[-1][1]["type"] == "error" and evs[-1][1]["error"]["type"] == "api_error"
    with pytest.raises(anthropic.InternalServerError) as e:
        cl.messages.create(model="fake-moe", max_tokens=20, messages=USER)
    assert e.value.status_code == 502 and e.value.body["error"]["type"] == "api_error"


# ---------------------------------------------------------------- hostile input
def _nest(depth: int, leaf=1):
    for _ in range(depth):
        leaf = [leaf] if depth % 2 else {"a": leaf}
    return leaf


CALLED = USER + [{"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                    "input": {"city": "Paris"}}]}]
BAD = [
    ({"model": 5}, "model"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": ["x"]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
    ({"messages": USER + [{"role": "assistant", "content": [{"type": "image"}]}]}, "messages[1].content[0]"),
    ({"messages": USER + [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f",
                                                             "input": "{}"}]}]}, "messages[1].content[0].input"),
    ({"messages": USER + [{"role": "assistant", "content": [{"type": "tool_use", "name": "f", "input": {}}]}]},
     "messages[1].content[0].id"),
    ({"messages": USER + [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f",
                                                             "input": {"x": float("nan")}}]}]},
     "messages[1].content[0].input"),
    ({"messages": CALLED + [{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]},
     "messages[2].content[0].tool_use_id"),
    ({"messages": CALLED + [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                          "is_error": "yes"}]}]}, "messages[2].content[0].is_error"),
    ({"messages": CALLED + [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                          "content": [{"type": "image"}]}]}]},
     "messages[2].content[0].content[0]"),
    ({"system": 5}, "system"),
    ({"system": 0}, "system"),
    ({"system": {"text": "x"}}, "system"),
    ({"system": [{"type": "image"}]}, "system[0]"),
    ({"system": "\ud800"}, "system"),
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "8"}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": 2 ** 40}, "max_tokens"),
    ({"temperature": 1.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 10 ** 400}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": [1]}, "top_p"),
    ({"top_k": 1.5}, "top_k"),
    ({"top_k": -1}, "top_k"),
    ({"stop_sequences": [""]}, "stop_sequences"),
    ({"stop_sequences": [5]}, "stop_sequences"),
    ({"stop_sequences": ["\ud800"]}, "stop_sequences"),
    ({"stop_sequences": ["x"] * 17}, "stop_sequences"),
    ({"stop_sequences": {"a": 1}}, "stop_sequences"),
    ({"stream": "yes"}, "stream"),
    ({"tools": "x"}, "tools"),
    ({"tools": [5]}, "tools[0]"),
    ({"tools": [{"name": "a b"}]}, "tools[0].name"),
    ({"tools": [{"name": "f", "description": 3}]}, "tools[0].description"),
    ({"tools": [{"name": "f", "input_schema": "x"}]}, "tools[0].input_schema"),
    ({"tools": [{"name": "f", "input_schema": {"$ref": "#"}}]}, "tools[0].input_schema"),
    ({"tools": [{"name": "f", "input_schema": {"type": "bogus"}}]}, "tools[0].input_schema"),
    ({"tools": A_TOOLS + [{"name": "f", "input_schema": {"type": "object", "properties": {"a": _nest(130)}}}]},
     "tools[2].input_schema"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type"),
    ({"tools": A_TOOLS + A_TOOLS[:1]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tool_choice": {"type": "maybe"}}, "tool_choice.type"),
    ({"tool_choice": {"type": ["any"]}}, "tool_choice.type"),
    ({"tool_choice": {"type": "any"}}, "tool_choice"),
    ({"tools": A_TOOLS, "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice.name"),
    ({"tools": A_TOOLS, "tool_choice": {"type": "tool"}}, "tool_choice.name"),
    ({"tools": A_TOOLS, "tool_choice": {"type": "auto", "disable_parallel_tool_use": "yes"}},
     "tool_choice.disable_parallel_tool_use"),
    ({"output_config": 5}, "output_config"),
    ({"output_config": {"format": "json"}}, "output_config.format"),
    ({"output_config": {"format": {"type": "yaml"}}}, "output_config.format.type"),
    ({"output_config": {"format": {"type": "json_schema"}}}, "output_config.format.schema"),
    ({"output_config": {"format": {"type": "json_schema", "schema": _nest(130)}}}, "output_config.format.schema"),
    ({"metadata": "x"}, "metadata"),
    ({"metadata": {"user_id": 5}}, "metadata.user_id"),
    ({"metadata": {"user_id": "u" * 300}}, "metadata.user_id"),
    ({"mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}]}, "mcp_servers"),
    ({"mlxmoe": {"mode": "bogus"}}, "mlxmoe.mode"),
    ({"mlxmoe": {"prefer": "cheap"}}, "mlxmoe.prefer"),
]


def refused(c, body: dict, field: str, path: str = "/v1/messages", status: int = 400) -> dict:
    st_, _, raw = post(c, path, body)
    err = error_of(raw)
    assert st_ == status and f"'{field}'" in err["message"], (st_, err)
    assert err["type"] == dialect.ERROR_TYPES[status]
    return err


@pytest.mark.parametrize("extra, field", BAD, ids=[f for _, f in BAD])
def test_bad_fields_are_a_400_naming_them(fake, extra, field):
    refused(fake, {"model": "fake-moe", "max_tokens": 8, "messages": USER, **extra}, field)


@pytest.mark.parametrize("extra, field", [b for b in BAD if b[1].startswith(("messages", "system", "tools",
                                                                             "tool_choice", "mcp", "output"))][::3])
def test_count_tokens_refuses_them_alike(fake, extra, field):
    body = {"model": "fake-moe", "messages": USER, **extra}
    body.pop("max_tokens", None)
    refused(fake, body, field, "/v1/messages/count_tokens")


def test_accepted_and_ignored(fake):
    status, _, raw = post(fake, "/v1/messages", {
        "model": "fake-moe", "max_tokens": 8, "messages": USER + [{"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hm", "signature": "x"}, {"type": "text", "text": "Hi"}]},
            {"role": "user", "content": "Go on"}], "thinking": {"type": "enabled", "budget_tokens": 1024},
        "service_tier": "auto", "container": None, "something_new": {"x": 1}, "stop_sequences": "x"},
        {"anthropic-version": "2023-06-01", "anthropic-beta": "whatever-2025"})
    assert status == 200 and json.loads(raw)["content"][0]["text"] == TEXT[:8]


def test_non_json_and_nan(fake):
    for raw_body, what in ((b"{not json", "not valid JSON"), (b"\xff\xfe", "not valid JSON"),
                           (b"[1, 2]", "JSON object"), (b"[" * 5000 + b"]" * 5000, "not valid JSON")):
        status, _, raw = post(fake, "/v1/messages", raw_body)
        assert status == 400 and what in error_of(raw)["message"]
    body = b'{"max_tokens": 8, "messages": [{"role": "user", "content": "x"}], "top_p": NaN}'
    status, _, raw = post(fake, "/v1/messages", body)
    assert status == 400 and "'top_p'" in error_of(raw)["message"]


scalars = (st.none() | st.booleans() | st.integers() | st.integers(-2 ** 70, 2 ** 70) | st.floats()
           | st.text(max_size=10) | st.sampled_from(["\ud800", "", "text", "tool_use", "tool_result", "image", "user",
                                                    "assistant", "any", "tool", "auto", "json_schema", 10 ** 30, -1]))
values = (st.recursive(scalars, lambda ch: st.lists(ch, max_size=3) | st.dictionaries(
    st.sampled_from(["type", "text", "name", "input", "id", "content", "role", "schema", "format", "user_id", "x"])
    | st.text(max_size=5), ch, max_size=3), max_leaves=10) | st.integers(1, 400).map(_nest))
TOP = ["model", "messages", "system", "max_tokens", "temperature", "top_p", "top_k", "stop_sequences", "stream",
       "tools", "tool_choice", "metadata", "output_config", "thinking", "mcp_servers", "mlxmoe"]
FIELDS = ([(f, (f,)) for f in TOP]
          + [(f"messages[0].{k}", ("messages", 0, k)) for k in ("role", "content")]
          + [(f"messages[0].content[0].{k}", ("messages", 0, "content", 0, k)) for k in ("type", "text")]
          + [(f"messages[1].content[0].{k}", ("messages", 1, "content", 0, k)) for k in ("type", "id", "name", "input")]
          + [(f"messages[2].content[0].{k}", ("messages", 2, "content", 0, k))
             for k in ("type", "tool_use_id", "content", "is_error")]
          + [(f"tools[0].{k}", ("tools", 0, k)) for k in ("type", "name", "description", "input_schema")]
          + [(f"tool_choice.{k}", ("tool_choice", k)) for k in ("type", "name", "disable_parallel_tool_use")]
          + [(f"output_config.format.{k}", ("output_config", "format", k)) for k in ("type", "schema")]
          + [("metadata.user_id", ("metadata", "user_id"))])


def _hostile(where: tuple, value) -> dict:
    """A valid body (a tool round trip, tools, a forced call, a format) with one field replaced."""
    body = copy.deepcopy({"model": "fake-moe", "max_tokens": 8, "stream": False, "tools": A_TOOLS[:1],
            "tool_choice": {"type": "auto"}, "metadata": {"user_id": "u"},
            "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}},
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                         {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                            "input": {"city": "Paris"}}]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                       "content": "18 C"}]}]})
    at = body
    for k in where[:-1]:
        at = at[k]
    at[where[-1]] = value
    return body


@pytest.fixture
def a_stream_beside(fake):
    """Normal streams, one after another, while the test runs: each must come whole."""
    stop, results = threading.Event(), []

    def run():
        cl = client(fake)
        while not stop.is_set():
            with cl.messages.stream(model="fake-moe", max_tokens=100, messages=[{"role": "user", "content": "x"}]) as s:
                text = "".join(s.text_stream)
                results.append((text, s.get_final_message().stop_reason))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    yield
    stop.set()
    t.join(30)
    assert results and set(results) == {(TEXT, "end_turn")}, set(results)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(field=st.sampled_from(FIELDS), value=values)
def test_hostile_fields_are_a_4xx_naming_them_never_a_5xx(fake, a_stream_beside, field, value):
    name, where = field
    st_, ctype, raw = post(fake, "/v1/messages", _hostile(where, value))
    assert st_ < 500, raw[:300]
    if st_ >= 400:
        err = error_of(raw)
        expect = re.split(r"[.\[]", name)[0]
        assert (st_, name) == (404, "model") or f"'{expect}" in err["message"], (st_, name, err)
        assert err["type"] == dialect.ERROR_TYPES[st_]
    elif ctype.startswith("text/event-stream"):
        names = [n for n, _ in sse(raw)]
        assert names[0] == "message_start" and names[-1] == "message_stop" and "error" not in names, names
    else:
        out = json.loads(raw)
        assert out["type"] == "message" and out["stop_reason"] in ("end_turn", "max_tokens", "tool_use"), out


# ---------------------------------------------------------------- the reference model behind a real router
@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from mlxmoe.bundle.split import split
    from test_api_tools import REFERENCE
    from test_failover_splice import ReplicaCluster

    root = tmp_path_factory.mktemp("anthropic")
    split(str(REFERENCE), root / "g1", 1)
    with ReplicaCluster(root / "g1", n=1, probe_interval=60.0) as c:
        yield c


def test_real_stop_sequences_say_which(real):
    """The real tokenizer and detokenizer: a stop string cut from the greedy answer's middle (over several
    tokens) ends it there, named, streamed or not; one that never appears leaves the answer as it was."""
    cl = client(real)
    model = cl.models.list().data[0].id
    kw = dict(model=model, max_tokens=40, messages=[{"role": "user", "content": "Tell me about the sea."}],
              extra_body={"temperature": 0.0})
    whole = cl.messages.create(**kw)
    text = whole.content[0].text
    assert len(text) > 24 and whole.stop_reason in ("max_tokens", "end_turn"), whole
    stop = text[12:18]
    r = cl.messages.create(**kw, stop_sequences=["\x01never", stop])
    assert (r.stop_reason, r.stop_sequence) == ("stop_sequence", stop)
    assert "".join(b.text for b in r.content) == text[:text.find(stop)]
    with cl.messages.stream(**kw, stop_sequences=[stop]) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert streamed == text[:text.find(stop)] and (final.stop_reason, final.stop_sequence) == ("stop_sequence", stop)
    r = cl.messages.create(**kw, stop_sequences=["\x01never"])
    assert (r.content[0].text, r.stop_reason, r.stop_sequence) == (text, whole.stop_reason, None)
