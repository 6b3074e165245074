"""cluster/api/tools.py: tools into the prompt, grammar specs from requests, and tool calls
out of generated text, whole and in streamed deltas split anywhere."""

import itertools
import json

import pytest
from hypothesis import given, settings, strategies as st

from mlxmoe.cluster.api import tools
from mlxmoe.errors import MlxMoeError

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]


def ids():
    c = itertools.count()
    return lambda: f"call_{next(c)}"


def call_text(name, args):
    return f'{tools.TOOL_CALL_START}\n{json.dumps({"name": name, "arguments": args})}\n{tools.TOOL_CALL_END}'


def test_same_format_as_the_node_grammar():
    from mlxmoe.node import grammar
    assert (tools.TOOL_CALL_START, tools.TOOL_CALL_END) == (grammar.TOOL_CALL_START, grammar.TOOL_CALL_END)


def test_parse_whole_answer():
    text = "Let me look. " + call_text("get_weather", {"city": "Paris"}) + call_text("add", {"a": 1, "b": 2})
    content, calls = tools.parse_tool_calls(text, ids())
    assert content == "Let me look. "
    assert calls == [
        {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}


def test_plain_text_has_no_calls_and_lone_angle_brackets_stay():
    assert tools.parse_tool_calls("a < b and <tool> </tool_call>") == ("a < b and <tool> </tool_call>", [])


@pytest.mark.parametrize("text", [
    "<tool_call>{not json}</tool_call>",
    '<tool_call>{"arguments": {}}</tool_call>',  # no name
    '<tool_call>{"name": "ad',  # cut by max_tokens inside the name: no call yet
    '<tool_call>{"arguments": {"a": 1',  # cut, and no name before it
    "<tool_call>not json",
    "<tool_call>",
])
def test_broken_calls_stay_content(text):
    content, calls = tools.parse_tool_calls(text)
    assert calls == [] and content == text


@pytest.mark.parametrize("text, name, args", [
    ('<tool_call>{"name": "add", "argu', "add", ""),
    ('<tool_call>{"name": "add", "arguments": ', "add", ""),
    ('<tool_call>{"name": "add", "arguments": {"a": 1, "b"', "add", '{"a": 1, "b"'),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Par', "get_weather", '{"city": "Par'),
    ('<tool_call>{"name": "add", "arguments": {"a": 1}', "add", '{"a": 1}'),  # the object whole, the tag cut
    ('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_', "add", '{"a": 1}'),
    ('Sure. <tool_call>\n{"name": "add",\n "arguments": {"a"', "add", '{"a"'),
])
def test_a_call_cut_by_max_tokens_is_still_a_call(text, name, args):
    """As the API reports it (finish_reason "length"): the call with the arguments text produced so far."""
    content, calls = tools.parse_tool_calls(text, ids())
    assert content == text[:text.index(tools.TOOL_CALL_START)]
    assert calls == [{"id": "call_0", "type": "function", "function": {"name": name, "arguments": args}}]
    p = tools.ToolCallParser(ids())
    events = [e for ch in text for e in p.feed(ch)] + p.finish()  # streamed one character at a time
    assert [e["tool_call"]["function"] for e in events if "tool_call" in e] == [{"name": name, "arguments": args}]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["Hi ", "x<y ", "<tool", "<tool_call", call_text("add", {"a": 1}),
                                 call_text("get_weather", {"city": "<tool_call> in a string"}), "done.",
                                 '<tool_call>{"name": "add", "arguments": {"a": 1', '<tool_call>{"na']), max_size=6),
       st.data())
def test_streamed_deltas_split_anywhere_give_the_whole_answer(parts, data):
    text = "".join(parts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=12)))
    deltas = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    p = tools.ToolCallParser(ids())
    events = [e for d in deltas for e in p.feed(d)] + p.finish()
    content, calls = tools.parse_tool_calls(text, ids())
    assert "".join(e.get("content", "") for e in events) == content
    streamed = [e["tool_call"] for e in events if "tool_call" in e]
    assert [c["index"] for c in streamed] == list(range(len(streamed)))
    assert [{k: v for k, v in c.items() if k != "index"} for c in streamed] == calls


