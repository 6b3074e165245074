"""Grammar specs (GenParams.grammar, node/grammar.py) as llguidance grammars, without MLX, so
the router's API (cluster/api) and the node share one rule and one check:

- the strict rule: every object schema that declares `properties` admits only those keys,
  once each, unless it says otherwise (`additionalProperties` true or a schema): `strict`;
- the tool-call schema {"name", "arguments"} of the declared functions: `tool_schema`;
- `compile_spec`: the grammar built, its first mask computed and its forced prefix consumed,
  under llguidance's parser limits (`LIMITS`) and a wall-clock bound (`COMPILE_SECONDS`),
  once per grammar text (cached), so a pathological schema is a 400 naming its field
  before any compute. The API checks with a byte-level tokenizer, the node with its own.

What llguidance's JSON compiler does (docs/json_schema.md of llguidance 1.x): properties
listed in `properties` come once each, in the order listed; keys admitted by
`additionalProperties` (true by default) or `patternProperties` come after them, in any
order, and may repeat. No compile option makes `additionalProperties` default to false
(the `x-guidance` options are separators, whitespace, `coerce_one_of` and `lenient`), hence
`strict`. Joined schemas (`allOf`, `$ref` with sibling keywords) are intersections: a
member closed on its own keys would refuse the keys of the others, so `strict` closes the
join, not its members (`"properties": {key: true}` for every key the members declare, then
`"additionalProperties": false`, which llguidance honours in that order); a $defs entry (or
any target) that some join names stays open everywhere, as does a join this cannot see
through (a cycle of joins, anyOf beside `properties`, conditionals): less strict, never wrong.

Schemas deeper than MAX_DEPTH with their $refs followed are refused before llguidance sees
them: its compiler recurses, and a long enough $ref chain overflows the thread's stack.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import llguidance

from mlxmoe.errors import AdmissionError, MlxMoeError

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
# Compact JSON: a small model left free to emit whitespace may never stop.
JSON_OPTIONS = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
COMPILE_SECONDS = 2.0  # wall-clock bound on building one grammar (its first mask and forced prefix included)
MAX_GRAMMAR_CHARS = 1 << 19  # a spec's JSON, and its grammar text
MAX_DEPTH = 128  # schema nesting, $refs followed (llguidance recurses: ~3000 levels overflow 8 MiB of stack)
MAX_FORCED = 8192  # tokens a grammar may force before the model has any choice (else it never ends)
# llguidance's parser limits (LLParserLimits): per-token work is bounded by step_lexer_fuel
# (~14k/ms) and step_max_items (~20k/ms), so one grammar costs at most ~10 ms a token.
LIMITS = {"step_max_items": 30_000, "step_lexer_fuel": 100_000, "initial_lexer_fuel": 1_000_000,
          "max_lexer_states": 100_000, "max_grammar_size": 200_000, "verbose_errors": False}
CACHE_SIZE = 128
DEFAULT_PARAMETERS = {"type": "object", "properties": {}}  # a function that declares none takes {}


def limits() -> llguidance.LLParserLimits:
    return llguidance.LLParserLimits(**LIMITS)


class _Bad(Exception):
    """Why a schema or grammar cannot be enforced (the caller names the field)."""


# ------------------------------------------------------------ the strict rule
_FRESH_ONE = ("additionalProperties", "contains", "additionalItems", "unevaluatedItems", "unevaluatedProperties",
              "propertyNames")
_FRESH_MAP = ("properties", "patternProperties")
_DEFS = ("$defs", "definitions")
_OBJECT_WORDS = ("properties", "required", "patternProperties", "additionalProperties", "unevaluatedProperties",
                 "allOf", "$ref", "dependentSchemas", "then", "else")


def _pointer_parts(ref: str) -> list[str] | None:
    """A local JSON pointer ("#", "#/$defs/a") as its parts; None for anything else (anchors, URLs)."""
    if not isinstance(ref, str) or not ref.startswith("#"):
        return None
    frag = urllib.parse.unquote(ref[1:])
    if frag == "":
        return []
    if not frag.startswith("/"):
        return None
    return [p.replace("~1", "/").replace("~0", "~") for p in frag[1:].split("/")]


def _resolve(root: Any, ref: str) -> Any:
    parts = _pointer_parts(ref)
    if parts is None:
        return None
    node = root
    for p in parts:
        if isinstance(node, dict) and p in node:
            node = node[p]
        elif isinstance(node, list) and p.isdigit() and int(p) < len(node):
            node = node[int(p)]
        else:
            return None
    return node


def _canonical(ref: str) -> str | None:
    """A local $ref as the pointer `_Strict.walk` gives the node it names (None: not local)."""
    parts = _pointer_parts(ref)
    return None if parts is None else _child("#", *parts)


def _child(ptr: str, *keys) -> str:
    return ptr + "".join("/" + str(k).replace("~", "~0").replace("/", "~1") for k in keys)


class _Strict:
    """One pass of `strict` over a root schema (see there)."""

    def __init__(self, root: Any, keep_open: set[str], ref_prefix: str | None):
        self.root, self.keep_open, self.ref_prefix = root, keep_open, ref_prefix
        self.open_refs: set[str] = set()  # targets referenced where they are joined with others
        self.ref_keys: dict[str, Any] = {}  # $ref -> its keys(), once each (None while being found: a cycle)

    def walk(self, node: Any, ptr: str, ctx: str, depth: int) -> Any:
        """ctx: "closed" (this object may be closed), "open" (joined with others: close its parts, not
        it), "frozen" (under not / if: left exactly as it is, refs aside)."""
        if depth > MAX_DEPTH:
            raise _Bad(f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, list):  # a list where a schema belongs: llguidance says what is wrong with it
            return node
        if not isinstance(node, dict):
            return node
        if ctx == "closed" and ptr in self.keep_open:
            ctx = "open"
        fresh = "frozen" if ctx == "frozen" else "closed"
        joined = "frozen" if ctx == "frozen" else "open"
        has_object_words = any(k in node for k in _OBJECT_WORDS)
        own_words = any(k in node for k in _OBJECT_WORDS if k != "$ref")
        out: dict = {}
        for k, v in node.items():
            if k == "x-guidance" and ptr == "#":
                continue  # compile options are the server's (JSON_OPTIONS), not the request's
            if k == "$ref" and isinstance(v, str):
                target = _canonical(v)
                if target is not None and (ctx != "closed" or own_words):  # joined here: its target stays open
                    self.open_refs.add(target)
                out[k] = self.ref_prefix + v[1:] if self.ref_prefix is not None and v.startswith("#") else v
            elif k in _FRESH_MAP and isinstance(v, dict):
                out[k] = {name: self.walk(s, _child(ptr, k, name), fresh, depth + 1) for name, s in v.items()}
            elif k in _DEFS and isinstance(v, dict):
                out[k] = {name: self.walk(s, _child(ptr, k, name), fresh, depth + 1) for name, s in v.items()}
            elif k == "dependentSchemas" and isinstance(v, dict):
                out[k] = {name: self.walk(s, _child(ptr, k, name), joined, depth + 1) for name, s in v.items()}
            elif k in _FRESH_ONE or (k == "items" and not isinstance(v, list)):
                out[k] = self.walk(v, _child(ptr, k), fresh, depth + 1)
            elif k in ("prefixItems", "items") and isinstance(v, list):
                out[k] = [self.walk(s, _child(ptr, k, i), fresh, depth + 1) for i, s in enumerate(v)]
            elif k == "allOf" and isinstance(v, list):
                out[k] = [self.walk(s, _child(ptr, k, i), joined, depth + 1) for i, s in enumerate(v)]
            elif k in ("anyOf", "oneOf") and isinstance(v, list):
                # alone, each branch is the object and is closed on its own; beside other object
                # keywords each branch is joined with them, and the whole is left as it is
                sub = joined if has_object_words or ctx != "closed" else "closed"
                out[k] = [self.walk(s, _child(ptr, k, i), sub, depth + 1) for i, s in enumerate(v)]
            elif k in ("not", "if"):
                out[k] = self.walk(v, _child(ptr, k), "frozen", depth + 1)
            elif k in ("then", "else"):
                out[k] = self.walk(v, _child(ptr, k), joined, depth + 1)
            else:
                out[k] = v  # const, enum, default, examples, ...: data, not schemas
        if ctx == "closed":
            out = self.close(node, out)
        return out

    def close(self, node: dict, out: dict) -> dict:
        """`out` (node walked) admitting only the keys node declares, or out as it is when node
        allows more, declares no properties, or joins something this cannot see through."""
        if "additionalProperties" in node or "unevaluatedProperties" in node:
            return out  # explicit
        if ("anyOf" in node or "oneOf" in node) and any(k in node for k in _OBJECT_WORDS):
            return out
        if not any(k in node for k in _OBJECT_WORDS if k != "$ref"):
            return out  # a plain $ref: its target is closed where it is (a $ref with siblings may not recurse)
        got = self.keys(node, 0, top=True)
        if got is None or not got[1]:
            return out
        own = out.get("properties") if isinstance(out.get("properties"), dict) else {}
        props = {**own, **{k: True for k in got[0] if k not in own}}
        if "properties" in out:
            res = {k: (props if k == "properties" else v) for k, v in out.items()}
        else:
            res = {"properties": props, **out}
        res["additionalProperties"] = False
        return res

    def keys(self, node: Any, depth: int, top: bool = False) -> tuple[list[str], bool] | None:
        """(the keys a schema declares, in llguidance's merge order; whether it has `properties`),
        following allOf, anyOf/oneOf branches and local $refs; None when it allows more keys or
        cannot be seen through (a cycle, an unresolvable $ref, a conditional, too deep)."""
        if node is True or node == {}:
            return [], False
        if not isinstance(node, dict) or depth > MAX_DEPTH:
            return None
        if not top and (node.get("additionalProperties", False) is not False or "patternProperties" in node
                        or "unevaluatedProperties" in node):
            return None
        keys: list[str] = []
        declared = False
        for k, v in node.items():
            if k == "properties" and isinstance(v, dict):
                keys += list(v)
                declared = True
            elif k == "required" and isinstance(v, list):
                keys += [r for r in v if isinstance(r, str)]
            elif k in ("allOf", "anyOf", "oneOf") and isinstance(v, list):
                for s in v:
                    got = self.keys(s, depth + 1)
                    if got is None:
                        return None
                    keys += got[0]
                    declared = declared or got[1]
            elif k == "$ref":
                if not isinstance(v, str):
                    return None
                if v not in self.ref_keys:
                    self.ref_keys[v] = None
                    target = _resolve(self.root, v)
                    self.ref_keys[v] = None if target is None else self.keys(target, depth + 1)
                got = self.ref_keys[v]
                if got is None:
                    return None
                keys += got[0]
                declared = declared or got[1]
            elif k in ("dependentSchemas", "if", "then", "else"):
                return None
        return list(dict.fromkeys(keys)), declared


def _height(root: Any, node: Any, depth: int, heights: dict) -> int:
    """How deep a schema nests with its $refs followed (each target measured once; a cycle counts
    nothing more); _Bad past MAX_DEPTH. llguidance compiles nesting by recursion, and a deep enough
    chain of $refs overflows its stack (a crash, not an error: ~1000 levels on 8 MiB)."""
    if depth > MAX_DEPTH:
        raise _Bad(f"nested more than {MAX_DEPTH} levels deep (its $refs followed)")
    if isinstance(node, dict):
        children, ref = node.values(), node.get("$ref")
    elif isinstance(node, list):
        children, ref = node, None
    else:
        return 0
    most = 0
    for v in children:
        most = max(most, _height(root, v, depth + 1, heights) + 1)
    key = _canonical(ref) if isinstance(ref, str) else None
    if key is not None:
        if key not in heights:
            heights[key] = 0  # while being measured: a cycle adds nothing
            target = _resolve(root, ref)
            heights[key] = 0 if target is None else _height(root, target, depth + 1, heights) + 1
        if depth + heights[key] > MAX_DEPTH:
            raise _Bad(f"nested more than {MAX_DEPTH} levels deep (its $refs followed)")
        most = max(most, heights[key])
    return most


def strict(schema: Any, ref_prefix: str | None = None) -> Any:
    """The schema with the strict rule applied, recursively: every object schema with `properties`
    (its own, or those of the schemas it joins through allOf / $ref) and no `additionalProperties`
    gets `additionalProperties: false`; explicit values are left as they are; nested objects,
    array items, anyOf/oneOf branches and $defs are covered; `not` and `if` are left alone.
    ref_prefix: local "#..." $refs become ref_prefix + "...", for a schema placed under another
    root (a tool's parameters under the call's $defs). _Bad when nested too deep."""
    _height(schema, schema, 0, {})
    keep_open: set[str] = set()
    for _ in range(8):  # targets joined somewhere (allOf, a $ref beside other keywords) stay open
        s = _Strict(schema, keep_open, ref_prefix)
        out = s.walk(schema, "#", "closed", 0)
        if s.open_refs <= keep_open:
            break
        keep_open |= s.open_refs
    return out


# ------------------------------------------------------------ specs -> grammar text
def _field(spec: dict) -> str:
    return {"json_schema": "response_format.json_schema.schema", "json_object": "response_format",
            "tool_call": "tools"}.get(spec.get("type"), "grammar")


def tool_schema(tools: list, choice) -> dict:
    """JSON schema of one call {"name", "arguments"} of a declared function (or of the named one),
    arguments under the strict rule. MlxMoeError naming the field on bad tools / choice."""
    if not isinstance(tools, list) or not tools:
        raise MlxMoeError("tools: expected a non-empty list of functions")
    calls, defs = {}, {}
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise MlxMoeError(f"tools[{i}].function.name: expected a function with a name")
        params = fn.get("parameters")
        params = DEFAULT_PARAMETERS if params is None or params == {} else params
        if not isinstance(params, dict):
            raise MlxMoeError(f"tools[{i}].function.parameters: expected a JSON schema object")
        key = f"tool{i}"
        try:
            defs[key] = strict(params, ref_prefix=f"#/$defs/{key}")  # its own "#..." refs, under the call's root
        except _Bad as e:
            raise MlxMoeError(f"tools[{i}].function.parameters: {e}") from None
        calls[fn["name"]] = (key, {"type": "object", "properties": {"name": {"const": fn["name"]},
                                                                    "arguments": {"$ref": f"#/$defs/{key}"}},
                                   "required": ["name", "arguments"], "additionalProperties": False})
    if isinstance(choice, dict):
        name = (choice.get("function") or choice).get("name")
        if name not in calls:
            raise MlxMoeError(f"tool_choice: function {name!r} is not among the declared tools")
        key, call = calls[name]
        return {"$defs": {key: defs[key]}, **call}
    if choice != "required":
        raise MlxMoeError(f"tool_choice: {choice!r} is not constrained (expected 'required' or a named function)")
    if len(calls) == 1:
        key, call = next(iter(calls.values()))
        return {"$defs": defs, **call}
    return {"$defs": defs, "anyOf": [call for _, call in calls.values()]}


def grammar_text(spec: dict) -> str:
    """The llguidance grammar of a spec, schemas under the strict rule. MlxMoeError naming the
    field when it is malformed or larger than MAX_GRAMMAR_CHARS."""
    if not isinstance(spec, dict):
        raise MlxMoeError("grammar: expected an object")
    kind = spec.get("type")
    try:  # the size first: what follows is linear in it
        size = len(json.dumps(spec))
    except (ValueError, TypeError, RecursionError) as e:
        raise MlxMoeError(f"{_field(spec)}: not plain JSON ({_first_line(e)})") from None
    if size > MAX_GRAMMAR_CHARS:
        raise MlxMoeError(f"{_field(spec)}: {size} characters of schema, more than the limit of {MAX_GRAMMAR_CHARS}")
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
    if kind == "json_schema":
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise MlxMoeError("response_format.json_schema.schema: expected a JSON schema object")
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(strict(schema), overrides=JSON_OPTIONS)
        except _Bad as e:
            raise MlxMoeError(f"response_format.json_schema.schema: {e}") from None
        except (ValueError, TypeError, RecursionError) as e:  # llguidance on a schema it cannot read
            raise MlxMoeError(f"response_format.json_schema.schema: {_first_line(e)}") from None
    if kind == "tool_call":
        schema = {**tool_schema(spec.get("tools"), spec.get("choice", "required")), "x-guidance": JSON_OPTIONS}
        try:
            body = json.dumps(schema)
        except (ValueError, TypeError, RecursionError) as e:
            raise MlxMoeError(f"tools: {_first_line(e)}") from None
        lark = f"start: {json.dumps(TOOL_CALL_START)} call {json.dumps(TOOL_CALL_END)}\ncall: %json {body}\n"
        return llguidance.LLMatcher.grammar_from_lark(lark)
    raise MlxMoeError(f"grammar.type: {kind!r} is not one of json_object, json_schema, tool_call")


def _first_line(e: Any) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:240]


# ------------------------------------------------------------ bounded, cached compile
class _Entry:
    __slots__ = ("future", "started")

    def __init__(self):
        self.future, self.started = None, None


_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar")
_CACHE: OrderedDict = OrderedDict()  # (tokenizer key, grammar text) -> _Entry
_LOCK = threading.Lock()
_BYTES: list = []


def byte_tokenizer() -> llguidance.LLTokenizer:
    """A tokenizer of the 256 bytes and one end token: the router's API checks grammars with it
    (it has no model tokenizer, and a grammar any tokenizer can follow is one every byte can)."""
    if not _BYTES:
        class Bytes:
            eos_token_id, bos_token_id = 256, None
            tokens = [bytes([i]) for i in range(256)] + [b"\xff[END]"]
            special_token_ids = [256]

            def __call__(self, s):
                return list(s if isinstance(s, bytes) else s.encode())

        _BYTES.append(llguidance.LLTokenizer(llguidance.TokenizerWrapper(Bytes())))
    return _BYTES[0]


def _build(entry: _Entry, text: str, tokenizer) -> Any:
    """The matcher of a grammar, fresh, or the reason (a str) it cannot be enforced."""
    entry.started = t0 = time.monotonic()
    m = llguidance.LLMatcher(tokenizer, text, log_level=0, limits=limits())
    if m.is_error():
        return f"cannot be enforced: {_first_line(m.get_error())}"
    probe = m.deep_copy()
    probe.compute_bitmask()  # an empty language or a grammar past the limits fails at its first mask
    if probe.is_error():
        return f"no answer satisfies it ({_first_line(probe.get_error())})"
    forced = probe.compute_ff_tokens()  # what the grammar forces before any choice: endless when a
    if len(forced) <= MAX_FORCED and probe.consume_tokens(forced):  # required property contains itself
        probe.compute_bitmask()
    if len(forced) > MAX_FORCED or probe.is_error():
        return "no answer satisfies it: it forces an answer that never ends (a required property that contains itself?)"
    took = time.monotonic() - t0
    if took > COMPILE_SECONDS:
        return f"took {took:.1f} s to compile, more than the limit of {COMPILE_SECONDS:g} s"
    return m


def _compiled(text: str, tokenizer) -> Any:
    """The cached (or new) template matcher of a grammar text; _Bad with the reason."""
    seconds = COMPILE_SECONDS
    if len(text) > MAX_GRAMMAR_CHARS:
        raise _Bad(f"its grammar is {len(text)} characters, more than the limit of {MAX_GRAMMAR_CHARS}")
    key = (id(tokenizer), text)
    with _LOCK:
        entry = _CACHE.get(key)
        if entry is None:
            entry = _CACHE[key] = _Entry()
            entry.future = _POOL.submit(_build, entry, text, tokenizer)
            while len(_CACHE) > CACHE_SIZE:
                _CACHE.popitem(last=False)
        else:
            _CACHE.move_to_end(key)
    end = time.monotonic() + 4 * seconds  # waiting behind other grammars included
    while True:
        started = entry.started  # None while it waits for a compiler thread: look again soon
        wait = min(end, started + seconds) - time.monotonic() if started is not None else 0.02
        try:
            got = entry.future.result(timeout=max(0.0, wait) + 0.005)
            break
        except FutureTimeout:
            now = time.monotonic()
            if entry.started is not None and now >= entry.started + seconds:
                raise _Bad(f"takes longer than {seconds:g} s to compile") from None
            if now >= end:
                raise AdmissionError("grammar: the compiler is busy with other grammars; retry") from None
        except Exception as e:  # llguidance raising, which its API says it never does for a grammar
            got = f"cannot be enforced: {_first_line(e)}"
            break
    if isinstance(got, str):
        raise _Bad(got)
    return got


def compile_spec(spec: dict, tokenizer=None, where: str | None = None):
    """The compiled template matcher of a spec (callers deep_copy it), checked: built under LIMITS,
    its first mask computed and its forced prefix consumed, within COMPILE_SECONDS; cached by grammar
    text. tokenizer: an llguidance LLTokenizer (None: byte_tokenizer()). MlxMoeError naming the
    field (`where`, else the spec's: response_format.json_schema.schema, tools[i].function.parameters,
    tools); AdmissionError when other grammars keep the compiler busy. Under "required" each
    function's call is checked alone first (a call that never ends hides behind the choice)."""
    tokenizer = tokenizer or byte_tokenizer()
    text = grammar_text(spec)
    field = where or _field(spec)
    tools, choice = spec.get("tools"), spec.get("choice", "required")
    if spec.get("type") == "tool_call" and where is None:
        if choice == "required" and len(tools) > 1:
            for i, t in enumerate(tools):
                one = grammar_text({"type": "tool_call", "tools": [t], "choice": "required"})
                try:
                    _compiled(one, tokenizer)
                except _Bad as e:
                    raise MlxMoeError(f"tools[{i}].function.parameters: {e}") from None
        elif isinstance(choice, dict):
            name = (choice.get("function") or choice).get("name")
            field = next((f"tools[{i}].function.parameters" for i, t in enumerate(tools)
                          if (t.get("function") or {}).get("name") == name), field)
        else:
            field = "tools[0].function.parameters"
    try:
        return _compiled(text, tokenizer)
    except _Bad as e:
        raise MlxMoeError(f"{field}: {e}") from None
