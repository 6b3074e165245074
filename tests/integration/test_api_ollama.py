"""Ollama's API (api/ollama.py) with the official `ollama` client, FakeEngine level: chat and generate, streamed
(NDJSON, Ollama's default) and not, with the same text; options, format and tools as they reach the node
(GenParams, the rendered prompt); tool calls with object arguments and tool results paired with their calls;
tags/show/ps/version in the client's types; model names, API keys, a failure mid-answer; hostile bodies (a 4xx
naming the field, never a 5xx) while a normal stream on the same cluster is unharmed."""

from __future__ import annotations

import http.client
import json
import re
import threading
import urllib.parse
from types import SimpleNamespace

import ollama
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fakes import HASH, FakeEngine, FakeFrontend, LocalCluster
from test_api_tools import CALL, TOOLS, Scripted
from mlxmoe import __version__
from mlxmoe.cluster.api import ollama as dialect
from tool_cases import WEATHER

pytestmark = pytest.mark.timeout(120)
TEXT = "Hello from the cluster."
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
CONFIG = {"model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 6, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 8192}
TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"  # no `tools`: they go in a system message


class Described(FakeFrontend):
    """A front end with what a real bundle's manifest says (distribution.json) and a chat template."""
    tokenizer = SimpleNamespace(chat_template=TEMPLATE)

    def __init__(self):
        super().__init__()
        self.manifest = SimpleNamespace(
            model_id="fake-moe", hash=HASH, n_groups=3, created="2026-12-07T14:15:37Z",
            model={"id": "fake-moe", "model_type": "qwen3_moe", "config": CONFIG},
            moe={"n_experts": 48, "top_k": 6}, quantization={"trunk": {"bits": 8, "group_size": 64},
                                                              "experts": {"bits": 4, "group_size": 64}},
            files={"trunk.safetensors": {"size": 1000}, "experts-group-00.safetensors": {"size": 234}})


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


def client(c, **kw) -> ollama.Client:
    return ollama.Client(host=c.api_url, timeout=30, **kw)


def last(c):
    """(GenParams, decoded prompt) of the node's latest request."""
    return c.engines[0].params[-1], c.engines[0].prompts[-1]


def post(c, path: str, body, headers: dict | None = None) -> tuple[int, str, bytes]:
    """A raw request (the ollama client checks some fields itself): (status, content type, body)."""
    u = urllib.parse.urlparse(c.api_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    data = body if isinstance(body, bytes) else json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    try:
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type", ""), r.read()
    finally:
        conn.close()


def lines(raw: bytes) -> list[dict]:
    return [json.loads(ln) for ln in raw.splitlines() if ln.strip()]


# ---------------------------------------------------------------- chat and generate
def test_chat_streamed_and_not_give_the_same_text(fake):
    cl = client(fake)
    r = cl.chat(model="fake-moe", messages=USER)
    assert (r.message.role, r.message.content, r.done, r.done_reason) == ("assistant", TEXT, True, "stop")
    assert r.model == "fake-moe" and r.created_at.endswith("Z")
    assert r.eval_count == len(TEXT) + 1 and r.prompt_eval_count  # its end token too == len(fake.engines[0].prompts[-1])
    assert r.total_duration >= r.eval_duration >= 0 and r.prompt_eval_duration >= 0 and r.load_duration >= 0
    parts = list(cl.chat(model="fake-moe:latest", messages=USER, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done and parts[-1].done_reason == "stop"
    assert "".join(p.message.content for p in parts) == TEXT and len(parts) > 2
    assert parts[-1].model == "fake-moe:latest" and parts[-1].eval_count == len(TEXT) + 1


def test_stream_is_the_default_and_ndjson(fake):
    status, ctype, raw = post(fake, "/api/chat", {"model": "fake-moe", "messages": USER})
    out = lines(raw)
    assert status == 200 and ctype.startswith("application/x-ndjson") and out[-1]["done"] is True
    assert out[0]["message"] == {"role": "assistant", "content": TEXT[0]} and out[0]["done"] is False
    assert set(out[-1]) >= {"total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
                            "eval_count", "eval_duration", "created_at", "model", "done_reason"}


def test_generate_templated_and_raw(fake):
    cl = client(fake)
    r = cl.generate(model="fake-moe", prompt="Why is the sky blue?", system="Be brief.")
    assert (r.response, r.done_reason) == (TEXT, "stop")
    assert last(fake)[1] == "<system>Be brief.\n<user>Why is the sky blue?\n<assistant>"
    parts = list(cl.generate(model="fake-moe", prompt="[INST] hi [/INST]", raw=True, stream=True))
    assert "".join(p.response for p in parts) == TEXT and parts[-1].done and parts[-1].context is None
    assert last(fake)[1] == "[INST] hi [/INST]"


def test_an_empty_request_loads_the_model(fake):
    n = len(fake.engines[0].params)
    r = client(fake).generate(model="fake-moe")
    assert (r.done, r.done_reason, r.response) == (True, "load", "")
    r = client(fake).chat(model="fake-moe:latest", messages=[])
    assert (r.done, r.done_reason, r.message.content) == (True, "load", "")
    assert len(fake.engines[0].params) == n  # no node was asked


def test_options_reach_the_node(fake):
    opts = {"temperature": 0.7, "num_predict": 9, "top_k": 20, "top_p": 0.9, "min_p": 0.05, "stop": ["cluster"],
            "seed": 42, "repeat_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": -0.5,
            "num_ctx": 4096, "mirostat": 0, "tfs_z": 1.0, "use_mmap": True}  # the last four: ignored
    r = client(fake).chat(model="fake-moe", messages=USER, options=opts)
    p = last(fake)[0]
    assert (p.temperature, p.max_tokens, p.top_k, p.top_p, p.min_p, p.stop, p.seed) == (0.7, 9, 20, 0.9, 0.05,
                                                                                         ["cluster"], 42)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.3, 0.5, -0.5)
    assert r.message.content == TEXT[:9] and r.done_reason == "length"
    r = client(fake).generate(model="fake-moe", prompt="x", options={"stop": ["cluster"], "num_predict": -1, "seed": -1})
    p = last(fake)[0]
    assert r.response == "Hello from the " and r.done_reason == "stop"
    assert (p.max_tokens, p.seed, p.temperature, p.repetition_penalty) == (512, None, None, None)  # model defaults


def test_format_reaches_the_node_as_a_grammar(fake):
    cl = client(fake)
    cl.chat(model="fake-moe", messages=USER, format="json")
    assert last(fake)[0].grammar == {"type": "json_object"}
    cl.generate(model="fake-moe", prompt="Weather as JSON", format=WEATHER)
    assert last(fake)[0].grammar == {"type": "json_schema", "schema": WEATHER}
    cl.generate(model="fake-moe", prompt="{", format=WEATHER, raw=True)
    assert last(fake)[0].grammar == {"type": "json_schema", "schema": WEATHER}
    cl.chat(model="fake-moe", messages=USER, format="")
    assert last(fake)[0].grammar is None


def test_tools_give_calls_with_object_arguments(fake, answer):
    answer("Let me look. " + CALL)
    cl = client(fake)
    r = cl.chat(model="fake-moe", messages=USER, tools=TOOLS)
    assert "Available functions" in last(fake)[1]  # the template has no tools: declared in a system message
    assert r.message.content == "Let me look. " and r.done_reason == "stop"
    (call,) = r.message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_weather", {"city": "Paris", "unit": "c"})
    parts = list(cl.chat(model="fake-moe", messages=USER, tools=TOOLS, stream=True))
    calls = [c for p in parts for c in (p.message.tool_calls or [])]
    assert [(c.function.name, c.function.arguments) for c in calls] == [("get_weather", {"city": "Paris", "unit": "c"})]
    assert "".join(p.message.content for p in parts) == "Let me look. " and parts[-1].done_reason == "stop"


def test_a_call_cut_short_stays_text(fake, answer):
    answer(CALL)
    r = client(fake).chat(model="fake-moe", messages=USER, tools=TOOLS, options={"num_predict": 60})
    assert r.done_reason == "length" and not r.message.tool_calls
    assert r.message.content == '<tool_call>{"name": "get_weather", "arguments": {"city": "Pa'


def test_a_tool_result_turn_reaches_the_prompt(fake):
    msgs = USER + [{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}}]},
        {"role": "tool", "content": "18 C, sunny", "tool_name": "get_weather"}]
    r = client(fake).chat(model="fake-moe", messages=msgs, tools=TOOLS)
    assert r.message.content == TEXT
    prompt = last(fake)[1]
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}</tool_call>' in prompt
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in prompt


