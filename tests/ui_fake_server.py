"""A tiny stand-in for the mlxmoe router, for UI tests and manual poking.

It speaks the router's public API: `/v1/models`, `/v1/chat/completions`
(SSE streaming or not, with the X-MLXMoE-* headers, canned tokens), `/status`
(by default what a real Router over FakeEngine nodes reports: sample_status)
and `/` (the real status page). With `mlxmoe_headers=False` and `has_status=False` it
looks like any plain OpenAI-compatible server (LM Studio, Ollama, ...).

    with FakeRouter() as srv:        # serves on 127.0.0.1:<free port>
        srv.url                      # "http://127.0.0.1:54321"
        srv.requests                 # JSON bodies + X-Session-Id received

Run `python tests/ui_fake_server.py [port]` to try `mlxmoe chat` by hand.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time
import urllib.request

from aiohttp import web

MODEL = "fake-moe-235b"
HASH = "abc123def4567890"


SCORES = {0: 0.21, 1: 0.64, 2: 0.15}  # the placement front end's scores: group 1 wins by 0.43
_STATUS: dict[int, dict] = {}


def sample_status(n_peers: int = 3) -> dict:
    """A real router's /status (mlxmoe.cluster.router.Router over node servers
    with FakeEngines, on loopback): peers mac-0.. serving group i with
    (40 + i) GiB free, and one chat pinned to mac-1 (group 1) after two turns.
    Built once per n_peers; each call gets its own copy to edit."""
    if n_peers not in _STATUS:
        _STATUS[n_peers] = _router_status(n_peers)
    return copy.deepcopy(_STATUS[n_peers])


def _router_status(n_peers: int) -> dict:
    from fakes import FakeEngine, FakeFrontend, LocalCluster

    engines = [FakeEngine(group=i, model_id=MODEL, manifest_hash=HASH, free_kv=(40 + i) * 2**30)
               for i in range(n_peers)]
    frontend = FakeFrontend(n_groups=3, model_id=MODEL, manifest_hash=HASH, fixed=SCORES)
    with LocalCluster(engines, frontend, names=[f"mac-{i}" for i in range(n_peers)]) as c:
        msgs = [{"role": "user", "content": "hello"}]
        for turn in range(2):
            reply = _post(c.api_url + "/v1/chat/completions", {"model": MODEL, "messages": msgs, "max_tokens": 4},
                          {"X-Session-Id": "ui-sample"})
            msgs += [reply["choices"][0]["message"], {"role": "user", "content": "and then?"}]
        c.run(c.router.fleet.probe_all())  # peers' load as the nodes report it, not the router's guess
        with urllib.request.urlopen(c.api_url + "/status", timeout=10) as r:
            return json.load(r)


def _post(url: str, body: dict, headers: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json", **headers})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


class FakeRouter:
    def __init__(self, tokens=("Hello", ",", " world", "!"), *, mlxmoe_headers: bool = True,
                 has_status: bool = True, status: dict | None = None, token_delay: float = 0.01,
                 fail_status: int | None = None, index_status: dict | None = None,
                 completion_tokens: int | None = None, drop_after: int | None = None, port: int = 0):
        self.tokens = list(tokens)
        self.mlxmoe_headers, self.has_status = mlxmoe_headers, has_status
        self.status = status if status is not None else sample_status()
        self.completion_tokens = completion_tokens or len(self.tokens)  # what `usage` reports
        self.drop_after = drop_after  # cut the connection after this many tokens
        self.index_status = index_status  # what `/` embeds, when it should differ from /status
        self.token_delay, self.fail_status, self.port = token_delay, fail_status, port
        self.requests: list[dict] = []
        self.status_fetches = 0
        self._loop = None
        self._error: BaseException | None = None
        self._ready = threading.Event()

    # --- handlers -------------------------------------------------------
    async def models(self, request):
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "mlxmoe"}]})

    async def get_status(self, request):
        if not self.has_status:
            raise web.HTTPNotFound()
        self.status_fetches += 1
        return web.json_response(self.status)

    async def index(self, request):
        if not self.has_status:
            raise web.HTTPNotFound()
        from mlxmoe.ui.status_page import render
        return web.Response(text=render(self.index_status or self.status), content_type="text/html")

    def _headers(self, sid: str) -> dict:
        if not self.mlxmoe_headers:
            return {}
        return {"X-MLXMoE-Session": sid, "X-MLXMoE-Node": "mac-1", "X-MLXMoE-Group": "1",
                "X-MLXMoE-Margin": "0.43", "X-MLXMoE-Scores": json.dumps({"0": 0.21, "1": 0.64, "2": 0.15})}

    async def chat(self, request):
        body = await request.json()
        sid = request.headers.get("X-Session-Id") or "srv-assigned"
        self.requests.append({"body": body, "session": request.headers.get("X-Session-Id")})
        if self.fail_status:
            return web.json_response({"error": {"message": "no memory for another session", "type": "overloaded"}},
                                     status=self.fail_status, headers={"Retry-After": "2"})
        created, cid = int(time.time()), "chatcmpl-fake"
        if not body.get("stream"):
            text = "".join(self.tokens)
            return web.json_response(
                {"id": cid, "object": "chat.completion", "created": created, "model": MODEL,
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": 5, "completion_tokens": self.completion_tokens,
                           "total_tokens": 5 + self.completion_tokens}},
                headers=self._headers(sid))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           **self._headers(sid)})
        await resp.prepare(request)

        async def send(obj):
            await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

        def chunk(delta, finish=None):
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": MODEL,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        await send(chunk({"role": "assistant", "content": ""}))
        for i, tok in enumerate(self.tokens):
            if i == self.drop_after:
                request.transport.close()  # as if the router died mid-answer
                return resp
            await asyncio.sleep(self.token_delay)
            await send(chunk({"content": tok}))
        await send(chunk({}, "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            await send({"id": cid, "object": "chat.completion.chunk", "created": created, "model": MODEL, "choices": [],
                        "usage": {"prompt_tokens": 5, "completion_tokens": self.completion_tokens,
                                  "total_tokens": 5 + self.completion_tokens}})
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/status", self.get_status)
        app.router.add_get("/status/public", self.get_status)  # the page refreshes from the public view
        app.router.add_get("/", self.index)
        return app

    # --- running in a background thread ---------------------------------
    def _run(self):
        self._loop = asyncio.new_event_loop()
        runner = web.AppRunner(self.app())
        try:
            self._loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", self.port)
            self._loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
        except BaseException as e:  # e.g. port in use: report it from __enter__
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())
        self._loop.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "FakeRouter":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake router did not start")
        if self._error:
            raise self._error
        return self

    def __exit__(self, *exc):
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


if __name__ == "__main__":
    import sys
    with FakeRouter(port=int(sys.argv[1]) if len(sys.argv) > 1 else 8000, token_delay=0.05) as srv:
        print(f"fake mlxmoe router on {srv.url} (Ctrl-C to stop)")
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