def test_streaming_holds_back_only_a_possible_tag():
    p = tools.ToolCallParser(ids())
    assert p.feed("Hello <to") == [{"content": "Hello "}]
    assert p.feed("day") == [{"content": "<today"}]
    assert p.feed("<tool_call>{\"name\": \"add\", ") == []
    assert p.feed('"arguments": {}}</tool_call>')[0]["tool_call"]["function"] == {"name": "add", "arguments": "{}"}


def test_render_native_template_passes_tools_like_mlx_lm():
    msgs = [{"role": "user", "content": "hi"}]
    assert tools.render(msgs, TOOLS, "auto", template_tools=True) == (msgs, {"tools": TOOLS})
    assert tools.render(msgs, TOOLS, "none", template_tools=True) == (msgs, {})


def test_render_without_template_support_declares_tools_in_system():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "c", "content": "sunny"}]
    out, kw = tools.render(msgs, TOOLS, "required", template_tools=False)
    assert kw == {}
    assert out[0]["content"].startswith("Be brief.") and '"name": "get_weather"' in out[0]["content"]
    assert tools.TOOL_CALL_START in out[0]["content"]
    assert out[2] == {"role": "assistant", "content": call_text("get_weather", {"city": "Oslo"}).replace("\n", "")}
    assert out[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}
    assert all(isinstance(m["content"], str) for m in out)
    assert tools.render(msgs[1:2], TOOLS, "none", template_tools=False) == (msgs[1:2], {})


def test_template_supports_tools():
    assert tools.template_supports_tools("{% if tools %}...{% endif %}")
    assert not tools.template_supports_tools("{% for message in messages %}{% endfor %}")
    assert not tools.template_supports_tools(None)


def test_grammar_specs_from_requests():
    assert tools.tool_grammar(TOOLS, "required") == {"type": "tool_call", "tools": TOOLS, "choice": "required"}
    assert tools.tool_grammar(TOOLS, {"type": "function", "function": {"name": "add"}})["choice"] == {"name": "add"}
    assert tools.tool_grammar(TOOLS, "auto") is None and tools.tool_grammar(TOOLS, None) is None
    assert tools.tool_grammar(None, None) is None and tools.tool_grammar(TOOLS, "none") is None
    assert tools.response_format_grammar(None) is None
    assert tools.response_format_grammar({"type": "text"}) is None
    assert tools.response_format_grammar({"type": "json_object"}) == {"type": "json_object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert tools.response_format_grammar({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}) == {
        "type": "json_schema", "schema": schema}


@pytest.mark.parametrize("call, field", [
    (lambda: tools.tool_grammar(None, "required"), "tool_choice"),
    (lambda: tools.tool_grammar(TOOLS, "always"), "tool_choice"),
    (lambda: tools.tool_grammar(TOOLS, {"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (lambda: tools.tool_grammar(TOOLS, {"type": "function"}), "tool_choice"),
    (lambda: tools.tool_grammar("get_weather", "auto"), "tools"),
    (lambda: tools.tool_grammar([{"function": {}}], "auto"), "tools"),
    (lambda: tools.response_format_grammar({"type": "yaml"}), "response_format.type"),
    (lambda: tools.response_format_grammar("json"), "response_format.type"),
    (lambda: tools.response_format_grammar({"type": "json_schema"}), "response_format.json_schema.schema"),
    (lambda: tools.response_format_grammar({"type": "json_schema", "json_schema": {"schema": 3}}),
     "response_format.json_schema.schema"),
])
def test_hostile_requests_name_the_field(call, field):
    with pytest.raises(MlxMoeError, match=field.replace(".", r"\.")) as e:
        call()
    assert e.value.status == 400
