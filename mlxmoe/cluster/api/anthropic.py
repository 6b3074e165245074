"""The Anthropic dialect (the Messages API): POST /v1/messages (a Message, or its server-sent events) and
POST /v1/messages/count_tokens. A body is parsed once into a ChatRequest (chat.py) as openai.py does: `system`
and the content blocks become the neutral messages (a user turn's tool_result blocks "tool" messages, its text
blocks a user message; an assistant turn's tool_use blocks its tool_calls), `tools`/`tool_choice` the neutral
ones, `output_config.format` the answer's grammar. A last assistant message with text is the start of the
answer (a "prefill"): the model continues it, and the reply holds only what follows. The reply's parts come
back as content blocks: a text block per run of text, a tool_use block per call. Errors as
{"type": "error", "error": {"type", "message"}} with our status.

Accepted and ignored: anthropic-version and anthropic-beta headers, `thinking` (no thinking blocks are made;
those sent back in assistant turns are dropped), `service_tier`, `cache_control`, `container`, `effort`,
`disable_parallel_tool_use` (a forced call is one call), and any unknown top-level field (clients send extras).
Refused with a 400 naming the field: image and document blocks (this model reads text only), server tools
(a tool `type` other than "custom"), `mcp_servers`."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import uuid
from typing import Any, AsyncIterator

from aiohttp import web

from mlxmoe.cluster.api import chat, http, sse
from mlxmoe.cluster.api.fields import (MAX_TOOLS, check_messages_fit, check_model, check_range, compile_grammar, flag,
                                       function_tool, message_list, message_role, number, opt, requested_mode,
                                       requested_prefer, session_hint, stop_list, text, unique_names)
from mlxmoe.cluster.api.openai import check_choice, noticed
from mlxmoe.errors import ApiError, MlxMoeError, api_error
from mlxmoe.params import MAX_TOKENS_LIMIT, GenParams, check

PING_EVERY = 5.0  # seconds without an event before a keep-alive ping (a long prompt prefills; proxies cut idle streams)
MAX_STOP_SEQUENCES = 16
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
               504: "timeout_error", 529: "overloaded_error"}
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}  # Reply.finish_reason ->
CHOICES = {"auto": "auto", "any": "required", "none": "none"}  # and {"type": "tool", "name"}: that function
PING = {"type": "ping"}


def error_body(e: ApiError) -> dict:
    kind = ERROR_TYPES.get(e.status) or ("api_error" if e.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": e.message}}


# ---------------------------------------------------------------- the request
def message_request(body: dict, headers) -> tuple[chat.ChatRequest, bool]:
    """A /v1/messages body, parsed once (grammars compile here: call it off the event loop): (request, stream)."""
    return chat_request(body, headers, gen_params(body)), flag(body, "stream")


def chat_request(body: dict, headers, params: GenParams) -> chat.ChatRequest:
    """What /v1/messages and count_tokens read alike: the prompt, tools, answer format and mlxmoe's options."""
    if body.get("mcp_servers"):
        raise ApiError(400, "'mcp_servers' is not supported: declare the functions in 'tools'", "mcp_servers",
                       "unsupported_parameter")
    tools, messages = parse_tools(body), system(body) + parse_messages(body)
    last = messages[-1]
    opening = last["role"] == "assistant" and not last.get("tool_calls") and bool(last["content"])
    return chat.ChatRequest(messages, params, tools, tool_choice(body, tools), output_format(body),
                            routing(headers, body), continue_last=opening)


def routing(headers, body: dict) -> chat.Routing:
    """mlxmoe's options; `metadata.user_id` serves as the session hint when no header gives one."""
    meta = opt(body, "metadata", (dict,), "an object like {\"user_id\": ...}", {})
    hint = session_hint(headers, {"metadata.user_id": meta.get("user_id")}, ("metadata.user_id",))
    return chat.Routing(hint, requested_mode(headers, body), requested_prefer(body))


