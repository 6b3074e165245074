"""Grammar-constrained decoding (node/grammar.py) on the reference tokenizer: whatever the
"model" (random logits), the output is valid JSON / valid against the schema / a valid call."""

import json
import time
from pathlib import Path

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mlxmoe.errors import MlxMoeError
from mlxmoe.model.load import load_tokenizer
from mlxmoe.node import grammar, grammar_spec

pytestmark = pytest.mark.timeout(120)
REFERENCE = Path(__file__).parents[2] / "mlxmoe" / "assets" / "reference-moe"
VOCAB = 4096
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]},
                                           "ok": {"type": "boolean"}},
          "required": ["city", "unit", "ok"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer", "maximum": 99, "minimum": 0},
                                              "b": {"type": "integer", "maximum": 99, "minimum": 0}},
             "required": ["a", "b"], "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(REFERENCE)


def decode(tok, spec, seed, bias=None, max_tokens=400):
    """A stand-in model: random logits (plus `bias`), sampled greedily through the processor until EOS."""
    proc = grammar.processor(spec, tok, VOCAB)
    rng = np.random.default_rng(seed)
    tokens, eos = [1], set(tok.eos_token_ids)
    for _ in range(max_tokens):
        logits = rng.normal(size=(1, VOCAB)).astype(np.float32) * 3 + (0 if bias is None else bias)
        t = int(mx.argmax(proc(mx.array(tokens), mx.array(logits)), axis=-1).item())
        if t in eos:
            assert proc.done or proc.matcher.is_accepting()
            return tok.decode(tokens[1:])
        tokens.append(t)
    raise AssertionError(f"no end after {max_tokens} tokens: {tok.decode(tokens[1:])!r}")


def closing_bias(tok):
    """Random walks through json_object nest forever; lean towards closing strings and braces."""
    b = np.zeros(VOCAB, np.float32)
    for i in range(len(tok.vocab)):
        s = tok.decode([i])
        if any(c in s for c in '"}]'):
            b[i] = 8.0
    return b


@pytest.mark.parametrize("seed", range(4))
def test_json_object_parses(tok, seed):
    out = json.loads(decode(tok, {"type": "json_object"}, seed, closing_bias(tok)))
    assert isinstance(out, dict)


@pytest.mark.parametrize("seed", range(4))
def test_json_schema_validates(tok, seed):
    out = json.loads(decode(tok, {"type": "json_schema", "schema": SCHEMA}, seed))
    jsonschema.validate(out, SCHEMA)


@pytest.mark.parametrize("seed", range(6))
def test_tool_call_required_is_a_valid_call(tok, seed):
    text = decode(tok, {"type": "tool_call", "tools": TOOLS, "choice": "required"}, seed)
    assert text.startswith(grammar.TOOL_CALL_START) and text.endswith(grammar.TOOL_CALL_END)
    call = json.loads(text[len(grammar.TOOL_CALL_START):-len(grammar.TOOL_CALL_END)])
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[call["name"]]
    jsonschema.validate(call["arguments"], schema)


def test_named_tool_choice_calls_that_function(tok):
    for seed in range(3):
        text = decode(tok, {"type": "tool_call", "tools": TOOLS, "choice": {"type": "function", "function": {"name": "add"}}}, seed)
        assert json.loads(text[len(grammar.TOOL_CALL_START):-len(grammar.TOOL_CALL_END)])["name"] == "add"


def test_done_only_after_the_grammar_is_complete(tok):
    proc = grammar.processor({"type": "json_schema", "schema": {"enum": ["yes"]}}, tok, VOCAB)
    ids = tok.encode('"yes"', add_special_tokens=False)
    logits = mx.zeros((1, VOCAB))
    seen = [1]
    for t in ids:
        assert not proc.done
        masked = proc(mx.array(seen), logits)
        assert masked[0, t].item() == 0.0
        seen.append(t)
    masked = np.array(proc(mx.array(seen), logits))[0]
    assert proc.done and set(np.flatnonzero(masked == 0.0)) <= set(tok.eos_token_ids)


