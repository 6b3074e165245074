"""The OpenAI dialect: request parsing and validation, and the shapes of
responses, chunks and errors ({"error": {"message", "type", "param",
"code"}}). Plain dicts in, plain dicts out; no router, no I/O but read_json."""

from __future__ import annotations

import asyncio
import json
import math
import os
from typing import Any

from aiohttp import web

from mlxmoe.cluster.api import tools as tl
from mlxmoe.errors import AdmissionError, MlxMoeError, RpcError
from mlxmoe.modes import ROUTER_MODES
from mlxmoe.node import grammar_spec

MAX_BODY = 8 << 20
MAX_TOKENS_DEFAULT = 512
MAX_TOKENS_LIMIT = 1 << 20
MAX_MESSAGES = 10000
MAX_CHARS_PER_TOKEN = 64  # text longer than context * this cannot fit: refused before it is tokenized
SEED_LIMIT = 1 << 64  # nodes seed with an unsigned 64-bit integer
BODY_TIMEOUT = 30.0  # seconds to receive a whole body once the headers are in
SESSION_HEADERS = ("X-Mlxmoe-Session", "X-Session-Id")
ROLES = {"system", "developer", "user", "assistant", "tool"}
EXTENSION_FIELDS = ("mode", "prefer")  # the "mlxmoe" object of a request body
PREFER = ("quality", "speed")  # "mlxmoe": {"prefer": ...}: the node that serves best, or the least loaded
MODE_HEADER = "X-Mlxmoe-Mode"


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self, param: bool = True) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param if param else None,
                          "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def rpc_api_error(e: RpcError) -> ApiError:
    """A node's refusal or failure, as the API reports it."""
    if e.code == "context_length_exceeded":
        return ApiError(400, e.message, "messages", e.code)
    if 400 <= e.status < 500:
        return ApiError(400, f"node {e.peer} refused the request: {e.message}", None, e.code)
    return ApiError(502, f"node {e.peer} failed: {e.message}", None, e.code)


# ---------------------------------------------------------------- validation

def opt(body: dict, name: str, kinds: tuple, what: str, default: Any = None) -> Any:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in kinds:
        raise ApiError(400, f"'{name}' must be {what}", name, "invalid_type")
    if not isinstance(v, kinds):
        raise ApiError(400, f"'{name}' must be {what}", name, "invalid_type")
    return v


def number(body: dict, name: str, default: float) -> float:
    """A finite number (json.loads accepts NaN, Infinity and ints too big for a float)."""
    v = opt(body, name, (int, float), "a number", default)
    try:
        v = float(v)
    except OverflowError:
        v = math.inf
    if not math.isfinite(v):
        raise ApiError(400, f"'{name}' must be a finite number", name, "invalid_value")
    return v