def gen_params(body: dict) -> GenParams:
    """max_tokens (required), temperature (Anthropic's range, 0..1), top_p, top_k, stop_sequences; the other
    ranges are GenParams' own (params.check), named as Anthropic names them."""
    max_tokens = opt(body, "max_tokens", (int,), "an integer")
    if max_tokens is None:
        raise ApiError(400, "'max_tokens' is required", "max_tokens", "missing_required_parameter")
    check_range("max_tokens", max_tokens, 1, MAX_TOKENS_LIMIT)
    temperature = number(body, "temperature", None)
    if temperature is not None:
        check_range("temperature", temperature, 0, 1)
    p = GenParams(max_tokens=max_tokens, temperature=temperature, top_p=number(body, "top_p", None),
                  top_k=opt(body, "top_k", (int,), "an integer"), min_p=None, repetition_penalty=None,
                  stop=stop_list(body.get("stop_sequences"), "stop_sequences", MAX_STOP_SEQUENCES))
    check(p.to_dict(), "", {"max_tokens": "max_tokens", "stop": "stop_sequences"})
    return p


def system(body: dict) -> list[dict]:
    s = body.get("system")
    s = None if s is None else texts(s, "system")  # checked whatever it is: 0 or {} is no system prompt either
    return [{"role": "system", "content": s}] if s else []


def parse_messages(body: dict) -> list[dict]:
    out = [n for i, m in enumerate(message_list(body)) for n in message(m, f"messages[{i}]")]
    if not any(m["role"] == "user" for m in out):
        raise ApiError(400, "'messages' must contain a user turn with text", "messages", "invalid_value")
    return out


def message(m: Any, where: str) -> list[dict]:
    """One Anthropic message as neutral messages."""
    role, c, w = message_role(m, where, ("user", "assistant")), m.get("content"), f"{where}.content"
    if isinstance(c, str):
        return [{"role": role, "content": text(c, w)}]
    return user_turn(blocks(c, w)) if role == "user" else [assistant_turn(blocks(c, w))]


def blocks(c: Any, where: str) -> list[tuple[dict, str]]:
    """A content list as (block, its field name) pairs."""
    if not isinstance(c, list):
        raise ApiError(400, f"'{where}' must be a string or a list of content blocks", where, "invalid_type")
    for j, b in enumerate(c):
        if not isinstance(b, dict) or not isinstance(b.get("type"), str):
            raise ApiError(400, f"'{where}[{j}]' must be a content block {{\"type\": ..., ...}}", f"{where}[{j}]",
                           "invalid_type")
    return [(b, f"{where}[{j}]") for j, b in enumerate(c)]


def user_turn(bs: list[tuple[dict, str]]) -> list[dict]:
    """A user turn, in order: each tool_result a "tool" message, each run of text blocks one user message."""
    out = []
    for is_text, run in itertools.groupby(bs, key=lambda bw: bw[0]["type"] == "text"):
        if is_text:
            out.append({"role": "user", "content": "\n\n".join(block_text(b, w) for b, w in run)})
        else:
            out += [tool_result(b, w) for b, w in run]
    return out


def assistant_turn(bs: list[tuple[dict, str]]) -> dict:
    """An assistant turn: its text blocks the content (pieces of one answer, joined as they are), its tool_use
    blocks the tool_calls; thinking blocks are dropped (no thinking here)."""
    parts, calls = [], []
    for b, w in bs:
        if b["type"] == "text":
            parts.append(block_text(b, w))
        elif b["type"] == "tool_use":
            calls.append(tool_call(b, w))
        elif b["type"] not in ("thinking", "redacted_thinking"):
            unsupported(b, w, "text and tool_use blocks")
    return {"role": "assistant", "content": "".join(parts), **({"tool_calls": calls} if calls else {})}


def texts(c: Any, where: str) -> str:
    """A string, or text blocks joined by blank lines (system, a tool result's content)."""
    if isinstance(c, str):
        return text(c, where)
    return "\n\n".join(block_text(b, w) for b, w in blocks(c, where))


def block_text(b: dict, where: str) -> str:
    if b["type"] != "text":
        unsupported(b, where, "text blocks")
    return text(string(b, "text", where), f"{where}.text")