def test_tool_results_are_paired_with_their_calls():
    """Ollama's results name their tool (or come in order); each gets its call's id, whatever the order."""
    call = lambda name, **a: {"function": {"name": name, "arguments": a}}  # noqa: E731
    msgs = USER + [{"role": "assistant", "tool_calls": [call("add", a=1, b=2), call("get_weather", city="Oslo"),
                                                        call("add", a=3, b=4)]},
                   {"role": "tool", "content": "Oslo: 3 C", "tool_name": "get_weather"},
                   {"role": "tool", "content": "3"}, {"role": "tool", "content": "7", "tool_name": "add"},
                   {"role": "tool", "content": "a result without its call"}]
    out = dialect.parse_messages({"messages": msgs})
    ids = [c["id"] for c in out[1]["tool_calls"]]
    assert [m["tool_call_id"] for m in out[2:]] == [ids[1], ids[0], ids[2], "call_5"]
    assert out[1]["tool_calls"][0]["function"] == {"name": "add", "arguments": '{"a": 1, "b": 2}'}


def test_logprobs(fake):
    r = client(fake).chat(model="fake-moe", messages=USER, logprobs=True, top_logprobs=2)
    assert [lp.token for lp in r.logprobs] == list(TEXT) + [""] and all(lp.logprob < 0 for lp in r.logprobs)
    assert last(fake)[0].top_logprobs == 2
    parts = list(client(fake).generate(model="fake-moe", prompt="x", logprobs=True, stream=True))
    assert "".join(lp.token for p in parts for lp in (p.logprobs or [])) == TEXT


