"""Constrained decoding end to end on the bundled reference model (one node, greedy and
sampled): tool_choice="required" gives a valid call of a declared function, json_schema
output validates, json_object output parses. The small model would not manage unaided."""

import json
import time
from pathlib import Path

import jsonschema
import pytest

from tool_cases import ADD, WEATHER

from mlxmoe.bundle.split import split
from mlxmoe.cluster.api import tools
from mlxmoe.errors import MlxMoeError
from mlxmoe.node.contract import GenParams
from mlxmoe.node.engine import Node

pytestmark = pytest.mark.timeout(300)
REFERENCE = Path(__file__).parents[2] / "mlxmoe" / "assets" / "reference-moe"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": ADD}}]


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    out = tmp_path_factory.mktemp("constrained") / "b"
    split(str(REFERENCE), out, 2)
    return Node.load(str(out), 0)


def answer(node, messages, grammar, **kw):
    events = list(node.generate(None, node.encode_chat(messages), GenParams(max_tokens=120, grammar=grammar, **kw)))
    assert events[-1].finish_reason == "stop"  # ended by the grammar's end token, not max_tokens
    return "".join(e.text for e in events)


@pytest.mark.parametrize("temperature, seed", [(0.0, None), (1.0, 3)])
def test_required_tool_choice_gives_a_valid_call(node, temperature, seed):
    msgs, kw = tools.render([{"role": "user", "content": "What is the weather in Paris?"}], TOOLS, "required",
                            template_tools=tools.template_supports_tools(node.tokenizer.chat_template))
    assert kw == {}  # the reference template has no tools: they are declared in a system message
    text = answer(node, msgs, tools.tool_grammar(TOOLS, "required"), temperature=temperature, seed=seed)
    content, calls = tools.parse_tool_calls(text)
    assert content == "" and len(calls) == 1, text
    fn = calls[0]["function"]
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[fn["name"]]
    jsonschema.validate(json.loads(fn["arguments"]), schema)


def test_named_tool_choice(node):
    msgs, _ = tools.render([{"role": "user", "content": "Add 2 and 3."}], TOOLS, "required", template_tools=False)
    text = answer(node, msgs, tools.tool_grammar(TOOLS, {"type": "function", "function": {"name": "add"}}))
    (call,) = tools.parse_tool_calls(text)[1]
    assert call["function"]["name"] == "add"
    jsonschema.validate(json.loads(call["function"]["arguments"]), ADD)


def test_json_schema_output_validates(node):
    rf = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER}}
    text = answer(node, [{"role": "user", "content": "Weather in Oslo as JSON."}], tools.response_format_grammar(rf))
    jsonschema.validate(json.loads(text), WEATHER)


def test_json_object_output_parses(node):
    text = answer(node, [{"role": "user", "content": "Say {} in JSON."}], tools.response_format_grammar({"type": "json_object"}))
    assert isinstance(json.loads(text), dict)


def test_bad_grammar_is_refused_before_generation(node):
    with pytest.raises(MlxMoeError, match="grammar.type"):
        node.generate(None, [1, 2, 3], GenParams(grammar={"type": "yaml"}))
    assert node.info()["active_sessions"] == 0


OPEN_TOOLS = [  # no additionalProperties anywhere: the strict rule closes them (node/grammar_spec.py)
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]


@pytest.mark.parametrize("question", ["What is the weather in Paris?", "Add 2 and 3."])
def test_forced_call_with_open_schemas_ends_with_declared_keys_only(node, question):
    """The runaway users hit: greedy, tool_choice "required", schemas without additionalProperties; the
    model once filled `arguments` with undeclared keys until max_tokens. Now the call ends (finish "stop")
    with declared keys only, each once."""
    msgs, _ = tools.render([{"role": "user", "content": question}], OPEN_TOOLS, "required", template_tools=False)
    text = answer(node, msgs, tools.tool_grammar(OPEN_TOOLS, "required"), temperature=0.0)
    content, (call,) = tools.parse_tool_calls(text)
    declared = {t["function"]["name"]: t["function"]["parameters"]["properties"] for t in OPEN_TOOLS}
    args = json.loads(call["function"]["arguments"])
    assert set(args) <= set(declared[call["function"]["name"]]), text
    body = text[len(tools.TOOL_CALL_START):-len(tools.TOOL_CALL_END)]
    assert json.loads(body, object_pairs_hook=lambda kv: (len(kv) == len(dict(kv)) or pytest.fail(text), dict(kv))[1])


def test_json_schema_without_additional_properties_keeps_to_its_keys(node):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}, "sunny": {"type": "boolean"}}}
    rf = {"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}
    text = answer(node, [{"role": "user", "content": "Weather in Oslo as JSON."}], tools.response_format_grammar(rf))
    assert set(json.loads(text)) <= {"city", "sunny"}, text


def test_a_forced_call_cut_by_max_tokens_is_a_call_with_finish_length(node):
    msgs, _ = tools.render([{"role": "user", "content": "What is the weather in Paris?"}], TOOLS, "required",
                           template_tools=False)
    events = list(node.generate(None, node.encode_chat(msgs),
                                GenParams(max_tokens=30, grammar=tools.tool_grammar(TOOLS, "required"))))
    assert events[-1].finish_reason == "length"
    content, (call,) = tools.parse_tool_calls("".join(e.text for e in events))
    assert content == "" and call["function"]["name"] in {"get_weather", "add"}
    assert not call["function"]["arguments"].endswith("}}")  # the arguments text so far


@pytest.mark.parametrize("grammar, field", [
    ({"type": "tool_call", "tools": [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#"}}}],
      "choice": "required"}, "tools[0].function.parameters"),
    ({"type": "json_schema", "schema": {"$ref": "#"}}, "response_format.json_schema.schema"),
])
def test_a_hostile_schema_is_refused_before_the_row_exists(node, grammar, field):
    """As a spec that reached the node over the RPC directly: refused at once naming the field, no session."""
    before = node.info()["active_sessions"]
    t0 = time.monotonic()
    with pytest.raises(MlxMoeError, match="^" + field.replace(".", r"\.").replace("[", r"\[").replace("]", r"\]")):
        node.generate(None, node.encode_chat([{"role": "user", "content": "hi"}]), GenParams(grammar=grammar))
    assert time.monotonic() - t0 < 1.0 and node.info()["active_sessions"] == before
