"""Tools and structured output through the OpenAI API (api/openai.py, api/app.py,
api/tools.py, node/grammar.py), with the openai client.

FakeEngine level (fast): response shapes (message.tool_calls, content null,
finish_reason "tool_calls"; streamed delta.tool_calls), what reaches the node
(GenParams.grammar, the rendered prompt, the template's `tools=`), hostile input
(a 400 naming the field, never a 5xx). Reference model behind a real router: a
required tool call is a valid call of a declared function (streaming too),
json_schema output validates, json_object output parses, and a node killed mid
constrained answer hands it to another node that continues the constraint."""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from pathlib import Path

import jsonschema
import openai
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tool_cases import ADD, WEATHER

from fakes import ByteDetokenizer, FakeEngine, FakeFrontend, LocalCluster, decode
from mlxmoe.cluster import node_server
from mlxmoe.cluster.api import tools as tl
from mlxmoe.node import grammar_spec
from mlxmoe.node.stream import text_events

pytestmark = pytest.mark.timeout(240)
REFERENCE = Path(__file__).parents[2] / "mlxmoe" / "assets" / "reference-moe"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": ADD}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}</tool_call>'


class Scripted(FakeEngine):
    """Answers `answer` then an end token (0), and records the params it was given."""

    def __init__(self, answer: str = CALL, **kw):
        super().__init__(**kw)
        self.answer, self.params, self.prompts = answer, [], []

    def generate(self, session_id, prompt, params):
        if session_id != getattr(node_server, "SELF_CHECK", None):  # the node's own start-up check is no request
            self.params.append(params)
            self.prompts.append(decode(prompt))
        return super().generate(session_id, prompt, params)

    def _gen(self, session_id, ctx, params, max_tokens):
        steps = ((b, -0.1) for b in list(self.answer.encode()) + [0])
        yield from text_events(steps, ByteDetokenizer(), {0}, params.stop, max_tokens)


class ToolTemplate(FakeFrontend):
    """A front end whose chat template renders tools itself (as Qwen's does)."""
    tokenizer = type("Tok", (), {"chat_template": "{% if tools %}...{% endif %}"})()


