"""The router's HTTP app: POST /v1/chat/completions, POST /v1/completions
(SSE streaming or not), GET /v1/models[/{id}], GET /status (JSON), GET /
(status page), GET /chat (the web chat page), GET /health (open, no secrets).
Every request gets one access line (access.py). Every refused request gets a 4xx in OpenAI's error shape,
and every prompt is checked (ids, length) before any work (SECURITY.md)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass

from aiohttp import web

from mlxmoe.cluster.api import access
from mlxmoe.cluster.api import openai as oa
from mlxmoe.cluster.api import sse
from mlxmoe.cluster.api import tools as tl
from mlxmoe.cluster.api.openai import ApiError
from mlxmoe.cluster.limits import GuardedSite, Limits
from mlxmoe.cluster.router import Rejected, Router, Session, Turn
from mlxmoe.errors import MlxMoeError, RpcError, classify

log = logging.getLogger("mlxmoe.api")


@dataclass(frozen=True)
class HttpLimits:
    """The router's HTTP limits (aiohttp's own knobs; SECURITY.md)."""
    idle_timeout: float = 15.0  # aiohttp's keepalive_timeout: an idle keep-alive connection is closed
    body_timeout: float = 30.0  # a whole body, once the headers are in
    connections: Limits = Limits()  # counted from accept, per address and in all (cluster/limits.py)
    max_line_size: int = 8190
    max_field_size: int = 8190
    max_headers: int = 64


ROUTER_KEY = web.AppKey("router", Router)
PAGE_KEY = web.AppKey("page", object)  # render(status) -> HTML, passed in by the command (ui sits above cluster)
LIMITS_KEY = web.AppKey("limits", HttpLimits)
CHAT_PAGE_KEY = web.AppKey("chat_page", object)  # render() -> HTML of the web chat page, passed in like PAGE_KEY
TURN = web.RequestKey("mlxmoe_turn", object)  # request key: the request's Turn, for its access line


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def client_of(request: web.Request) -> str:
    """The client's identity: its API key's hash ("" when the router has no
    keys); a missing or wrong key is 401, before the body is read."""
    keys = request.app[ROUTER_KEY].api_keys
    if not keys:
        return ""
    auth = request.headers.get("Authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    match = None
    for k in keys:  # every key compared, in constant time
        if hmac.compare_digest(given.encode(), k.encode()) and given:
            match = k
    if match is not None:
        return key_hash(match)
    raise ApiError(401, "a valid API key is required: send 'Authorization: Bearer KEY'", None, "invalid_api_key",
                   headers={"WWW-Authenticate": "Bearer"})


async def _body(request: web.Request) -> tuple[str, dict]:
    owner = client_of(request)  # before reading the body
    body = await oa.read_json(request, request.app[LIMITS_KEY].body_timeout)
    return owner, body


async def _session(router: Router, tokens: list[int], where: str, hint, messages, mode, owner: str,
                   prefer: str | None = None) -> Session:
    oa.check_tokens(tokens, router.vocab_size, router.context_limit, where)
    try:
        return await router.session_for(tokens, hint, messages, mode, owner=owner, prefer=prefer)
    except MlxMoeError as e:
        status, code = classify(e)
        raise ApiError(status if status < 500 else 400, str(e)[:300], where, code) from None


def _usage(turn: Turn) -> dict:
    return oa.usage(len(turn.prompt), len(turn.generated))


async def _open(router: Router, s: Session, prompt: list[int], params: dict) -> Turn:
    try:
        return await router.open_turn(s, prompt, params)
    except Rejected as e:
        raise ApiError(e.status, e.message, None, "overloaded" if e.status == 429 else "no_nodes",
                       headers={"Retry-After": str(int(round(e.retry_after)))})
    except RpcError as e:
        raise oa.rpc_api_error(e)


async def _send_error(resp: web.StreamResponse, e: RpcError) -> None:
    await sse.send(resp, oa.rpc_api_error(e).body(param=False))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    router: Router = request.app[ROUTER_KEY]
    owner, body = await _body(request)
    messages, params = oa.parse_messages(body), oa.gen_params(body)
    oa.check_logit_bias(params, router.vocab_size)
    oa.check_model(body, router.model_names())
    stream = oa.flag(body, "stream")
    logprobs = oa.chat_logprobs(body)
    include_usage = oa.include_usage(body)
    hint, mode = oa.session_hint(request.headers, body), oa.requested_mode(request.headers, body)
    oa.check_messages_fit(messages, router.context_limit)
    st = await asyncio.to_thread(_structured, router, body, messages)  # grammars compile off the event loop
    params = {**params, "grammar": st.grammar} if st.grammar else params
    tokens = await router.encode_chat(st.messages, **st.template_kwargs)  # once: the same ids are scored and sent
    s = await _session(router, tokens, "messages", hint, messages, mode, owner, oa.requested_prefer(body))
    turn = await _open(router, s, tokens, params)
    request[TURN] = turn
    base = {"id": oa.new_id("chatcmpl"), "created": int(time.time()), "model": router.model}
    if stream:
        return await _stream_chat(request, router, turn, messages, base, logprobs, include_usage, st.parse)
    text, lps = [], []
    try:
        async for f in turn.events():
            text.append(f["text"])
            lps.append(oa.chat_lp(f))
    except RpcError as e:
        raise oa.rpc_api_error(e)
    reply, calls = "".join(text), []
    if st.parse:
        reply, calls = tl.parse_tool_calls(reply)
    router.remember_turn(s, messages, reply)
    out = oa.chat_completion(base, reply, lps if logprobs else None, _finish(turn, bool(calls)), _usage(turn))
    if calls:
        out["choices"][0]["message"].update(content=reply or None, tool_calls=calls)
    return web.json_response(_noticed(out, turn), headers=router.headers(s))


# ---------------------------------------------------------------- tools and structured output

@dataclass(frozen=True)
class Structured:
    """What tools / response_format make of a chat request (api/tools.py)."""
    messages: list  # as the chat template gets them
    template_kwargs: dict  # `tools=` for templates that render tools
    grammar: dict | None  # GenParams.grammar: the tool grammar under required/named, else response_format's
    parse: bool  # the answer may hold tool calls: parse them into tool_calls


def _structured(router: Router, body: dict, messages: list[dict]) -> Structured:
    ts, choice = oa.parse_tools(body)
    rf = oa.parse_response_format(body)
    template = getattr(getattr(router.frontend, "tokenizer", None), "chat_template", None)
    msgs, kw = tl.render(messages, ts, choice, tl.template_supports_tools(template))
    n_chars = sum(len(m.get("content") or "") + len(json.dumps(m.get("tool_calls") or "")) for m in msgs)
    oa.check_chars(n_chars + len(json.dumps(kw)), router.context_limit, "messages")  # before the template runs
    grammar = (tl.tool_grammar(ts, choice) if ts else None) or rf  # a forced call wins over response_format
    return Structured(msgs, kw, grammar, bool(ts) and tl.check_tool_choice(ts, choice) != "none")


def _finish(turn: Turn, calls: bool) -> str:
    """OpenAI's finish_reason: "tool_calls" when the answer ended (not cut off) with calls."""
    reason = turn.finish_reason or "length"
    return "tool_calls" if calls and reason == "stop" else reason