def unsupported(b: dict, where: str, what: str) -> None:
    why = " (this model reads text only)" if b["type"] in ("image", "document") else ""
    raise ApiError(400, f"'{where}' is a {b['type']!r} block{why}; only {what} are supported here"[:300],
                   f"{where}.type", "unsupported_value")


def string(b: dict, name: str, where: str) -> str:
    """A block's required non-empty string field."""
    v = b.get(name)
    if not isinstance(v, str) or not v:
        raise ApiError(400, f"'{where}.{name}' must be a non-empty string", f"{where}.{name}",
                       "missing_required_parameter" if v is None else "invalid_value")
    return text(v, f"{where}.{name}")


def tool_result(b: dict, where: str) -> dict:
    """A tool_result block as a "tool" message; an error result says so in its text (the neutral form has no flag)."""
    if b["type"] != "tool_result":
        unsupported(b, where, "text and tool_result blocks")
    content = "" if b.get("content") is None else texts(b["content"], f"{where}.content")
    if flag(b, "is_error", f"{where}.is_error"):
        content = f"Error: {content}"
    return {"role": "tool", "tool_call_id": string(b, "tool_use_id", where), "content": content}


def tool_call(b: dict, where: str) -> dict:
    """A tool_use block as a neutral tool call (its input as JSON text)."""
    cid, name, args = string(b, "id", where), string(b, "name", where), b.get("input")
    if not isinstance(args, dict):
        raise ApiError(400, f"'{where}.input' must be an object", f"{where}.input", "invalid_type")
    try:
        arguments = json.dumps(args, ensure_ascii=False, allow_nan=False)
    except (ValueError, RecursionError):
        raise ApiError(400, f"'{where}.input' must be a JSON object of finite numbers, not nested too deep",
                       f"{where}.input", "invalid_value") from None
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": text(arguments, f"{where}.input")}}


def parse_tools(body: dict) -> list[dict] | None:
    """`tools` ([{name, description, input_schema}]) in the neutral form, each schema compiled as the node will."""
    ts = body.get("tools")
    if ts is None:
        return None
    if not isinstance(ts, list) or len(ts) > MAX_TOOLS:
        raise ApiError(400, f"'tools' must be a list of up to {MAX_TOOLS} tools", "tools", "invalid_type")
    out = [tool(t, f"tools[{i}]") for i, t in enumerate(ts)]
    unique_names(out, "tools")
    return out or None


def tool(t: Any, where: str) -> dict:
    if not isinstance(t, dict):
        raise ApiError(400, f"'{where}' must be an object {{name, description, input_schema}}", where, "invalid_type")
    if t.get("type") not in (None, "custom"):
        raise ApiError(400, f"'{where}.type' must be 'custom': server tools are not supported"[:300], f"{where}.type",
                       "unsupported_value")
    with named(f"{where}.input_schema", f"{where}.name", f"{where}.description"):
        return function_tool(t.get("name"), t.get("description"), t.get("input_schema"), where,
                             ("name", "description", "input_schema"))


def tool_choice(body: dict, tools: list[dict] | None) -> Any:
    """Anthropic's tool_choice as the neutral one, checked against the tools (openai.check_choice)."""
    c = opt(body, "tool_choice", (dict,), "an object like {\"type\": \"auto\"}")
    if c is None:
        return None
    opt(c, "disable_parallel_tool_use", (bool,), "true or false", where="tool_choice.disable_parallel_tool_use")
    kind = c.get("type")
    if kind == "tool":
        name = c.get("name")
        if not isinstance(name, str) or name not in {t["function"]["name"] for t in tools or []}:
            raise ApiError(400, "'tool_choice.name' must name one of 'tools'", "tool_choice.name", "invalid_value")
        choice = {"type": "function", "function": {"name": name}}
    elif isinstance(kind, str) and kind in CHOICES:
        choice = CHOICES[kind]
    else:
        raise ApiError(400, "'tool_choice.type' must be 'auto', 'any', 'tool' or 'none'", "tool_choice.type",
                       "invalid_value")
    if choice == "required" and not tools:
        raise ApiError(400, "'tool_choice' of type 'any' needs 'tools'", "tool_choice", "invalid_value")
    check_choice(tools, choice, "tool_choice")
    return choice