def client(c) -> openai.OpenAI:
    return openai.OpenAI(base_url=c.api_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(c, body: dict, path: str = "/v1/chat/completions") -> tuple[int, dict]:
    """A raw request (the openai client would check some fields itself): (status, JSON answer)."""
    u = urllib.parse.urlparse(c.api_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request("POST", path, body=json.dumps({"model": "fake-moe", **body}),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


@pytest.fixture(scope="module")
def fake():
    with LocalCluster([Scripted()]) as c:
        yield c


# ------------------------------------------------------------ FakeEngine level
def test_required_call_shape(fake):
    r = client(fake).chat.completions.create(model="fake-moe", messages=USER, tools=TOOLS, tool_choice="required")
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    (call,) = ch.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "c"}
    p = fake.engines[0].params[-1]
    assert p.grammar == {"type": "tool_call", "tools": TOOLS, "choice": "required"}
    assert "Available functions" in fake.engines[0].prompts[-1]  # no template tools: declared in a system message


def test_streamed_call_shape(fake):
    chunks = list(client(fake).chat.completions.create(model="fake-moe", messages=USER, tools=TOOLS, stream=True,
                                                        tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    deltas = [d for ch in chunks for d in (ch.choices[0].delta.tool_calls or [])]
    (d,) = deltas
    assert d.index == 0 and d.id.startswith("call_") and d.type == "function" and d.function.name == "get_weather"
    assert json.loads(d.function.arguments) == {"city": "Paris", "unit": "c"}
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert fake.engines[0].params[-1].grammar["choice"] == {"name": "get_weather"}


def test_auto_text_and_call_mixed(fake):
    fake.engines[0].answer = "Let me look. " + CALL
    try:
        r = client(fake).chat.completions.create(model="fake-moe", messages=USER, tools=TOOLS)
        chunks = list(client(fake).chat.completions.create(model="fake-moe", messages=USER, tools=TOOLS, stream=True))
    finally:
        fake.engines[0].answer = CALL
    assert fake.engines[0].params[-1].grammar is None  # "auto" is parsed, not constrained
    assert r.choices[0].message.content == "Let me look. " and r.choices[0].finish_reason == "tool_calls"
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "Let me look. "
    assert [d.function.name for ch in chunks for d in (ch.choices[0].delta.tool_calls or [])] == ["get_weather"]


def test_tool_choice_none_gives_text(fake):
    r = client(fake).chat.completions.create(model="fake-moe", messages=USER, tools=TOOLS, tool_choice="none")
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content == CALL
    assert r.choices[0].finish_reason == "stop" and "Available functions" not in fake.engines[0].prompts[-1]


def test_response_format_reaches_the_node(fake):
    cl = client(fake)
    cl.chat.completions.create(model="fake-moe", messages=USER, response_format={"type": "json_object"})
    assert fake.engines[0].params[-1].grammar == {"type": "json_object"}
    rf = {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER, "strict": True}}
    cl.chat.completions.create(model="fake-moe", messages=USER, response_format=rf)
    assert fake.engines[0].params[-1].grammar == {"type": "json_schema", "schema": WEATHER}
    cl.chat.completions.create(model="fake-moe", messages=USER, response_format={"type": "text"})
    assert fake.engines[0].params[-1].grammar is None
    # both: the forced call wins
    cl.chat.completions.create(model="fake-moe", messages=USER, response_format=rf, tools=TOOLS, tool_choice="required")
    assert fake.engines[0].params[-1].grammar["type"] == "tool_call"


def test_completions_response_format(fake):
    status, _ = post(fake, {"prompt": "JSON: ", "response_format": {"type": "json_object"}}, "/v1/completions")
    assert status == 200 and fake.engines[0].params[-1].grammar == {"type": "json_object"}
    status, out = post(fake, {"prompt": "x", "tools": TOOLS}, "/v1/completions")
    assert status == 400 and out["error"]["param"] == "tools"


def test_tool_history_is_rendered(fake):
    msgs = USER + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    r = client(fake).chat.completions.create(model="fake-moe", messages=msgs, tools=TOOLS)
    assert r.choices[0].message.tool_calls
    prompt = fake.engines[0].prompts[-1]
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}</tool_call>' in prompt
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in prompt


def test_template_with_tools_gets_them():
    with LocalCluster([Scripted()], frontend=ToolTemplate()) as c:
        client(c).chat.completions.create(model="fake-moe", messages=USER, tools=TOOLS, tool_choice="required")
        prompt = c.engines[0].prompts[-1]
    assert prompt.startswith("<tool>get_weather\n<tool>add\n") and "Available functions" not in prompt


BAD = [
    ({"tools": "x"}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": 3}}]}, "tools[0].function.description"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/nope"}}}]},
     "tools[0].function.parameters"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools"),
    ({"tools": TOOLS, "tool_choice": "maybe"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "retrieval"}}, "tool_choice.type"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}}}}},
     "response_format.json_schema.schema"),
    ({"messages": USER + [{"role": "tool", "content": "18 C"}]}, "messages[1].tool_call_id"),
    ({"messages": USER + [{"role": "tool", "content": "18 C", "tool_call_id": 7}]}, "messages[1].tool_call_id"),
    ({"messages": USER + [{"role": "assistant", "tool_calls": "x"}]}, "messages[1].tool_calls"),
    ({"messages": USER + [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"messages": USER + [{"role": "assistant", "tool_calls": [{"function": {}}]}]},
     "messages[1].tool_calls[0].function.name"),
]


@pytest.mark.parametrize("extra, param", BAD, ids=[p for _, p in BAD])
def test_hostile_input_is_a_400_naming_the_field(fake, extra, param):
    status, out = post(fake, {"messages": USER, **extra})
    assert (status, out["error"]["param"]) == (400, param), out


def test_a_call_cut_by_max_tokens_is_a_call_with_finish_length(fake):
    """Not the raw <tool_call> text as content: tool_calls with the arguments text so far, finish_reason "length"."""
    kw = dict(model="fake-moe", messages=USER, tools=TOOLS, tool_choice="required", max_tokens=60)
    r = client(fake).chat.completions.create(**kw)
    ch = r.choices[0]
    assert ch.finish_reason == "length" and ch.message.content is None
    (call,) = ch.message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "Pa')
    chunks = list(client(fake).chat.completions.create(**kw, stream=True))
    (d,) = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert (d.function.name, d.function.arguments) == ("get_weather", '{"city": "Pa')
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    assert chunks[-1].choices[0].finish_reason == "length"


HOSTILE = [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#"}}}], "tool_choice": "required"},
     "tools[0].function.parameters"),
    ({"tools": TOOLS + [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"me": {"$ref": "#"}}, "required": ["me"]}}}]}, "tools[2].function.parameters"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "anyOf": [{"$ref": "#"}, {"allOf": [{"$ref": "#"}]}]}}}}, "response_format.json_schema.schema"),
]


@pytest.mark.parametrize("extra, param", HOSTILE, ids=[p for _, p in HOSTILE])
def test_a_schema_that_cannot_end_is_a_fast_400_before_any_node(fake, extra, param):
    n = len(fake.engines[0].params)
    t0 = time.monotonic()
    status, out = post(fake, {"messages": USER, **extra})
    assert (status, out["error"]["param"]) == (400, param), out
    assert time.monotonic() - t0 < 2.0 and len(fake.engines[0].params) == n  # no node was asked