def _noticed(obj: dict, turn: Turn) -> dict:
    """The answer (or its final chunk) with what the client should know of how it ran (Turn.notice)."""
    notice = turn.notice()
    return {**obj, "mlxmoe": notice} if notice else obj


def _tool_deltas(events: list[dict]) -> list[dict]:
    """ToolCallParser events as chat chunk deltas (a call whole in one delta, as mlx-lm's server sends it)."""
    return [{"content": e["content"]} if "content" in e else {"tool_calls": [e["tool_call"]]} for e in events]


async def _stream_chat(request, router, turn, messages, base, logprobs, include_usage,
                       parse: bool = False) -> web.StreamResponse:
    s = turn.s
    try:
        resp = await sse.open_stream(request, router.headers(s))
        chunk = {**base, "object": "chat.completion.chunk"}
        await sse.send(resp, oa.chat_chunk(chunk, {"role": "assistant", "content": ""}))
        text, parser, calls = [], tl.ToolCallParser() if parse else None, 0
        try:
            async for f in turn.events():
                text.append(f["text"])
                lp = {"content": [oa.chat_lp(f)]} if logprobs else None
                if parser is None:
                    await sse.send(resp, oa.chat_chunk(chunk, {"content": f["text"]}, lp))
                    continue
                deltas = _tool_deltas(parser.feed(f["text"])) or ([{"content": ""}] if lp else [])
                for i, d in enumerate(deltas):  # the token's logprob once, with its first delta
                    calls += "tool_calls" in d
                    await sse.send(resp, oa.chat_chunk(chunk, d, lp if i == 0 else None))
        except RpcError as e:
            await _send_error(resp, e)
            return resp
        for d in _tool_deltas(parser.finish() if parser else []):
            calls += "tool_calls" in d
            await sse.send(resp, oa.chat_chunk(chunk, d))
        await sse.send(resp, _noticed(oa.chat_chunk(chunk, {}, None, _finish(turn, calls > 0)), turn))
        if include_usage:
            await sse.send(resp, {**chunk, "choices": [], "usage": _usage(turn)})
        await sse.done(resp)
        router.remember_turn(s, messages, tl.parse_tool_calls("".join(text))[0] if parse else "".join(text))
        return resp
    finally:
        await turn.close()