def test_no_spec_no_processor(tok):
    assert grammar.processor(None, tok, VOCAB) is None


@pytest.mark.parametrize("spec, field", [
    ("json", "grammar"),
    ({"type": "xml"}, "grammar.type"),
    ({"type": "json_schema"}, "json_schema.schema"),
    ({"type": "json_schema", "schema": True}, "json_schema.schema"),
    ({"type": "json_schema", "schema": {"$ref": "#/nope"}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "schema": {"type": "string", "pattern": "(("}}, "response_format.json_schema.schema"),
    ({"type": "tool_call", "tools": []}, "tools"),
    ({"type": "tool_call", "tools": [{"function": {}}]}, "tools[0].function.name"),
    ({"type": "tool_call", "tools": [{"function": {"name": "f", "parameters": 3}}]}, "tools[0].function.parameters"),
    ({"type": "tool_call", "tools": TOOLS, "choice": {"name": "nope"}}, "tool_choice"),
    ({"type": "tool_call", "tools": TOOLS, "choice": "sometimes"}, "tool_choice"),
    ({"type": "json_schema", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}},
     "response_format.json_schema.schema"),
    ({"type": "tool_call", "tools": TOOLS + [{"function": {"name": "f", "parameters": {"type": "nonsense"}}}]},
     "tools[2].function.parameters"),
])
def test_bad_specs_name_the_field(tok, spec, field):
    with pytest.raises(MlxMoeError, match=field.replace("[", r"\[").replace("]", r"\]")):
        grammar.processor(spec, tok, VOCAB)


def test_grammar_crosses_the_wire_in_gen_params():
    import msgpack

    from mlxmoe.node.contract import GenParams

    spec = {"type": "tool_call", "tools": TOOLS, "choice": {"name": "add"}}
    back = GenParams.from_dict(msgpack.unpackb(msgpack.packb(GenParams(grammar=spec).to_dict())))
    assert back.grammar == spec and GenParams().grammar is None


# ------------------------------------------------------------ the strict rule (grammar_spec.strict)
def admits(tok, spec, text: str) -> bool:
    """Whether the node's matcher takes `text` (its tokens, fed one by one) and may end there."""
    proc = grammar.processor(spec, tok, VOCAB)
    ids = tok.encode(text, add_special_tokens=False)
    return proc.matcher.try_consume_tokens(ids) == len(ids) and proc.matcher.is_accepting()


OPEN = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}}  # no additionalProperties


@pytest.mark.parametrize("text, ok", [
    ('{"city": "Oslo", "unit": "c"}', True),
    ('{"city": "Oslo"}', True),
    ('{}', True),
    ('{"city": "Oslo", "type": "type"}', False),  # a key the schema never declared
    ('{"city": "Oslo", "city": "Bergen"}', False),  # the same key twice
    ('{"city": "general", "type": "type", "name": "type"}', False),  # the reference model's runaway
    ('{"unit": "c", "city": "Oslo"}', False),  # properties come in the order declared (llguidance)
])
def test_declared_properties_only_and_once(tok, text, ok):
    assert admits(tok, {"type": "json_schema", "schema": OPEN}, text) is ok
    call = '<tool_call>{"name": "get_weather", "arguments": ' + text + '}</tool_call>'
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": OPEN}}]
    assert admits(tok, {"type": "tool_call", "tools": tools, "choice": "required"}, call) is ok


def test_explicitly_open_schemas_stay_open(tok):
    spec = {"type": "json_schema", "schema": {**OPEN, "additionalProperties": True}}
    assert admits(tok, spec, '{"city": "Oslo", "type": "x"}')
    assert not admits(tok, spec, '{"city": "Oslo", "city": "Bergen"}')  # declared keys: still once each
    typed = {"type": "json_schema", "schema": {**OPEN, "additionalProperties": {"type": "integer"}}}
    assert admits(tok, typed, '{"city": "Oslo", "n": 3}') and not admits(tok, typed, '{"city": "Oslo", "n": "x"}')
    assert admits(tok, {"type": "json_object"}, '{"anything": [1, {"goes": null}]}')
    assert admits(tok, {"type": "json_schema", "schema": {"type": "object"}}, '{"free": "form"}')