def test_mlxmoe_options_and_headers(fake):
    status, _, raw = post(fake, "/api/chat", {"model": "fake-moe", "messages": USER, "stream": False},
                          {"X-Mlxmoe-Session": "conv-7"})
    assert status == 200 and json.loads(raw)["message"]["content"] == TEXT
    status, _, raw = post(fake, "/api/chat", {"model": "fake-moe", "messages": USER, "mlxmoe": {"mode": "bogus"}})
    assert status == 400 and "mlxmoe.mode" in json.loads(raw)["error"]


# ---------------------------------------------------------------- models
def test_tags_show_ps_version_parse_in_the_clients_types(fake):
    cl = client(fake)
    (m,) = cl.list().models
    assert (m.model, m.digest, int(m.size), m.modified_at.year) == ("fake-moe:latest", HASH, 1234, 2026)
    d = m.details
    assert (d.format, d.family, list(d.families), d.quantization_level, d.parameter_size) == (
        "mlxmoe", "qwen3_moe", ["qwen3_moe"], "Q8/Q4", "")
    s = cl.show("fake-moe:latest")
    assert s.capabilities == ["completion", "tools"] and s.template == TEMPLATE and s.details == d
    assert s.modelinfo["general.architecture"] == "qwen3_moe" and s.modelinfo["qwen3_moe.context_length"] == 8192
    assert s.modelinfo["qwen3_moe.expert_count"] == 48 and s.modelinfo["qwen3_moe.block_count"] == 6
    assert "temperature" in s.parameters and "num_predict         512" in s.parameters
    (p,) = cl.ps().models
    assert (p.model, int(p.size_vram), p.context_length, p.expires_at.year) == ("fake-moe:latest", 1234, 8192, 9999)
    raw = cl._client.get("/api/version").json()
    assert raw == {"version": __version__}


def test_a_manifest_that_says_little_leaves_fields_empty():
    router = SimpleNamespace(frontend=FakeFrontend(), model="fake-moe", manifest_hash=HASH, n_groups=3,
                             context_limit=None, sampling_defaults={})
    e = ollama.ListResponse(models=[dialect.entry(router)]).models[0]
    assert (e.model, e.size, e.modified_at, e.details.family, e.details.families, e.details.quantization_level) == (
        "fake-moe:latest", None, None, "", None, "")
    assert dialect.model_info(router) == {"general.architecture": "", "mlxmoe.groups": 3, "mlxmoe.manifest_hash": HASH}


def test_unknown_model_is_a_404(fake):
    cl = client(fake)
    for call in (lambda: cl.chat(model="llama3", messages=USER), lambda: cl.generate(model="fake-moe:7b", prompt="x"),
                 lambda: cl.show("llama3:latest"), lambda: list(cl.chat(model="nope", messages=USER, stream=True))):
        with pytest.raises(ollama.ResponseError) as e:
            call()
        assert e.value.status_code == 404 and "not found" in e.value.error
    status, _, raw = post(fake, "/api/show", {"name": "llama3"})
    assert status == 404 and json.loads(raw) == {"error": "model 'llama3' not found"}