def text(v: str, where: str) -> str:
    """A string that can travel as UTF-8 (JSON may carry lone surrogates like "\\ud800")."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"'{where}' is not valid Unicode (a lone surrogate)", where, "invalid_value") from None
    return v


def check_range(name: str, v: float, lo: float, hi: float, lo_open: bool = False) -> None:
    if (v <= lo if lo_open else v < lo) or v > hi:
        raise ApiError(400, f"'{name}' must be {'>' if lo_open else '>='} {lo} and <= {hi}, got {v}", name,
                       "invalid_value")


def flag(body: dict, name: str) -> bool:
    return bool(opt(body, name, (bool,), "true or false", False))


def include_usage(body: dict) -> bool:
    return flag(opt(body, "stream_options", (dict,), "an object", {}), "include_usage")


def gen_params(body: dict) -> dict:
    mt = body.get("max_completion_tokens")
    name = "max_completion_tokens" if mt is not None else "max_tokens"
    max_tokens = opt(body, name, (int,), "an integer", MAX_TOKENS_DEFAULT)
    check_range(name, max_tokens, 1, MAX_TOKENS_LIMIT)
    temperature = number(body, "temperature", None) if body.get("temperature") is not None else None
    if temperature is not None:
        check_range("temperature", temperature, 0.0, 2.0)
    top_p = number(body, "top_p", None) if body.get("top_p") is not None else None
    if top_p is not None:
        check_range("top_p", top_p, 0.0, 1.0, lo_open=True)
    stop = opt(body, "stop", (str, list), "a string or a list of strings", [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 4 or not all(isinstance(x, str) and x for x in stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 non-empty strings", "stop",
                       "invalid_value")
    stop = [text(x, "stop") for x in stop]
    seed = opt(body, "seed", (int,), "an integer")
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise ApiError(400, f"'seed' must be an integer in 0..2**64-1", "seed", "invalid_value")
    n = opt(body, "n", (int,), "an integer", 1)
    if n != 1:
        raise ApiError(400, "'n' must be 1 (one completion per request)", "n", "unsupported_value")
    return {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "stop": stop, "seed": seed,
            **sampling_params(body)}


# ---------------------------------------------------------------- sampling beyond temperature/top_p
MAX_LOGIT_BIAS = 1024  # entries (the wire's limit too)
TOP_LOGPROBS_LIMIT = 20


def sampling_params(body: dict) -> dict:
    """presence/frequency/repetition penalties, top_k, min_p, logit_bias and
    the number of top_logprobs, as GenParams fields (None: the model's default,
    node/contract.py model_defaults); best_of other than 1 is refused."""
    best_of = opt(body, "best_of", (int,), "an integer", 1)
    if best_of != 1:
        raise ApiError(400, "'best_of' must be 1 (one completion per request)", "best_of", "unsupported_value")
    out = {}
    for name in ("presence_penalty", "frequency_penalty"):
        out[name] = number(body, name, 0.0)
        check_range(name, out[name], -2.0, 2.0)
    out["repetition_penalty"] = optional_number(body, "repetition_penalty", 0.0, 10.0, lo_open=True)
    out["min_p"] = optional_number(body, "min_p", 0.0, 1.0)
    top_k = opt(body, "top_k", (int,), "an integer")
    if top_k is not None:
        check_range("top_k", top_k, 0, 1 << 20)
    out["top_k"] = top_k
    out["logit_bias"] = logit_bias(body)
    out["top_logprobs"] = top_logprobs_count(body)
    return out


def optional_number(body: dict, name: str, lo: float, hi: float, lo_open: bool = False) -> float | None:
    if body.get(name) is None:
        return None
    v = number(body, name, 0.0)
    check_range(name, v, lo, hi, lo_open)
    return v


def logit_bias(body: dict) -> dict[str, float]:
    """{"token id": bias in -100..100}; ids beyond the vocabulary the node refuses (naming logit_bias)."""
    b = opt(body, "logit_bias", (dict,), "an object mapping token ids to numbers", {})
    if len(b) > MAX_LOGIT_BIAS:
        raise ApiError(400, f"'logit_bias' has more than {MAX_LOGIT_BIAS} entries", "logit_bias", "invalid_value")
    out = {}
    for k, v in b.items():
        if not (isinstance(k, str) and k.isascii() and k.isdigit() and len(k) <= 9):
            raise ApiError(400, f"'logit_bias' keys must be token ids (digits), got {k[:20]!r}", "logit_bias",
                           "invalid_value")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise ApiError(400, f"'logit_bias[{k}]' must be a number in -100..100", "logit_bias", "invalid_value")
        out[str(int(k))] = float(v)
    return out


def check_logit_bias(params: dict, vocab: int | None) -> None:
    """logit_bias ids inside the vocabulary, when the router knows it (else the node refuses them)."""
    bad = [k for k in params.get("logit_bias") or {} if vocab is not None and int(k) >= vocab]
    if bad:
        raise ApiError(400, f"'logit_bias': token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})", "logit_bias",
                       "invalid_value")


def top_logprobs_count(body: dict) -> int:
    """Alternatives per token: chat's top_logprobs (with logprobs: true), or completions' logprobs N."""
    lp = body.get("logprobs")
    if "messages" not in body:  # /v1/completions: logprobs is the count (completion_logprobs checks it)
        return lp if isinstance(lp, int) and not isinstance(lp, bool) and 0 <= lp <= 5 else 0
    n = opt(body, "top_logprobs", (int,), "an integer", 0)
    check_range("top_logprobs", n, 0, TOP_LOGPROBS_LIMIT)
    if n and lp is not True:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
    return n


def top_list(f: dict) -> list[dict]:
    """A token frame's alternatives in the chat shape."""
    return [{"token": t["text"], "logprob": t["logprob"], "bytes": list(t["text"].encode())} for t in f.get("top") or []]


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages",
                       "invalid_type" if "messages" in body else "missing_required_parameter")
    if len(msgs) > MAX_MESSAGES:
        raise ApiError(400, f"'messages' has more than {MAX_MESSAGES} entries", "messages", "invalid_value")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"'{where}' must be an object with 'role' and 'content'", where, "invalid_type")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise ApiError(400, f"'{where}.role' must be one of {sorted(ROLES)}, got {role!r}"[:300],
                           f"{where}.role", "invalid_value")
        out.append({"role": role, "content": _content(m.get("content"), f"{where}.content", role),
                    **tool_message_fields(m, where, role)})
    if not any(m["role"] == "user" for m in out):
        raise ApiError(400, "'messages' must contain at least one message with role 'user'", "messages",
                       "invalid_value")
    return out


