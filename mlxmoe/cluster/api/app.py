"""The router's HTTP app: the three dialects' routes (openai.py: /v1/chat/completions, /v1/completions,
/v1/models; anthropic.py: /v1/messages; ollama.py: /api/*), GET /status (JSON), GET / (status page),
GET /chat (the web chat page), GET /health (open, no secrets). Every request gets one access line
(cluster/accesslog.py); every refused request a 4xx in its dialect's error shape; every prompt is checked (ids,
length) before any work (SECURITY.md)."""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from mlxmoe.cluster import accesslog
from mlxmoe.cluster.api import anthropic, fields, ollama, openai, sse
from mlxmoe.cluster.api.http import LIMITS_KEY, ROUTER_KEY, TURN, HttpLimits, client_of
from mlxmoe.cluster.limits import GuardedSite
from mlxmoe.cluster.router import Router
from mlxmoe.errors import ApiError, api_error

log = logging.getLogger("mlxmoe.api")

PAGE_KEY = web.AppKey("page", object)  # render(status) -> HTML, passed in by the command (ui sits above cluster)
CHAT_PAGE_KEY = web.AppKey("chat_page", object)  # render() -> HTML of the web chat page, passed in like PAGE_KEY
# the dialect whose error shape a path's answers take (openai's for every other path)
DIALECTS = (("/v1/messages", anthropic), ("/api/", ollama))
QUIET_PATHS = ("/status", "/status/public", "/health", "/", "/chat", "/favicon.ico")  # polled: logged at debug level


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
        accesslog.emit(d, quiet=request.method == "GET" and request.path in QUIET_PATHS)


def dialect_of(path: str):
    return next((d for prefix, d in DIALECTS if path.startswith(prefix)), openai)


@web.middleware
async def errors_middleware(request: web.Request, handler):
    """Every error as its dialect shapes it: ApiError as it is, aiohttp's 404/405, a bug as a 500 (logged)."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        msg = {404: f"no route {request.method} {request.path}", 405: f"method {request.method} not allowed on "
               f"{request.path}"}.get(e.status, e.reason)
        err = ApiError(e.status, msg, None, "not_found" if e.status == 404 else None)
    except (ConnectionResetError, web.HTTPClientError):
        raise
    except Exception as e:
        if not isinstance(e, ApiError):
            log.exception("unhandled error in %s", request.path)
        err = api_error(e)
    return web.json_response(dialect_of(request.path).error_body(err), status=err.status, headers=err.headers)


def make_app(router: Router, page=None, limits: HttpLimits = HttpLimits(), chat_page=None) -> web.Application:
    """The router's HTTP app; `page(status) -> HTML` serves the status page at /,
    `chat_page() -> HTML` the web chat page at /chat."""
    app = web.Application(middlewares=[access_middleware, errors_middleware], client_max_size=fields.MAX_BODY)
    app[ROUTER_KEY], app[LIMITS_KEY] = router, limits
    for dialect in (openai, anthropic, ollama):
        dialect.add_routes(app)
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
