"""OpenAI-compatible HTTP API of the router (aiohttp).

POST /v1/chat/completions, POST /v1/completions (SSE streaming or not),
GET /v1/models, GET /status (JSON), GET / (status page).
Every refused request gets a 4xx in OpenAI's error shape:
{"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import html
import importlib
import json
import logging
import os
import time
from typing import Any

from aiohttp import web

from mlxmoe.errors import RpcError
from mlxmoe.cluster.mobility import MODES
from mlxmoe.cluster.router import Rejected, Router, Session, Turn

log = logging.getLogger("mlxmoe.api")
MAX_BODY = 8 << 20
MAX_TOKENS_DEFAULT = 512
MAX_TOKENS_LIMIT = 1 << 20
ROLES = {"system", "developer", "user", "assistant", "tool"}
ROUTER_KEY = web.AppKey("router", Router)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return web.json_response(body, status=self.status, headers=self.headers)


# ---------------------------------------------------------------- validation

def _opt(body: dict, name: str, kinds: tuple, what: str, default: Any = None) -> Any:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in kinds:
        raise ApiError(400, f"'{name}' must be {what}", name, "invalid_type")
    if not isinstance(v, kinds):
        raise ApiError(400, f"'{name}' must be {what}", name, "invalid_type")
    return v


def _range(name: str, v: float, lo: float, hi: float, lo_open: bool = False) -> None:
    if (v <= lo if lo_open else v < lo) or v > hi:
        raise ApiError(400, f"'{name}' must be {'>' if lo_open else '>='} {lo} and <= {hi}, got {v}", name,
                       "invalid_value")


def gen_params(body: dict) -> dict:
    mt = body.get("max_completion_tokens")
    name = "max_completion_tokens" if mt is not None else "max_tokens"
    max_tokens = _opt(body, name, (int,), "an integer", MAX_TOKENS_DEFAULT)
    _range(name, max_tokens, 1, MAX_TOKENS_LIMIT)
    temperature = float(_opt(body, "temperature", (int, float), "a number", 0.0))
    _range("temperature", temperature, 0.0, 2.0)
    top_p = float(_opt(body, "top_p", (int, float), "a number", 1.0))
    _range("top_p", top_p, 0.0, 1.0, lo_open=True)
    stop = _opt(body, "stop", (str, list), "a string or a list of strings", [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 4 or not all(isinstance(x, str) and x for x in stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 non-empty strings", "stop",
                       "invalid_value")
    seed = _opt(body, "seed", (int,), "an integer")
    n = _opt(body, "n", (int,), "an integer", 1)
    if n != 1:
        raise ApiError(400, "'n' must be 1 (one completion per request)", "n", "unsupported_value")
    for name in ("presence_penalty", "frequency_penalty"):
        _range(name, float(_opt(body, name, (int, float), "a number", 0.0)), -2.0, 2.0)
    return {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "stop": stop, "seed": seed}


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages",
                       "invalid_type" if "messages" in body else "missing_required_parameter")
    if len(msgs) > 10000:
        raise ApiError(400, "'messages' has more than 10000 entries", "messages", "invalid_value")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"'{where}' must be an object with 'role' and 'content'", where, "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(400, f"'{where}.role' must be one of {sorted(ROLES)}, got {role!r}"[:300],
                           f"{where}.role", "invalid_value")
        out.append({"role": role, "content": _content(m.get("content"), f"{where}.content", role)})
    if not any(m["role"] == "user" for m in out):
        raise ApiError(400, "'messages' must contain at least one message with role 'user'", "messages",
                       "invalid_value")
    return out


def _content(c: Any, where: str, role: str) -> str:
    if c is None and role == "assistant":
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        parts = []
        for j, p in enumerate(c):
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise ApiError(400, f"'{where}[{j}]' must be {{\"type\": \"text\", \"text\": string}} "
                                    "(only text content is supported)", f"{where}[{j}]", "invalid_value")
            parts.append(p["text"])
        return "".join(parts)
    raise ApiError(400, f"'{where}' must be a string or a list of text parts", where, "invalid_type")


def session_hint(request: web.Request, body: dict) -> str | None:
    for v, name in ((request.headers.get("X-Session-Id"), "X-Session-Id"), (body.get("session_id"), "session_id"),
                    (body.get("user"), "user")):
        if v is None or v == "":
            continue
        if not isinstance(v, str) or len(v) > 256:
            raise ApiError(400, f"'{name}' must be a string of at most 256 characters", name, "invalid_value")
        return v
    return None


EXTENSION_FIELDS = ("mode",)  # the "mlxmoe" object of a request body
MODE_HEADER = "X-Mlxmoe-Mode"


def requested_mode(request: web.Request, body: dict) -> str | None:
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
        if mode is not None and mode not in MODES:
            raise ApiError(400, f"'mlxmoe.mode' must be one of {', '.join(MODES)}, got {mode!r}"[:300], "mlxmoe.mode",
                           "invalid_value")
    h = request.headers.get(MODE_HEADER)
    if h is not None:
        h = h.strip().lower()
        if h not in MODES:
            raise ApiError(400, f"header '{MODE_HEADER}' must be one of {', '.join(MODES)}, got {h!r}"[:300],
                           MODE_HEADER, "invalid_value")
        if mode is not None and mode != h:
            raise ApiError(400, f"header '{MODE_HEADER}' ({h}) contradicts 'mlxmoe.mode' ({mode})", MODE_HEADER,
                           "invalid_value")
        mode = h
    return mode


async def read_json(request: web.Request) -> dict:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise ApiError(413, f"request body is {request.content_length} bytes; the limit is {MAX_BODY}", None,
                       "request_too_large")
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise ApiError(413, f"request body exceeds the {MAX_BODY}-byte limit", None, "request_too_large")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}"[:300], None, "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", None, "invalid_json")
    return body


# ---------------------------------------------------------------- handlers

def _id(prefix: str) -> str:
    return f"{prefix}-{os.urandom(12).hex()}"


def _usage(turn: Turn) -> dict:
    p, c = len(turn.prompt), len(turn.generated)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _chat_lp(f: dict) -> dict:
    return {"token": f["text"], "logprob": f["logprob"], "bytes": list(f["text"].encode()), "top_logprobs": []}


async def _open(router: Router, s: Session, prompt: list[int], params: dict) -> Turn:
    router.counters["requests"] += 1
    try:
        return await router.open_turn(s, prompt, params)
    except Rejected as e:
        if s.turns == 0 and s.peer is None:
            router.forget(s)
        raise ApiError(e.status, e.message, None, "overloaded" if e.status == 429 else "no_nodes",
                       headers={"Retry-After": str(int(round(e.retry_after)))})
    except RpcError as e:
        if s.turns == 0 and s.peer is None:
            router.forget(s)
        raise _rpc_api_error(e)


def _rpc_api_error(e: RpcError) -> ApiError:
    if e.code == "context_length_exceeded":
        return ApiError(400, e.message, "messages", e.code)
    if 400 <= e.status < 500:
        return ApiError(400, f"node {e.peer} refused the request: {e.message}", None, e.code)
    return ApiError(502, f"node {e.peer} failed: {e.message}", None, e.code)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    router: Router = request.app[ROUTER_KEY]
    body = await read_json(request)
    messages, params = parse_messages(body), gen_params(body)
    stream = bool(_opt(body, "stream", (bool,), "true or false", False))
    logprobs = bool(_opt(body, "logprobs", (bool,), "true or false", False))
    _range("top_logprobs", _opt(body, "top_logprobs", (int,), "an integer", 0), 0, 20)
    opts = _opt(body, "stream_options", (dict,), "an object", {})
    include_usage = bool(_opt(opts, "include_usage", (bool,), "true or false", False))
    hint, mode = session_hint(request, body), requested_mode(request, body)
    tokens = await router.encode_chat(messages)
    s = await router.session_for(tokens, hint, messages, mode)
    turn = await _open(router, s, tokens, params)
    base = {"id": _id("chatcmpl"), "created": int(time.time()), "model": router.model}
    if stream:
        return await _stream_chat(request, router, turn, messages, base, logprobs, include_usage)
    text, lps = [], []
    try:
        async for f in turn.events():
            text.append(f["text"])
            lps.append(_chat_lp(f))
    except RpcError as e:
        raise _rpc_api_error(e)
    reply = "".join(text)
    router.remember_turn(s, messages, reply)
    out = {**base, "object": "chat.completion",
           "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                        "logprobs": {"content": lps} if logprobs else None,
                        "finish_reason": turn.finish_reason or "length"}],
           "usage": _usage(turn)}
    return web.json_response(out, headers=router.headers(s))


async def _sse(resp: web.StreamResponse, obj: Any) -> None:
    await resp.write(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")


async def _stream_chat(request, router, turn, messages, base, logprobs, include_usage) -> web.StreamResponse:
    s = turn.s
    try:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           **router.headers(s)})
        await resp.prepare(request)
        chunk = {**base, "object": "chat.completion.chunk"}
        await _sse(resp, {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]})
        text = []
        try:
            async for f in turn.events():
                text.append(f["text"])
                await _sse(resp, {**chunk, "choices": [{"index": 0, "delta": {"content": f["text"]},
                                                        "logprobs": {"content": [_chat_lp(f)]} if logprobs else None,
                                                        "finish_reason": None}]})
        except RpcError as e:
            err = _rpc_api_error(e)
            await _sse(resp, {"error": {"message": err.message, "type": err.type, "param": None, "code": err.code}})
            return resp
        await _sse(resp, {**chunk, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                "finish_reason": turn.finish_reason or "length"}]})
        if include_usage:
            await _sse(resp, {**chunk, "choices": [], "usage": _usage(turn)})
        await _sse(resp, b"[DONE]")
        router.remember_turn(s, messages, "".join(text))
        return resp
    finally:
        await turn.close()


def parse_prompt(body: dict) -> str | list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 1 << 31 for t in p):
        return p
    raise ApiError(400, "'prompt' must be a string (or a list of one string, or a list of token ids)", "prompt",
                   "invalid_type" if "prompt" in body else "missing_required_parameter")


async def completions(request: web.Request) -> web.StreamResponse:
    router: Router = request.app[ROUTER_KEY]
    body = await read_json(request)
    prompt, params = parse_prompt(body), gen_params(body)
    stream = bool(_opt(body, "stream", (bool,), "true or false", False))
    n_lp = _opt(body, "logprobs", (int,), "an integer 0..5")
    if n_lp is not None:
        _range("logprobs", n_lp, 0, 5)
    if _opt(body, "echo", (bool,), "true or false", False):
        raise ApiError(400, "'echo' is not supported", "echo", "unsupported_value")
    if body.get("suffix") is not None:
        raise ApiError(400, "'suffix' is not supported", "suffix", "unsupported_value")
    opts = _opt(body, "stream_options", (dict,), "an object", {})
    include_usage = bool(_opt(opts, "include_usage", (bool,), "true or false", False))
    hint, mode = session_hint(request, body), requested_mode(request, body)
    tokens = prompt if isinstance(prompt, list) else await router.encode(prompt)
    if not tokens:
        raise ApiError(400, "'prompt' is empty", "prompt", "invalid_value")
    s = await router.session_for(tokens, hint, None, mode)
    turn = await _open(router, s, tokens, params)
    base = {"id": _id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": router.model}
    if stream:
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               **router.headers(s)})
            await resp.prepare(request)
            offset = 0
            try:
                async for f in turn.events():
                    lp = None
                    if n_lp is not None:
                        lp = {"tokens": [f["text"]], "token_logprobs": [f["logprob"]], "top_logprobs": None,
                              "text_offset": [offset]}
                    offset += len(f["text"])
                    await _sse(resp, {**base, "choices": [{"index": 0, "text": f["text"], "logprobs": lp,
                                                           "finish_reason": None}]})
            except RpcError as e:
                err = _rpc_api_error(e)
                await _sse(resp, {"error": {"message": err.message, "type": err.type, "param": None,
                                            "code": err.code}})
                return resp
            await _sse(resp, {**base, "choices": [{"index": 0, "text": "", "logprobs": None,
                                                   "finish_reason": turn.finish_reason or "length"}]})
            if include_usage:
                await _sse(resp, {**base, "choices": [], "usage": _usage(turn)})
            await _sse(resp, b"[DONE]")
            return resp
        finally:
            await turn.close()
    frames = []
    try:
        async for f in turn.events():
            frames.append(f)
    except RpcError as e:
        raise _rpc_api_error(e)
    text = "".join(f["text"] for f in frames)
    lp = None
    if n_lp is not None:
        offs, o = [], 0
        for f in frames:
            offs.append(o)
            o += len(f["text"])
        lp = {"tokens": [f["text"] for f in frames], "token_logprobs": [f["logprob"] for f in frames],
              "top_logprobs": None, "text_offset": offs}
    out = {**base, "choices": [{"index": 0, "text": text, "logprobs": lp,
                                "finish_reason": turn.finish_reason or "length"}], "usage": _usage(turn)}
    return web.json_response(out, headers=router.headers(s))


async def models(request: web.Request) -> web.Response:
    router: Router = request.app[ROUTER_KEY]
    return web.json_response({"object": "list", "data": [
        {"id": router.model, "object": "model", "created": int(router.started), "owned_by": "mlxmoe"}]})


async def status(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    await router.refresh_remote()
    return web.json_response(router.status())


async def status_page(request: web.Request) -> web.Response:
    router = request.app[ROUTER_KEY]
    await router.refresh_remote()
    st = router.status()
    try:
        render = importlib.import_module("mlxmoe.ui.status_page").render
    except (ImportError, AttributeError):
        render = minimal_page
    return web.Response(text=render(st), content_type="text/html")


def minimal_page(st: dict) -> str:
    e = html.escape
    rows = "".join(f"<tr><td>{e(str(p['name']))}</td><td>{e(str(p['url']))}</td><td>{e(str(p['groups']))}</td>"
                   f"<td>{e(p['state'])}</td><td>{e(str(p['reason'] or ''))}</td><td>{p['active_sessions']}</td></tr>"
                   for p in st["peers"])
    sess = "".join(f"<tr><td>{e(s['id'])}</td><td>{e(str(s['node']))}</td><td>{s['group']}</td>"
                   f"<td>{e(s['mode'])}</td><td>{s['expert_group']}</td><td>{len(s['migrations'])}</td>"
                   f"<td>{s['remote_calls']}</td><td>{s['margin']:.3f}</td><td>{s['turns']}</td><td>{s['tokens']}</td></tr>"
                   for s in st["sessions"])
    return (f"<!doctype html><title>mlxmoe</title><h1>{e(st['model'])}</h1>"
            f"<p>manifest {e(st['manifest_hash'])}, up {st['uptime_s']:.0f}s, {e(json.dumps(st['counters']))}</p>"
            f"<h2>Nodes</h2><table border=1><tr><th>name</th><th>url</th><th>groups</th><th>state</th>"
            f"<th>reason</th><th>sessions</th></tr>{rows}</table>"
            f"<h2>Sessions</h2><table border=1><tr><th>id</th><th>node</th><th>group</th><th>mode</th>"
            f"<th>expert group</th><th>migrations</th><th>remote calls</th><th>margin</th>"
            f"<th>turns</th><th>tokens</th></tr>{sess}</table>")


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


def make_app(router: Router) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=MAX_BODY + 1)
    app[ROUTER_KEY] = router
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/status", status)
    app.router.add_get("/", status_page)
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


async def start_router(router: Router, host: str = "127.0.0.1", port: int = 8000) -> RunningRouter:
    await router.start()
    runner = web.AppRunner(make_app(router), access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return RunningRouter(router, runner, host, runner.addresses[0][1])


async def serve_router(router: Router, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the router until SIGINT/SIGTERM."""
    from mlxmoe.cluster.worker import until_signalled

    running = await start_router(router, host, port)
    live = len(router.peers.live())
    print(f"mlxmoe router: {router.model} (manifest {router.manifest_hash[:12]}) on {running.url}/v1 "
          f"- status page {running.url}/ - {live} node(s) up so far", flush=True)
    await until_signalled()
    await running.stop()