def test_nested_objects_arrays_unions_and_defs_are_closed(tok):
    schema = {"type": "object", "$defs": {"Addr": {"type": "object", "properties": {"zip": {"type": "string"}}}},
              "properties": {"home": {"$ref": "#/$defs/Addr"},
                             "tags": {"type": "array", "items": {"type": "object", "properties": {"k": {"type": "integer"}}}},
                             "pet": {"anyOf": [{"type": "object", "properties": {"cat": {"type": "boolean"}}},
                                               {"type": "null"}]}}}
    spec = {"type": "json_schema", "schema": schema}
    assert admits(tok, spec, '{"home": {"zip": "0150"}, "tags": [{"k": 1}], "pet": {"cat": true}}')
    assert not admits(tok, spec, '{"home": {"zip": "0150", "x": 1}}')
    assert not admits(tok, spec, '{"tags": [{"k": 1, "x": 1}]}')
    assert not admits(tok, spec, '{"pet": {"cat": true, "dog": true}}')
    # the same under a tool: its own "#/$defs/..." refs still resolve below the call object
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    assert admits(tok, {"type": "tool_call", "tools": tools, "choice": "required"},
                  '<tool_call>{"name": "f", "arguments": {"home": {"zip": "1"}}}</tool_call>')
    assert not admits(tok, {"type": "tool_call", "tools": tools, "choice": "required"},
                      '<tool_call>{"name": "f", "arguments": {"home": {"zip": "1", "x": 2}}}</tool_call>')


def test_all_of_closes_the_join_not_its_members(tok):
    base = {"type": "object", "properties": {"a": {"type": "integer"}}}
    for schema in ({"allOf": [base, {"properties": {"b": {"type": "integer"}}}]},
                   {"$defs": {"Base": base}, "allOf": [{"$ref": "#/$defs/Base"}, {"properties": {"b": {"type": "integer"}}}]},
                   {"$defs": {"Base": base}, "$ref": "#/$defs/Base", "properties": {"b": {"type": "integer"}}}):
        spec = {"type": "json_schema", "schema": schema}
        assert admits(tok, spec, '{"a": 1, "b": 2}'), schema
        assert not admits(tok, spec, '{"a": 1, "b": 2, "c": 3}'), schema
        assert not admits(tok, spec, '{"a": 1, "a": 2}'), schema


def test_strict_leaves_explicit_values_and_negations_alone():
    s = {"type": "object", "properties": {"a": {"not": {"type": "object", "properties": {"x": {}}}},
                                          "b": {"type": "object", "properties": {}, "additionalProperties": True},
                                          "c": {"type": "object", "patternProperties": {"^x": {}}, "properties": {}}},
         "x-guidance": {"whitespace_pattern": " *"}}
    out = grammar.strict(s)
    assert out["additionalProperties"] is False and "x-guidance" not in out
    assert out["properties"]["a"] == s["properties"]["a"]  # under `not`: closing would admit more
    assert out["properties"]["b"] == s["properties"]["b"]
    assert out["properties"]["c"]["additionalProperties"] is False  # pattern keys stay admitted
    assert "additionalProperties" not in s  # the caller's schema is not changed
    assert grammar.strict({"type": "object"}) == {"type": "object"}  # no properties: a free-form object
    required_only = grammar.strict({"properties": {"a": {}}, "required": ["a", "b"]})
    assert required_only["properties"] == {"a": {}, "b": True} and required_only["additionalProperties"] is False