def test_strict_rule_reaches_the_node_as_sent():
    """The API sends the request's schemas as they are; the node applies the strict rule itself (one rule,
    node/grammar_spec.py), so a spec sent over the RPC directly is held to it too."""
    assert grammar_spec.strict(WEATHER) == WEATHER  # already closed: unchanged
    open_ = {"type": "object", "properties": {"city": {"type": "string"}}}
    assert grammar_spec.strict(open_) == {**open_, "additionalProperties": False}


JSON_TYPES = ["string", "integer", "object", "array", "null", "nonsense"]
LEAF = st.sampled_from([True, {}, {"$ref": "#"}, {"$ref": "#/$defs/d"}, {"$ref": "#/nope"}, {"type": "string", "pattern": "(("},
                        {"type": "string", "pattern": "((a|b)*)*c"}, {"enum": []}, {"type": "string", "format": "bogus"}]
                       ) | st.builds(lambda t: {"type": t}, st.sampled_from(JSON_TYPES))


def _schema(inner):
    obj = st.builds(lambda p, r, a: {"type": "object", "properties": p, "required": r, **a},
                    st.dictionaries(st.sampled_from(["a", "b", "$ref"]), inner, max_size=3),
                    st.lists(st.sampled_from(["a", "b", "c"]), max_size=2),
                    st.sampled_from([{}, {"additionalProperties": True}, {"additionalProperties": False}]))
    return st.one_of(obj, st.builds(lambda i, n: {"type": "array", "items": i, "minItems": n}, inner, st.integers(0, 2)),
                     st.builds(lambda k, xs: {k: xs}, st.sampled_from(["anyOf", "oneOf", "allOf"]),
                               st.lists(inner, min_size=1, max_size=3)))


HOSTILE_SCHEMAS = st.builds(lambda root, d: {**root, "$defs": {"d": d}} if isinstance(root, dict) else root,
                            st.recursive(LEAF, _schema, max_leaves=10), st.recursive(LEAF, _schema, max_leaves=6))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(schema=HOSTILE_SCHEMAS, where=st.sampled_from(["tool", "response_format"]))
def test_hostile_schemas_are_a_200_or_a_400_naming_the_field_in_time(fake, schema, where):
    """Random nested / recursive schemas: the router answers (the fake node does not enforce grammars) or
    refuses with a 400 naming the field, within the compile bound: never a 5xx, never a hang."""
    if where == "tool":
        extra, param = ({"tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}],
                         "tool_choice": "required"}, "tools[0].function.parameters")
    else:
        extra, param = ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}},
                        "response_format.json_schema.schema")
    t0 = time.monotonic()
    status, out = post(fake, {"messages": USER, "max_tokens": 4, **extra})
    assert status in (200, 400), out
    if status == 400:
        assert out["error"]["param"] == param, out
    assert time.monotonic() - t0 < 2 * grammar_spec.COMPILE_SECONDS + 1


def test_parallel_tool_calls_is_accepted(fake):
    r = client(fake).chat.completions.create(model="fake-moe", messages=USER, tools=TOOLS, tool_choice="required",
                                             parallel_tool_calls=False)
    assert len(r.choices[0].message.tool_calls) == 1


# ------------------------------------------------------------ the reference model behind a real router
@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from mlxmoe.bundle.split import split
    from test_failover_splice import ReplicaCluster

    root = tmp_path_factory.mktemp("tools")
    split(str(REFERENCE), root / "g1", 1)
    with ReplicaCluster(root / "g1", n=2, probe_interval=60.0) as c:
        yield c


