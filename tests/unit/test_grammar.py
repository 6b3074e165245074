"""Grammar-constrained decoding (node/grammar.py) on the reference tokenizer: whatever the
"model" (random logits), the output is valid JSON / valid against the schema / a valid call."""

import json
from pathlib import Path

import jsonschema
import mlx.core as mx
import numpy as np
import pytest

from mlxmoe.errors import MlxMoeError
from mlxmoe.model.load import load_tokenizer
from mlxmoe.node import grammar

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
    ({"type": "json_schema", "schema": {"$ref": "#/nope"}}, "grammar"),
    ({"type": "json_schema", "schema": {"type": "string", "pattern": "(("}}, "grammar"),
    ({"type": "tool_call", "tools": []}, "tools"),
    ({"type": "tool_call", "tools": [{"function": {}}]}, "tools[0].function.name"),
    ({"type": "tool_call", "tools": [{"function": {"name": "f", "parameters": 3}}]}, "tools[0].function.parameters"),
    ({"type": "tool_call", "tools": TOOLS, "choice": {"name": "nope"}}, "tool_choice"),
    ({"type": "tool_call", "tools": TOOLS, "choice": "sometimes"}, "tool_choice"),
    ({"type": "json_schema", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}, "grammar"),
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