def _content(c: Any, where: str, role: str) -> str:
    if c is None and role in ("assistant", "tool"):
        return ""
    if isinstance(c, str):
        return text(c, where)
    if isinstance(c, list):
        parts = []
        for j, p in enumerate(c):
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise ApiError(400, f"'{where}[{j}]' must be {{\"type\": \"text\", \"text\": string}} "
                                    "(only text content is supported)", f"{where}[{j}]", "invalid_value")
            parts.append(text(p["text"], f"{where}[{j}].text"))
        return "".join(parts)
    raise ApiError(400, f"'{where}' must be a string or a list of text parts", where, "invalid_type")


# ---------------------------------------------------------------- tools and structured output

MAX_TOOLS = 128


def tool_message_fields(m: dict, where: str, role: str) -> dict:
    """A message's tool fields: an assistant's `tool_calls` (arguments as JSON text), a tool
    result's `tool_call_id` (required, as OpenAI requires it)."""
    if role == "tool":
        tid = m.get("tool_call_id")
        if not isinstance(tid, str) or not tid:
            raise ApiError(400, f"'{where}.tool_call_id' is required for a message with role 'tool'",
                           f"{where}.tool_call_id", "missing_required_parameter" if tid is None else "invalid_type")
        return {"tool_call_id": text(tid, f"{where}.tool_call_id")}
    calls = m.get("tool_calls")
    if calls is None or role != "assistant":
        return {}
    if not isinstance(calls, list) or len(calls) > MAX_TOOLS:
        raise ApiError(400, f"'{where}.tool_calls' must be a list of up to {MAX_TOOLS} calls", f"{where}.tool_calls",
                       "invalid_type")
    out = []
    for j, c in enumerate(calls):
        w = f"{where}.tool_calls[{j}]"
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ApiError(400, f"'{w}.function.name' must be a non-empty string", f"{w}.function.name",
                           "invalid_value")
        args = fn.get("arguments", "{}")
        if not isinstance(args, str):
            raise ApiError(400, f"'{w}.function.arguments' must be a string of JSON", f"{w}.function.arguments",
                           "invalid_type")
        cid = c.get("id")
        out.append({"id": cid if isinstance(cid, str) else "", "type": "function",
                    "function": {"name": text(fn["name"], f"{w}.function.name"),
                                 "arguments": text(args, f"{w}.function.arguments")}})
    return {"tool_calls": out}


def parse_tools(body: dict) -> tuple[list | None, Any]:
    """`tools` and `tool_choice`, checked (api/tools.py check_tool_choice): ([{type, function: {name,
    description, parameters}}] or None, tool_choice as given)."""
    ts = body.get("tools")
    if ts is not None:
        if not isinstance(ts, list) or len(ts) > MAX_TOOLS:
            raise ApiError(400, f"'tools' must be a list of up to {MAX_TOOLS} functions", "tools", "invalid_type")
        ts = [_tool(t, f"tools[{i}]") for i, t in enumerate(ts)] or None
        names = [t["function"]["name"] for t in ts or []]
        if len(set(names)) < len(names):
            raise ApiError(400, "'tools' declares a function name twice", "tools", "invalid_value")
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type", "function") != "function":
        raise ApiError(400, "'tool_choice.type' must be 'function'", "tool_choice.type", "invalid_value")
    opt(body, "parallel_tool_calls", (bool,), "true or false")  # accepted; under "required" one call is made
    try:
        forced = tl.tool_grammar(ts, choice)
    except MlxMoeError as e:
        raise ApiError(400, str(e)[:300], "tool_choice", "invalid_value") from None
    if forced is not None and len(ts) > 1 and forced["choice"] == "required":
        _compile(forced, None)  # the whole grammar the node will get (each function's alone is checked)
    return ts, choice