def output_format(body: dict) -> dict | None:
    """`output_config.format` ({"type": "json_schema", "schema"}) as the answer's grammar; `effort` is ignored."""
    oc = opt(body, "output_config", (dict,), "an object", {})
    fmt = opt(oc, "format", (dict,), "an object like {\"type\": \"json_schema\", \"schema\": {...}}", None,
              "output_config.format")
    if fmt is None:
        return None
    if fmt.get("type") != "json_schema":
        raise ApiError(400, "'output_config.format.type' must be 'json_schema'", "output_config.format.type",
                       "invalid_value")
    schema = fmt.get("schema")
    if not isinstance(schema, dict):
        raise ApiError(400, "'output_config.format.schema' must be a JSON schema object", "output_config.format.schema",
                       "invalid_type")
    spec = {"type": "json_schema", "schema": schema}
    with named("output_config.format.schema"):
        compile_grammar(spec, "output_config.format.schema")
    return spec


@contextlib.contextmanager
def named(field: str, *ours: str):
    """A schema's refusal naming `field`: grammar_spec names some by OpenAI's field (response_format.json_schema.
    schema, tools[0].function.parameters whatever the tool's index: see fields.compile_grammar)."""
    try:
        yield
    except ApiError as e:
        if e.param in (None, field, *ours):
            raise
        raise ApiError(e.status, e.message.replace(f"'{e.param}'", f"'{field}'", 1), field, e.code, e.headers) from None