# ---------------------------------------------------------------- keys, failures
@pytest.fixture(scope="module")
def keyed():
    """One node that fails after 3 tokens, behind a router that asks for an API key."""
    with LocalCluster([FakeEngine(group=0, n_groups=1, fail_after=3)], api_keys=["alice-key"]) as c:
        yield c


def test_api_key_is_required(keyed):
    for cl in (client(keyed), client(keyed, headers={"Authorization": "Bearer wrong"})):
        for call in (cl.list, cl.ps, lambda: cl.show("fake-moe"), lambda: cl.generate(model="fake-moe"),
                     lambda: cl.chat(model="fake-moe", messages=USER), lambda: cl._request_raw("GET", "/api/version")):
            with pytest.raises(ollama.ResponseError) as e:
                call()
            assert e.value.status_code == 401
    cl = client(keyed, headers={"Authorization": "Bearer alice-key"})
    assert cl.list().models and cl.ps().models and cl.show("fake-moe").capabilities
    assert cl.chat(model="fake-moe", messages=USER, options={"num_predict": 2}).eval_count == 2


def test_a_failure_mid_answer_is_a_last_error_line(keyed):
    cl = client(keyed, headers={"Authorization": "Bearer alice-key"})
    parts = []
    with pytest.raises(ollama.ResponseError) as e:
        for p in cl.chat(model="fake-moe", messages=USER, stream=True):
            parts.append(p)
    assert len(parts) == 3 and "fake failure" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        cl.generate(model="fake-moe", prompt="x")
    assert e.value.status_code == 502


# ---------------------------------------------------------------- hostile input
def _nest(depth: int, leaf=1):
    for _ in range(depth):
        leaf = [leaf] if depth % 2 else {"a": leaf}
    return leaf