def _tool(t: Any, where: str) -> dict:
    if not isinstance(t, dict) or t.get("type", "function") != "function":
        raise ApiError(400, f"'{where}' must be {{\"type\": \"function\", \"function\": {{...}}}}", f"{where}.type",
                       "invalid_value")
    fn = t.get("function")
    if not isinstance(fn, dict):
        raise ApiError(400, f"'{where}.function' must be an object with a 'name'", f"{where}.function", "invalid_type")
    name = fn.get("name")
    if not isinstance(name, str) or not name or len(name) > 64 or not all(c.isalnum() or c in "_-" for c in name):
        raise ApiError(400, f"'{where}.function.name' must be 1-64 letters, digits, '_' or '-'",
                       f"{where}.function.name", "invalid_value")
    desc = fn.get("description")
    if desc is not None and not isinstance(desc, str):
        raise ApiError(400, f"'{where}.function.description' must be a string", f"{where}.function.description",
                       "invalid_type")
    params = fn.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(params, dict):
        raise ApiError(400, f"'{where}.function.parameters' must be a JSON schema object", f"{where}.function.parameters",
                       "invalid_type")
    _compile({"type": "tool_call", "tools": [{"type": "function", "function": {"name": name, "parameters": params}}],
              "choice": "required"}, f"{where}.function.parameters")
    return {"type": "function", "function": {"name": name, **({"description": text(desc, f"{where}.function.description")}
                                                               if desc else {}), "parameters": params}}


def _compile(spec: dict, where: str | None) -> None:
    """A grammar spec compiled and checked as the node will (node/grammar_spec.py: the strict rule, llguidance's
    limits, a time bound, a cache), so a schema that cannot be enforced is a 400 naming its field before any
    node is asked."""
    try:
        grammar_spec.compile_spec(spec, None, where)
    except AdmissionError as e:
        raise ApiError(503, str(e)[:300], None, "overloaded", headers={"Retry-After": "1"}) from None
    except MlxMoeError as e:
        field, _, why = str(e).partition(": ")
        raise ApiError(400, f"'{field}' is not a JSON schema this server can enforce: {why}"[:300], field,
                       "invalid_value") from None


def parse_response_format(body: dict) -> dict | None:
    """`response_format` as a grammar spec (node/grammar.py), or None for free text."""
    rf = body.get("response_format")
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise ApiError(400, "'response_format' must be an object like {\"type\": \"json_object\"}", "response_format",
                       "invalid_type")
    kind = rf.get("type")
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise ApiError(400, "'response_format.json_schema' must be an object {name, schema, strict}",
                           "response_format.json_schema", "invalid_type")
        schema = js.get("schema")
        if not isinstance(schema, dict):
            raise ApiError(400, "'response_format.json_schema.schema' must be a JSON schema object",
                           "response_format.json_schema.schema", "invalid_type")
        _compile({"type": "json_schema", "schema": schema}, "response_format.json_schema.schema")
    elif kind not in ("text", "json_object"):
        raise ApiError(400, f"'response_format.type' must be 'text', 'json_object' or 'json_schema', got {kind!r}"[:300],
                       "response_format.type", "invalid_value")
    return tl.response_format_grammar(rf)


def completion_grammar(body: dict) -> dict | None:
    """/v1/completions: response_format as for chats; tools need a chat (400 naming them)."""
    for name in ("tools", "tool_choice"):
        if body.get(name) is not None:
            raise ApiError(400, f"'{name}' is supported on /v1/chat/completions only", name, "unsupported_parameter")
    return parse_response_format(body)