# ---------------------------------------------------------------- handlers: parse -> start -> respond
async def create_message(request: web.Request) -> web.StreamResponse:
    router, owner, body = await http.body_of(request)
    check_model(body, router.model_names())
    req, stream = await asyncio.to_thread(message_request, body, request.headers)  # grammars compile off the loop
    base = {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant", "model": router.model}
    start = asyncio.ensure_future(chat.start(router, owner, req))  # a task: a stream pings while it runs
    try:
        return await (_stream(request, start, base) if stream else _whole(request, start, base))
    finally:
        await _release(start)


async def _whole(request: web.Request, start: asyncio.Future, base: dict) -> web.Response:
    reply = await start
    request[http.TURN] = reply.turn
    try:
        content = await fold(block_events(reply.parts()))
    except MlxMoeError as e:
        raise api_error(e) from None
    out = {**base, "content": content, **await ending(reply), "usage": usage(reply)}
    return web.json_response(noticed(out, reply), headers=reply.headers)


async def _stream(request: web.Request, start: asyncio.Future, base: dict) -> web.StreamResponse:
    """message_start, a ping, each block's start, deltas and stop, message_delta, message_stop; a ping whenever
    PING_EVERY seconds pass without an event; a failure once the stream is open, an `error` event."""
    resp, reply = await _started(request, start)
    if reply is None:
        return resp
    resp = resp or await sse.open_stream(request, reply.headers)
    request[http.TURN] = reply.turn
    start_msg = {**base, "content": [], "stop_reason": None, "stop_sequence": None,
                 "usage": {"input_tokens": reply.usage[0], "output_tokens": 0}}
    await _send(resp, {"type": "message_start", "message": start_msg})
    await _send(resp, PING)
    try:
        async with contextlib.aclosing(sse.paced(block_events(reply.parts()), PING_EVERY)) as events:
            async for ev in events:
                await _send(resp, ev or PING)
    except MlxMoeError as e:
        await _send(resp, error_body(api_error(e)))
        return resp
    end = {"type": "message_delta", "delta": await ending(reply), "usage": {"output_tokens": reply.usage[1]}}
    await _send(resp, noticed(end, reply))
    await _send(resp, {"type": "message_stop"})
    return resp


async def _started(request: web.Request, start: asyncio.Future) -> tuple[web.StreamResponse | None, chat.Reply | None]:
    """(the stream, if pings opened it, and the started reply). The start waits for the first token, so while a
    long prompt prefills the stream opens for pings, before the session (and its header) exists; a start that
    fails then is an `error` event (reply None); one that fails before, an HTTP error."""
    resp = None
    while not (await asyncio.wait({start}, timeout=PING_EVERY))[0]:
        resp = resp or await sse.open_stream(request, {})
        await _send(resp, PING)
    try:
        return resp, start.result()
    except MlxMoeError as e:
        if resp is None:
            raise
        await _send(resp, error_body(api_error(e)))
        return resp, None


async def _release(start: asyncio.Future) -> None:
    """A start still running is cancelled (chat.start lets its session go); a finished one's reply is closed."""
    start.cancel()
    await asyncio.wait({start})
    if not start.cancelled() and start.exception() is None:
        await start.result().close()


async def _send(resp: web.StreamResponse, event: dict) -> None:
    await sse.send(resp, event, event=event["type"])


async def count_tokens(request: web.Request) -> web.Response:
    """The prompt's tokens as /v1/messages would send them: the messages and tools through the chat template."""
    router, _, body = await http.body_of(request)
    check_model(body, router.model_names())
    req = await asyncio.to_thread(chat_request, body, request.headers, GenParams())
    check_messages_fit(req.messages, router.context_limit, req.where)
    messages, template_kwargs, _, _ = await asyncio.to_thread(chat._structured, router, req)
    return web.json_response({"input_tokens": len(await router.encode_chat(messages, **template_kwargs))})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/messages", create_message)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)


# ---------------------------------------------------------------- response shapes
async def block_events(parts: AsyncIterator[chat.Part]) -> AsyncIterator[dict]:
    """The answer's content blocks as stream events: a text block per run of text, a tool_use block per call
    (its input whole, in one input_json_delta)."""
    index, in_text = 0, False
    async for p in parts:
        if p.text and not in_text:
            yield {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}
            in_text = True
        if p.text:
            yield {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": p.text}}
        if p.call is None:
            continue
        if in_text:
            yield {"type": "content_block_stop", "index": index}
            index, in_text = index + 1, False
        block = tool_use(p.call)
        yield {"type": "content_block_start", "index": index, "content_block": {**block, "input": {}}}
        yield {"type": "content_block_delta", "index": index,
               "delta": {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}}
        yield {"type": "content_block_stop", "index": index}
        index += 1
    if in_text:
        yield {"type": "content_block_stop", "index": index}


async def fold(events: AsyncIterator[dict]) -> list[dict]:
    """The content blocks that block events build: the non-streamed Message is its stream, folded."""
    out, pieces = [], []
    async for ev in events:
        if ev["type"] == "content_block_start":
            out.append(dict(ev["content_block"]))
            pieces.append([])
        elif ev["type"] == "content_block_delta" and ev["delta"]["type"] == "text_delta":
            pieces[-1].append(ev["delta"]["text"])
        elif ev["type"] == "content_block_delta":
            out[-1]["input"] = json.loads(ev["delta"]["partial_json"])
    for b, p in zip(out, pieces):
        if b["type"] == "text":
            b["text"] = "".join(p)
    return out


def tool_use(call: dict) -> dict:
    """A neutral tool call as a tool_use block; arguments that are no JSON object (a call cut short by
    max_tokens) give the input {}."""
    try:
        args = json.loads(call["function"]["arguments"])
    except (ValueError, RecursionError):
        args = None
    return {"type": "tool_use", "id": "toolu_" + call["id"].removeprefix("call_"), "name": call["function"]["name"],
            "input": args if isinstance(args, dict) else {}}


async def ending(reply: chat.Reply) -> dict:
    """Why the (read) answer ended: a stop string is "stop_sequence" with the string (Reply.stop_sequence)."""
    matched = await reply.stop_sequence()
    return {"stop_reason": "stop_sequence" if matched else STOP_REASONS[reply.finish_reason],
            "stop_sequence": matched}


def usage(reply: chat.Reply) -> dict:
    n_prompt, n_generated = reply.usage
    return {"input_tokens": n_prompt, "output_tokens": n_generated}