BAD = [
    ({"model": None}, "model"),
    ({"model": ["fake-moe"]}, "model"),
    ({"messages": {"role": "user"}}, "messages"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": ["x"]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, "messages[0].images"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages"),
    ({"messages": USER + [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"messages": USER + [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {"a": "\udfff"}}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"messages": USER + [{"role": "assistant", "tool_calls": [{"function": {}}]}]},
     "messages[1].tool_calls[0].function.name"),
    ({"messages": USER + [{"role": "tool", "content": "x", "tool_name": 3}]}, "messages[1].tool_name"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}]},
     "tools[0].function.parameters"),
    ({"format": "yaml"}, "format"),
    ({"format": {"type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}}}, "format"),
    ({"format": {"$ref": "#"}}, "format"),
    ({"format": _nest(130)}, "format"),
    ({"format": {"type": "object", "properties": {"a": 5}}}, "format"),
    ({"options": "x"}, "options"),
    ({"options": {"num_predict": 0}}, "options.num_predict"),
    ({"options": {"num_predict": 2 ** 40}}, "options.num_predict"),
    ({"options": {"temperature": "hot"}}, "options.temperature"),
    ({"options": {"temperature": 10 ** 400}}, "options.temperature"),
    ({"options": {"top_p": 0}}, "options.top_p"),
    ({"options": {"top_k": 1.5}}, "options.top_k"),
    ({"options": {"seed": 2 ** 64}}, "options.seed"),
    ({"options": {"seed": -2}}, "options.seed"),
    ({"options": {"repeat_penalty": 0}}, "options.repeat_penalty"),
    ({"options": {"presence_penalty": 3}}, "options.presence_penalty"),
    ({"options": {"stop": [""]}}, "options.stop"),
    ({"options": {"stop": ["\ud800"]}}, "options.stop"),
    ({"options": {"num_ctx": "big"}}, "options.num_ctx"),
    ({"options": {"mirostat_tau": float("nan")}}, "options.mirostat_tau"),
    ({"options": {"use_mmap": "yes"}}, "options.use_mmap"),
    ({"stream": "yes"}, "stream"),
    ({"keep_alive": [5]}, "keep_alive"),
    ({"think": 3}, "think"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"mlxmoe": {"prefer": "cheap"}}, "mlxmoe.prefer"),
]
GENERATE_BAD = [({"images": ["aGk="]}, "images"), ({"suffix": "}"}, "suffix"), ({"template": "{{ .Prompt }}"}, "template"),
                ({"context": [1, 2]}, "context"), ({"prompt": 5}, "prompt"), ({"system": "\ud800"}, "system"),
                ({"raw": "yes"}, "raw")]


def refused(c, path: str, body: dict, field: str, status: int = 400) -> str:
    st_, _, raw = post(c, path, body)
    err = json.loads(raw)
    assert st_ == status and list(err) == ["error"] and f"'{field}'" in err["error"], (st_, err)
    return err["error"]


@pytest.mark.parametrize("extra, field", BAD, ids=[f for _, f in BAD])
def test_bad_chat_fields_are_a_400_naming_them(fake, extra, field):
    refused(fake, "/api/chat", {"model": "fake-moe", "messages": USER, "stream": False, **extra}, field)


@pytest.mark.parametrize("extra, field", GENERATE_BAD, ids=[f for _, f in GENERATE_BAD])
def test_bad_generate_fields_are_a_400_naming_them(fake, extra, field):
    refused(fake, "/api/generate", {"model": "fake-moe", "prompt": "x", "stream": False, **extra}, field)


def test_nan_in_raw_json_and_unknown_routes(fake):
    body = b'{"model": "fake-moe", "prompt": "x", "options": {"top_p": NaN}}'
    st_, _, raw = post(fake, "/api/generate", body)
    assert st_ == 400 and "'options.top_p'" in json.loads(raw)["error"]
    st_, _, raw = post(fake, "/api/pull", {"model": "fake-moe"})
    assert st_ == 404 and "no route" in json.loads(raw)["error"]


scalars = (st.none() | st.booleans() | st.integers() | st.integers(-2 ** 70, 2 ** 70) | st.floats()
           | st.text(max_size=10) | st.sampled_from(["\ud800", "", "json", "fake-moe", "user", "race", 10 ** 30, -1, -2]))
values = (st.recursive(scalars, lambda ch: st.lists(ch, max_size=3) | st.dictionaries(st.text(max_size=6), ch, max_size=3),
                       max_leaves=8) | st.integers(1, 400).map(_nest))
OPTION_NAMES = sorted(dialect.OPTIONS) + list(dialect.IGNORED_INT + dialect.IGNORED_NUM + dialect.IGNORED_BOOL)
TOP = ["model", "messages", "prompt", "system", "raw", "stream", "format", "options", "tools", "keep_alive", "think",
       "images", "suffix", "template", "context", "logprobs", "top_logprobs", "mlxmoe"]
MESSAGE = ["role", "content", "images", "tool_calls", "tool_name"]
FIELDS = ([(f, f) for f in TOP] + [(f"options.{o}", ("options", o)) for o in OPTION_NAMES]
          + [(f"messages[0].{k}", ("messages", 0, k)) for k in MESSAGE])


def _hostile(path: str, where, value) -> dict:
    body = {"model": "fake-moe", "stream": False, "options": {"num_predict": 8},
            **({"messages": [{"role": "user", "content": "hi"}]} if path == "/api/chat" else {"prompt": "hi"})}
    if isinstance(where, str):
        body[where] = value
    elif where[0] == "options":
        body["options"] = {**body["options"], where[1]: value}
    else:
        body["messages"] = [{"role": "user", "content": "hi", where[2]: value}]
    return body


@pytest.fixture
def a_stream_beside(fake):
    """Normal streams, one after another, while the test runs: each must come whole."""
    stop, results = threading.Event(), []

    def run():
        cl = client(fake)
        while not stop.is_set():
            parts = list(cl.chat(model="fake-moe", messages=[{"role": "user", "content": "beside"}], stream=True))
            results.append(("".join(p.message.content for p in parts), parts[-1].done_reason))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    yield
    stop.set()
    t.join(30)
    assert results and set(results) == {(TEXT, "stop")}, set(results)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/api/chat", "/api/generate"]), field=st.sampled_from(FIELDS), value=values)
def test_hostile_fields_are_a_4xx_naming_them_never_a_5xx(fake, a_stream_beside, path, field, value):
    name, where = field
    st_, ctype, raw = post(fake, path, _hostile(path, where, value))
    assert st_ < 500, raw[:300]
    if st_ >= 400:
        err = json.loads(raw)["error"]
        expect = name if name.startswith("options.") else re.split(r"[.\[]", name)[0]
        assert (st_, name) == (404, "model") or f"'{expect}" in err, (st_, name, err)
    else:
        out = lines(raw)
        assert out[-1]["done"] is True and "error" not in out[-1], out[-1]