async def completions(request: web.Request) -> web.StreamResponse:
    router: Router = request.app[ROUTER_KEY]
    owner, body = await _body(request)
    prompt, params = oa.parse_prompt(body), oa.gen_params(body)
    oa.check_logit_bias(params, router.vocab_size)
    oa.check_model(body, router.model_names())
    grammar = await asyncio.to_thread(oa.completion_grammar, body)
    params = {**params, "grammar": grammar} if grammar else params
    stream = oa.flag(body, "stream")
    n_lp = oa.completion_logprobs(body)
    include_usage = oa.include_usage(body)
    hint, mode = oa.session_hint(request.headers, body), oa.requested_mode(request.headers, body)
    if isinstance(prompt, str):
        oa.check_chars(len(prompt), router.context_limit, "prompt")
    tokens = prompt if isinstance(prompt, list) else await router.encode(prompt)
    if not tokens:
        raise ApiError(400, "'prompt' is empty", "prompt", "invalid_value")
    s = await _session(router, tokens, "prompt", hint, None, mode, owner, oa.requested_prefer(body))
    turn = await _open(router, s, tokens, params)
    request[TURN] = turn
    base = {"id": oa.new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": router.model}
    if stream:
        return await _stream_completion(request, router, turn, base, n_lp, include_usage)
    frames = []
    try:
        async for f in turn.events():
            frames.append(f)
    except RpcError as e:
        raise oa.rpc_api_error(e)
    text = "".join(f["text"] for f in frames)
    lp = oa.completion_lp(frames) if n_lp is not None else None
    out = {**base, "choices": [oa.completion_choice(text, lp, turn.finish_reason or "length")],
           "usage": _usage(turn)}
    return web.json_response(_noticed(out, turn), headers=router.headers(s))


async def _stream_completion(request, router, turn, base, n_lp, include_usage) -> web.StreamResponse:
    try:
        resp = await sse.open_stream(request, router.headers(turn.s))
        offset = 0
        try:
            async for f in turn.events():
                lp = oa.completion_lp([f], offset) if n_lp is not None else None
                offset += len(f["text"])
                await sse.send(resp, {**base, "choices": [oa.completion_choice(f["text"], lp, None)]})
        except RpcError as e:
            await _send_error(resp, e)
            return resp
        await sse.send(resp, _noticed({**base, "choices": [oa.completion_choice("", None, turn.finish_reason or "length")]},
                                      turn))
        if include_usage:
            await sse.send(resp, {**base, "choices": [], "usage": _usage(turn)})
        await sse.done(resp)
        return resp
    finally:
        await turn.close()


def _model(router: Router) -> dict:
    return {"id": router.model, "object": "model", "created": int(router.started), "owned_by": "mlxmoe"}


async def models(request: web.Request) -> web.Response:
    client_of(request)
    return web.json_response({"object": "list", "data": [_model(request.app[ROUTER_KEY])]})


async def model(request: web.Request) -> web.Response:
    client_of(request)
    router = request.app[ROUTER_KEY]
    oa.check_model({"model": request.match_info["id"]}, router.model_names())
    return web.json_response(_model(router))


async def status(request: web.Request) -> web.Response:
    owner = client_of(request)
    router = request.app[ROUTER_KEY]
    await router.refresh_remote()
    return web.json_response(router.status(owner if router.api_keys else None))


async def public_status(request: web.Request) -> web.Response:
    """/status as anyone may see it (what the status page shows: session refs,
    never ids or keys), for the page's refresh, the menu bar and doctor on a
    router that asks for an API key."""
    router = request.app[ROUTER_KEY]
    await router.refresh_remote()
    return web.json_response(router.status(None))


async def status_page(request: web.Request) -> web.Response:
    """Open to anyone: it shows no session ids (their short hashes only) and no keys."""
    router = request.app[ROUTER_KEY]
    await router.refresh_remote()
    return web.Response(text=request.app[PAGE_KEY](router.status(None)), content_type="text/html")


async def health(request: web.Request) -> web.Response:
    """Open to anyone (load balancers, scripts): counts only, no ids, no keys.
    200 while at least one node is up, else 503, in the same shape."""
    router = request.app[ROUTER_KEY]
    why = sorted({p.reason for p in router.peers.peers.values() if p.state != "up" and p.reason})
    body = health_body(router.model, len(router.peers.live()), len(router.peers.peers), len(router.sessions),
                       time.time() - router.started, why)
    return web.json_response(body, status=200 if body["nodes_up"] else 503)


def health_body(model: str, up: int, known: int, sessions: int, uptime_s: float, why: list[str] = ()) -> dict:
    """`why`: the distinct reasons nodes are not up, said when none is."""
    body = {"status": "ok" if up else "unavailable", "nodes_up": up, "nodes_known": known, "model": model,
            "sessions": sessions, "uptime_s": round(uptime_s, 1)}
    if not up:
        body["why"] = list(why) or ["no node found yet"]
    return body


async def web_chat(request: web.Request) -> web.Response:
    """The web chat page: static HTML; it calls /v1 with the user's own key, if any."""
    return web.Response(text=request.app[CHAT_PAGE_KEY](), content_type="text/html")


async def no_favicon(request: web.Request) -> web.Response:
    """Browsers ask for /favicon.ico (the status page has no icon; the chat page has one inline): 204, not 404."""
    return web.Response(status=204)


@web.middleware
async def access_middleware(request: web.Request, handler):
    """One access line per request, when it is over (for a stream: when the stream ends)."""
    t0, status = time.perf_counter(), 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as e:
        status = e.status
        raise
    except ConnectionResetError:  # the client went away mid-answer: its turn is closed (turn.close), no 5xx
        status = 499
        return request.get(sse.STREAM) or web.Response(status=499)
    except asyncio.CancelledError:
        status = 499
        raise
    finally:
        d = {"method": request.method, "path": request.path, "status": status}
        turn = request.get(TURN)
        if turn is not None:
            d.update(turn.stats())
        d["ms"] = round((time.perf_counter() - t0) * 1000, 1)
        access.emit(d, quiet=request.method == "GET" and request.path in access.QUIET_PATHS)


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except ApiError as e:
        return e.response()
    except web.HTTPException as e:
        if e.status < 400:
            raise
        msg = {404: f"no route {request.method} {request.path}", 405: f"method {request.method} not allowed on "
               f"{request.path}"}.get(e.status, e.reason)
        return ApiError(e.status, msg, None, "not_found" if e.status == 404 else None).response()
    except (ConnectionResetError, web.HTTPClientError):
        raise
    except Exception as e:  # a bug: still answer in the API's shape, and log it
        log.exception("unhandled error in %s", request.path)
        return ApiError(500, f"internal error: {type(e).__name__}: {e}"[:300]).response()


def make_app(router: Router, page=None, limits: HttpLimits = HttpLimits(), chat_page=None) -> web.Application:
    """The router's HTTP app; `page(status) -> HTML` serves the status page at /,
    `chat_page() -> HTML` the web chat page at /chat."""
    app = web.Application(middlewares=[access_middleware, errors_middleware], client_max_size=oa.MAX_BODY)
    app[ROUTER_KEY], app[LIMITS_KEY] = router, limits
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{id:.+}", model)
    app.router.add_get("/status", status)
    app.router.add_get("/status/public", public_status)
    app.router.add_get("/health", health)
    if page is not None:
        app[PAGE_KEY] = page
        app.router.add_get("/", status_page)
    if chat_page is not None:
        app[CHAT_PAGE_KEY] = chat_page
        app.router.add_get("/chat", web_chat)
    app.router.add_get("/favicon.ico", no_favicon)
    return app


class RunningRouter:
    def __init__(self, router: Router, runner: web.AppRunner, host: str, port: int):
        self.router, self.runner, self.host, self.port = router, runner, host, port

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()
        await self.router.stop()


async def start_router(router: Router, host: str = "127.0.0.1", port: int = 8000, page=None,
                       limits: HttpLimits = HttpLimits(), chat_page=None) -> RunningRouter:
    await router.start()
    runner = web.AppRunner(make_app(router, page, limits, chat_page), access_log=None, handle_signals=False,
                           shutdown_timeout=2.0, keepalive_timeout=limits.idle_timeout,
                           max_line_size=limits.max_line_size, max_field_size=limits.max_field_size,
                           max_headers=limits.max_headers)
    try:
        await runner.setup()
        await GuardedSite(runner, host, port, limits=limits.connections, name="router").start()
    except BaseException:  # e.g. the port is taken: close the router's client session and thread too
        await runner.cleanup()
        await router.stop()
        raise
    return RunningRouter(router, runner, host, runner.addresses[0][1])


async def serve_router(router: Router, host: str = "127.0.0.1", port: int = 8000, page=None,
                       limits: HttpLimits = HttpLimits(), chat_page=None) -> None:
    """Run the router until SIGINT/SIGTERM."""
    from mlxmoe.cluster.worker import until_signalled

    running = await start_router(router, host, port, page, limits, chat_page)
    live = len(router.peers.live())
    chat = f" - web chat {running.url}/chat" if chat_page is not None else ""
    print(f"mlxmoe router: {router.model} (manifest {router.manifest_hash[:12]}) on {running.url}/v1 "
          f"- status page {running.url}/{chat} - {live} node(s) up so far", flush=True)
    await until_signalled()
    await running.stop()
