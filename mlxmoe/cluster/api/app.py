"""The router's HTTP app: POST /v1/chat/completions, POST /v1/completions
(SSE streaming or not), GET /v1/models, GET /status (JSON), GET / (status
page). Every refused request gets a 4xx in OpenAI's error shape."""

from __future__ import annotations

import logging
import time

from aiohttp import web

from mlxmoe.cluster.api import openai as oa
from mlxmoe.cluster.api import sse
from mlxmoe.cluster.api.openai import ApiError
from mlxmoe.cluster.router import Rejected, Router, Session, Turn
from mlxmoe.errors import RpcError

log = logging.getLogger("mlxmoe.api")
ROUTER_KEY = web.AppKey("router", Router)
PAGE_KEY = web.AppKey("page", object)  # render(status) -> HTML, passed in by the command (ui sits above cluster)


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
    body = await oa.read_json(request)
    messages, params = oa.parse_messages(body), oa.gen_params(body)
    stream = oa.flag(body, "stream")
    logprobs = oa.chat_logprobs(body)
    include_usage = oa.include_usage(body)
    hint, mode = oa.session_hint(request.headers, body), oa.requested_mode(request.headers, body)
    tokens = await router.encode_chat(messages)
    s = await router.session_for(tokens, hint, messages, mode)
    turn = await _open(router, s, tokens, params)
    base = {"id": oa.new_id("chatcmpl"), "created": int(time.time()), "model": router.model}
    if stream:
        return await _stream_chat(request, router, turn, messages, base, logprobs, include_usage)
    text, lps = [], []
    try:
        async for f in turn.events():
            text.append(f["text"])
            lps.append(oa.chat_lp(f))
    except RpcError as e:
        raise oa.rpc_api_error(e)
    reply = "".join(text)
    router.remember_turn(s, messages, reply)
    out = oa.chat_completion(base, reply, lps if logprobs else None, turn.finish_reason or "length", _usage(turn))
    return web.json_response(out, headers=router.headers(s))


async def _stream_chat(request, router, turn, messages, base, logprobs, include_usage) -> web.StreamResponse:
    s = turn.s
    try:
        resp = await sse.open_stream(request, router.headers(s))
        chunk = {**base, "object": "chat.completion.chunk"}
        await sse.send(resp, oa.chat_chunk(chunk, {"role": "assistant", "content": ""}))
        text = []
        try:
            async for f in turn.events():
                text.append(f["text"])
                await sse.send(resp, oa.chat_chunk(chunk, {"content": f["text"]},
                                                   {"content": [oa.chat_lp(f)]} if logprobs else None))
        except RpcError as e:
            await _send_error(resp, e)
            return resp
        await sse.send(resp, oa.chat_chunk(chunk, {}, None, turn.finish_reason or "length"))
        if include_usage:
            await sse.send(resp, {**chunk, "choices": [], "usage": _usage(turn)})
        await sse.done(resp)
        router.remember_turn(s, messages, "".join(text))
        return resp
    finally:
        await turn.close()


async def completions(request: web.Request) -> web.StreamResponse:
    router: Router = request.app[ROUTER_KEY]
    body = await oa.read_json(request)
    prompt, params = oa.parse_prompt(body), oa.gen_params(body)
    stream = oa.flag(body, "stream")
    n_lp = oa.completion_logprobs(body)
    include_usage = oa.include_usage(body)
    hint, mode = oa.session_hint(request.headers, body), oa.requested_mode(request.headers, body)
    tokens = prompt if isinstance(prompt, list) else await router.encode(prompt)
    if not tokens:
        raise ApiError(400, "'prompt' is empty", "prompt", "invalid_value")
    s = await router.session_for(tokens, hint, None, mode)
    turn = await _open(router, s, tokens, params)
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
    return web.json_response(out, headers=router.headers(s))


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
        await sse.send(resp, {**base, "choices": [oa.completion_choice("", None, turn.finish_reason or "length")]})
        if include_usage:
            await sse.send(resp, {**base, "choices": [], "usage": _usage(turn)})
        await sse.done(resp)
        return resp
    finally:
        await turn.close()


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
    return web.Response(text=request.app[PAGE_KEY](router.status()), content_type="text/html")


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


def make_app(router: Router, page=None) -> web.Application:
    """The router's HTTP app; `page(status) -> HTML` serves the status page at /."""
    app = web.Application(middlewares=[errors_middleware], client_max_size=oa.MAX_BODY + 1)
    app[ROUTER_KEY] = router
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/status", status)
    if page is not None:
        app[PAGE_KEY] = page
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


async def start_router(router: Router, host: str = "127.0.0.1", port: int = 8000, page=None) -> RunningRouter:
    await router.start()
    runner = web.AppRunner(make_app(router, page), access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return RunningRouter(router, runner, host, runner.addresses[0][1])


async def serve_router(router: Router, host: str = "127.0.0.1", port: int = 8000, page=None) -> None:
    """Run the router until SIGINT/SIGTERM."""
    from mlxmoe.cluster.worker import until_signalled

    running = await start_router(router, host, port, page)
    live = len(router.peers.live())
    print(f"mlxmoe router: {router.model} (manifest {router.manifest_hash[:12]}) on {running.url}/v1 "
          f"- status page {running.url}/ - {live} node(s) up so far", flush=True)
    await until_signalled()
    await running.stop()
