"""Reading a request's fields, for every dialect: the body as JSON within its limits, typed fields, text that
can travel, tools and grammars checked as the node will check them, a prompt's size before it is tokenized,
and mlxmoe's own options. Each refusal is an ApiError naming the field as the client wrote it; the dialect
(openai.py, anthropic.py, ollama.py) shapes the body."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

from aiohttp import web

from mlxmoe.errors import AdmissionError, ApiError, MlxMoeError
from mlxmoe.modes import ROUTER_MODES
from mlxmoe.node import grammar_spec

MAX_BODY = 8 << 20
MAX_MESSAGES = 10000
MAX_TOOLS = 128
MAX_CHARS_PER_TOKEN = 64  # text longer than context * this cannot fit: refused before it is tokenized
BODY_TIMEOUT = 30.0  # seconds to receive a whole body once the headers are in
SESSION_HEADERS = ("X-Mlxmoe-Session", "X-Session-Id")
EXTENSION_FIELDS = ("mode", "prefer")  # the "mlxmoe" object of a request body
PREFER = ("quality", "speed")  # "mlxmoe": {"prefer": ...}: the node that serves best, or the least loaded
MODE_HEADER = "X-Mlxmoe-Mode"


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


# ---------------------------------------------------------------- typed fields
def opt(body: dict, name: str, kinds: tuple, what: str, default: Any = None, where: str | None = None) -> Any:
    """body[name] of one of `kinds` (None or absent: `default`); `where`: the field's name in messages."""
    v = body.get(name)
    if v is None:
        return default
    if (isinstance(v, bool) and bool not in kinds) or not isinstance(v, kinds):
        raise ApiError(400, f"'{where or name}' must be {what}", where or name, "invalid_type")
    return v


def number(body: dict, name: str, default: float | None, where: str | None = None) -> float | None:
    """A finite number (json.loads accepts NaN, Infinity and ints too big for a float)."""
    v = opt(body, name, (int, float), "a number", default, where)
    if v is None:
        return None
    try:
        v = float(v)
    except OverflowError:
        v = math.inf
    if not math.isfinite(v):
        raise ApiError(400, f"'{where or name}' must be a finite number", where or name, "invalid_value")
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


def flag(body: dict, name: str, where: str | None = None) -> bool:
    return bool(opt(body, name, (bool,), "true or false", False, where))


def stop_list(v: Any, where: str, most: int) -> list[str]:
    """Stop sequences: a string or a list of up to `most` non-empty strings."""
    stop = [v] if isinstance(v, str) else v if v is not None else []
    if not isinstance(stop, list) or len(stop) > most or not all(isinstance(x, str) and x for x in stop):
        raise ApiError(400, f"'{where}' must be a non-empty string or a list of up to {most} non-empty strings", where,
                       "invalid_value")
    return [text(x, where) for x in stop]


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


# ---------------------------------------------------------------- the prompt's size
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


def check_messages_fit(messages: list[dict], context: int | None, where: str = "messages") -> None:
    """Messages that cannot fit (each costs at least one token, and no token
    holds more than MAX_CHARS_PER_TOKEN characters) are refused before the
    chat template and the tokenizer run."""
    if context is not None and len(messages) >= context:
        raise ApiError(400, f"'{where}' has {len(messages)} entries; the context limit is {context} tokens",
                       where, "context_length_exceeded")
    check_chars(sum(len(m["content"]) for m in messages), context, where)


def check_chars(n_chars: int, context: int | None, where: str) -> None:
    """Text far longer than the context can hold is refused before it is tokenized."""
    if context is not None and n_chars > context * MAX_CHARS_PER_TOKEN:
        raise ApiError(400, f"'{where}' has {n_chars} characters, far more than the context limit of {context} "
                            "tokens can hold", where, "context_length_exceeded")


def check_logit_bias(bias: dict[str, float], vocab: int | None, where: str = "logit_bias") -> None:
    """logit_bias ids inside the vocabulary, when the router knows it (else the node refuses them)."""
    bad = [k for k in bias if vocab is not None and int(k) >= vocab]
    if bad:
        raise ApiError(400, f"'{where}': token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})", where,
                       "invalid_value")


# ---------------------------------------------------------------- messages
def message_list(body: dict, required: bool = True) -> list:
    """`messages`: a list, non-empty when `required`, of at most MAX_MESSAGES entries."""
    msgs = body.get("messages")
    if msgs is None and not required:
        return []
    if not isinstance(msgs, list) or (required and not msgs):
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages",
                       "invalid_type" if "messages" in body else "missing_required_parameter")
    if len(msgs) > MAX_MESSAGES:
        raise ApiError(400, f"'messages' has more than {MAX_MESSAGES} entries", "messages", "invalid_value")
    return msgs


def message_role(m: Any, where: str, roles: tuple[str, ...]) -> str:
    """The role of message `m` (at `where`), one of `roles`."""
    if not isinstance(m, dict):
        raise ApiError(400, f"'{where}' must be an object with 'role' and 'content'", where, "invalid_type")
    role = m.get("role")
    if not isinstance(role, str) or role not in roles:
        raise ApiError(400, f"'{where}.role' must be one of {', '.join(roles)}, got {role!r}"[:300], f"{where}.role",
                       "invalid_value")
    return role


# ---------------------------------------------------------------- tools and grammars
def function_tool(name: Any, description: Any, parameters: Any, where: str, names: tuple[str, str, str]) -> dict:
    """One function tool in the neutral (OpenAI) form, its schema compiled as the node will;
    `names`: how the dialect calls the name, description and parameters fields."""
    n_name, n_desc, n_params = (f"{where}.{n}" for n in names)
    if not isinstance(name, str) or not name or len(name) > 64 or not all(c.isalnum() or c in "_-" for c in name):
        raise ApiError(400, f"'{n_name}' must be 1-64 letters, digits, '_' or '-'", n_name, "invalid_value")
    if description is not None and not isinstance(description, str):
        raise ApiError(400, f"'{n_desc}' must be a string", n_desc, "invalid_type")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise ApiError(400, f"'{n_params}' must be a JSON schema object", n_params, "invalid_type")
    compile_grammar({"type": "tool_call", "tools": [{"type": "function", "function": {"name": name,
                                                                                      "parameters": parameters}}],
                     "choice": "required"}, n_params)
    return {"type": "function", "function": {"name": name, **({"description": text(description, n_desc)}
                                                               if description else {}), "parameters": parameters}}


def unique_names(tools: list[dict], where: str) -> None:
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) < len(names):
        raise ApiError(400, f"'{where}' declares a function name twice", where, "invalid_value")


def compile_grammar(spec: dict, where: str | None) -> None:
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


# ---------------------------------------------------------------- mlxmoe's own options
def session_hint(headers, body: dict, fields: tuple[str, ...] = ("session_id", "user")) -> str | None:
    """The client's session id: a header, or one of `fields` of the body."""
    found = [(headers.get(h), h) for h in SESSION_HEADERS]
    for v, name in found + [(body.get(f), f) for f in fields]:
        if v is None or v == "":
            continue
        if not isinstance(v, str) or len(v) > 256:
            raise ApiError(400, f"'{name}' must be a string of at most 256 characters", name, "invalid_value")
        return text(v, name)
    return None


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