def parse_prompt(body: dict) -> str | list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if isinstance(p, str):
        return text(p, "prompt")
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return p  # ids are checked against the vocabulary by check_tokens
    raise ApiError(400, "'prompt' must be a string (or a list of one string, or a list of token ids)", "prompt",
                   "invalid_type" if "prompt" in body else "missing_required_parameter")


def completion_logprobs(body: dict) -> int | None:
    """/v1/completions: the `logprobs` count (None: none), refusing echo and suffix."""
    n_lp = opt(body, "logprobs", (int,), "an integer 0..5")
    if n_lp is not None:
        check_range("logprobs", n_lp, 0, 5)
    if flag(body, "echo"):
        raise ApiError(400, "'echo' is not supported", "echo", "unsupported_value")
    if body.get("suffix") is not None:
        raise ApiError(400, "'suffix' is not supported", "suffix", "unsupported_value")
    return n_lp


def chat_logprobs(body: dict) -> bool:
    logprobs = flag(body, "logprobs")
    check_range("top_logprobs", opt(body, "top_logprobs", (int,), "an integer", 0), 0, 20)
    return logprobs


def session_hint(headers, body: dict) -> str | None:
    found = [(headers.get(h), h) for h in SESSION_HEADERS]
    for v, name in found + [(body.get("session_id"), "session_id"), (body.get("user"), "user")]:
        if v is None or v == "":
            continue
        if not isinstance(v, str) or len(v) > 256:
            raise ApiError(400, f"'{name}' must be a string of at most 256 characters", name, "invalid_value")
        return text(v, name)
    return None


def check_model(body: dict, names: tuple[str, ...]) -> None:
    """`model`, when given, must name the one model this router serves (404 model_not_found)."""
    m = body.get("model")
    if m is None:
        return
    if not isinstance(m, str):
        raise ApiError(400, "'model' must be a string", "model", "invalid_type")
    if m not in names:
        raise ApiError(404, f"the model {m!r} does not exist; this router serves {names[0]!r}"[:300], "model",
                       "model_not_found")


def check_tokens(tokens: list[int], vocab: int | None, context: int | None, where: str) -> None:
    """Token ids in the vocabulary and the prompt shorter than the context,
    before anything (scoring, placement) spends time or memory on it."""
    if vocab is not None:
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"'{where}': token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})"[:300],
                           where, "invalid_value")
    elif any(not 0 <= t < 1 << 31 for t in tokens):
        raise ApiError(400, f"'{where}': token ids must be in 0..2**31-1", where, "invalid_value")
    if context is not None and len(tokens) >= context:
        raise ApiError(400, f"'{where}' is {len(tokens)} tokens; the context limit is {context} tokens "
                            "(prompt and at least one generated token)", where, "context_length_exceeded")


def check_messages_fit(messages: list[dict], context: int | None) -> None:
    """Messages that cannot fit (each costs at least one token, and no token
    holds more than MAX_CHARS_PER_TOKEN characters) are refused before the
    chat template and the tokenizer run."""
    if context is not None and len(messages) >= context:
        raise ApiError(400, f"'messages' has {len(messages)} entries; the context limit is {context} tokens",
                       "messages", "context_length_exceeded")
    check_chars(sum(len(m["content"]) for m in messages), context, "messages")


def check_chars(n_chars: int, context: int | None, where: str) -> None:
    """Text far longer than the context can hold is refused before it is tokenized."""
    if context is not None and n_chars > context * MAX_CHARS_PER_TOKEN:
        raise ApiError(400, f"'{where}' has {n_chars} characters, far more than the context limit of {context} "
                            "tokens can hold", where, "context_length_exceeded")