# ------------------------------------------------------------ hostile schemas: compiled before any compute
def test_self_reference_is_refused_fast_naming_the_field(tok):
    t0 = time.monotonic()
    with pytest.raises(MlxMoeError, match=r"^tools\[0\]\.function\.parameters: no answer"):
        grammar.processor({"type": "tool_call", "tools": [{"function": {"name": "f", "parameters": {"$ref": "#"}}}]},
                          tok, VOCAB)
    with pytest.raises(MlxMoeError, match=r"^response_format\.json_schema\.schema: no answer"):
        grammar.processor({"type": "json_schema", "schema": {"$ref": "#"}}, tok, VOCAB)
    with pytest.raises(MlxMoeError, match=r"^response_format\.json_schema\.schema: no answer"):
        grammar.processor({"type": "json_schema", "schema": {
            "type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}}, tok, VOCAB)
    assert time.monotonic() - t0 < 2.0


def test_the_function_at_fault_is_named(tok):
    bad = {"type": "object", "properties": {"me": {"$ref": "#"}}, "required": ["me"]}
    tools = TOOLS + [{"function": {"name": "loop", "parameters": bad}}]
    with pytest.raises(MlxMoeError, match=r"^tools\[2\]\.function\.parameters: "):
        grammar.processor({"type": "tool_call", "tools": tools, "choice": "required"}, tok, VOCAB)
    with pytest.raises(MlxMoeError, match=r"^tools\[2\]\.function\.parameters: "):
        grammar.processor({"type": "tool_call", "tools": tools, "choice": {"name": "loop"}}, tok, VOCAB)
    assert grammar.processor({"type": "tool_call", "tools": tools, "choice": {"name": "add"}}, tok, VOCAB)


def test_limits_too_deep_and_too_big(tok):
    deep: dict = {"type": "string"}
    for _ in range(grammar_spec.MAX_DEPTH + 2):
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(MlxMoeError, match=r"^response_format\.json_schema\.schema: nested more than"):
        grammar.processor({"type": "json_schema", "schema": deep}, tok, VOCAB)
    big = {"type": "object", "properties": {f"p{i}_" + "x" * 200: {"type": "string"} for i in range(3000)}}
    with pytest.raises(MlxMoeError, match=r"^response_format\.json_schema\.schema: "):
        grammar.processor({"type": "json_schema", "schema": big}, tok, VOCAB)


def test_compiled_grammars_are_cached_and_each_row_gets_its_own_matcher(tok):
    spec = {"type": "json_schema", "schema": {"type": "object", "properties": {"n": {"type": "integer"}}}}
    a, b = grammar.processor(spec, tok, VOCAB), grammar.processor(spec, tok, VOCAB)
    assert a.matcher is not b.matcher
    ids = tok.encode('{"n": 1', add_special_tokens=False)
    assert a.matcher.consume_tokens(ids) and b.matcher.try_consume_tokens(ids) == len(ids)
    lt = grammar.ll_tokenizer(tok, VOCAB)
    assert grammar_spec.compile_spec(spec, lt) is grammar_spec.compile_spec(spec, lt)  # one compile per grammar text


def test_precompile_off_the_engine_thread_fills_the_cache(tok):
    """grammar.precompile: what a node server can run before handing the request to the engine thread."""
    spec = {"type": "json_schema", "schema": {"type": "object", "properties": {"pre": {"type": "boolean"}}}}
    grammar.precompile(spec, tok, VOCAB)
    key = (id(grammar.ll_tokenizer(tok, VOCAB)), grammar.grammar_text(spec))
    assert grammar_spec._CACHE[key].future.done()
    grammar.precompile(None, tok, VOCAB)
    grammar.precompile(spec, None, VOCAB)  # no tokenizer: nothing to do
    with pytest.raises(MlxMoeError, match=r"^response_format\.json_schema\.schema: "):
        grammar.precompile({"type": "json_schema", "schema": {"$ref": "#"}}, tok, VOCAB)


def test_compile_time_is_bounded(tok, monkeypatch):
    """A grammar that takes longer than the bound to build is a 400 naming the field, at the bound; the
    verdict is cached, so the next request with it costs nothing."""
    slow = {"type": "json_schema", "schema": {"type": "object", "properties": {"slow": {"type": "integer"}}}}
    real = grammar_spec.limits
    monkeypatch.setattr(grammar_spec, "limits", lambda: (time.sleep(1.0), real())[1])  # inside the build
    monkeypatch.setattr(grammar_spec, "COMPILE_SECONDS", 0.3)
    lt = grammar.ll_tokenizer(tok, VOCAB)
    t0 = time.monotonic()
    with pytest.raises(MlxMoeError, match=r"^response_format\.json_schema\.schema: takes longer than 0.3 s"):
        grammar_spec.compile_spec(slow, lt)
    assert time.monotonic() - t0 < 0.8
    time.sleep(1.0)  # the build ends meanwhile (llguidance cannot be interrupted; its limits bound it)
    t0 = time.monotonic()
    with pytest.raises(MlxMoeError, match=r"^response_format\.json_schema\.schema: took 1\.\d s to compile"):
        grammar_spec.compile_spec(slow, lt)
    assert time.monotonic() - t0 < 0.1


JSON_TYPES = ["string", "integer", "number", "boolean", "null", "object", "array"]
PATTERNS = ["((a|b)*)*c", "(a*)*b{0,50}", "[a-z]{1,3000}", "(.*a){20}", "((", "\\\\p{L}+", "^(x|xx)+$"]
LEAVES = st.one_of(
    st.sampled_from([True, False, {}, {"$ref": "#"}, {"$ref": "#/$defs/d"}, {"$ref": "#/$defs/nope"}, {"$ref": "x.json"},
                     {"type": "string", "format": "date-time"}, {"type": "string", "format": "bogus"},
                     {"enum": []}, {"const": {"$ref": "#"}}, {"type": "integer", "minimum": 5, "maximum": 1},
                     {"type": JSON_TYPES}]),
    st.builds(lambda t: {"type": t}, st.sampled_from(JSON_TYPES + ["nonsense"])),
    st.builds(lambda p: {"type": "string", "pattern": p}, st.sampled_from(PATTERNS)),
)
KEYS = st.sampled_from(["a", "b", "$ref", "x~/y", "", "properties"])


def _schemas():
    def extend(inner):
        obj = st.builds(lambda props, req, extra: {"type": "object", "properties": props, "required": req,
                                                   **({} if extra == "absent" else {"additionalProperties": extra})},
                        st.dictionaries(KEYS, inner, max_size=3), st.lists(KEYS, max_size=2),
                        st.sampled_from(["absent", True, False]) | inner)
        arr = st.builds(lambda items, n: {"type": "array", "items": items, "minItems": n}, inner, st.integers(0, 2))
        comb = st.builds(lambda kw, xs: {kw: xs}, st.sampled_from(["anyOf", "oneOf", "allOf"]),
                         st.lists(inner, min_size=1, max_size=3))
        mixed = st.builds(lambda a, b: {**a, **b} if isinstance(a, dict) and isinstance(b, dict) else a, inner, inner)
        return st.one_of(obj, arr, comb, mixed, st.builds(lambda s: {"not": s}, inner))
    body = st.recursive(LEAVES, extend, max_leaves=12)
    return st.builds(lambda root, d: {**root, "$defs": {"d": d}} if isinstance(root, dict) else root, body, body)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(schema=_schemas(), as_tool=st.booleans())
def test_hostile_schemas_compile_or_name_the_field_in_time(tok, schema, as_tool):
    """Random nested / recursive / contradictory schemas: each is a processor or an MlxMoeError
    naming the field, within the bound: never another exception, never a hang."""
    if as_tool:
        spec = {"type": "tool_call", "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}],
                "choice": "required"}
        field = "tools[0].function.parameters"
    else:
        spec, field = {"type": "json_schema", "schema": schema}, "response_format.json_schema.schema"
    t0 = time.monotonic()
    try:
        proc = grammar.processor(spec, tok, VOCAB)
    except MlxMoeError as e:
        assert str(e).startswith(f"{field}: ") or (not isinstance(schema, dict) and "schema" in str(e)), str(e)
    else:
        proc(mx.array([1]), mx.zeros((1, VOCAB)))  # the first mask: already computed once, at compile
    assert time.monotonic() - t0 < 3 * grammar_spec.COMPILE_SECONDS
