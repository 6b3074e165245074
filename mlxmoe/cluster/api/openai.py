"""The OpenAI dialect: POST /v1/chat/completions, POST /v1/completions (SSE streaming or not),
GET /v1/models[/{id}]. A body is parsed once into a ChatRequest or PromptRequest (chat.py) and the
options of its answer; the reply is written back as OpenAI's objects and chunks; errors as
{"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from mlxmoe.cluster.api import chat, http, sse
from mlxmoe.cluster.api import tools as tl
from mlxmoe.cluster.api.fields import (MAX_CHARS_PER_TOKEN, MAX_TOOLS, check_chars, check_messages_fit, check_model,
                                       check_range, check_tokens, compile_grammar, flag, function_tool, message_list,
                                       message_role, number, opt, requested_mode, requested_prefer, session_hint,
                                       stop_list, text, unique_names)
from mlxmoe.errors import ApiError, MlxMoeError, api_error
from mlxmoe.params import MAX_TOKENS_LIMIT, GenParams, check

__all__ = ["ApiError", "MAX_CHARS_PER_TOKEN", "check_chars", "check_messages_fit", "check_model", "check_tokens",
           "number", "text"]  # the field checks, as the OpenAI tests reach them

MAX_TOKENS_DEFAULT = 512
ROLES = {"system", "developer", "user", "assistant", "tool"}
TOP_LOGPROBS_LIMIT = 20


def error_body(e: ApiError, param: bool = True) -> dict:
    kind = "invalid_request_error" if e.status < 500 else "server_error"
    return {"error": {"message": e.message, "type": kind, "param": e.param if param else None, "code": e.code}}


# ---------------------------------------------------------------- the request
@dataclass(frozen=True)
class Answer:
    """How a request wants its answer written."""
    stream: bool = False
    logprobs: bool = False  # chat: per-token logprobs
    completion_logprobs: int | None = None  # completions: alternatives per token (None: no logprobs)
    include_usage: bool = False


def chat_request(body: dict, headers) -> tuple[chat.ChatRequest, Answer]:
    """A chat completions body, parsed once (grammars compile here: call it off the event loop)."""
    messages, params = parse_messages(body), gen_params(body)
    answer = Answer(flag(body, "stream"), chat_logprobs(body), None, include_usage(body))
    tools, choice = parse_tools(body)
    req = chat.ChatRequest(messages, params, tools, choice, parse_response_format(body), routing(headers, body))
    return req, answer


def prompt_request(body: dict, headers) -> tuple[chat.PromptRequest, Answer]:
    """A completions body, parsed once (off the event loop, as chat_request)."""
    prompt, params = parse_prompt(body), gen_params(body)
    params = params.edit(grammar=completion_grammar(body))
    answer = Answer(flag(body, "stream"), False, completion_logprobs(body), include_usage(body))
    return chat.PromptRequest(prompt, params, routing(headers, body)), answer


def routing(headers, body: dict) -> chat.Routing:
    return chat.Routing(session_hint(headers, body), requested_mode(headers, body), requested_prefer(body))


def include_usage(body: dict) -> bool:
    return flag(opt(body, "stream_options", (dict,), "an object", {}), "include_usage", "stream_options.include_usage")


def gen_params(body: dict) -> GenParams:
    """The generation parameters of a body; ranges are GenParams' own (mlxmoe/params.py check), named as
    OpenAI names them."""
    mt = body.get("max_completion_tokens")
    max_name = "max_completion_tokens" if mt is not None else "max_tokens"
    max_tokens = opt(body, max_name, (int,), "an integer", MAX_TOKENS_DEFAULT)
    check_range(max_name, max_tokens, 1, MAX_TOKENS_LIMIT)
    seed = opt(body, "seed", (int,), "an integer")
    if opt(body, "n", (int,), "an integer", 1) != 1:
        raise ApiError(400, "'n' must be 1 (one completion per request)", "n", "unsupported_value")
    if opt(body, "best_of", (int,), "an integer", 1) != 1:
        raise ApiError(400, "'best_of' must be 1 (one completion per request)", "best_of", "unsupported_value")
    top_k = opt(body, "top_k", (int,), "an integer")
    p = GenParams(max_tokens=max_tokens, temperature=number(body, "temperature", None), top_p=number(body, "top_p", None),
                  stop=stop_list(body.get("stop"), "stop", 4), seed=seed, top_k=top_k, min_p=number(body, "min_p", None),
                  repetition_penalty=number(body, "repetition_penalty", None),
                  presence_penalty=number(body, "presence_penalty", 0.0),
                  frequency_penalty=number(body, "frequency_penalty", 0.0),
                  logit_bias=logit_bias(body), top_logprobs=top_logprobs_count(body))
    check(p.to_dict(), "", {"max_tokens": max_name, "top_logprobs": "top_logprobs" if "messages" in body else "logprobs"})
    return p


def logit_bias(body: dict) -> dict[str, float]:
    """{"token id": bias} (GenParams checks the ids' form and the biases; the node, that ids are in its vocabulary)."""
    b = opt(body, "logit_bias", (dict,), "an object mapping token ids to numbers", {})
    check({"logit_bias": b}, "")
    return {str(int(k)): float(v) for k, v in b.items()}


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


def chat_logprobs(body: dict) -> bool:
    return flag(body, "logprobs")


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


def parse_messages(body: dict) -> list[dict]:
    out = []
    for i, m in enumerate(message_list(body)):
        where = f"messages[{i}]"
        role = message_role(m, where, ROLES)
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
        unique_names(ts or [], "tools")
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type", "function") != "function":
        raise ApiError(400, "'tool_choice.type' must be 'function'", "tool_choice.type", "invalid_value")
    opt(body, "parallel_tool_calls", (bool,), "true or false")  # accepted; under "required" one call is made
    check_choice(ts, choice, "tool_choice")
    return ts, choice


def check_choice(ts: list | None, choice: Any, where: str) -> None:
    """tool_choice against the tools; a forced choice among several compiles whole, as the node will get it."""
    try:
        forced = tl.tool_grammar(ts, choice)
    except MlxMoeError as e:
        raise ApiError(400, str(e)[:300], where, "invalid_value") from None
    if forced is not None and len(ts) > 1 and forced["choice"] == "required":
        compile_grammar(forced, None)  # each function's alone was checked


def _tool(t: Any, where: str) -> dict:
    if not isinstance(t, dict) or t.get("type", "function") != "function":
        raise ApiError(400, f"'{where}' must be {{\"type\": \"function\", \"function\": {{...}}}}", f"{where}.type",
                       "invalid_value")
    fn = t.get("function")
    if not isinstance(fn, dict):
        raise ApiError(400, f"'{where}.function' must be an object with a 'name'", f"{where}.function", "invalid_type")
    return function_tool(fn.get("name"), fn.get("description"), fn.get("parameters"), where,
                         ("function.name", "function.description", "function.parameters"))


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
        compile_grammar({"type": "json_schema", "schema": schema}, "response_format.json_schema.schema")
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


# ---------------------------------------------------------------- handlers: parse -> start -> respond
async def chat_completions(request: web.Request) -> web.StreamResponse:
    router, owner, body = await http.body_of(request)
    req, answer = await asyncio.to_thread(chat_request, body, request.headers)  # grammars compile off the loop
    check_model(body, router.model_names())
    reply = await chat.start(router, owner, req)
    request[http.TURN] = reply.turn
    base = {"id": new_id("chatcmpl"), "created": int(time.time()), "model": router.model}
    try:
        if answer.stream:
            return await _stream_chat(request, reply, base, answer)
        try:
            content, calls, frames = await reply.collect()
        except MlxMoeError as e:  # a node failed, or none is left to continue on
            raise api_error(e) from None
        out = chat_completion(base, content, [chat_lp(f) for f in frames] if answer.logprobs else None,
                              reply.finish_reason, usage(*reply.usage))
        if calls:
            out["choices"][0]["message"].update(content=content or None, tool_calls=calls)
        return web.json_response(noticed(out, reply), headers=reply.headers)
    finally:
        await reply.close()


async def _stream_chat(request: web.Request, reply: chat.Reply, base: dict, answer: Answer) -> web.StreamResponse:
    resp = await sse.open_stream(request, reply.headers)
    chunk = {**base, "object": "chat.completion.chunk"}
    await sse.send(resp, chat_chunk(chunk, {"role": "assistant", "content": ""}))
    try:
        async for p in reply.parts():
            lp = {"content": [chat_lp(p.frame)]} if answer.logprobs and p.frame is not None else None
            if p.call is not None:
                await sse.send(resp, chat_chunk(chunk, {"tool_calls": [p.call]}, lp))
            elif p.text or lp:
                await sse.send(resp, chat_chunk(chunk, {"content": p.text}, lp))
    except MlxMoeError as e:  # a node failed, or none is left to continue on
        await sse.send(resp, error_body(api_error(e), param=False))
        return resp
    await sse.send(resp, noticed(chat_chunk(chunk, {}, None, reply.finish_reason), reply))
    if answer.include_usage:
        await sse.send(resp, {**chunk, "choices": [], "usage": usage(*reply.usage)})
    await sse.done(resp)
    return resp


async def completions(request: web.Request) -> web.StreamResponse:
    router, owner, body = await http.body_of(request)
    req, answer = await asyncio.to_thread(prompt_request, body, request.headers)
    check_model(body, router.model_names())
    reply = await chat.start(router, owner, req)
    request[http.TURN] = reply.turn
    base = {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": router.model}
    try:
        if answer.stream:
            return await _stream_completion(request, reply, base, answer)
        try:
            content, _, frames = await reply.collect()
        except MlxMoeError as e:  # a node failed, or none is left to continue on
            raise api_error(e) from None
        lp = completion_lp(frames) if answer.completion_logprobs is not None else None
        out = {**base, "choices": [completion_choice(content, lp, reply.finish_reason)], "usage": usage(*reply.usage)}
        return web.json_response(noticed(out, reply), headers=reply.headers)
    finally:
        await reply.close()


async def _stream_completion(request: web.Request, reply: chat.Reply, base: dict, answer: Answer) -> web.StreamResponse:
    resp = await sse.open_stream(request, reply.headers)
    offset = 0
    try:
        async for p in reply.parts():
            lp = completion_lp([p.frame], offset) if answer.completion_logprobs is not None else None
            offset += len(p.text)
            await sse.send(resp, {**base, "choices": [completion_choice(p.text, lp, None)]})
    except MlxMoeError as e:  # a node failed, or none is left to continue on
        await sse.send(resp, error_body(api_error(e), param=False))
        return resp
    await sse.send(resp, noticed({**base, "choices": [completion_choice("", None, reply.finish_reason)]}, reply))
    if answer.include_usage:
        await sse.send(resp, {**base, "choices": [], "usage": usage(*reply.usage)})
    await sse.done(resp)
    return resp


def _model(router) -> dict:
    return {"id": router.model, "object": "model", "created": int(router.started), "owned_by": "mlxmoe"}


async def models(request: web.Request) -> web.Response:
    http.client_of(request)
    return web.json_response({"object": "list", "data": [_model(request.app[http.ROUTER_KEY])]})


async def model(request: web.Request) -> web.Response:
    http.client_of(request)
    router = request.app[http.ROUTER_KEY]
    check_model({"model": request.match_info["id"]}, router.model_names())
    return web.json_response(_model(router))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{id:.+}", model)


# ---------------------------------------------------------------- response shapes
def new_id(prefix: str) -> str:
    return f"{prefix}-{os.urandom(12).hex()}"


def usage(n_prompt: int, n_completion: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


def noticed(obj: dict, reply: chat.Reply) -> dict:
    """The answer (or its final chunk) with what the client should know of how it ran."""
    notice = reply.notice()
    return {**obj, "mlxmoe": notice} if notice else obj


def piece(f: dict) -> str:
    """A token frame's token as the vocabulary spells it (its `text` is what the stream added, which a
    held-back space or stop-string prefix moves between tokens)."""
    p = f.get("piece")
    return p if isinstance(p, str) else f["text"]


def top_list(f: dict) -> list[dict]:
    """A token frame's alternatives in the chat shape."""
    return [{"token": t["text"], "logprob": t["logprob"], "bytes": list(t["text"].encode())} for t in f.get("top") or []]


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