def _check_call(call) -> None:
    assert call.type == "function" and call.function.name in SCHEMAS
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_real_required_call_valid_and_streamed_the_same(real):
    cl = client(real)
    model = cl.models.list().data[0].id
    kw = dict(model=model, messages=USER, tools=TOOLS, tool_choice="required", max_tokens=120, temperature=0.0)
    r = cl.chat.completions.create(**kw)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls", ch
    (call,) = ch.message.tool_calls
    _check_call(call)
    chunks = list(cl.chat.completions.create(**kw, stream=True))
    (d,) = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert (d.function.name, d.function.arguments) == (call.function.name, call.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_real_forced_call_with_open_schemas_ends_and_a_cut_one_says_length(real):
    """Greedy, "required", schemas without additionalProperties (the runaway users hit): a valid call of
    declared keys, finish_reason "tool_calls"; cut by max_tokens: the call so far, finish_reason "length"."""
    open_tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}}}}]
    cl = client(real)
    model = cl.models.list().data[0].id
    kw = dict(model=model, messages=USER, tools=open_tools, tool_choice="required", temperature=0.0)
    ch = cl.chat.completions.create(**kw, max_tokens=120).choices[0]
    assert ch.finish_reason == "tool_calls", ch
    (call,) = ch.message.tool_calls
    assert set(json.loads(call.function.arguments)) <= {"city", "unit"}
    ch = cl.chat.completions.create(**kw, max_tokens=30).choices[0]
    assert ch.finish_reason == "length" and ch.message.content is None, ch
    (cut,) = ch.message.tool_calls
    assert cut.function.name == "get_weather" and call.function.arguments.startswith(cut.function.arguments)
    chunks = list(cl.chat.completions.create(**kw, max_tokens=30, stream=True))
    (d,) = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert (d.function.name, d.function.arguments) == (cut.function.name, cut.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_real_response_formats(real):
    cl = client(real)
    model = cl.models.list().data[0].id
    rf = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER, "strict": True}}
    r = cl.chat.completions.create(model=model, messages=[{"role": "user", "content": "Weather in Oslo as JSON."}],
                                   response_format=rf, max_tokens=120, temperature=0.0)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), WEATHER)
    r = cl.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say {} in JSON."}],
                                   response_format={"type": "json_object"}, max_tokens=120, temperature=0.0)
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_real_failover_mid_call_keeps_the_constraint(real):
    """The serving node dies after 9 tokens of a forced call (inside its JSON); the other node
    resumes (params.resume = 9): its grammar first consumes those 9 tokens, so the answer is the
    same valid call an uninterrupted node gives (greedy)."""
    cl = client(real)
    model = cl.models.list().data[0].id
    kw = dict(model=model, messages=[{"role": "user", "content": "Add 2 and 3."}], tools=TOOLS,
              tool_choice={"type": "function", "function": {"name": "add"}}, max_tokens=120, temperature=0.0,
              stream=True)

    def answer():
        chunks = list(cl.chat.completions.create(**kw))
        return ([(d.function.name, d.function.arguments) for c in chunks for d in (c.choices[0].delta.tool_calls or [])],
                chunks[-1].choices[0].finish_reason)

    whole = answer()
    before, real.plan.k = len(real.plan.resumes), 9
    spliced = answer()
    assert real.plan.resumes[before:] == [0, 9]  # killed after 9 tokens; the other node resumed there
    assert spliced == whole and whole[1] == "tool_calls"
    ((name, args),), _ = whole
    jsonschema.validate(json.loads(args), ADD)


def test_node_resume_consumes_the_turn_so_far(tmp_path):
    """Node level, no router: a constrained answer cut after k tokens and resumed (a new session,
    as on another node) equals the uninterrupted one; resumed tokens the grammar forbids are refused."""
    import mlx.core as mx

    from mlxmoe.bundle.split import split
    from mlxmoe.errors import MlxMoeError
    from mlxmoe.model.load import load_bundle, load_tokenizer
    from mlxmoe.node.contract import GenParams
    from mlxmoe.node.engine import Node

    b = str(tmp_path / "g1")
    split(str(REFERENCE), b, 1)
    node = Node(load_bundle(b, 0, dtype=mx.float32), load_tokenizer(b), kv_bits=None, bundle_dir=b)
    g = {"type": "json_schema", "schema": WEATHER}
    prompt = node.encode_chat([{"role": "user", "content": "Weather in Oslo as JSON."}])
    whole = list(node.generate(None, prompt, GenParams(max_tokens=80, grammar=g)))
    k = 6
    head = [e.token for e in whole[:k]]
    sent = sum(len(e.text) for e in whole[:k])
    rest = list(node.generate(None, prompt + head, GenParams(max_tokens=80 - k, grammar=g, resume=k, resume_chars=sent)))
    assert [e.token for e in rest] == [e.token for e in whole[k:]]
    text = "".join(e.text for e in whole[:k] + rest)
    jsonschema.validate(json.loads(text), WEATHER)
    bad = node.encode("hello")  # not how a JSON object starts
    with pytest.raises(MlxMoeError, match="params.resume"):
        node.generate(None, prompt + bad, GenParams(max_tokens=8, grammar=g, resume=len(bad)))


def test_template_tools_get_earlier_arguments_as_objects():
    """As mlx-lm's server: a template that renders tools gets earlier calls' arguments as objects."""
    msgs = USER + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]}]
    out, kw = tl.render(msgs, TOOLS, "auto", template_tools=True)
    assert kw == {"tools": TOOLS} and out[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1, "b": 2}
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == '{"a": 1, "b": 2}'  # the caller's list is untouched


def test_oversized_tool_history_is_refused_before_the_template():
    huge = "x" * 70_000
    msgs = USER + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": huge}}]}]
    with LocalCluster([Scripted(max_context=1000)]) as c:
        c.router.context_override = 1000
        status, out = post(c, {"messages": msgs, "tools": TOOLS})
        assert (status, out["error"]["param"], out["error"]["code"]) == (400, "messages", "context_length_exceeded")
        assert c.engines[0].prompts == []
