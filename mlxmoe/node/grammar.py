"""Grammar-constrained decoding: structured output (response_format json_object /
json_schema) and tool calls (tool_choice "required" or a named function) as an
mlx-lm logits processor, with llguidance (chosen by measurement:
benchmarks/2026-12-01-cpu-grammar-libraries.json; no dependencies, wheels for
macOS arm64 and Linux, microseconds per token mask).

A grammar spec is plain data (it crosses the wire in GenParams.grammar):
    {"type": "json_object"}
    {"type": "json_schema", "schema": {...}}
    {"type": "tool_call", "tools": [OpenAI tools], "choice": "required" | {"name": ...}}
The tool call text is cluster/api/tools.py's format: <tool_call>{"name": ..., "arguments": {...}}</tool_call>.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np

from mlxmoe.errors import MlxMoeError

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
# Compact JSON: a small model left free to emit whitespace may never stop.
JSON_OPTIONS = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


def tool_schema(tools: list, choice) -> dict:
    """JSON schema of one call {"name", "arguments"} of a declared function (or of
    the named one). MlxMoeError naming the field on bad tools / choice."""
    if not isinstance(tools, list) or not tools:
        raise MlxMoeError("tools: expected a non-empty list of functions")
    calls = {}
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise MlxMoeError(f"tools[{i}].function.name: expected a function with a name")
        params = fn.get("parameters") or {"type": "object"}
        if not isinstance(params, dict):
            raise MlxMoeError(f"tools[{i}].function.parameters: expected a JSON schema object")
        calls[fn["name"]] = {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                             "required": ["name", "arguments"], "additionalProperties": False}
    if isinstance(choice, dict):
        name = (choice.get("function") or choice).get("name")
        if name not in calls:
            raise MlxMoeError(f"tool_choice: function {name!r} is not among the declared tools")
        return calls[name]
    if choice != "required":
        raise MlxMoeError(f"tool_choice: {choice!r} is not constrained (expected 'required' or a named function)")
    return next(iter(calls.values())) if len(calls) == 1 else {"anyOf": list(calls.values())}


def grammar_text(spec: dict) -> str:
    """The llguidance grammar of a spec. MlxMoeError naming the field when it is malformed."""
    import llguidance

    if not isinstance(spec, dict):
        raise MlxMoeError("grammar: expected an object")
    kind = spec.get("type")
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
    if kind == "json_schema":
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise MlxMoeError("response_format.json_schema.schema: expected a JSON schema object")
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    if kind == "tool_call":
        schema = {**tool_schema(spec.get("tools"), spec.get("choice", "required")), "x-guidance": JSON_OPTIONS}
        lark = f"start: {json.dumps(TOOL_CALL_START)} call {json.dumps(TOOL_CALL_END)}\ncall: %json {json.dumps(schema)}\n"
        return llguidance.LLMatcher.grammar_from_lark(lark)
    raise MlxMoeError(f"grammar.type: {kind!r} is not one of json_object, json_schema, tool_call")


_TOKENIZERS: dict = {}  # id(tokenizer) -> (tokenizer, LLTokenizer): building one costs ~0.1-1 s


def ll_tokenizer(tokenizer, vocab_size: int):
    """llguidance's view of an HF tokenizer (or mlx-lm's TokenizerWrapper around one),
    with every end token the node stops on as EOS."""
    import llguidance.hf

    key = (id(tokenizer), vocab_size)
    if key not in _TOKENIZERS:
        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        eos = sorted(getattr(tokenizer, "eos_token_ids", None) or [hf.eos_token_id])
        _TOKENIZERS[key] = (tokenizer, llguidance.hf.from_tokenizer(hf, n_vocab=vocab_size, eos_token=eos))
    return _TOKENIZERS[key][1]


class Constrained:
    """One generation's constrained-decoding state, as an mlx-lm logits processor:
    `processor(tokens, logits)` first advances the matcher by the token sampled last
    (tokens[-1], from the previous call's mask), then masks disallowed tokens to -inf."""

    def __init__(self, spec: dict, tokenizer, vocab_size: int):
        import llguidance

        self.vocab_size = vocab_size
        try:
            text = grammar_text(spec)
        except (ValueError, TypeError) as e:  # llguidance on a schema it cannot read
            raise MlxMoeError(f"grammar: {e}") from None
        self.matcher = llguidance.LLMatcher(ll_tokenizer(tokenizer, vocab_size), text)
        if self.matcher.is_error():
            raise MlxMoeError(f"grammar: {self.matcher.get_error()}")
        self.started = False

    @property
    def done(self) -> bool:
        """The grammar is complete: only an end token may follow."""
        return self.matcher.is_stopped()

    def allowed(self) -> np.ndarray:
        """Boolean mask over the vocabulary of the tokens the grammar allows next."""
        words = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(words, bitorder="little")[:self.vocab_size].astype(bool)

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise MlxMoeError(f"grammar: token {token} was not allowed ({self.matcher.get_error()})")

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self.started:
            self.advance(tokens[-1].item())
        self.started = True
        mask = self.allowed()
        if logits.shape[-1] > mask.size:  # padded model vocabularies: the extra rows are never allowed
            mask = np.pad(mask, (0, logits.shape[-1] - mask.size))
        return mx.where(mx.array(mask[: logits.shape[-1]]), logits, mx.array(-float("inf"), dtype=logits.dtype))


def processor(spec: dict | None, tokenizer, vocab_size: int, resume: list[int] = ()) -> Constrained | None:
    """The logits processor of a grammar spec (None: unconstrained). resume: the turn's tokens
    so far when it continues on this node (failover, migration, after a race: GenParams.resume),
    consumed first so the constraint goes on from where the other node left it."""
    if spec is None:
        return None
    if tokenizer is None:
        raise MlxMoeError("grammar: this node has no tokenizer")
    c = Constrained(spec, tokenizer, vocab_size)
    for t in resume:
        if not c.matcher.consume_token(int(t)):
            raise MlxMoeError(f"params.resume: token {t} of the resumed turn does not fit the grammar "
                              f"({c.matcher.get_error()})")
    return c