def requested_mode(headers, body: dict) -> str | None:
    """The routing mode a request asks for ("mlxmoe": {"mode": ...} in the
    body, or the X-Mlxmoe-Mode header), or None for the session's own."""
    ext, mode = body.get("mlxmoe"), None
    if ext is not None:
        if not isinstance(ext, dict):
            raise ApiError(400, "'mlxmoe' must be an object like {\"mode\": \"race\"}", "mlxmoe", "invalid_type")
        for k in ext:
            if k not in EXTENSION_FIELDS:
                raise ApiError(400, f"'mlxmoe.{k}' is not a known option (known: {', '.join(EXTENSION_FIELDS)})"[:300],
                               f"mlxmoe.{k}", "invalid_value")
        mode = ext.get("mode")
        if mode is not None and mode not in ROUTER_MODES:
            raise ApiError(400, f"'mlxmoe.mode' must be one of {', '.join(ROUTER_MODES)}, got {mode!r}"[:300],
                           "mlxmoe.mode", "invalid_value")
    h = headers.get(MODE_HEADER)
    if h is not None:
        h = h.strip().lower()
        if h not in ROUTER_MODES:
            raise ApiError(400, f"header '{MODE_HEADER}' must be one of {', '.join(ROUTER_MODES)}, got {h!r}"[:300],
                           MODE_HEADER, "invalid_value")
        if mode is not None and mode != h:
            raise ApiError(400, f"header '{MODE_HEADER}' ({h}) contradicts 'mlxmoe.mode' ({mode})", MODE_HEADER,
                           "invalid_value")
        mode = h
    return mode


def requested_prefer(body: dict) -> str | None:
    """"mlxmoe": {"prefer": "quality" | "speed"}: where a new chat goes (requested_mode checked the object)."""
    ext = body.get("mlxmoe")
    prefer = ext.get("prefer") if isinstance(ext, dict) else None
    if prefer is not None and prefer not in PREFER:
        raise ApiError(400, f"'mlxmoe.prefer' must be one of {', '.join(PREFER)}, got {prefer!r}"[:300],
                       "mlxmoe.prefer", "invalid_value")
    return prefer


async def read_json(request: web.Request, timeout: float = BODY_TIMEOUT) -> dict:
    """The whole body (however many writes it came in), up to MAX_BODY
    (the app's client_max_size): 413 past it, chunked or not; 408 if it
    does not arrive within `timeout` seconds."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise ApiError(413, f"request body is {request.content_length} bytes; the limit is {MAX_BODY}", None,
                       "request_too_large")
    try:
        raw = await asyncio.wait_for(request.read(), timeout)
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"request body exceeds the {MAX_BODY}-byte limit", None, "request_too_large",
                       headers={"Connection": "close"}) from None
    except asyncio.TimeoutError:
        raise ApiError(408, f"request body did not arrive within {timeout:g} s", None, "request_timeout",
                       headers={"Connection": "close"}) from None
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}"[:300], None, "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", None, "invalid_json")
    return body


# ---------------------------------------------------------------- response shapes

def new_id(prefix: str) -> str:
    return f"{prefix}-{os.urandom(12).hex()}"


def usage(n_prompt: int, n_completion: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


def piece(f: dict) -> str:
    """A token frame's token as the vocabulary spells it (its `text` is what the stream added, which a
    held-back space or stop-string prefix moves between tokens)."""
    p = f.get("piece")
    return p if isinstance(p, str) else f["text"]


def chat_lp(f: dict) -> dict:
    return {"token": piece(f), "logprob": f["logprob"], "bytes": list(piece(f).encode()), "top_logprobs": top_list(f)}


def chat_completion(base: dict, reply: str, lps: list[dict] | None, finish_reason: str, use: dict) -> dict:
    return {**base, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                         "logprobs": {"content": lps} if lps is not None else None,
                         "finish_reason": finish_reason}],
            "usage": use}


def chat_chunk(chunk: dict, delta: dict, lp: dict | None = None, finish_reason: str | None = None) -> dict:
    return {**chunk, "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}]}


def completion_choice(text: str, lp: dict | None, finish_reason: str | None) -> dict:
    return {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish_reason}


def completion_lp(frames: list[dict], offset: int = 0) -> dict:
    """The legacy logprobs object of a run of token frames whose text starts at `offset`."""
    offs, o = [], offset
    for f in frames:
        offs.append(o)
        o += len(f["text"])
    return {"tokens": [piece(f) for f in frames], "token_logprobs": [f["logprob"] for f in frames],
            "top_logprobs": [{t["text"]: t["logprob"] for t in f.get("top") or []} for f in frames]
            if any(f.get("top") for f in frames) else None, "text_offset": offs}
